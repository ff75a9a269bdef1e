"""Relayed steps (a chain) over real gRPC on 127.0.0.1: each stage passes its output to the next, the
last answers on the front end's Subscribe call; refusals and dead stages surface at once."""

import time

import grpc
import pytest
import torch

from workers.profile import NodeProfile
from orchestrator.streams import ChainFailed, RelayChain, RelayUnsupported
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from quant.checkpoint import load_checkpoint
from quant.generate import SamplingConfig, generate_tokens
from workers.decode import make_decoder
from tests.conftest import tiny_checkpoint
from workers.server import start_worker_server
from workers.wire import GRPC_OPTIONS, encode_tensor

PID = "v1-relay"
KV = 4 * 2 * 2 * 2 * 16 * 4 * 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", layers=6)


def _chain(ckpt, cuts=((0, 2), (2, 4), (4, 6))):
    """Workers for consecutive layer ranges, each told the next one's address -> (servers, stubs, addresses)."""
    started = [start_worker_server(NodeProfile(f"n{a}", "cpu", 10**9, 1.0)) for a, _ in cuts]
    addrs = [f"127.0.0.1:{port}" for _, port, _ in started]
    stubs = []
    for k, ((first, last), addr) in enumerate(zip(cuts, addrs)):
        stub = pb_grpc.WorkerServiceStub(grpc.insecure_channel(addr, options=GRPC_OPTIONS))
        spec = pb.ShardSpec(checkpoint=str(ckpt), first_layer=first, last_layer=last, embed=k == 0,
                            head=k == len(cuts) - 1, placement_id=PID, kv_budget_bytes=KV, max_context=64,
                            next_stage=addrs[k + 1] if k + 1 < len(cuts) else "")
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=60)
        stubs.append(stub)
    return [s for s, _, _ in started], stubs, addrs


@pytest.fixture(scope="module")
def chain(ckpt):
    servers, stubs, addrs = _chain(ckpt)
    yield stubs, addrs
    for s in servers:
        s.stop(0)


def _req(sid: str, pos: int, ids: list[int], step: int = 0) -> pb.ForwardRequest:
    return pb.ForwardRequest(placement_id=PID, items=[pb.StepItem(
        session_id=sid, position=pos, max_tokens=32, token_ids=encode_tensor(torch.tensor(ids, dtype=torch.int64)),
        step=step)])


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_relayed_steps_generate_what_the_single_process_model_does(ckpt, chain):
    stubs, addrs = chain
    model, _, _ = load_checkpoint(ckpt)
    prompt = [5, 9, 33, 100, 7]
    ref = list(generate_tokens(make_decoder(model), prompt, SamplingConfig(max_new_tokens=10), set()))
    relay = RelayChain(addrs, PID)
    try:
        got, x, pos = [], prompt, 0
        for step in range(10):
            event = relay.step(_req("greedy", pos, x, step), 10.0)
            assert len(event.stage_ms) == 3 and all(ms > 0 for ms in event.stage_ms)
            assert event.relay_bytes > 64 * 4 * 2  # two hidden states of 64 floats went stage to stage
            got.append(int(event.result.results[0].token))
            pos, x = pos + len(x), [got[-1]]
        assert got == ref
    finally:
        relay.close()
    for stub in stubs:
        assert stub.Release(pb.ReleaseRequest(session_ids=["greedy"]), timeout=5).released == 1


def test_steps_of_different_sessions_in_flight_at_once_each_match_the_single_process(ckpt, chain):
    """A pipeline: two sessions' steps are sent before either comes back (the stages compute them at
    the same time); each session's tokens are the single-process model's."""
    stubs, addrs = chain
    model, _, _ = load_checkpoint(ckpt)
    prompts = {"pa": [5, 9, 33, 100, 7], "pb": [42, 3, 3]}
    ref = {sid: list(generate_tokens(make_decoder(model), p, SamplingConfig(max_new_tokens=8), set()))
           for sid, p in prompts.items()}
    relay = RelayChain(addrs, PID)
    try:
        state = {sid: (0, p, []) for sid, p in prompts.items()}  # position, next input, tokens so far
        for step in range(8):
            seqs = {relay.send(_req(sid, pos, x, step), 10.0): sid for sid, (pos, x, _) in state.items()}
            assert relay.in_flight == 2
            while seqs:
                seq, event = relay.receive()
                sid = seqs.pop(seq)
                assert event.result.results[0].session_id == sid
                pos, x, got = state[sid]
                got.append(int(event.result.results[0].token))
                state[sid] = (pos + len(x), [got[-1]], got)
            assert relay.in_flight == 0
        assert {sid: got for sid, (_, _, got) in state.items()} == ref
        with pytest.raises(RuntimeError, match="in flight"):
            relay.receive()
    finally:
        relay.close()
        for stub in stubs:
            stub.Release(pb.ReleaseRequest(session_ids=list(prompts)), timeout=5)


def test_a_refusal_with_other_steps_in_flight_fails_them_all_and_the_chain_serves_on(chain):
    stubs, addrs = chain
    relay = RelayChain(addrs, PID)
    try:
        relay.send(_req("ok", 0, [5, 9]), 10.0)
        relay.send(_req("bad", 3, [7]), 10.0)  # position 3 of a session no stage holds: refused by stage 0
        t0 = time.monotonic()
        with pytest.raises(ChainFailed) as e:
            while relay.in_flight:
                relay.receive()
        assert e.value.stage == 0 and e.value.code == grpc.StatusCode.NOT_FOUND
        assert relay.in_flight == 0 and time.monotonic() - t0 < 2.0  # every step in flight is given up at once
        assert relay.step(_req("fresh", 0, [5, 9]), 10.0).result.results[0].session_id == "fresh"
    finally:
        relay.close()
        for stub in stubs:
            stub.Release(pb.ReleaseRequest(session_ids=["ok", "bad", "fresh"]), timeout=5)


