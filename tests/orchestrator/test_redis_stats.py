"""Statistics in a real Redis server (a private valkey/redis-server started by the test)."""

import time

import numpy as np
import pytest

from orchestrator.redis_server import RedisServer
from workers.residency import PathStats
from workers.route_stats import StatsRecorder, connect, key, read_stats, route_deltas


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as s:
        yield s


ROUTES = [[(0, 1), (2, 3), (4, 5)], [(0, 2), (2, 3), (5, 6)], [(1, 7), (3, 4), (4, 5)]]


def _expected() -> PathStats:
    st = PathStats(3, 8)
    prev = None
    for r in ROUTES:
        st.observe(r, prev)
        prev = r
    return st


def test_route_deltas_keys_follow_the_schema():
    d = route_deltas("my model", 7, [(0, 1), (2, 3)], [(0, 1), (1, 3)], [0, 1])
    assert d[("edgeweave:v1:my_model:act:1:7", "3")] == 1
    assert d[("edgeweave:v1:my_model:l1:1:7", "0,2")] == 1
    assert d[("edgeweave:v1:my_model:t1:0:7", "1,0")] == 1
    assert d[("edgeweave:v1:my_model:tokens:7", None)] == 1


def test_counts_land_in_redis_and_read_back(server):
    rec = StatsRecorder(server.url, "m-land", 3, 8, flush_interval_s=0.05)
    prev = None
    for r in ROUTES:
        rec.record(r, prev, range(3))
        prev = r
    rec.close()
    c = rec.counters()
    assert c.flushed == c.recorded and c.buffered == 0 and c.lost == 0
    client = connect(server.url)
    w = rec.window()
    assert client.hget(key("m-land", "act", 2, w), "5") == "3"
    assert client.get(key("m-land", "tokens", w)) == "3"
    assert client.hget(key("m-land", "meta"), "experts") == "8"
    st = read_stats(client, "m-land", 3, 8)
    ref = _expected()
    assert np.array_equal(st.act, ref.act)
    for k in PathStats.KINDS:
        assert np.array_equal(st.trans[k], ref.trans[k])


def test_redis_down_buffers_and_flushes_when_back(tmp_path):
    srv = RedisServer(tmp_path / "r").start()
    try:
        rec = StatsRecorder(srv.url, "m-outage", 3, 8, flush_interval_s=0.05)
        rec.record(ROUTES[0], None, range(3))
        deadline = time.time() + 10
        while rec.counters().buffered and time.time() < deadline:
            time.sleep(0.05)
        srv.stop()  # Redis goes away: counts keep arriving
        rec.record(ROUTES[1], ROUTES[0], range(3))
        rec.record(ROUTES[2], ROUTES[1], range(3))
        time.sleep(0.5)
        c = rec.counters()
        assert c.buffered > 0 and c.flush_errors > 0 and not c.redis_up
        srv.start()  # back, with its append-only file
        deadline = time.time() + 15
        while rec.counters().buffered and time.time() < deadline:
            time.sleep(0.1)
        rec.close()
        c = rec.counters()
        assert c.lost == 0 and c.buffered == 0 and c.flushed == c.recorded
        st = read_stats(connect(srv.url), "m-outage", 3, 8)
        assert np.array_equal(st.act, _expected().act)  # nothing lost, the first batch survived the restart
    finally:
        srv.close()


def test_a_batch_whose_reply_was_lost_is_counted_once(server):
    """Redis applied a batch but the connection dropped before its reply: the recorder sends the
    same batch again, and Redis must not count it twice (the outage test above saw exactly that)."""
    import redis

    rec = StatsRecorder(server.url, "m-once", 3, 8, flush_interval_s=3600)  # flushes only when called
    real, sent = rec._client.eval, []

    def reply_lost_once(*args):
        real(*args)
        sent.append(args)
        if len(sent) == 1:
            raise redis.ConnectionError("connection closed before the reply")

    rec._client.eval = reply_lost_once
    prev = None
    for r in ROUTES:
        rec.record(r, prev, range(3))
        prev = r
    assert rec.flush() is False and rec.counters().buffered > 0  # not acknowledged: kept
    assert rec.flush() is True
    assert len(sent) == 2 and sent[0][2] == sent[1][2]  # the same batch id both times
    c = rec.counters()
    assert c.flushed == c.recorded and c.buffered == 0
    st = read_stats(connect(server.url), "m-once", 3, 8)
    ref = _expected()
    assert np.array_equal(st.act, ref.act)
    for k in PathStats.KINDS:
        assert np.array_equal(st.trans[k], ref.trans[k])
    rec.close()
