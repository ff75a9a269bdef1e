"""Per-hop cost of the WorkerService in isolation: a worker process hosting SmolLM2 layers, and
sequential decode steps (one token) from this process, three ways, interleaved over --rounds:

- unary: one Forward call per step (the engine with --unary-steps);
- stream: the steps over one long-lived ForwardStream call (the engine's default);
- empty: an empty unary RPC (Health), the floor of Python's synchronous gRPC on the machine.

A step's hop overhead is its round trip minus the compute the worker reports.

    python bench/hop.py [CHECKPOINT_DIR] [--calls 300] [--rounds 3] [--layers 1]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import checkpoint_parser, write_results  # noqa: E402
from orchestrator.streams import StageStream  # noqa: E402
from protos import edgeweave_v1_pb2 as pb  # noqa: E402
from protos import edgeweave_v1_pb2_grpc as pb_grpc  # noqa: E402
from workers.wire import GRPC_OPTIONS, encode_activation  # noqa: E402


def serve(ports: mp.Queue, stop: mp.Event) -> None:  # type: ignore[valid-type]
    """The worker process: a WorkerService on a free loopback port until `stop`."""
    from workers.profile import NodeProfile
    from workers.server import start_worker_server

    server, port, _ = start_worker_server(NodeProfile("bench", "cpu", 10**9, 1.0))
    ports.put(port)
    stop.wait(3600)  # type: ignore[attr-defined]
    server.stop(0)


def spawn_workers(n: int = 1):
    """n worker processes (serve) -> (processes, their loopback addresses, the event that stops them)."""
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=serve, args=(ports, stop), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    return procs, [f"127.0.0.1:{ports.get(timeout=120)}" for _ in procs], stop


def main() -> None:
    ap = checkpoint_parser()
    ap.add_argument("--calls", type=int, default=300, help="steps per way and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers the worker hosts")
    a = ap.parse_args()
    (proc,), (address,), stop = spawn_workers()
    total = a.calls * 2 * a.rounds + 8
    ways: dict[str, list[float]] = {"unary": [], "stream": [], "empty": []}
    rtts: dict[str, list[float]] = {"unary": [], "stream": []}
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        spec = pb.ShardSpec(checkpoint=str(Path(a.checkpoint).resolve()), first_layer=1, last_layer=1 + a.layers,
                            placement_id="bench", kv_budget_bytes=10**9, max_context=total, threads=1)
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=300)
        h = encode_activation(torch.randn(1, 576), False)
        stream, unary = StageStream(stub, address), StageStream(stub, address, use_stream=False)
        pos = 0
        for r in range(a.rounds):
            order = [("unary", unary), ("stream", stream)] if r % 2 == 0 else [("stream", stream), ("unary", unary)]
            for name, way in order:
                for _ in range(a.calls):
                    req = pb.ForwardRequest(placement_id="bench", items=[pb.StepItem(
                        session_id="hop", position=pos, max_tokens=total, hidden=h)])
                    t0 = time.perf_counter()
                    resp = way.step(req, 10.0)
                    ms = (time.perf_counter() - t0) * 1e3
                    pos += 1
                    ways[name].append(ms - resp.compute_ms)
                    rtts[name].append(ms)
            for _ in range(a.calls):
                t0 = time.perf_counter()
                stub.Health(pb.WorkerHealthRequest(), timeout=10)
                ways["empty"].append((time.perf_counter() - t0) * 1e3)
        stream.close()
    stop.set()
    proc.join(timeout=30)
    res = {"unary_overhead_ms": statistics.median(ways["unary"]),
           "stream_overhead_ms": statistics.median(ways["stream"]),
           "unary_rtt_ms": statistics.median(rtts["unary"]), "stream_rtt_ms": statistics.median(rtts["stream"]),
           "empty_rpc_ms": statistics.median(ways["empty"]), "calls": a.calls, "rounds": a.rounds,
           "layers": a.layers}
    write_results("hop" if a.layers == 1 else f"hop-{a.layers}layers", res)
    print(res)


if __name__ == "__main__":
    main()