def test_a_step_refused_down_the_chain_is_reported_by_that_stage_and_the_chain_serves_on(chain):
    stubs, addrs = chain
    relay = RelayChain(addrs, PID)
    try:
        relay.step(_req("gone", 0, [5, 9]), 10.0)
        stubs[1].Release(pb.ReleaseRequest(session_ids=["gone"]), timeout=5)  # stage 1 forgets the session
        t0 = time.monotonic()
        with pytest.raises(ChainFailed) as e:
            relay.step(_req("gone", 2, [7], step=1), 10.0)
        assert e.value.stage == 1 and e.value.code == grpc.StatusCode.NOT_FOUND and "gone" in e.value.details
        assert time.monotonic() - t0 < 2.0  # reported, not found out at the deadline
        assert relay.step(_req("fresh", 0, [5, 9]), 10.0).result.results[0].session_id == "fresh"
        # every failure drops the front end's calls and the next step subscribes again: more times in
        # a row than a worker has Subscribe slots, without running out of them
        for _ in range(6):
            with pytest.raises(ChainFailed):
                relay.step(_req("fresh", 0, [5]), 10.0)  # position 0 again: refused by stage 0
        assert relay.step(_req("fresh", 2, [7], step=1), 10.0).result.results[0].session_id == "fresh"
    finally:
        relay.close()
        for stub in stubs:
            stub.Release(pb.ReleaseRequest(session_ids=["gone", "fresh"]), timeout=5)


def test_stages_that_do_not_chain_in_the_front_ends_order_are_not_relayed_to(chain):
    """The ready events say where each stage passes steps on; a front end whose order differs
    (or whose stages were loaded without next_stage) is told before any step is sent."""
    stubs, addrs = chain
    relay = RelayChain([addrs[0], addrs[2], addrs[1]], PID)
    try:
        with pytest.raises(RelayUnsupported, match="passes steps on to"):
            relay.step(_req("never", 0, [5]), 10.0)
    finally:
        relay.close()
    assert all(s.Release(pb.ReleaseRequest(session_ids=["never"]), timeout=5).released == 0 for s in stubs)


def test_bad_relay_input_gets_a_clear_status(ckpt, chain):
    stubs, addrs = chain
    relayed = _req("x", 0, [5])
    relayed.relay_id = "r"
    code, msg = _code(lambda: stubs[0].Forward(relayed, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ForwardStream" in msg
    for req, want in ((pb.SubscribeRequest(placement_id=PID, relay_id=""), grpc.StatusCode.INVALID_ARGUMENT),
                      (pb.SubscribeRequest(placement_id=PID, relay_id="r" * 65), grpc.StatusCode.INVALID_ARGUMENT),
                      (pb.SubscribeRequest(placement_id="v0-old", relay_id="r"), grpc.StatusCode.FAILED_PRECONDITION)):
        code, _ = _code(lambda: next(iter(stubs[1].Subscribe(req, timeout=5))))
        assert code == want
    # a next stage on the last stage, or one that is not host:port, is refused at load
    for k, bad in ((2, addrs[0]), (0, "http://evil/x")):
        spec = pb.ShardSpec(checkpoint=str(ckpt), first_layer=0, last_layer=2, embed=True, head=k == 2,
                            placement_id=PID, kv_budget_bytes=KV, max_context=64, next_stage=bad)
        code, msg = _code(lambda: stubs[k].LoadShard(pb.LoadShardRequest(shard=spec), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "next_stage" in msg
    # a refused relayed step with no Subscribe call to report it on ends the stream with the status
    relayed.placement_id = "v0-old"
    code, msg = _code(lambda: list(stubs[0].ForwardStream(iter([relayed]), timeout=5)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "v0-old" in msg
    assert stubs[0].Health(pb.WorkerHealthRequest(), timeout=5).placement_id == PID  # still serving


def test_a_dead_stage_fails_the_relayed_step_at_once_not_at_the_deadline(ckpt):
    servers, stubs, addrs = _chain(ckpt, ((0, 3), (3, 6)))
    relay = RelayChain(addrs, PID)
    try:
        relay.step(_req("s", 0, [5, 9]), 10.0)
        servers[1].stop(0)  # the last stage's process goes away between steps
        t0 = time.monotonic()
        with pytest.raises(ChainFailed) as e:
            relay.step(_req("s", 2, [7], step=1), 20.0)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
        assert time.monotonic() - t0 < 5.0
    finally:
        relay.close()
        servers[0].stop(0)


def test_calls_near_the_end_of_their_lifetime_are_renewed_between_steps(chain):
    """The chain's calls have a lifetime; once a step could outlive it the chain says so (a pipelining
    caller then lets its steps come back first), and the next send with none in flight opens new calls."""
    stubs, addrs = chain
    relay = RelayChain(addrs, PID, lifetime_s=7.0)  # a 1 s step may outlive it 1 s after opening
    try:
        assert relay.step(_req("life", 0, [5, 9]), 1.0).result.results[0].session_id == "life"
        assert not relay.expiring(1.0)
        opened = relay._opened
        time.sleep(1.2)
        assert relay.expiring(1.0)
        relay.send(_req("life", 2, [7], step=1), 1.0)
        assert relay._opened > opened  # renewed: no step was in flight
        assert relay.receive()[1].result.results[0].session_id == "life"
    finally:
        relay.close()
        for stub in stubs:
            stub.Release(pb.ReleaseRequest(session_ids=["life"]), timeout=5)
