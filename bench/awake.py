"""What keeping the cores awake does to one stage (workers/awake.py), without Ray: a worker process
hosting --layers SmolLM2 layers, one session's decode steps from this process over a ForwardStream,
either back to back or with --gap-ms of idle time before each (what a pipeline stage sees while the
other stages compute), and the worker's shard loaded with keep_awake on or off. The four ways are
interleaved over --rounds on the same worker.

Per way: the median compute the worker reports and the median round trip.

    python bench/awake.py [CHECKPOINT_DIR] [--layers 10] [--gap-ms 6] [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.hop import spawn_workers  # noqa: E402
from bench.report import checkpoint_parser, update_section, write_results  # noqa: E402
from orchestrator.streams import StageStream  # noqa: E402
from protos import edgeweave_v1_pb2 as pb  # noqa: E402
from protos import edgeweave_v1_pb2_grpc as pb_grpc  # noqa: E402
from workers.awake import current_latency_limit_us  # noqa: E402
from workers.wire import GRPC_OPTIONS, encode_activation  # noqa: E402


def main() -> None:
    ap = checkpoint_parser()
    ap.add_argument("--layers", type=int, default=10, help="decoder layers the worker hosts (from layer 1)")
    ap.add_argument("--gap-ms", type=float, default=6.0, help="idle time before each step of the 'gap' ways")
    ap.add_argument("--calls", type=int, default=200, help="steps per way and round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    (proc,), (address,), stop = spawn_workers()
    ways = [(awake, gap) for awake in (True, False) for gap in (0.0, a.gap_ms)]
    name = lambda awake, gap: f"{'awake' if awake else 'may halt'}, {'gap ' + format(gap, 'g') + ' ms' if gap else 'back to back'}"  # noqa: E731
    compute: dict[str, list[float]] = {name(*w): [] for w in ways}
    rtt: dict[str, list[float]] = {name(*w): [] for w in ways}
    held: dict[str, int | None] = {}
    h = encode_activation(torch.randn(1, 576), False)
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        for r in range(a.rounds):
            for awake, gap in (ways if r % 2 == 0 else ways[::-1]):
                pid = f"bench-awake-{r}-{int(awake)}-{int(gap * 1000)}"
                spec = pb.ShardSpec(checkpoint=str(Path(a.checkpoint).resolve()), first_layer=1,
                                    last_layer=1 + a.layers, placement_id=pid, kv_budget_bytes=10**9,
                                    max_context=a.calls + 8, threads=1, keep_awake=awake)
                stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=300)
                stream = StageStream(stub, address)
                for i in range(a.calls + 8):  # 8 warm-up steps
                    req = pb.ForwardRequest(placement_id=pid, items=[pb.StepItem(
                        session_id="s", position=i, max_tokens=a.calls + 8, hidden=h)])
                    if gap:
                        time.sleep(gap / 1e3)
                    t0 = time.perf_counter()
                    resp = stream.step(req, 30.0)
                    ms = (time.perf_counter() - t0) * 1e3
                    if i >= 8:
                        compute[name(awake, gap)].append(resp.compute_ms)
                        rtt[name(awake, gap)].append(ms)
                held[name(awake, gap)] = current_latency_limit_us()
                stream.close()
    stop.set()
    proc.join(timeout=30)
    med = {k: {"compute_ms": statistics.median(compute[k]), "round_trip_ms": statistics.median(rtt[k]),
               "latency_limit_us_after": held[k]} for k in compute}
    write_results("awake", {"layers": a.layers, "gap_ms": a.gap_ms, "calls": a.calls, "rounds": a.rounds,
                            "ways": med})
    rows = "\n".join(f"| {k} | {v['compute_ms']:.2f} | {v['round_trip_ms']:.2f} |" for k, v in med.items())
    update_section("awake", f"""## Keeping the cores awake, one stage (`bench/awake.py`)

Command: `python bench/awake.py bench/results/checkpoints/haq-token --layers {a.layers} --gap-ms {a.gap_ms:g} --calls {a.calls} --rounds {a.rounds}`
(a worker process hosting {a.layers} SmolLM2 layers, 1 kernel thread; one session's decode steps over a
ForwardStream, back to back or {a.gap_ms:g} ms apart, the shard loaded with `keep_awake` on or off; the
four ways interleaved over {a.rounds} rounds; medians over {a.calls * a.rounds} steps each.)

| way | compute ms | round trip ms |
|---|---|---|
{rows}
""")
    print(med)


if __name__ == "__main__":
    main()
