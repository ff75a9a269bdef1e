"""WorkerService over real gRPC on 127.0.0.1: shards compose to the whole model; bad input is refused
with the right status and the server keeps serving."""

import grpc
import pytest
import torch

from workers.profile import NodeProfile
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from quant.checkpoint import load_checkpoint
from quant.generate import SamplingConfig, generate_tokens
from workers.decode import make_decoder
from tests.conftest import tiny_checkpoint
from workers.server import start_worker_server
from workers.wire import GRPC_OPTIONS, MAX_MESSAGE_BYTES, decode_activation, encode_activation, encode_tensor

PID = "v1-test"
D = 64  # tiny model hidden size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", layers=4)


@pytest.fixture(scope="module")
def workers(ckpt):
    """Two workers: layers [0, 2) with the embedding, [2, 4) with the head."""
    out = []
    for first, last in ((0, 2), (2, 4)):
        server, port, _ = start_worker_server(NodeProfile(f"n{first}", "cpu", 10**9, 1.0))
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        stub = pb_grpc.WorkerServiceStub(ch)
        spec = pb.ShardSpec(checkpoint=str(ckpt), first_layer=first, last_layer=last, embed=first == 0, head=last == 4,
                            placement_id=PID, kv_budget_bytes=4 * 2 * 2 * 2 * 16 * 4 * 64, max_context=64)
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=60)
        out.append((server, stub))
    yield [s for _, s in out]
    for server, _ in out:
        server.stop(0)


def _step(workers, sid, pos, ids, max_tokens=32, quantize=False, step=0):
    first = pb.StepItem(session_id=sid, position=pos, max_tokens=max_tokens,
                        token_ids=encode_tensor(torch.tensor(ids, dtype=torch.int64)))
    r = workers[0].Forward(pb.ForwardRequest(placement_id=PID, items=[first], quantize_output=quantize), timeout=10)
    second = pb.StepItem(session_id=sid, position=pos, max_tokens=max_tokens, hidden=r.results[0].hidden, step=step)
    return workers[1].Forward(pb.ForwardRequest(placement_id=PID, items=[second]), timeout=10).results[0].token


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_two_shards_generate_what_the_single_process_model_does(ckpt, workers):
    model, _, _ = load_checkpoint(ckpt)
    prompt = [5, 9, 33, 100, 7]
    ref = list(generate_tokens(make_decoder(model), prompt, SamplingConfig(max_new_tokens=12), set()))
    got, x, pos = [], prompt, 0
    for step in range(12):
        tok = _step(workers, "greedy", pos, x, step=step)
        got.append(tok)
        pos, x = pos + len(x), [tok]
    assert got == ref
    assert workers[0].Release(pb.ReleaseRequest(session_ids=["greedy"]), timeout=5).released == 1


def test_int8_wire_activation_is_close_and_four_times_smaller():
    h = torch.randn(3, 576) * 4
    dense, quant = encode_activation(h, False), encode_activation(h, True)
    back = decode_activation(quant, "h", 576, 8)
    assert quant.ByteSize() < dense.ByteSize() / 3.5
    assert float((back - h).abs().max()) <= float(h.abs().amax(-1).max()) / 127 * 0.51


def _item(sid="s", pos=0, **kw):
    return pb.StepItem(session_id=sid, position=pos, max_tokens=8, **kw)


def _fwd(stub, *items, pid=PID):
    return lambda: stub.Forward(pb.ForwardRequest(placement_id=pid, items=list(items)), timeout=10)


