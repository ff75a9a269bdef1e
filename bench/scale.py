"""A model no single node holds: a Llama-2-7B-shaped model (seeded random bf16 weights, 13.5 GB)
quantized in bounded memory, placed on a local 3-node cluster whose every budget is under half the
quantized model, and served; against a 1-process run of the same checkpoint and llama.cpp (Q8_0 of the
same weights, llama-cpp-python, 2 threads), all in this one run.

Phases, one after another, each heavy one in its own process so that at most one copy of the model
is resident at a time (a sampler records the machine's used memory throughout and the JSON reports
its peak above the idle start: the 20 GB ceiling is checked, not assumed):
  1. write the bf16 model (bench/synthetic.py) and its GGUF Q8_0, once (kept under --work);
  2. `edgeweave quantize --method rtn` (and haq with --haq): peak RSS of that process (wait4) and time;
  3. memory read bandwidth (2 threads, sum over 2 GiB) -> the bandwidth limit = bandwidth / weight bytes read per token;
  4. plan + serve on 3 local nodes (--budgets), greedy 16 tokens x --reps, decode tokens/s after the first token;
  5. the same checkpoint in one process (workers/shard.load_shard of every layer), same prompt and tokens;
  6. llama.cpp on the Q8_0 GGUF, same prompt ids and token count.

    python bench/scale.py --json bench/results/scale.json [--work /tmp/edgeweave-scale] [--haq] [--shape small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.report import RESULTS, command, git_rev, machine, table, update_section  # noqa: E402
from bench.synthetic import LLAMA2_7B, SMALL, write_gguf_q8_0, write_hf_model  # noqa: E402

PROMPT = "The history of the city begins in the early middle ages, when"
GB = 1e9


class MemorySampler:
    """The machine's used memory (total - available) every 0.5 s; peak above the level at start."""

    def __init__(self) -> None:
        import psutil

        self._vm = psutil.virtual_memory
        self.start = self._used()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _used(self) -> int:
        m = self._vm()
        return int(m.total - m.available)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._used())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak - self.start


def run_child(args: list[str], env: dict | None = None) -> tuple[int, float, str]:
    """-> (peak RSS bytes of that process, seconds, its stdout). stderr passes through (progress bars)."""
    t0 = time.time()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])}... failed with exit code {p.returncode}")
    return usage.ru_maxrss * 1024, time.time() - t0, out


def quantize(model_dir: Path, out: Path, method: str, samples: int, seq_len: int) -> dict:
    if (out / "edgeweave.json").is_file() and (out / ".bench-quantize.json").is_file():
        return json.loads((out / ".bench-quantize.json").read_text())
    exe = str(Path(sys.executable).parent / "edgeweave")
    rss, secs, _ = run_child([exe, "quantize", str(model_dir), "--method", method, "--calib-samples", str(samples),
                              "--calib-len", str(seq_len), "--out", str(out)])
    res = {"peak_rss_bytes": rss, "seconds": secs, "calib_samples": samples, "calib_len": seq_len}
    (out / ".bench-quantize.json").write_text(json.dumps(res))
    return res


def haq_phase(a: argparse.Namespace, work: Path, shape) -> dict:
    """HAQ W8A8 of the model (or of one of its widths and a.haq_layers layers): peak RSS and time."""
    from dataclasses import replace

    from quant.calibration import default_calibration_path

    layers = a.haq_layers or shape.layers
    tag = f"{a.shape}" if layers == shape.layers else f"{a.shape}-{layers}layers"
    model_dir = write_hf_model(work / f"llama-{tag}-bf16", replace(shape, layers=layers), default_calibration_path())
    res = quantize(model_dir, work / f"llama-{tag}-haq", "haq", a.calib_samples, a.calib_len)
    return {**res, "layers": layers, "seconds_per_layer": res["seconds"] / layers,
            "estimated_full_depth_seconds": res["seconds"] / layers * shape.layers}


def bytes_read_per_token(m) -> int:
    """What one decode step reads: every tensor but the input embedding, of which it reads one row."""
    embed = [t for name, t in m.tensors.items() if name.startswith("model.embed_tokens.")]
    rows = max((t.shape[0] for t in embed), default=1)
    return sum(t.file_bytes for t in m.tensors.values()) - sum(t.file_bytes - t.file_bytes // rows for t in embed)


def bandwidth_gb_s(reps: int = 7) -> float:
    """Read bandwidth with 2 threads: the median of summing 2 GiB of float32."""
    import torch

    torch.set_num_threads(2)
    x = torch.ones(1 << 29)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[1:]) / GB


