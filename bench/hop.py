"""Per-hop cost of the WorkerService in isolation: one worker hosting one SmolLM2 layer, sequential
Forward calls with one decode token (round trip minus the worker's reported compute), next to an
empty unary RPC (Health), which is the floor of Python's synchronous gRPC on the machine.

    python bench/hop.py [CHECKPOINT_DIR] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_results  # noqa: E402
from orchestrator.profile import NodeProfile  # noqa: E402
from protos import edgeweave_v1_pb2 as pb  # noqa: E402
from protos import edgeweave_v1_pb2_grpc as pb_grpc  # noqa: E402
from workers.server import start_worker_server  # noqa: E402
from workers.wire import GRPC_OPTIONS, encode_activation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default="bench/results/checkpoints/haq-token")
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    server, port, _ = start_worker_server(NodeProfile("bench", "cpu", 10**9, 1.0))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        spec = pb.ShardSpec(checkpoint=str(Path(a.checkpoint).resolve()), first_layer=1, last_layer=2,
                            placement_id="bench", kv_budget_bytes=10**9, max_context=a.calls + 8)
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=300)
        h = encode_activation(torch.randn(1, 576), False)
        overhead, rtt = [], []
        for i in range(a.calls):
            req = pb.ForwardRequest(placement_id="bench", items=[pb.StepItem(
                session_id="hop", position=i, max_tokens=a.calls + 8, hidden=h)])
            t0 = time.perf_counter()
            r = stub.Forward(req, timeout=10)
            ms = (time.perf_counter() - t0) * 1e3
            overhead.append(ms - r.compute_ms)
            rtt.append(ms)
        empty = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            stub.Health(pb.WorkerHealthRequest(), timeout=10)
            empty.append((time.perf_counter() - t0) * 1e3)
    server.stop(0)
    res = {"forward_overhead_ms": statistics.median(overhead), "forward_rtt_ms": statistics.median(rtt),
           "empty_rpc_ms": statistics.median(empty), "calls": a.calls}
    write_results("hop", res)
    print(res)


if __name__ == "__main__":
    main()
