"""The fast-tier policies and the simulator, on small hand-made traces and the real one."""

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.experts import LRUPolicy, StatsPolicy, TokenRoute, TraceError, belady, load_trace, simulate, token_routes
from quant.manifest import fast_tier_fraction
from workers.residency import PathStats, StatsWeights, choose_resident
from orchestrator.moesim import SimConfig, run_sim

TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "moe" / "mixtral8x7b_gsm8k_routing.jsonl"


def _routes(seq: list[list[tuple[int, ...]]], sequence: int = 0) -> list[TokenRoute]:
    return [TokenRoute(sequence, t, tuple(r)) for t, r in enumerate(seq)]


def test_lru_counts_hits_and_loads():
    toks = _routes([[(0, 1)], [(0, 2)], [(1, 2)], [(3, 0)]])
    r = simulate(toks, LRUPolicy(1, 2), 2)
    # (0,1) 2 loads; (0,2): 0 hits, 2 loads evicting 1; (1,2): 2 hits, 1 loads evicting 0; (3,0): 2 loads
    assert (r.hits, r.loads, r.accesses) == (2, 6, 8)


def test_belady_is_optimal_on_a_small_case_and_beats_lru():
    toks = _routes([[(0,)], [(1,)], [(2,)], [(0,)], [(1,)], [(3,)], [(0,)], [(1,)]])
    opt, lru = belady(toks, 2), simulate(toks, LRUPolicy(1, 2), 2)
    # 2 evicts 1 (next used later than 0): 0 hits; 3 evicts 1 again (0 comes first): 0 hits
    assert opt.hits == 2
    assert lru.hits == 0 and opt.hit_rate > lru.hit_rate


def test_choose_resident_hysteresis():
    s = np.array([0.0, -0.1, -5.0, -0.05])
    assert choose_resident(s, frozenset(), 2, 0.5) == {0, 3}
    # 3 beats 1 by 0.05 < hysteresis: 1 stays; a large margin replaces it
    assert choose_resident(s, frozenset({0, 1}), 2, 0.5) == {0, 1}
    assert choose_resident(np.array([0.0, -2.0, -5.0, 0.0]), frozenset({0, 1}), 2, 0.5) == {0, 3}
    assert choose_resident(s, frozenset(), 2, 0.0, allowed=[2, 1]) == {1, 2}


def test_stats_learn_transitions_and_predict_them():
    # expert e at layer 0 is always followed by expert (e + 4) % 8 at layer 1
    st = PathStats(2, 8)
    for e in range(8):
        for _ in range(5):
            st.observe([(e,), ((e + 4) % 8,)], None)
    s = st.scores(1, StatsWeights(), l1=[3])
    assert int(np.argmax(s)) == 7


def test_stats_policy_prefetches_a_deterministic_path():
    # two alternating paths; after learning, every expert is prefetched in time
    path_a, path_b = [(0, 1), (2, 3), (4, 5)], [(6, 7), (0, 1), (2, 3)]
    toks = _routes([path_a if t % 2 == 0 else path_b for t in range(200)])
    st = PathStats(3, 8)
    r = simulate(toks, StatsPolicy(3, 4, st, StatsWeights(hysteresis=0.0)), 4)
    lru = simulate(toks, LRUPolicy(3, 4), 4)
    assert r.hit_rate > 0.95 and r.hit_rate >= lru.hit_rate


def test_load_trace_names_the_bad_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"layer": 0, "token_idx": 0, "experts": [1, 2]}) + "\n{not json\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2"):
        load_trace(p)
    p.write_text(json.dumps({"layer": 0, "token_idx": 0, "experts": [1, 1]}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:1"):
        load_trace(p)


def test_fast_tier_half_int8_is_under_40_percent_of_fp16():
    assert fast_tier_fraction(4096, 14336, 8, 4) <= 0.40
    assert fast_tier_fraction(64, 96, 8, 4) <= 0.40


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/data")
def test_real_trace_stats_beats_lru_on_held_out_problem():
    toks = token_routes(load_trace(TRACE))
    rep = run_sim([t for t in toks if t.sequence == 1], SimConfig(slots=4, policies=("lru", "stats", "belady")),
                  warm=[t for t in toks if t.sequence == 0])
    res = {r["policy"]: r for r in rep["results"]}
    assert res["stats"]["hit_rate"] >= 0.70
    assert res["stats"]["pct_of_belady"] >= 94
    assert res["stats"]["bytes_moved_per_token"] <= res["lru"]["bytes_moved_per_token"]