def serve_cluster(ckpt: Path, budgets: list[int], tokens: int, reps: int, context: int) -> dict:
    import ray

    from orchestrator.client import stream_generate
    from orchestrator.controller import ServeOptions, start_controller
    from orchestrator.local import LocalCluster, LocalNode
    from orchestrator.planner import Placement, format_placement

    with LocalCluster([LocalNode(b, cpus=2) for b in budgets]):
        t0 = time.time()
        actor, address = start_controller(ServeOptions(str(ckpt), context=context, batch=1))
        load_s = time.time() - t0
        placement = Placement.from_dict(ray.get(actor.placement_dict.remote()))
        print(format_placement(placement), file=sys.stderr)
        runs, ids = [], []
        for r in range(reps + 1):  # the first run warms up
            stamps, got = [], []
            for m in stream_generate(address, PROMPT, tokens, timeout_s=1200):
                stamps.extend([time.perf_counter()] * len(m.token_ids))
                got.extend(m.token_ids)
            if r:
                runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                ids.append(got)
            if r == 0:
                ray.get(actor.reset_stats.remote())
        stats = ray.get(actor.stats.remote())
        ray.get(actor.shutdown.remote(), timeout=120)
    stages = [{"first": s.first, "last": s.last, "weight_bytes": s.weight_bytes, "budget_bytes": s.budget_bytes,
               "compute_ms": c, "gb_s": s.weight_bytes / (c * 1e-3) / GB if c else None}
              for s, c in zip(placement.stages, stats["compute_ms_median"])]
    return {"tok_s": statistics.median(runs), "runs_tok_s": runs, "tokens": ids[0], "all_runs_same": all(i == ids[0] for i in ids),
            "stages": stages, "hop_overhead_ms": stats["hop_overhead_ms_median"], "load_seconds": load_s}


def one_process(ckpt: Path, tokens: int, reps: int, context: int) -> dict:
    """The checkpoint's every layer in this process, through the worker's own stage code (C stage)."""
    import torch

    from quant.checkpoint import read_manifest
    from quant.manifest import ShardRange
    from transformers import AutoTokenizer
    from workers.shard import load_shard

    torch.set_num_threads(2)
    m = read_manifest(ckpt)
    t0 = time.time()
    shard = load_shard(ckpt, ShardRange(0, m.n_layers, True, True), context, progress=True)
    load_s = time.time() - t0
    assert shard.embed is not None and shard.head is not None
    prompt = AutoTokenizer.from_pretrained(ckpt / "tokenizer")(PROMPT)["input_ids"]
    runs, ids = [], []
    with torch.inference_mode():
        for r in range(reps + 1):
            cache = shard.stage.new_cache(context)
            x = torch.tensor(prompt)
            out, stamps = [], []
            for _ in range(tokens):
                h = shard.stage.forward(shard.embed(x), cache)
                tok = int(shard.head(h[-1:])[0].argmax())
                stamps.append(time.perf_counter())
                out.append(tok)
                x = torch.tensor([tok])
            if r:
                runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                ids.append(out)
    return {"tok_s": statistics.median(runs), "runs_tok_s": runs, "tokens": ids[0], "prompt_ids": prompt,
            "native": shard.stage.native_ready, "load_seconds": load_s}


def llama_cpp(gguf: Path, prompt: list[int], tokens: int, reps: int, context: int) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"tok_s": None, "why": "llama-cpp-python is not installed (pip install '.[bench]')"}
    llm = Llama(model_path=str(gguf), n_threads=2, n_threads_batch=2, n_ctx=context, verbose=False)
    runs, ids = [], []
    for r in range(reps + 1):
        stamps, out = [], []
        for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(int(t))
            if len(out) == tokens:
                break
        if r:
            runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            ids.append(out)
    import llama_cpp as lc

    return {"tok_s": statistics.median(runs), "runs_tok_s": runs, "tokens": ids[0], "version": lc.__version__}


def child_phase(a: argparse.Namespace) -> None:
    """`--phase one-process|llama-cpp`: run one phase in this (child) process, JSON on stdout."""
    if a.phase == "one-process":
        res = one_process(Path(a.ckpt), a.tokens, a.reps, a.context)
    else:
        res = llama_cpp(Path(a.gguf), json.loads(a.prompt_ids), a.tokens, a.reps, a.context)
    print(json.dumps(res))


