"""A worker killed in every generation: SmolLM2 W8A8 on a local 3-node Ray cluster where any two
nodes hold the model. For each of --runs generations (greedy, --tokens new tokens) one stage's
worker process gets SIGKILL after a random number of streamed tokens; the request must complete
with the same text as an uninterrupted run. Recovery time: the client-visible gap between the last
token before the kill and the next token after it (detection, re-plan, shard loads, replay).

    python bench/chaos.py [CHECKPOINT_DIR] [--runs 10] [--tokens 64] [--seed 0]
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import checkpoint_parser, machine, table, update_section, write_results  # noqa: E402
from orchestrator.client import stream_generate  # noqa: E402
from orchestrator.controller import ServeOptions, start_controller  # noqa: E402
from orchestrator.local import LocalCluster, LocalNode  # noqa: E402
from orchestrator.planner import Placement  # noqa: E402

BUDGETS = [160_000_000] * 3  # any two hold the model at this context x batch; one does not
CONTEXT, BATCH = 256, 8
PROMPT = "The history of the city begins in the early middle ages, when"


def _text_and_times(address: str, tokens: int, kill=None, kill_at: int = 0) -> tuple[str, list[float], float]:
    """-> (text, arrival time of each token, time of the kill). kill() is called once kill_at tokens arrived."""
    text, stamps, killed = [], [], 0.0
    for m in stream_generate(address, PROMPT, tokens, timeout_s=600):
        text.append(m.text)
        stamps.extend([time.perf_counter()] * len(m.token_ids))
        if kill is not None and not killed and len(stamps) >= kill_at:
            kill()
            killed = time.perf_counter()
    return "".join(text), stamps, killed


def _wait_all_up(actor, timeout_s: float = 300.0) -> float:
    import ray

    t0 = time.time()
    while any(h.startswith("down") for h in ray.get(actor.stats.remote())["health"].values()):
        if time.time() - t0 > timeout_s:
            raise RuntimeError("a killed worker did not rejoin in time")
        time.sleep(0.5)
    return time.time() - t0


def main() -> None:
    import ray

    ap = checkpoint_parser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    runs = []
    with LocalCluster([LocalNode(b) for b in BUDGETS]):
        actor, address = start_controller(ServeOptions(str(Path(a.checkpoint).resolve()), context=CONTEXT,
                                                       batch=BATCH, health_interval_s=1.0))
        reference, _, _ = _text_and_times(address, a.tokens)
        for i in range(a.runs):
            rejoin_s = _wait_all_up(actor)
            stage = rnd.randrange(2)  # 0: the stage with the embedding, 1: the last stage (with the head)
            kill_at = rnd.randint(1, a.tokens * 3 // 4)
            before = ray.get(actor.stats.remote())
            victim = [""]

            def kill() -> None:  # the placement in force now (a re-plan may have changed it since the last run)
                p = Placement.from_dict(ray.get(actor.placement_dict.remote()))
                victim[0] = p.stages[0 if stage == 0 else -1].node_id
                os.kill(ray.get(actor.worker_pids.remote())[victim[0]], signal.SIGKILL)

            err = ""
            try:
                text, stamps, killed = _text_and_times(address, a.tokens, kill, kill_at)
            except Exception as e:  # counted as a failed run
                text, stamps, killed, err = "", [], 0.0, str(e)
            after = Placement.from_dict(ray.get(actor.placement_dict.remote()))
            st = ray.get(actor.stats.remote())
            gap = next((t - stamps[j - 1] for j, t in enumerate(stamps) if j > 0 and stamps[j - 1] <= killed < t), None)
            runs.append({"run": i, "killed_stage": stage, "killed_node": victim[0][:8], "kill_after_tokens": kill_at,
                         "identical": text == reference and not err, "tokens": len(stamps), "error": err,
                         # the kill hit a running generation only if the session was replayed
                         "interrupted": st["replayed_tokens"] > before["replayed_tokens"],
                         "recovery_s": gap, "recoveries": st["recoveries"] - before["recoveries"],
                         "stages_after": len(after.stages), "waited_for_rejoin_s": rejoin_s})
            print(runs[-1], flush=True)
        ray.get(actor.shutdown.remote(), timeout=60)
    ok = sum(r["identical"] for r in runs)
    hit = sum(r["interrupted"] for r in runs)
    rec = [r["recovery_s"] for r in runs if r["recovery_s"] is not None and r["interrupted"]]
    summary = {"identical": ok, "runs": len(runs), "interrupted": hit,
               "recovery_median_s": statistics.median(rec) if rec else None, "recovery_max_s": max(rec) if rec else None}
    write_results("chaos", {"summary": summary, "runs": runs, "budgets": BUDGETS, "context": CONTEXT,
                            "batch": BATCH, "tokens": a.tokens, "checkpoint": a.checkpoint})
    others = "" if hit == len(runs) else (
        "; in the others the stream had already been fully generated when the client saw token k, and the "
        "failure was handled between requests")
    rows = [[r["run"], "first" if r["killed_stage"] == 0 else "last", r["kill_after_tokens"],
             "yes" if r["interrupted"] else "no", "yes" if r["identical"] else f"**no** {r['error'][:80]}",
             f"{r['recovery_s']:.2f}" if r["recovery_s"] is not None else "-", r["stages_after"]] for r in runs]
    md = table(["run", "killed stage", "killed after token", "hit a running generation", "identical text",
                "recovery s", "stages after"], rows)
    update_section("chaos", f"""## A worker killed in every generation (`bench/chaos.py`)

Command: `python bench/chaos.py bench/results/checkpoints/haq-token --runs {a.runs} --tokens {a.tokens} --seed {a.seed}`
(SmolLM2-135M HAQ W8A8, greedy, {a.tokens} new tokens; local Ray cluster of 3 nodes with {BUDGETS[0]:,} bytes each,
any two of which hold the model at context {CONTEXT} x batch {BATCH}; {machine()['cores']} cores shared by all processes).
In each run one stage's worker process gets SIGKILL after a random number of streamed tokens. Before each
run the previous victim, restarted by Ray, has rejoined. Recovery = the gap the client sees between the
token before the kill and the next one (detection, re-plan, loading the new shards, replaying the session).

{md}

- **{ok}/{len(runs)} complete with text identical to an uninterrupted run** (target 10/10); in {hit} of the {len(runs)}
  the kill hit the generation while it ran (its session was replayed){others}
- recovery time: median **{summary['recovery_median_s']:.2f} s**, max **{summary['recovery_max_s']:.2f} s**
""" if rec else "## chaos\n\nno recovery measured\n")
    print(md)
    print(summary)


if __name__ == "__main__":
    main()
