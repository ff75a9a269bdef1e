"""Relayed steps (chain) against the front end calling each stage (star), without Ray: worker
processes hosting consecutive slices of SmolLM2's layers, and one session's decode steps from this
process, the two ways interleaved over --rounds on the same workers.

Per step: the wall time, every stage's compute (reported by the workers), and the overhead, which
is the wall time less all compute: over N + 1 one-way hops for the chain, over N round trips for the
star.

    python bench/chain.py [CHECKPOINT_DIR] [--stages 3] [--calls 200] [--rounds 3]
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
from orchestrator.streams import RelayChain, StageStream  # noqa: E402
from protos import edgeweave_v1_pb2 as pb  # noqa: E402
from protos import edgeweave_v1_pb2_grpc as pb_grpc  # noqa: E402
from workers.wire import GRPC_OPTIONS, encode_tensor, next_stage_items  # noqa: E402

PID = "bench-chain"


def _item(sid: str, pos: int, token: int) -> pb.StepItem:
    return pb.StepItem(session_id=sid, position=pos, max_tokens=4096,
                       token_ids=encode_tensor(torch.tensor([token], dtype=torch.int64)))


def main() -> None:
    ap = checkpoint_parser()
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="decode steps per way and round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    ckpt = str(Path(a.checkpoint).resolve())
    from quant.checkpoint import read_manifest

    n_layers = read_manifest(ckpt).n_layers
    cuts = [round(i * n_layers / a.stages) for i in range(a.stages + 1)]
    procs, addrs, stop = spawn_workers(a.stages)
    stubs = [pb_grpc.WorkerServiceStub(grpc.insecure_channel(x, options=GRPC_OPTIONS)) for x in addrs]
    for k, stub in enumerate(stubs):
        spec = pb.ShardSpec(checkpoint=ckpt, first_layer=cuts[k], last_layer=cuts[k + 1], embed=k == 0,
                            head=k == a.stages - 1, placement_id=PID, kv_budget_bytes=2 * 10**9, max_context=4096,
                            threads=1, next_stage=addrs[k + 1] if k + 1 < a.stages else "")
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=600)
    star = [StageStream(s, x) for s, x in zip(stubs, addrs)]
    chain = RelayChain(addrs, PID)
    res: dict[str, dict[str, list[float]]] = {w: {"wall_ms": [], "overhead_ms": [], "compute_ms": []}
                                              for w in ("chain", "star")}
    total = 2 * a.rounds * (a.calls + 4)
    try:
        for r in range(a.rounds):
            for way in ("star", "chain"):
                sid = f"{way}-{r}"
                tok, pos = 42, 0
                for i in range(a.calls + 4):  # 4 warm-up steps
                    req = pb.ForwardRequest(placement_id=PID, items=[_item(sid, pos, tok)])
                    t0 = time.perf_counter()
                    if way == "chain":
                        ev = chain.step(req, 30.0)
                        wall = (time.perf_counter() - t0) * 1e3
                        compute = list(ev.stage_ms)
                        tok = int(ev.result.results[0].token)
                        overhead = (wall - sum(compute)) / (a.stages + 1)
                    else:
                        compute, resp = [], None
                        for k, st in enumerate(star):
                            if resp is not None:
                                req = pb.ForwardRequest(placement_id=PID, items=next_stage_items(req.items, resp.results))
                            resp = st.step(req, 30.0)
                            compute.append(resp.compute_ms)
                        wall = (time.perf_counter() - t0) * 1e3
                        tok = int(resp.results[0].token)
                        overhead = (wall - sum(compute)) / a.stages
                    pos += 1
                    if i >= 4:
                        res[way]["wall_ms"].append(wall)
                        res[way]["overhead_ms"].append(overhead)
                        res[way]["compute_ms"].append(sum(compute))
                for s in stubs:
                    s.Release(pb.ReleaseRequest(session_ids=[sid]), timeout=5)
    finally:
        chain.close()
        for st in star:
            st.close()
        stop.set()
        for p in procs:
            p.join(10)
    med = {w: {k: statistics.median(v) for k, v in d.items()} for w, d in res.items()}
    out = {"stages": a.stages, "layers": cuts, "calls": a.calls, "rounds": a.rounds, "median": med,
           "chain_vs_star_wall": med["chain"]["wall_ms"] / med["star"]["wall_ms"], "steps": total}
    write_results("chain", out)
    c, s = med["chain"], med["star"]
    update_section("chain", f"""## Relayed steps against calling each stage, without Ray (`bench/chain.py`)

Command: `python bench/chain.py bench/results/checkpoints/haq-token --stages {a.stages} --calls {a.calls} --rounds {a.rounds}`
({a.stages} worker processes, layers cut at {cuts}, 1 kernel thread each; one session's decode steps,
chain and star interleaved by round on the same workers; medians over {a.calls * a.rounds} steps each.)

| way | wall ms per step | compute ms (all stages) | overhead ms | overhead counted over |
|---|---|---|---|---|
| chain (relayed) | {c['wall_ms']:.2f} | {c['compute_ms']:.2f} | {c['overhead_ms']:.2f} | {a.stages + 1} one-way hops |
| star | {s['wall_ms']:.2f} | {s['compute_ms']:.2f} | {s['overhead_ms']:.2f} | {a.stages} round trips |

Chain / star wall time per step: **{out['chain_vs_star_wall']:.3f}x**.
""")
    print(med, out["chain_vs_star_wall"])


if __name__ == "__main__":
    main()
