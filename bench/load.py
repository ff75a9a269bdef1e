"""Load: N concurrent streaming clients for a fixed time against SmolLM2 W8A8 on a local 3-node Ray
cluster. Each client sends requests back to back (greedy, --tokens new tokens, prompts differing
per client and request) until the time is up. Reported: errors (target 0), requests completed,
generated tokens/s over all clients, time per token (gap between consecutive streamed tokens of a
request) p50/p99, and time to first token p50/p99 (it includes queueing: the placement admits
BATCH sessions at a time and the rest wait).

    python bench/load.py [CHECKPOINT_DIR] [--clients 32] [--seconds 60] [--tokens 32]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import checkpoint_parser, machine, table, update_section, write_results  # noqa: E402
from orchestrator.client import stream_generate  # noqa: E402
from orchestrator.controller import ServeOptions, start_controller  # noqa: E402
from orchestrator.local import LocalCluster, LocalNode  # noqa: E402
from orchestrator.planner import Placement  # noqa: E402

BUDGETS = [160_000_000] * 3
CONTEXT, BATCH = 256, 8
TOPICS = ["the river", "a small town", "the old library", "winter", "the harbour", "a mountain road", "the market",
          "an orchard"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def main() -> None:
    import ray

    ap = checkpoint_parser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    lock = threading.Lock()
    gaps: list[float] = []
    ttft: list[float] = []
    errors: list[str] = []
    done = [0]
    tokens = [0]

    def client(i: int, address: str, stop_at: float) -> None:
        k = 0
        while time.perf_counter() < stop_at:
            prompt = f"Write one sentence about {TOPICS[(i + k) % len(TOPICS)]} (reader {i}, note {k}):"
            k += 1
            t0 = last = time.perf_counter()
            mine: list[float] = []
            first = None
            n = 0
            try:
                for m in stream_generate(address, prompt, a.tokens, timeout_s=600):
                    now = time.perf_counter()
                    for _ in m.token_ids:
                        if first is None:
                            first = now - t0
                        else:
                            mine.append(now - last)
                        last = now
                        n += 1
                with lock:
                    done[0] += 1
            except Exception as e:
                with lock:
                    errors.append(f"client {i}: {type(e).__name__}: {e}"[:300])
            with lock:
                gaps.extend(mine)
                tokens[0] += n
                if first is not None:
                    ttft.append(first)

    with LocalCluster([LocalNode(b) for b in BUDGETS]):
        actor, address = start_controller(ServeOptions(str(Path(a.checkpoint).resolve()), context=CONTEXT, batch=BATCH))
        placement = Placement.from_dict(ray.get(actor.placement_dict.remote()))
        list(stream_generate(address, "warm up", 4))
        t0 = time.perf_counter()
        stop_at = t0 + a.seconds
        threads = [threading.Thread(target=client, args=(i, address, stop_at)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ray.get(actor.shutdown.remote(), timeout=60)
    res = {"clients": a.clients, "seconds": a.seconds, "wall_s": wall, "errors": len(errors), "error_samples": errors[:5],
           "requests": done[0], "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
           "tpt_p50_ms": _pct(gaps, 0.5) * 1e3 if gaps else None, "tpt_p99_ms": _pct(gaps, 0.99) * 1e3 if gaps else None,
           "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_p99_s": _pct(ttft, 0.99) if ttft else None,
           "stages": [[s.first, s.last] for s in placement.stages]}
    write_results("load", {"result": res, "budgets": BUDGETS, "context": CONTEXT, "batch": BATCH, "tokens": a.tokens,
                           "checkpoint": a.checkpoint})
    md = table(["clients", "seconds", "errors", "requests done", "tokens/s", "time per token p50 / p99 ms",
                "time to first token p50 / p99 s"],
               [[a.clients, f"{wall:.0f}", f"**{len(errors)}**", done[0], f"{res['tokens_per_s']:.1f}",
                 f"{res['tpt_p50_ms']:.0f} / {res['tpt_p99_ms']:.0f}", f"{res['ttft_p50_s']:.2f} / {res['ttft_p99_s']:.2f}"]])
    update_section("load", f"""## Load: concurrent streaming clients (`bench/load.py`)

Command: `python bench/load.py bench/results/checkpoints/haq-token --clients {a.clients} --seconds {a.seconds:g} --tokens {a.tokens}`
(SmolLM2-135M HAQ W8A8, greedy, {a.tokens} new tokens per request, requests back to back per client; local Ray
cluster of 3 nodes with {BUDGETS[0]:,} bytes each, context {CONTEXT} x batch {BATCH}: {BATCH} sessions decode
together and the others queue; {machine()['cores']} cores shared by every process including the clients).

{md}

Target: 0 errors. Time to first token includes the queueing behind the {BATCH} admitted sessions.
""")
    print(md)
    print({k: v for k, v in res.items() if k != "error_samples"}, errors[:3])


if __name__ == "__main__":
    main()
