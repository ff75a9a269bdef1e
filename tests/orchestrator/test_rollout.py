"""What each node is told to load (pure): stages, the relay chain, KV budgets, MoE experts elsewhere."""

from orchestrator.planner import ExpertHost, Placement, Stage
from orchestrator.replacement import replacement_maps
from orchestrator.rollout import RolloutOptions, held_units, nodes_of, shard_spec
from workers.residency import PathStats


def _placement(hosts=()) -> Placement:
    stages = (Stage("a", "cpu", 0, 2, True, False, 100, 10, 1, 1000, 1.0),
              Stage("b", "cpu", 2, 4, False, True, 100, 20, 1, 1000, 1.0))
    return Placement(3, "v3-abc", "m", 4, 64, 2, stages, 2.0, 2, tuple(hosts))


ADDR = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}


def test_dense_shard_specs_chain_the_stages():
    p = _placement()
    o = RolloutOptions("/ck", keep_awake=False)
    a, b = shard_spec(p, "a", ADDR, 2, o), shard_spec(p, "b", ADDR, 3, o)
    assert (a.first_layer, a.last_layer, a.embed, a.head, a.next_stage) == (0, 2, True, False, "127.0.0.1:2")
    assert (b.first_layer, b.last_layer, b.embed, b.head, b.next_stage) == (2, 4, False, True, "")
    assert a.kv_budget_bytes == 10 and b.kv_budget_bytes == 20 and b.threads == 3 and not a.keep_awake
    assert a.placement_id == b.placement_id == "v3-abc" and a.max_context == 64 and not a.experts and not a.redis_url
    assert nodes_of(p) == ["a", "b"]


def test_moe_specs_name_the_remote_experts_and_their_hosts():
    p = _placement([ExpertHost("c", ((1, 3), (2, 3)), 10)])
    o = RolloutOptions("/ck", redis_url="redis://127.0.0.1:1/0", model_name="m", moe_experts=4)
    a, b, c = (shard_spec(p, n, ADDR, 1, o) for n in "abc")
    assert [(u.layer, u.expert, u.address) for u in a.experts] == [(1, 3, "127.0.0.1:3")]
    assert [(u.layer, u.expert, u.address) for u in b.experts] == [(2, 3, "127.0.0.1:3")]
    assert [(u.layer, u.expert) for u in c.hosted] == [(1, 3), (2, 3)] and c.last_layer == 0
    assert a.fast_slots == 2 and a.redis_url.startswith("redis://") and nodes_of(p) == ["a", "b", "c"]
    assert held_units(p, "a", 4) == {(l, e) for l in (0, 1) for e in range(4)} - {(1, 3)}
    assert held_units(p, "c", 4) == {(1, 3), (2, 3)}


def test_replacement_moves_a_hot_expert_up_and_keeps_near_ties():
    st = PathStats(2, 4)
    st.act[0] = [0, 1, 50, 0]  # expert 2 is hot at layer 0
    st.act[1] = [10, 9, 0, 0]  # layer 1: the resident pair is already the best
    held = {"a": {(l, e) for l in (0, 1) for e in range(4)}}
    maps = replacement_maps(st, {"a": {0: [0, 1], 1: [0, 1]}}, held, 2, 0.4)
    assert maps == {"a": {0: [1, 2]}}  # 2 replaces the coldest resident; layer 1 unchanged, not sent
    # an expert the node does not hold is never made fast there
    assert replacement_maps(st, {"a": {0: [0, 1]}}, {"a": {(0, 0), (0, 1)}}, 2, 0.4) == {}
    # a layer with no counts keeps its tier
    assert replacement_maps(PathStats(2, 4), {"a": {0: [0, 1]}}, held, 2, 0.4) == {}
