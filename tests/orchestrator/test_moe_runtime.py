"""MoE end to end: a tiny random Mixtral (8 experts, top-2) on a real local 3-node Ray cluster,
with some experts living on other nodes than their layer, statistics in a real Redis server."""

import time

import pytest

from orchestrator.client import stream_generate
from orchestrator.controller import ServeOptions, start_controller
from orchestrator.local import LocalCluster, LocalNode
from orchestrator.planner import Placement
from orchestrator.redis_server import RedisServer
from workers.route_stats import connect, key
from quant.checkpoint import load_checkpoint
from quant.generate import SamplingConfig, generate_tokens
from workers.decode import make_decoder
from tests.conftest import tiny_checkpoint

BUDGETS = (700_000, 650_000, 600_000)
PROMPTS = ["t5 t9 t33 t100 t7", "t200 t3 t3 t18", "t42 t43"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("moe") / "tinymix", arch="mixtral", layers=4, init_range=0.2)
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        with LocalCluster([LocalNode(b, cpus=1) for b in BUDGETS]):
            import ray

            opts = ServeOptions(str(ckpt), context=128, batch=4, prefill_chunk=32, remote_experts=2, fast_slots=2,
                                redis_url=redis.url, prefetch=False, replace_interval_s=0)
            actor, address = start_controller(opts)
            yield ckpt, actor, address, redis
            ray.get(actor.shutdown.remote(), timeout=30)
    finally:
        redis.close()


def _reference(ckpt, prompt: str, n: int) -> list[int]:
    model, tok, _ = load_checkpoint(ckpt)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return [t for t in generate_tokens(make_decoder(model), ids, SamplingConfig(max_new_tokens=n), {tok.eos_token_id})
            if t != tok.eos_token_id]


def _generate(address, prompt, n) -> list[int]:
    return [t for m in stream_generate(address, prompt, n, timeout_s=60) for t in m.token_ids]


def _wait_flushed(actor, timeout_s: float = 20.0) -> dict:
    import ray

    deadline = time.time() + timeout_s
    while True:
        st = ray.get(actor.worker_stats.remote())
        if all(v["stats_buffered"] == 0 for v in st.values()) or time.time() > deadline:
            return st
        time.sleep(0.2)


def test_output_identical_with_experts_on_other_nodes(served):
    import ray

    ckpt, actor, address, _ = served
    p = Placement.from_dict(ray.get(actor.placement_dict.remote()))
    assert len(p.stages) >= 2 and p.expert_hosts, "some experts live away from their layer"
    assert len({s.node_id for s in p.stages} | {h.node_id for h in p.expert_hosts}) == 3
    assert all(s.used_bytes <= s.budget_bytes for s in p.stages)
    for prompt in PROMPTS[:2]:
        assert _generate(address, prompt, 20) == _reference(ckpt, prompt, 20)
    state = ray.get(actor.expert_state.remote())
    assert sum(v["misses"] for v in state.values()) > 0 and sum(v["hits"] for v in state.values()) > 0


def test_statistics_land_in_redis_with_documented_keys(served):
    _, actor, address, redis = served
    _generate(address, PROMPTS[2], 8)
    _wait_flushed(actor)
    c = connect(redis.url)
    model = "tinymix"
    windows = [int(w) for w in c.zrange(key(model, "windows"), 0, -1)]
    assert windows
    w = windows[-1]
    for layer in range(4):
        assert sum(int(v) for v in c.hgetall(key(model, "act", layer, w)).values()) > 0
    assert c.hgetall(key(model, "l1", 1, w)) and c.hgetall(key(model, "l2", 2, w)) and c.hgetall(key(model, "t1", 0, w))
    assert int(c.get(key(model, "tokens", w))) > 0
    assert c.hget(key(model, "meta"), "experts") == "8"
    # k = 2 experts per token at every layer
    assert sum(int(v) for v in c.hgetall(key(model, "act", 3, w)).values()) == 2 * int(c.get(key(model, "tokens", w)))
    c.close()


def test_replacement_moves_the_hottest_expert_to_the_fast_tier(served):
    import numpy as np
    import ray

    from workers.route_stats import read_stats

    _, actor, address, redis = served
    _generate(address, PROMPTS[0], 16)
    _wait_flushed(actor)
    before = ray.get(actor.expert_state.remote())
    sent = ray.get(actor.replace_now.remote())
    after = ray.get(actor.expert_state.remote())
    st = read_stats(connect(redis.url), "tinymix", 4, 8)
    moved_hot = 0
    for node, layers in sent.items():
        assert after[node]["map_version"] > before[node]["map_version"]
        for layer, experts in layers.items():
            held_fast = set(after[node]["fast"][layer])
            assert held_fast == set(experts)
            cand = [e for e in range(8) if e in held_fast or e not in before[node]["fast"][layer]]
            hottest = max(cand, key=lambda e: st.act[layer, e])
            moved_hot += hottest in held_fast and hottest not in before[node]["fast"][layer]
    assert moved_hot > 0, "no hot expert moved up"
    # a second round on the same statistics changes nothing (hysteresis: no thrashing)
    assert ray.get(actor.replace_now.remote()) == {}
    assert np.isfinite(st.act).all()


def test_redis_stopped_mid_run_loses_no_request_and_no_counts(served):
    import ray

    ckpt, actor, address, redis = served
    redis.stop()
    try:
        got = _generate(address, PROMPTS[1], 12)  # serving goes on
        assert got == _reference(ckpt, PROMPTS[1], 12)
        st = ray.get(actor.worker_stats.remote())
        assert sum(v["stats_buffered"] for v in st.values()) > 0
    finally:
        redis.start()
    st = _wait_flushed(actor, 30)
    assert all(v["stats_buffered"] == 0 and v["stats_lost"] == 0 for v in st.values())
    # every count any worker recorded is in Redis (appendonly: the counts from before the stop too)
    c = connect(redis.url)
    total = 0
    for k in c.scan_iter(match=key("tinymix", "*")):
        if k.endswith(":meta") or k.endswith(":windows") or ":batch:" in k:  # not counts
            continue
        total += int(c.get(k)) if c.type(k) == "string" else sum(int(v) for v in c.hgetall(k).values())
    assert total == sum(v["stats_recorded"] for v in st.values())
