"""End to end on a real local Ray cluster of 3 nodes with different budgets: the controller places a
tiny quantized Llama over the three, workers serve it over gRPC, and the service streams tokens."""

import threading

import grpc
import pytest

from orchestrator.client import server_health, stream_generate
from orchestrator.controller import ServeOptions, start_controller
from orchestrator.local import LocalCluster, LocalNode
from orchestrator.planner import Placement
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from quant.checkpoint import load_checkpoint
from quant.generate import SamplingConfig, generate_tokens
from workers.decode import make_decoder
from tests.conftest import tiny_checkpoint, tiny_tokenizer

BUDGETS = (600_000, 550_000, 500_000)  # bytes; none holds the 6-layer model alone (planner: 3 stages)
PROMPTS = ["t5 t9 t33 t100 t7", "t200 t3 t3 t18", "t42", "t77 t78 t79 t80 t81 t82 t83 t84 t85 t86 t87 t88"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("rt") / "tiny", layers=6, init_range=0.2)
    with LocalCluster([LocalNode(b, cpus=1) for b in BUDGETS]):
        import ray

        actor, address = start_controller(ServeOptions(str(ckpt), context=128, batch=4, prefill_chunk=32))
        yield ckpt, actor, address
        ray.get(actor.shutdown.remote(), timeout=30)


def _reference(ckpt, prompt: str, n: int, temperature=0.0, seed=0) -> list[int]:
    model, tok, _ = load_checkpoint(ckpt)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    cfg = SamplingConfig(max_new_tokens=n, temperature=temperature, seed=seed)
    return [t for t in generate_tokens(make_decoder(model), ids, cfg, {tok.eos_token_id}) if t != tok.eos_token_id]


def _generate(address, prompt, n, **kw) -> tuple[list[int], list[pb.GenerateResponse]]:
    msgs = list(stream_generate(address, prompt, n, timeout_s=60, **kw))
    return [t for m in msgs for t in m.token_ids], msgs


def test_placement_uses_all_three_nodes_within_budgets(served):
    import ray

    _, actor, _ = served
    p = Placement.from_dict(ray.get(actor.placement_dict.remote()))
    assert len(p.stages) == 3
    assert sorted(s.budget_bytes for s in p.stages) == sorted(BUDGETS)
    assert all(s.used_bytes <= s.budget_bytes for s in p.stages)
    for addr, s in zip(ray.get(actor.worker_addresses.remote()), p.stages):
        with grpc.insecure_channel(addr) as ch:
            h = pb_grpc.WorkerServiceStub(ch).Health(pb.WorkerHealthRequest(), timeout=5)
        assert h.placement_id == p.placement_id and h.kv_budget_bytes == s.kv_bytes


def test_greedy_output_identical_to_single_process_and_streamed(served):
    ckpt, _, address = served
    for prompt in PROMPTS[:2]:
        got, msgs = _generate(address, prompt, 24)
        assert got == _reference(ckpt, prompt, 24)
        assert len(msgs) > 2, "tokens arrive as a stream, not in one message"
        assert msgs[-1].finish_reason in ("length", "eos") and all(not m.finish_reason for m in msgs[:-1])


def test_seeded_sampling_identical_to_single_process(served):
    ckpt, _, address = served
    got, _ = _generate(address, PROMPTS[0], 16, temperature=0.8, seed=7)
    assert got == _reference(ckpt, PROMPTS[0], 16, temperature=0.8, seed=7)


def test_concurrent_sessions_do_not_mix_kv_caches(served):
    """8 streams over a batch of 4 on 3 relayed stages: the sessions go in groups, several steps in
    flight at once (one per stage by default), and each stream still gets the single process's tokens."""
    import ray

    ckpt, actor, address = served
    before = ray.get(actor.stats.remote())["overlapped_steps"]
    results: dict[str, list[int]] = {}
    errors = []

    def run(p):
        try:
            results[p] = _generate(address, p, 20)[0]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS * 2]  # 8 streams over a batch of 4
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for p in PROMPTS:
        assert results[p] == _reference(ckpt, p, 20), p
    assert ray.get(actor.stats.remote())["overlapped_steps"] > before, "concurrent sessions' steps were pipelined"


def test_bad_requests_get_invalid_argument_and_service_stays_up(served):
    _, _, address = served
    with pytest.raises(grpc.RpcError) as e:
        _generate(address, "", 4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _generate(address, "t5 " * 100, 100)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context of 128" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _generate(address, "t5", 4, temperature=-1.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server_health(address).stages == 3


def test_stop_strings_end_generation(served):
    ckpt, _, address = served
    ref = _reference(ckpt, PROMPTS[0], 12)

    word = tiny_tokenizer().decode([ref[3]])
    _, msgs = _generate(address, PROMPTS[0], 12, stop=(word,))
    text = "".join(m.text for m in msgs)
    assert msgs[-1].finish_reason == "stop" and word not in text


def test_stages_relay_steps_and_calling_each_stage_gives_the_same_tokens(served):
    """The service's steps go down the chain (N + 1 messages); an engine calling each stage in turn
    (the star, --star) on the same workers produces the same tokens."""
    import ray

    from orchestrator.engine import Engine, EngineOptions, GenerationRequest
    from orchestrator.transports import ChainTransport

    _, actor, address = served
    relayed, _ = _generate(address, PROMPTS[1], 8)
    assert ray.get(actor.stats.remote())["relayed"] is True
    p = Placement.from_dict(ray.get(actor.placement_dict.remote()))
    tok = tiny_tokenizer()
    engine = Engine(p, ray.get(actor.worker_addresses.remote()), {tok.eos_token_id}, EngineOptions(relay=False))
    try:
        assert not isinstance(engine.transport, ChainTransport)
        ids = tuple(tok(PROMPTS[1], add_special_tokens=False)["input_ids"])
        star = [pc.token for pc in engine.submit(GenerationRequest(ids, 8))
                if pc.token is not None and pc.token != tok.eos_token_id]
    finally:
        engine.close()
    assert star == relayed


def test_a_dead_stage_fails_the_request_cleanly_and_the_engine_keeps_serving(served):
    """An engine pointed at a stage that does not answer: UNAVAILABLE-style error, no hang."""
    import ray

    from orchestrator.engine import Engine, EngineOptions, GenerationRequest

    _, actor, _ = served
    p = Placement.from_dict(ray.get(actor.placement_dict.remote()))
    addrs = ray.get(actor.worker_addresses.remote())
    engine = Engine(p, [addrs[0], "127.0.0.1:9", addrs[2]], set(), EngineOptions(step_timeout_s=3.0))
    try:
        for _ in range(2):  # the loop survives the first failure
            pieces = list(engine.submit(GenerationRequest((5, 9, 33), 4)))
            assert pieces[-1].finish == "error" and "stage 1 at 127.0.0.1:9" in pieces[-1].error
    finally:
        engine.close()


def test_pipeline_depth_is_one_per_stage_but_no_more_than_this_machines_cores_for_local_stages():
    from orchestrator.engine import EngineOptions, auto_pipeline_depth

    three_local = ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]
    assert auto_pipeline_depth(three_local, local_cores=2) == 2  # a local cluster on 2 cores
    assert auto_pipeline_depth(three_local, local_cores=16) == 3
    assert auto_pipeline_depth(["10.0.0.2:7000", "10.0.0.3:7000", "127.0.0.1:5001"], local_cores=1) == 3  # machines
    assert auto_pipeline_depth(["localhost:1"], local_cores=8) == 1
    with pytest.raises(ValueError, match="pipeline_depth"):
        EngineOptions(pipeline_depth=-1)
