"""Serving SmolLM2 W8A8 on a local Ray cluster: 1 node vs 3 nodes (separate raylets, this machine).

For each cluster: single-stream decode tokens/s (greedy, 128 tokens, median of --reps), time to
first token, per-hop overhead (median over decode steps), bytes on the wire per token, and the
throughput of 8 concurrent streams (batched decode steps) against one stream, measured alike:
decode rate against decode rate, end to end against end to end.

Per-hop overhead: with relayed steps (the default on 3 nodes: each stage passes the step on, the
last answers the front end), the step's time minus every stage's compute, over its N + 1 one-way
hops; with the front end calling each stage (1 node, or --star), a stage's round trip minus its
compute (two one-way messages: front end to stage and back).

    python bench/cluster.py [CHECKPOINT_DIR] [--reps 5] [--tokens 128] [--rounds 3] [--unary-steps] [--compare-star]
                            [--pipeline-depth N] [--compare-depth1]
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

PROMPT = "The history of the city begins in the early middle ages, when"
CLUSTERS = {"1 node": [1_000_000_000], "3 nodes": [170_000_000, 140_000_000, 140_000_000]}
CONTEXT, BATCH = 512, 8
DEPTH1 = "3 nodes, 1 step in flight"
HALTING = ", cores may halt"


def one_stream(address: str, tokens: int) -> tuple[float, float, int, float]:
    """-> (decode tokens/s after the first token, seconds to first token, tokens, end-to-end tokens/s:
    every token over the request's whole time, first token included)."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    for m in stream_generate(address, PROMPT, tokens, timeout_s=600):
        stamps.extend([time.perf_counter()] * len(m.token_ids))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0, len(stamps), len(stamps) / (stamps[-1] - t0)


def concurrent(address: str, streams: int, tokens: int) -> tuple[float, float]:
    """`streams` simultaneous requests (different prompts) -> (end-to-end tokens/s: every token over
    the whole phase, first tokens included; decode tokens/s: the tokens that arrive while every stream
    is past its first token and none has ended, over that window, as one_stream's decode rate)."""
    stamps: list[list[float]] = [[] for _ in range(streams)]

    def run(i: int) -> None:
        for m in stream_generate(address, f"{PROMPT} ({i})", tokens, timeout_s=600):
            stamps[i].extend([time.perf_counter()] * len(m.token_ids))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    e2e = sum(map(len, stamps)) / (time.perf_counter() - t0)
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    decode = sum(start < x <= end for s in stamps for x in s) / (end - start) if end > start else float("nan")
    return e2e, decode


def _result(name: str, budgets: list[int], keep_awake: bool, placement: Placement, runs: list, stats: dict,
            reps: int, conc: list, conc_s: float, conc_stats: dict) -> dict:
    rate = statistics.median(r[0] for r in runs)
    decode_steps = max(stats["steps"] - reps, 1)  # one prefill step per run
    return {"cluster": name, "budgets": budgets, "keep_awake": keep_awake, "relayed": stats["relayed"],
            "stages": [[s.first, s.last] for s in placement.stages],
            "decode_tok_s": rate, "runs_tok_s": [r[0] for r in runs], "ttft_s": statistics.median(r[1] for r in runs),
            "e2e_tok_s": statistics.median(r[3] for r in runs),
            "hop_overhead_ms": stats["hop_overhead_ms_median"], "compute_ms": stats["compute_ms_median"],
            "wire_bytes_per_token": stats["wire_bytes"] / decode_steps,
            "concurrent8_tok_s": statistics.median(c[0] for c in conc), "concurrent8_runs": [c[0] for c in conc],
            "concurrent8_decode_tok_s": statistics.median(c[1] for c in conc),
            # where a batched step's time goes: per stage compute and hop overhead (medians over the
            # decode steps), and the wall time per step of the whole concurrent phase
            "concurrent8_compute_ms": conc_stats["compute_ms_median"],
            "concurrent8_hop_overhead_ms": conc_stats["hop_overhead_ms_median"],
            "concurrent8_step_ms": conc_s * 1e3 / max(conc_stats["steps"], 1),
            # steps sent while another was in flight (relayed steps of different sessions pipelined)
            "concurrent8_overlapped_steps": conc_stats["overlapped_steps"], "concurrent8_steps": conc_stats["steps"]}


def measure(name: str, budgets: list[int], ckpt: str, reps: int, tokens: int, cpus: int, streams: bool,
            relay: bool = True, depth: int = 0, keep_awake: bool = True) -> dict:
    import ray

    with LocalCluster([LocalNode(b, cpus=cpus) for b in budgets]):
        actor, address = start_controller(ServeOptions(ckpt, context=CONTEXT, batch=BATCH, stream_steps=streams,
                                                       relay=relay, pipeline_depth=depth,
                                                       keep_awake=keep_awake))
        placement = Placement.from_dict(ray.get(actor.placement_dict.remote()))
        one_stream(address, 8)  # warm-up
        ray.get(actor.reset_stats.remote())
        runs = [one_stream(address, tokens) for _ in range(reps)]
        stats = ray.get(actor.stats.remote())
        ray.get(actor.reset_stats.remote())
        t0 = time.perf_counter()
        conc = [concurrent(address, 8, tokens) for _ in range(max(reps // 2, 1))]  # (end to end, decode)
        conc_s = time.perf_counter() - t0
        conc_stats = ray.get(actor.stats.remote())  # the batched steps of the 8 streams
        ray.get(actor.shutdown.remote(), timeout=60)
    return _result(name, budgets, keep_awake, placement, runs, stats, reps, conc, conc_s, conc_stats)


def measure_paired(ckpt: str, reps: int, tokens: int, cpus: int, streams: bool, depth: int = 0,
                   keep_awake: bool = True) -> dict[str, dict]:
    """Both CLUSTERS at once, as two pools of one local Ray cluster, each served by its own controller
    (ServeOptions.pool); their single-stream runs alternate (1 node, 3 nodes, 3 nodes, 1 node, ...), so
    each 3-node run has a 1-node run next to it in time: `pair_ratios` are the 3-node / 1-node decode
    rates of those pairs. The idle pool's processes wait on their sockets meanwhile."""
    import ray

    pools = {name: f"pool{i}" for i, name in enumerate(CLUSTERS)}
    nodes = [LocalNode(b, cpus=cpus, pool=pools[name]) for name, budgets in CLUSTERS.items() for b in budgets]
    with LocalCluster(nodes):
        served = {name: start_controller(ServeOptions(ckpt, context=CONTEXT, batch=BATCH, stream_steps=streams,
                                                      pipeline_depth=depth, keep_awake=keep_awake, pool=pool))
                  for name, pool in pools.items()}
        placements = {n: Placement.from_dict(ray.get(a.placement_dict.remote())) for n, (a, _) in served.items()}
        for actor, address in served.values():
            one_stream(address, 8)  # warm-up
            ray.get(actor.reset_stats.remote())
        names = list(CLUSTERS)
        runs: dict[str, list] = {n: [] for n in names}
        for i in range(reps):
            for n in (names if i % 2 == 0 else names[::-1]):
                runs[n].append(one_stream(served[n][1], tokens))
        stats = {n: ray.get(a.stats.remote()) for n, (a, _) in served.items()}
        conc: dict[str, list] = {n: [] for n in names}
        conc_s = dict.fromkeys(names, 0.0)
        for actor, _ in served.values():
            ray.get(actor.reset_stats.remote())
        for i in range(max(reps // 2, 1)):
            for n in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                conc[n].append(concurrent(served[n][1], 8, tokens))
                conc_s[n] += time.perf_counter() - t0
        conc_stats = {n: ray.get(a.stats.remote()) for n, (a, _) in served.items()}
        for actor, _ in served.values():
            ray.get(actor.shutdown.remote(), timeout=60)
    out = {n: _result(n, CLUSTERS[n], keep_awake, placements[n], runs[n], stats[n], reps, conc[n], conc_s[n],
                      conc_stats[n]) for n in names}
    one, three = names
    out[three]["pair_ratios"] = [b[0] / a[0] for a, b in zip(runs[one], runs[three])]
    return out


def main() -> None:
    ap = checkpoint_parser()
    ap.add_argument("--reps", type=int, default=5, help="single-stream runs per cluster and round")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="1 node then 3 nodes, this many times: the machine's speed drifts, so the ratio is taken "
                         "within each round and the median over rounds reported")
    ap.add_argument("--node-cpus", type=int, default=1,
                    help="cores (kernel threads) of every node in both clusters, so equal nodes are compared")
    ap.add_argument("--unary-steps", action="store_true",
                    help="a unary Forward per step and stage (the default: one ForwardStream per stage)")
    ap.add_argument("--compare-star", action="store_true",
                    help="each round also serves the 3 nodes with the front end calling each stage (--star)")
    ap.add_argument("--pipeline-depth", type=int, default=0,
                    help="relayed steps in flight at once on 3 nodes (serve's --pipeline-depth; 0: one per stage)")
    ap.add_argument("--compare-depth1", action="store_true",
                    help="each round also serves the 3 nodes relayed with one step in flight at a time")
    ap.add_argument("--paired", action="store_true",
                    help="serve 1 node and 3 nodes at once (two pools of one Ray cluster) and alternate their runs, "
                         "so that each 3-node run is compared with a 1-node run next to it in time")
    ap.add_argument("--no-keep-awake", action="store_true",
                    help="serve every cluster with the cores free to halt between steps (serve's --no-keep-awake)")
    ap.add_argument("--compare-awake", action="store_true",
                    help="each round also serves 1 node and 3 nodes with the cores free to halt between steps")
    a = ap.parse_args()
    ckpt = str(Path(a.checkpoint).resolve())
    awake = not a.no_keep_awake
    clusters = [(name, b, True, a.pipeline_depth, awake) for name, b in CLUSTERS.items()]
    if a.compare_star:
        clusters.append(("3 nodes, star", CLUSTERS["3 nodes"], False, 0, awake))
    if a.compare_depth1:
        clusters.append((DEPTH1, CLUSTERS["3 nodes"], True, 1, awake))
    if a.compare_awake:
        clusters += [(f"{name}{HALTING}", b, True, a.pipeline_depth, False) for name, b in CLUSTERS.items()]
    ap_paired = a.paired and not a.unary_steps
    rounds = []
    for _ in range(a.rounds):
        rnd = measure_paired(ckpt, a.reps, a.tokens, a.node_cpus, True, a.pipeline_depth, awake) if ap_paired else {}
        rnd.update({name: measure(name, b, ckpt, a.reps, a.tokens, a.node_cpus, not a.unary_steps, relay, depth, aw)
                    for name, b, relay, depth, aw in clusters if name not in rnd})
        rounds.append(rnd)
    med = statistics.median
    per_round = [{"three_vs_one_decode": r["3 nodes"]["decode_tok_s"] / r["1 node"]["decode_tok_s"],
                  **({"three_vs_one_decode_pairs": statistics.median(r["3 nodes"]["pair_ratios"])}
                     if "pair_ratios" in r["3 nodes"] else {}),
                  # like for like: decode rate vs decode rate, end to end vs end to end
                  "concurrent8_vs_one_stream_3nodes": r["3 nodes"]["concurrent8_decode_tok_s"] / r["3 nodes"]["decode_tok_s"],
                  "concurrent8_vs_one_stream_1node": r["1 node"]["concurrent8_decode_tok_s"] / r["1 node"]["decode_tok_s"],
                  "concurrent8_vs_one_stream_e2e_3nodes": r["3 nodes"]["concurrent8_tok_s"] / r["3 nodes"]["e2e_tok_s"],
                  # runs 1-13's measure: the 8 streams end to end over one stream's decode rate
                  "concurrent8_e2e_vs_one_stream_decode_3nodes":
                      r["3 nodes"]["concurrent8_tok_s"] / r["3 nodes"]["decode_tok_s"],
                  "max_hop_overhead_ms_3nodes": max(x for x in r["3 nodes"]["hop_overhead_ms"] if x is not None),
                  **({"three_star_vs_one_decode": r["3 nodes, star"]["decode_tok_s"] / r["1 node"]["decode_tok_s"],
                      "max_hop_overhead_ms_3nodes_star": max(x for x in r["3 nodes, star"]["hop_overhead_ms"]
                                                             if x is not None),
                      "concurrent8_vs_one_stream_3nodes_star":
                          r["3 nodes, star"]["concurrent8_decode_tok_s"] / r["3 nodes, star"]["decode_tok_s"]}
                     if "3 nodes, star" in r else {}),
                  **({"concurrent8_vs_one_stream_3nodes_depth1":
                      r[DEPTH1]["concurrent8_decode_tok_s"] / r[DEPTH1]["decode_tok_s"],
                      "concurrent8_pipelined_vs_depth1":
                          r["3 nodes"]["concurrent8_decode_tok_s"] / r[DEPTH1]["concurrent8_decode_tok_s"]}
                     if DEPTH1 in r else {}),
                  **({"three_vs_one_decode_halting":
                      r["3 nodes" + HALTING]["decode_tok_s"] / r["1 node" + HALTING]["decode_tok_s"],
                      "awake_vs_halting_decode_1node": r["1 node"]["decode_tok_s"] / r["1 node" + HALTING]["decode_tok_s"],
                      "awake_vs_halting_decode_3nodes":
                          r["3 nodes"]["decode_tok_s"] / r["3 nodes" + HALTING]["decode_tok_s"]}
                     if "3 nodes" + HALTING in r else {})}
                 for r in rounds]
    ratios = {k: med(x[k] for x in per_round) for k in per_round[0]}
    pairs = [x for r in rounds for x in r["3 nodes"].get("pair_ratios", [])]
    if pairs:
        ratios["three_vs_one_decode_every_pair"] = med(pairs)
    name = "cluster-unary" if a.unary_steps else "cluster"  # the unary baseline keeps its own results and section
    write_results(name, {"rounds": rounds, "ratios_per_round": per_round, "ratios": ratios, "context": CONTEXT,
                              "batch": BATCH, "tokens": a.tokens, "reps": a.reps, "checkpoint": a.checkpoint,
                              "node_cpus": a.node_cpus, "steps": "unary" if a.unary_steps else "stream",
                              "compare_star": a.compare_star, "pipeline_depth": a.pipeline_depth,
                              "keep_awake": awake, "compare_awake": a.compare_awake, "paired": ap_paired})
    rows = []
    for i, rnd in enumerate(rounds):
        for r in rnd.values():
            rows.append([str(i + 1), r["cluster"], " ".join(f"{f}-{l - 1}" for f, l in r["stages"]),
                         f"{r['decode_tok_s']:.1f}", f"{r['ttft_s'] * 1e3:.0f}",
                         " / ".join(f"{x:.2f}" for x in r["hop_overhead_ms"]),
                         " / ".join(f"{x:.1f}" for x in r["compute_ms"]), f"{r['wire_bytes_per_token']:,.0f}",
                         f"{r['e2e_tok_s']:.1f}", f"{r['concurrent8_decode_tok_s']:.1f}", f"{r['concurrent8_tok_s']:.1f}"])
    md = table(["round", "cluster", "layers per stage", "decode tok/s", "TTFT ms", "hop overhead ms",
                "stage compute ms", "wire bytes/token", "end-to-end tok/s", "8 streams decode tok/s",
                "8 streams end-to-end tok/s"], rows)
    conc_rows = [[str(i + 1), r["cluster"], f"{r['concurrent8_step_ms']:.1f}",
                  f"{r['concurrent8_overlapped_steps']} / {r['concurrent8_steps']}",
                  " / ".join(f"{x:.1f}" for x in r["concurrent8_compute_ms"] if x is not None),
                  " / ".join(f"{x:.2f}" for x in r["concurrent8_hop_overhead_ms"] if x is not None)]
                 for i, rnd in enumerate(rounds) for r in rnd.values()]
    conc_md = table(["round", "cluster", "wall ms per step", "steps overlapping another", "stage compute ms",
                     "hop overhead ms (steps alone)"], conc_rows)
    each = lambda k, f: ", ".join(f.format(x[k]) for x in per_round)  # noqa: E731
    star = f"""- the same 3 nodes with the front end calling each stage (`--star`): decode **{ratios['three_star_vs_one_decode']:.2f}x**
  1-node (rounds: {each('three_star_vs_one_decode', '{:.2f}')}); its round trip per stage less compute
  **{ratios['max_hop_overhead_ms_3nodes_star']:.2f} ms** (rounds: {each('max_hop_overhead_ms_3nodes_star', '{:.2f}')});
  8 streams / 1 stream {ratios['concurrent8_vs_one_stream_3nodes_star']:.2f}x
""" if a.compare_star else ""
    depth1 = f"""- the same 3 nodes relayed with one step in flight at a time (`--pipeline-depth 1`, runs up to 19):
  8 streams / 1 stream **{ratios['concurrent8_vs_one_stream_3nodes_depth1']:.2f}x** (rounds: {each('concurrent8_vs_one_stream_3nodes_depth1', '{:.2f}')});
  8 streams pipelined / one step at a time: **{ratios['concurrent8_pipelined_vs_depth1']:.2f}x** (rounds: {each('concurrent8_pipelined_vs_depth1', '{:.2f}')})
""" if a.compare_depth1 else ""
    halting = f"""- with the cores free to halt between steps (`--no-keep-awake`, runs up to 22), in the same rounds:
  3-node / 1-node decode **{ratios['three_vs_one_decode_halting']:.2f}x** (rounds: {each('three_vs_one_decode_halting', '{:.2f}')});
  kept awake / free to halt, decode: 1 node {ratios['awake_vs_halting_decode_1node']:.2f}x
  (rounds: {each('awake_vs_halting_decode_1node', '{:.2f}')}), 3 nodes {ratios['awake_vs_halting_decode_3nodes']:.2f}x
  (rounds: {each('awake_vs_halting_decode_3nodes', '{:.2f}')})
""" if a.compare_awake else ""
    awake_note = "(serve's default)" if awake else "never (--no-keep-awake)"
    order = ("1 node and 3 nodes served at once, their runs alternating, then the other clusters one after the other"
             if ap_paired else "1 node then 3 nodes")
    flags = ((" --unary-steps" if a.unary_steps else "") + (" --compare-star" if a.compare_star else "")
             + (f" --pipeline-depth {a.pipeline_depth}" if a.pipeline_depth else "")
             + (" --compare-depth1" if a.compare_depth1 else "") + (" --no-keep-awake" if a.no_keep_awake else "")
             + (" --compare-awake" if a.compare_awake else "") + (" --paired" if ap_paired else ""))
    paired = f"""  - paired runs (`--paired`): 1 node and 3 nodes served at once, as two pools of one Ray cluster,
    their single-stream runs alternating; median over each round's pairs (3-node run / the 1-node run next
    to it): **{ratios['three_vs_one_decode_pairs']:.2f}x** (rounds: {each('three_vs_one_decode_pairs', '{:.2f}')}); over all
    {len(pairs)} pairs: {ratios['three_vs_one_decode_every_pair']:.2f}x
""" if pairs else ""
    update_section(name, f"""## Serving on a local Ray cluster (`bench/cluster.py`{' --unary-steps' if a.unary_steps else ''})

Command: `python bench/cluster.py bench/results/checkpoints/haq-token --reps {a.reps} --tokens {a.tokens} --rounds {a.rounds} --node-cpus {a.node_cpus}{flags}`
(SmolLM2-135M HAQ W8A8 per-token; context {CONTEXT} x batch {BATCH}; each node a separate raylet on this
{machine()['cores']}-core machine with {a.node_cpus} core(s), in both clusters, so equal nodes are compared;
budgets {CLUSTERS['3 nodes']} bytes for the 3 nodes; workers keep the cores awake while steps arrive
{awake_note}; {a.rounds} rounds of {order}, median of
{a.reps} runs per cluster and round; steps {'as unary Forward calls' if a.unary_steps else 'over ForwardStream calls'};
{'the 3 nodes relay each step stage to stage, the last answering the front end (N + 1 one-way hops), so their hop overhead is the step time less all compute, per one-way hop; on 1 node (and with --star) it is a stage round trip less its compute (two one-way messages)' if not a.unary_steps else 'the front end calls each stage; hop overhead is a stage round trip less its compute'}).

{md}

The 8 concurrent streams' steps (whole concurrent phase, prefill included, over its steps; relayed
steps of different sessions overlap in the pipeline, up to one per stage unless `--pipeline-depth`
says otherwise; compute: medians over the decode steps; hop overhead: over the decode steps that had
the chain to themselves, none where every step overlapped another):

{conc_md}

Medians over the rounds of each round's figure:
- 3-node decode / 1-node decode: **{ratios['three_vs_one_decode']:.2f}x** (target >= 0.8; rounds: {each('three_vs_one_decode', '{:.2f}')})
{paired}- largest per-hop overhead, 3 nodes: **{ratios['max_hop_overhead_ms_3nodes']:.2f} ms** (target <= 1 ms; rounds: {each('max_hop_overhead_ms_3nodes', '{:.2f}')})
{star}{depth1}{halting}- 8 concurrent streams / 1 stream, decode rates, 3 nodes: **{ratios['concurrent8_vs_one_stream_3nodes']:.2f}x**
  (1 node: {ratios['concurrent8_vs_one_stream_1node']:.2f}x; target >= 3x; rounds: {each('concurrent8_vs_one_stream_3nodes', '{:.2f}')})
- the same, end to end (every token over each request's whole time, first token included), 3 nodes:
  **{ratios['concurrent8_vs_one_stream_e2e_3nodes']:.2f}x** (rounds: {each('concurrent8_vs_one_stream_e2e_3nodes', '{:.2f}')})
- runs 1-13's measure, the 8 streams end to end over one stream's decode rate, 3 nodes:
  {ratios['concurrent8_e2e_vs_one_stream_decode_3nodes']:.2f}x (rounds: {each('concurrent8_e2e_vs_one_stream_decode_3nodes', '{:.2f}')})
""")
    print(md)
    print(ratios)


if __name__ == "__main__":
    main()