def _child(a: argparse.Namespace, phase: str, **extra) -> dict:
    args = [sys.executable, __file__, "--phase", phase, "--tokens", str(a.tokens), "--reps", str(a.reps),
            "--context", str(a.context)] + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    rss, secs, out = run_child(args, env={"OMP_NUM_THREADS": "2"})
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": rss, "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(RESULTS / "scale.json"))
    ap.add_argument("--work", default="/tmp/edgeweave-scale", help="where the model, GGUF and checkpoints go (~30 GB)")
    ap.add_argument("--shape", choices=("7b", "small"), default="7b")
    ap.add_argument("--budgets", default="3.0GB,2.6GB,2.6GB")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context", type=int, default=64, help="tokens per session the nodes reserve KV memory for")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--haq", action="store_true", help="also quantize with HAQ (slow at 7B) and report its peak RSS")
    ap.add_argument("--haq-layers", type=int, default=0,
                    help="HAQ on a model of the same widths with this many layers (peak memory is per layer; time "
                         "per layer x 32 estimates the full depth); 0: the full model")
    ap.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from --json")
    ap.add_argument("--haq-only", action="store_true",
                    help="only the HAQ phase, merged into an existing --json (after a full run)")
    ap.add_argument("--phase", choices=("one-process", "llama-cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        return child_phase(a)
    if a.report_only:
        return report(a, json.loads(Path(a.json).read_text()))
    run(a)


def run(a: argparse.Namespace) -> None:
    from quant.calibration import default_calibration_path
    from quant.checkpoint import read_manifest
    from quant.manifest import parse_bytes
    from quant.sources import open_source

    sampler = MemorySampler()
    work = Path(a.work)
    shape = LLAMA2_7B if a.shape == "7b" else SMALL
    if a.haq_only:
        res = json.loads(Path(a.json).read_text())
        res["quantize"]["haq"] = haq_phase(a, work, shape)
        Path(a.json).write_text(json.dumps(res, indent=1))
        return report(a, res)
    model_dir = write_hf_model(work / f"llama-{a.shape}-bf16", shape, default_calibration_path())
    gguf = write_gguf_q8_0(model_dir, work / f"llama-{a.shape}-q8_0.gguf")
    float_bytes = open_source(str(model_dir)).stored_bytes()
    quant = {"rtn": quantize(model_dir, work / f"llama-{a.shape}-rtn", "rtn", a.calib_samples, a.calib_len)}
    ckpt = work / f"llama-{a.shape}-rtn"
    m = read_manifest(ckpt)
    model_bytes = sum(t.file_bytes for t in m.tensors.values())
    read_bytes = bytes_read_per_token(m)
    bw = bandwidth_gb_s()
    budgets = [parse_bytes(b) for b in a.budgets.split(",")]
    cluster = serve_cluster(ckpt, budgets, a.tokens, a.reps, a.context)
    single = _child(a, "one-process", ckpt=ckpt)
    peer = _child(a, "llama-cpp", gguf=gguf, prompt_ids=json.dumps(single["prompt_ids"]))
    limit = bw * GB / read_bytes  # tokens/s if every byte a token reads is read once at the measured rate
    res = {"shape": a.shape, "float_bytes": float_bytes, "model_bytes": model_bytes, "bytes_read_per_token": read_bytes,
           "quantize_peak_rss_bytes": quant["rtn"]["peak_rss_bytes"], "quantize_seconds": quant["rtn"]["seconds"],
           "quantize": quant, "node_budgets_bytes": budgets, "identical": cluster["tokens"] == single["tokens"],
           "decode_tok_s_3node": cluster["tok_s"], "decode_tok_s_1proc": single["tok_s"],
           "llama_cpp_tok_s": peer["tok_s"], "bandwidth_gb_s": bw, "bandwidth_limit_tok_s": limit,
           "cluster": cluster, "one_process": single, "llama_cpp": peer,
           "peak_machine_memory_above_start_bytes": sampler.stop()}
    if a.haq:  # last: the timed phases above ran on an otherwise idle machine
        quant["haq"] = haq_phase(a, work, shape)
    res = {"command": command(), "commit": git_rev(), "machine": machine(), **res}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    report(a, res)


def _depth(v: dict) -> str:
    if v.get("layers") in (None, 32):
        return ""
    return (f" ({v['layers']} of the 32 layers at full width; {v['seconds_per_layer']:.0f} s per layer, "
            f"so about {v['estimated_full_depth_seconds'] / 60:.0f} min at full depth)")


def report(a: argparse.Namespace, r: dict) -> None:
    lim = r["bandwidth_limit_tok_s"]
    peer = r["llama_cpp_tok_s"]
    rows = [["3 nodes (edgeweave)", f"{r['decode_tok_s_3node']:.2f}", f"{r['decode_tok_s_3node'] / lim:.2f}",
             f"{r['decode_tok_s_3node'] / peer:.2f}x" if peer else "n/a"],
            ["1 process (edgeweave)", f"{r['decode_tok_s_1proc']:.2f}", f"{r['decode_tok_s_1proc'] / lim:.2f}",
             f"{r['decode_tok_s_1proc'] / peer:.2f}x" if peer else "n/a"],
            ["llama.cpp Q8_0, 2 threads", f"{peer:.2f}" if peer else "n/a", f"{peer / lim:.2f}" if peer else "n/a", "1.00x"]]
    stages = table(["stage", "layers", "weights GB", "budget GB", "compute ms/token", "GB/s"],
                   [[i, f"{s['first']}-{s['last'] - 1}", f"{s['weight_bytes'] / GB:.2f}", f"{s['budget_bytes'] / GB:.2f}",
                     f"{s['compute_ms']:.0f}", f"{s['gb_s']:.1f}"] for i, s in enumerate(r["cluster"]["stages"])])
    q = r["quantize"]
    md = f"""## A model no single node holds (`bench/scale.py`)

Command: `{r.get("command") or command()}`. Shape: Llama-2-7B (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab 32000),
seeded random bf16 weights ({r['float_bytes'] / GB:.1f} GB), quantized RTN W8A8 per-token
({r['model_bytes'] / GB:.2f} GB of tensors). Node budgets {', '.join(f'{b / GB:.1f}' for b in r['node_budgets_bytes'])} GB
(largest < half the model: {max(r['node_budgets_bytes']) < r['model_bytes'] / 2}). Greedy {a.tokens} tokens, median of {a.reps}
runs after a warm-up; decode tokens/s counts from the first token. Read bandwidth (2 threads, sum over 2 GiB):
{r['bandwidth_gb_s']:.1f} GB/s; a token reads {r.get('bytes_read_per_token', r['model_bytes']) / GB:.2f} GB (every tensor but
the input embedding, of which one row), so the bandwidth limit is {lim:.2f} tokens/s.

| quantize | peak RSS | time | calibration |
|---|---|---|---|
""" + "\n".join(f"| {k} W8A8{_depth(v)} | {v['peak_rss_bytes'] / GB:.2f} GB | {v['seconds'] / 60:.1f} min | "
                f"{v['calib_samples']} x {v['calib_len']} tokens |" for k, v in q.items()) + f"""

{table(["decode", "tokens/s", "x bandwidth limit", "x llama.cpp"], rows)}

3-node output identical to the 1-process run: **{r['identical']}**. Peak memory of the machine above its idle
start, over the whole run: {r['peak_machine_memory_above_start_bytes'] / GB:.1f} GB (one phase at a time).

Per stage (3 nodes): weights read per token over the stage's median compute time per decode step.

{stages}

Peak RSS per process: quantize (rtn) {q['rtn']['peak_rss_bytes'] / GB:.2f} GB, one process
{r['one_process']['peak_rss_bytes'] / GB:.2f} GB, llama.cpp {r['llama_cpp'].get('peak_rss_bytes', 0) / GB:.2f} GB (its file mapping).

Targets: quantize peak RSS <= 4 GB: """ + ", ".join(f"{k} {v['peak_rss_bytes'] / GB:.2f} GB" for k, v in q.items()) + f"""; largest
budget < half the model: {max(r['node_budgets_bytes']) / r['model_bytes']:.2f} of it; identical: {r['identical']};
3-node decode >= 0.75 x the bandwidth limit: {r['decode_tok_s_3node'] / lim:.2f}; >= 1.0 x llama.cpp:
{r['decode_tok_s_3node'] / peer if peer else float('nan'):.2f}; machine memory <= 20 GB: {r['peak_machine_memory_above_start_bytes'] / GB:.1f} GB above idle.
"""
    update_section("scale", md)


if __name__ == "__main__":
    main()