def test_bad_input_gets_a_clear_status(workers):
    first, second = workers
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    cases = [
        (_fwd(first, _item(token_ids=encode_tensor(ids.to(torch.int32)))), grpc.StatusCode.INVALID_ARGUMENT, "dtype INT32"),
        (_fwd(first, _item(token_ids=pb.Tensor(dtype=pb.INT64, shape=[3], data=b"\0" * 20))),
         grpc.StatusCode.INVALID_ARGUMENT, "20 bytes of data"),
        (_fwd(first, _item(token_ids=encode_tensor(torch.tensor([1, 999])))), grpc.StatusCode.INVALID_ARGUMENT, "token_ids must be in"),
        (_fwd(first, _item(pos=4, token_ids=encode_tensor(ids))), grpc.StatusCode.NOT_FOUND, "unknown session"),
        (_fwd(first, _item(token_ids=encode_tensor(ids)), pid="v0-old"), grpc.StatusCode.FAILED_PRECONDITION, "not the loaded one"),
        (_fwd(first, _item(hidden=encode_activation(torch.randn(1, D), False))), grpc.StatusCode.INVALID_ARGUMENT, "takes token_ids"),
        (_fwd(second, _item(hidden=encode_activation(torch.randn(2, D + 1), False))), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (_fwd(second, _item(hidden=encode_activation(torch.full((1, D), float("nan")), False))),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (_fwd(second, _item(hidden=pb.Activation(quantized=pb.QuantizedTensor(shape=[1, D], values=b"\1" * D, scales=b"\0" * 4)))),
         grpc.StatusCode.INVALID_ARGUMENT, "scales must be finite and > 0"),
        (_fwd(second, _item(hidden=encode_activation(torch.randn(9, D), False))), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (_fwd(first, _item(token_ids=encode_tensor(ids)), _item(token_ids=encode_tensor(ids))),
         grpc.StatusCode.INVALID_ARGUMENT, "appears twice"),
        (_fwd(first, _item(sid="", token_ids=encode_tensor(ids))), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (lambda: first.Forward(pb.ForwardRequest(placement_id=PID), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "items"),
    ]
    for call, code, text in cases:
        got, details = _code(call)
        assert got == code and text in details, (got, details)
    assert first.Health(pb.WorkerHealthRequest(), timeout=5).sessions == 0, "refused steps must not leave sessions"


def test_oversized_message_is_refused_and_server_lives(workers):
    huge = pb.Tensor(dtype=pb.INT64, shape=[MAX_MESSAGE_BYTES // 8 + 16], data=b"\0" * (MAX_MESSAGE_BYTES + 128))
    code, _ = _code(_fwd(workers[0], _item(token_ids=huge)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert workers[0].Health(pb.WorkerHealthRequest(), timeout=5).placement_id == PID


def test_kv_budget_is_enforced_and_freed_by_release(workers):
    first = workers[0]
    ids = encode_tensor(torch.tensor([1, 2], dtype=torch.int64))
    # budget: 4 sessions of 64 tokens (2 layers here); 64-token sessions fill it
    big = [pb.StepItem(session_id=f"kv{i}", position=0, max_tokens=64, token_ids=ids) for i in range(4)]
    first.Forward(pb.ForwardRequest(placement_id=PID, items=big), timeout=10)
    code, details = _code(_fwd(first, pb.StepItem(session_id="kv-extra", position=0, max_tokens=64, token_ids=ids)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache full" in details
    first.Release(pb.ReleaseRequest(session_ids=[f"kv{i}" for i in range(4)]), timeout=5)
    first.Forward(pb.ForwardRequest(placement_id=PID, items=[pb.StepItem(
        session_id="kv-extra", position=0, max_tokens=64, token_ids=ids)]), timeout=10)
    first.Release(pb.ReleaseRequest(session_ids=["kv-extra"]), timeout=5)


def test_standard_health_and_reflection_are_served(workers, ckpt):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server, port, _ = start_worker_server(NodeProfile("h", "cpu", 10**9, 1.0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="edgeweave.v1.WorkerService"), timeout=5)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            services = ProtoReflectionDescriptorDatabase(ch).get_services()
            assert "edgeweave.v1.WorkerService" in services
            stub = pb_grpc.WorkerServiceStub(ch)
            code, details = _code(lambda: stub.Forward(pb.ForwardRequest(placement_id=PID, items=[_item()]), timeout=5))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "LoadShard" in details
            code, details = _code(lambda: stub.LoadShard(pb.LoadShardRequest(shard=pb.ShardSpec(
                checkpoint=str(ckpt) + "-missing", placement_id="p", max_context=8, last_layer=1)), timeout=30))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "missing" in details
    finally:
        server.stop(0)


def _load_whole(ch: grpc.Channel, ckpt) -> pb_grpc.WorkerServiceStub:
    """Loads the whole tiny model (embedding to head) on the worker behind `ch` -> its stub."""
    stub = pb_grpc.WorkerServiceStub(ch)
    stub.LoadShard(pb.LoadShardRequest(shard=pb.ShardSpec(
        checkpoint=str(ckpt), first_layer=0, last_layer=4, embed=True, head=True, placement_id=PID,
        kv_budget_bytes=10**8, max_context=64)), timeout=60)
    return stub


@pytest.fixture(scope="module")
def whole(ckpt):
    """One worker holding the whole tiny model (embedding to head) -> (stub, servicer, port)."""
    server, port, servicer = start_worker_server(NodeProfile("whole", "cpu", 10**9, 1.0))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        stub = _load_whole(ch, ckpt)
        yield stub, servicer, port
    server.stop(0)


def _tokens(sid: str, pos: int, ids: list[int], step: int) -> pb.ForwardRequest:
    return pb.ForwardRequest(placement_id=PID, items=[pb.StepItem(
        session_id=sid, position=pos, max_tokens=32, step=step,
        token_ids=encode_tensor(torch.tensor(ids, dtype=torch.int64)))])


def test_steps_over_one_stream_generate_the_model_and_a_refused_step_ends_only_that_stream(ckpt, whole):
    from orchestrator.streams import StageStream, StepFailed

    stub, _, port = whole
    model, _, _ = load_checkpoint(ckpt)
    prompt = [5, 9, 33, 100, 7]
    ref = list(generate_tokens(make_decoder(model), prompt, SamplingConfig(max_new_tokens=10), set()))
    stream = StageStream(stub, f"127.0.0.1:{port}")
    got, x, pos = [], prompt, 0
    for step in range(10):
        if step == 4:  # a bad step (int32 ids) in the middle: refused with Forward's status
            bad = _tokens("st", pos, x, step)
            bad.items[0].token_ids.CopyFrom(encode_tensor(torch.tensor(x, dtype=torch.int32)))
            with pytest.raises(StepFailed) as e:
                stream.step(bad, 10.0)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "dtype INT32" in e.value.details
        tok = stream.step(_tokens("st", pos, x, step), 10.0).results[0].token  # reopens after the refusal
        got.append(tok)
        pos, x = pos + len(x), [tok]
    assert got == ref
    stream.close()
    assert stub.Release(pb.ReleaseRequest(session_ids=["st"]), timeout=5).released == 1


def test_a_step_written_now_is_answered_later_and_a_dropped_one_never_is(whole):
    from orchestrator.streams import StageStream

    stub, _, port = whole
    stream = StageStream(stub, f"127.0.0.1:{port}")
    try:
        stream.send(_tokens("later", 0, [1, 2], 0), 10.0)
        with pytest.raises(RuntimeError, match="already out"):
            stream.send(_tokens("later", 2, [3], 1), 10.0)  # one at a time
        first = stream.receive().results[0]
        assert first.session_id == "later"
        with pytest.raises(RuntimeError, match="no step is out"):
            stream.receive()
        stream.send(_tokens("later", 2, [first.token], 1), 10.0)
        stream.drop()  # e.g. the engine gave up its steps in flight: the answer must not reach the next step
        ans = stream.step(_tokens("other", 0, [4], 0), 10.0)
        assert [r.session_id for r in ans.results] == ["other"]
    finally:
        stream.close()
        stub.Release(pb.ReleaseRequest(session_ids=["later", "other"]), timeout=5)


def test_a_stuck_stage_fails_the_stream_step_at_its_deadline(whole):
    import time

    from orchestrator.streams import StageStream, StepFailed

    stub, servicer, port = whole
    stream = StageStream(stub, f"127.0.0.1:{port}")
    try:
        stream.step(_tokens("stuck", 0, [1, 2], 0), 10.0)
        with servicer.lock:  # the worker's compute lock held: the next step cannot run
            t0 = time.monotonic()
            with pytest.raises(StepFailed) as e:
                stream.step(_tokens("stuck", 2, [3], 1), 0.3)
            waited = time.monotonic() - t0
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.3 <= waited < 2.0, (e.value, waited)
        # the worker lives, and a new stream serves the next step once the stage is free (the late
        # step itself may have run: the engine's position check and replay deal with that)
        assert stream.step(_tokens("after", 0, [3], 0), 10.0).results[0].token >= 0
    finally:
        stream.close()
        stub.Release(pb.ReleaseRequest(session_ids=["stuck", "after"]), timeout=5)


def test_open_streams_are_bounded_and_garbage_on_a_stream_is_refused(whole):
    import queue

    from workers.server import MAX_STREAMS

    stub, _, port = whole
    calls, feeds = [], []
    try:
        for _ in range(MAX_STREAMS):  # each holds a server thread until it ends
            q: queue.SimpleQueue = queue.SimpleQueue()
            calls.append(stub.ForwardStream(iter(q.get, None), timeout=30))
            feeds.append(q)
            q.put(pb.ForwardRequest(placement_id=PID, items=[pb.StepItem(
                session_id=f"open{len(calls)}", position=0, max_tokens=8,
                token_ids=encode_tensor(torch.tensor([1], dtype=torch.int64)))]))
            next(calls[-1])
        extra = stub.ForwardStream(iter([_tokens("extra", 0, [1], 0)]), timeout=10)
        code, details = _code(lambda: next(extra))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "use Forward" in details
        assert stub.Health(pb.WorkerHealthRequest(), timeout=5).placement_id == PID  # unary calls still served
    finally:
        for q in feeds:
            q.put(None)  # half-close: the worker's handler ends, frees its slot, then answers OK
        for c in calls:
            list(c)  # wait for that end, so the slots are free before the next stream opens
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # bytes that are no ForwardRequest
        raw = ch.stream_stream("/edgeweave.v1.WorkerService/ForwardStream")
        code, details = _code(lambda: next(raw(iter([b"\xff\xff\xff"]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details
    stub.Release(pb.ReleaseRequest(session_ids=[f"open{i + 1}" for i in range(MAX_STREAMS)]), timeout=5)


def test_a_worker_without_streams_is_stepped_with_unary_calls(ckpt):
    """An older worker answers ForwardStream with UNIMPLEMENTED; the front end's stage stream falls
    back to unary Forward for it and the steps go on unchanged."""
    from orchestrator.streams import StageStream
    from protos.serving import start_server
    from workers.server import WorkerServicer

    class OldWorker(WorkerServicer):
        ForwardStream = pb_grpc.WorkerServiceServicer.ForwardStream  # the generated UNIMPLEMENTED one

    server, port, _ = start_server(pb_grpc.add_WorkerServiceServicer_to_server,
                                   OldWorker(NodeProfile("old", "cpu", 10**9, 1.0)), "WorkerService", "127.0.0.1", 0, 8)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            stub = _load_whole(ch, ckpt)
            stream = StageStream(stub, f"127.0.0.1:{port}")
            first = stream.step(_tokens("old", 0, [5, 9, 33], 0), 10.0).results[0].token
            assert not stream.use_stream
            second = stream.step(_tokens("old", 3, [first], 1), 10.0).results[0].token
            stream.close()
        model, _, _ = load_checkpoint(ckpt)
        ref = list(generate_tokens(make_decoder(model), [5, 9, 33], SamplingConfig(max_new_tokens=2), set()))
        assert [first, second] == ref
    finally:
        server.stop(0)


def test_a_worker_gone_between_steps_fails_the_next_stream_step_as_unavailable(ckpt):
    """The stream outlives its worker: the next step's write fails inside gRPC core (a bare INTERNAL),
    which the engine would not recover from. It must come out as UNAVAILABLE, a dead peer."""
    import time

    from orchestrator.engine import RECOVERABLE
    from orchestrator.streams import StageStream, StepFailed

    server, port, _ = start_worker_server(NodeProfile("gone", "cpu", 10**9, 1.0))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        stub = _load_whole(ch, ckpt)
        stream = StageStream(stub, f"127.0.0.1:{port}")
        stream.step(_tokens("gone", 0, [5, 9], 0), 10.0)
        server.stop(0)
        time.sleep(0.3)  # the stream's end reaches this side before the next step
        with pytest.raises(StepFailed) as e:
            stream.step(_tokens("gone", 2, [7], 1), 10.0)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.code in RECOVERABLE
        stream.close()


def test_token_ids_encoded_without_torch_match_the_tensor_encoding():
    from workers.wire import decode_tensor, encode_ids

    ids = [0, 5, 49151, 2**40]
    assert encode_ids(ids) == encode_tensor(torch.tensor(ids, dtype=torch.int64))
    assert decode_tensor(encode_ids(ids), "ids", pb.INT64, rank=1, max_elems=8).tolist() == ids
