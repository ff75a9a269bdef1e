"""The ban list that decides which nodes the controller may place on (pure: time passed in)."""

from orchestrator.health import BanList


def test_repeated_failures_ban_longer_up_to_the_cap_and_are_forgiven_later():
    b = BanList(initial_s=2, max_s=8, forgive_s=100)
    assert b.ban("n", 0, "dead").backoff_s == 2
    assert b.banned("n", 1) and not b.banned("n", 2)
    assert b.down(1) == {"n": "dead"}
    b.readmit("n")
    assert b.down(3) == {}
    assert b.ban("n", 10, "dead again").backoff_s == 4  # within forgive_s of the last failure
    b.readmit("n")
    assert b.ban("n", 20, "x").backoff_s == 8
    b.readmit("n")
    assert b.ban("n", 30, "x").backoff_s == 8  # capped
    b.readmit("n")
    assert b.ban("n", 200, "x").backoff_s == 2  # healthy for longer than forgive_s: starts again


def test_a_probe_that_finds_the_node_still_down_waits_the_same_backoff_again():
    b = BanList(initial_s=2)
    b.ban("n", 0, "no answer")
    assert b.expired(1) == [] and b.expired(2) == ["n"]
    b.extend("n", 2)
    assert b.banned("n", 3.9) and not b.banned("n", 4)
    assert b.bans["n"].backoff_s == 2 and b.down(3) == {"n": "no answer"}
    b.readmit("n")
    assert b.expired(10) == [] and b.down(10) == {}


def test_a_pool_limits_the_nodes_a_service_uses():
    from orchestrator.ray_nodes import NODE_RESOURCE, usable_nodes
    from workers.profile import POOL_LABEL

    def node(i, alive=True, pool=None, marked=True):
        return {"NodeID": f"n{i}", "Alive": alive, "Resources": {NODE_RESOURCE: 1} if marked else {"CPU": 1},
                "Labels": {POOL_LABEL: pool} if pool else {}}

    nodes = [node(0, pool="a"), node(1, pool="b"), node(2, pool="a", alive=False), node(3), node(4, pool="a", marked=False)]
    assert [n["NodeID"] for n in usable_nodes(nodes)] == ["n0", "n1", "n3"]  # marked edgeweave nodes, alive
    assert [n["NodeID"] for n in usable_nodes(nodes, "a")] == ["n0"]
    assert usable_nodes(nodes, "c") == []
    assert [n["NodeID"] for n in usable_nodes([node(5, marked=False), node(6, pool="a", marked=False)], "a")] == ["n6"]


def test_dead_nodes_from_a_health_snapshot():
    from orchestrator.health import dead_nodes

    nodes = ["a", "b", "c", "d"]
    dead = dead_nodes(nodes, ray_alive={"a", "b", "c"}, answers={"a": True, "b": False, "c": True}, suspect="c",
                      deadline_passed=True, step_timeout_s=30.0)
    assert dead == {"d": "Ray reports the node dead", "b": "no answer to a health check",
                    "c": "a step passed its 30s deadline"}
    # Ray cannot say (GCS away): the health checks decide; a slow step alone takes out nobody
    assert dead_nodes(nodes, None, {"a": True, "b": True, "c": True, "d": True}, "c", False, 30.0) == {}
    assert dead_nodes(["a"], None, {}, None, False, 30.0) == {"a": "no answer to a health check"}
