"""The planner on plain data: a typed manifest and node profiles."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.planner import Placement, PlacementError, PlanOptions, format_placement, plan
from quant.manifest import Manifest, parse_bytes
from workers.profile import NodeProfile, load_profiles

MB = 1_000_000


def manifest(layers=12, d=256, inter=1024, vocab=8000, kv_heads=2, heads=4, tied=True) -> Manifest:
    """A Llama-shaped W8A8 manifest: int8 weights, float32 scales and norms."""
    t: dict = {}

    def lin(name, n, k):
        t[f"{name}.qweight"] = {"shape": [n, k], "dtype": "int8"}
        t[f"{name}.w_scale"] = {"shape": [n], "dtype": "float32"}

    hd = d // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, (rows, cols) in {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv_heads * hd, d),
                                "self_attn.v_proj": (kv_heads * hd, d), "self_attn.o_proj": (d, d),
                                "mlp.gate_proj": (inter, d), "mlp.up_proj": (inter, d),
                                "mlp.down_proj": (d, inter)}.items():
            lin(p + n, rows, cols)
        t[p + "input_layernorm.weight"] = t[p + "post_attention_layernorm.weight"] = {"shape": [d], "dtype": "float32"}
    lin("lm_head", vocab, d)
    t["model.norm.weight"] = {"shape": [d], "dtype": "float32"}
    if tied:
        t["model.embed_tokens.col_scale"] = {"shape": [d], "dtype": "float32"}
    else:
        lin("model.embed_tokens", vocab, d)
    cfg = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": d, "intermediate_size": inter,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab}
    return Manifest.from_dict({"model_type": "llama", "model_config": cfg, "tensors": t, "files": {}})


OPTS = PlanOptions(context=512, batch=2, prefill_chunk=64, hop_ms=0.5)


def node(name, budget_mb, gops=4.0, tier="cpu"):
    return NodeProfile(name, tier, int(budget_mb * MB), gops)


def _check_valid(p: Placement, profiles, layers):
    budgets = {n.node_id: n.budget_bytes for n in profiles}
    assert [s.first for s in p.stages][0] == 0 and p.stages[-1].last == layers
    assert all(a.last == b.first for a, b in zip(p.stages, p.stages[1:])), "ranges must be contiguous"
    assert p.stages[0].embed and p.stages[-1].head
    assert len({s.node_id for s in p.stages}) == len(p.stages)
    for s in p.stages:
        assert s.used_bytes <= budgets[s.node_id], f"{s.node_id} over budget"


def test_everything_on_one_node_when_it_fits_and_hops_cost():
    m = manifest()
    p = plan(m, [node("big", 400), node("small", 100)], OPTS)
    assert [(s.node_id, s.first, s.last) for s in p.stages] == [("big", 0, 12)]


def test_heterogeneous_budgets_split_by_memory_and_stay_under_budget():
    m = manifest()
    profiles = [node("a", 18), node("b", 12), node("c", 10)]
    p = plan(m, profiles, OPTS)
    _check_valid(p, profiles, 12)
    assert len(p.stages) >= 2
    # equal speeds: any split takes the same time; the one chosen leaves the most headroom
    fullest = max(s.used_bytes / s.budget_bytes for s in p.stages)
    assert fullest < 0.95


def test_slow_node_gets_fewer_layers_or_none():
    m = manifest()
    fast_enough = [node("fast1", 20, gops=8), node("fast2", 20, gops=8), node("slow", 40, gops=0.5)]
    p = plan(m, fast_enough, OPTS)
    assert "slow" not in {s.node_id for s in p.stages}, "a slow node is left out when the others hold the model"
    tight = [node("fast", 20, gops=8), node("slow", 40, gops=0.5)]
    p = plan(m, tight, OPTS)
    layers = {s.node_id: s.last - s.first for s in p.stages}
    assert 0 < layers["slow"] < layers["fast"], "the slow node only takes what the fast one cannot hold"
    fast = next(s for s in p.stages if s.node_id == "fast")
    assert fast.used_bytes > 0.85 * fast.budget_bytes, "the fast node is filled first"
    est = {s.node_id: s.est_ms_per_token / (s.last - s.first) for s in p.stages}
    assert est["slow"] > est["fast"]


def test_node_too_small_for_any_layer_gets_none():
    m = manifest()
    profiles = [node("a", 40), node("tiny", 0.5)]
    p = plan(m, profiles, OPTS)
    assert {s.node_id for s in p.stages} == {"a"}


def test_model_too_big_says_how_many_bytes_are_missing():
    m = manifest()
    with pytest.raises(PlacementError, match=r"does not fit.*[\d,]+ bytes are missing") as e:
        plan(m, [node("a", 5), node("b", 5)], OPTS)
    missing = int(str(e.value).split(" bytes are missing")[0].split("; ")[-1].replace(",", ""))
    # exactly enough: adding the missing bytes to the largest node makes it fit, one byte less does not
    plan(m, [node("a", 5 + missing / MB), node("b", 5)], OPTS)
    with pytest.raises(PlacementError):
        plan(m, [NodeProfile("a", "cpu", 5 * MB + missing - 1, 4.0), node("b", 5)], OPTS)


def test_kv_cache_for_context_and_batch_is_counted():
    m = manifest()
    small = plan(m, [node("a", 100)], PlanOptions(context=128, batch=1))
    big = plan(m, [node("a", 100)], PlanOptions(context=512, batch=4))
    per_token_layer = 2 * 2 * 64 * 4  # K and V, kv_heads x head_dim float32
    assert big.stages[0].kv_bytes - small.stages[0].kv_bytes == 12 * per_token_layer * (512 * 4 - 128)


def test_table_lists_every_stage():
    m = manifest()
    p = plan(m, [node("a", 18), node("b", 12), node("c", 10)], OPTS)
    text = format_placement(p)
    for s in p.stages:
        assert s.node_id in text and f"{s.first}-{s.last - 1}" in text
    assert Placement.from_dict(p.to_dict()) == p


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.floats(0.5, 16)), min_size=1, max_size=4))
def test_any_placement_respects_every_budget(nodes):
    m = manifest(layers=8)
    profiles = [node(f"n{i}", b, g) for i, (b, g) in enumerate(nodes)]
    try:
        p = plan(m, profiles, OPTS)
    except PlacementError as e:
        assert "bytes are missing" in str(e)
        return
    _check_valid(p, profiles, 8)


def test_profiles_file_and_sizes(tmp_path):
    f = tmp_path / "nodes.json"
    f.write_text('[{"node_id": "a", "budget_bytes": "300MB", "int8_gops": 3.5}, {"budget_bytes": 1024, "tier": "gpu"}]')
    a, b = load_profiles(f)
    assert (a.budget_bytes, a.int8_gops, b.node_id, b.tier) == (300 * MB, 3.5, "node1", "gpu")
    assert parse_bytes("1.5GiB") == 3 * 2**29
    f.write_text('[{"node_id": "a", "budget": 3}]')
    with pytest.raises(ValueError, match="budget_bytes"):
        load_profiles(f)
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
