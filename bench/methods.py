"""Side by side: every quantization method's checkpoint with its quality, file bytes, resident bytes
and decode speed (issue 5's table).

Perplexities come from bench/quality.py (bench/results/quality.json, same checkpoints). This script
adds, per checkpoint in bench/results/checkpoints/NAME:
  - resident bytes: what a worker holding the whole model keeps in memory for its weights
    (workers.shard.shard_weight_bytes over every layer, the embedding and the head: the planner's
    own count, sparse layers decoded to dense);
  - decode tokens/s: greedy, --tokens new tokens through the integer decoder (LocalLlama), median of
    --reps, measured in one run for all configs so their ratios compare (this machine is shared).

    python bench/methods.py [--configs haq-token,tender-g8,...] [--reps 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.decode import PROMPT, decode_rate  # noqa: E402
from bench.report import RESULTS, table, update_section, write_results  # noqa: E402
from quant.checkpoint import load_checkpoint, read_manifest  # noqa: E402
from workers.decode import make_decoder  # noqa: E402
from quant.manifest import ShardRange, shard_weight_bytes  # noqa: E402

# name -> (method, scheme) for the table (bench/method_rows.json); the quality rows use the same names
ROWS = {k: tuple(v) for k, v in json.loads((Path(__file__).with_name("method_rows.json")).read_text()).items()}
TARGETS = {"tender-g8": 1.02, "mq-w8": 1.02, "haq-w4g128-token": 1.10, "haq-w4-token": 1.10, "mq-w4g128": 1.10,
           "haq-w4g128-tensor": 1.10, "haq-w4a-token": 1.10, "haq-w4g128a-token": 1.10,
           "haq-token-rot": 1.01, "haq-tensor-rot": 1.03, "haq-w4g128ar-token": 1.10, "haq-token": 1.01,
           "haq-w4g128arall-token": 1.10, "haq-w4g128ark-token": 1.10,
           "haq-tensor": 1.03, "haq-w4g128arq-token": 1.10}


def resident_bytes(manifest) -> int:
    return shard_weight_bytes(manifest, ShardRange(0, manifest.n_layers, True, True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(ROWS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    quality = json.loads((RESULTS / "quality.json").read_text())["rows"]
    fp = quality["fp"]["ppl"]
    previous = RESULTS / "methods.json"  # rows of earlier runs stay, with the date they were measured
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    same = (old.get("tokens"), old.get("reps")) == (a.tokens, a.reps)
    rows = dict(old.get("rows", {})) if same else {}
    today = time.strftime("%Y-%m-%d %H:%M")
    for name in a.configs.split(","):
        ckpt = RESULTS / "checkpoints" / name
        if not (ckpt / "edgeweave.json").is_file() or name not in quality:
            print(f"skip {name}: no checkpoint or no quality row yet", file=sys.stderr)
            continue
        manifest = read_manifest(ckpt)
        model, tok, _ = load_checkpoint(ckpt)
        dec = make_decoder(model)
        ids = tok(PROMPT)["input_ids"]
        decode_rate(dec, ids, 8)  # warm-up
        rates = [decode_rate(dec, ids, a.tokens)[0] for _ in range(a.reps)]
        rows[name] = {"ppl": quality[name]["ppl"], "file_bytes": quality[name]["bytes"],
                      "resident_bytes": resident_bytes(manifest), "decode_tok_s": statistics.median(rates),
                      "policy": manifest.method.get("layer_policy") or None, "measured": today}
        print(name, rows[name], flush=True)
        del model, dec
    base = {}  # run -> HAQ W8A8 per-token's decode rate in that run: speeds compare within a run only
    for r in rows.values():
        r.setdefault("measured", "an earlier run")  # results written before rows carried a date
    if "haq-token" in rows:
        base = {rows["haq-token"]["measured"]: rows["haq-token"]["decode_tok_s"]}
    write_results("methods", {"tokens": a.tokens, "reps": a.reps, "fp_ppl": fp, "rows": rows})
    lines = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        method, scheme = ROWS[name]
        rel = {k: r["ppl"][k] / fp[k] for k in fp}
        t = TARGETS.get(name)
        verdict = "" if t is None else (f"<= {t}x: " + ("met" if rel["wikitext2"] <= t else "**missed**"))
        b = base.get(r["measured"])
        speed = f"{r['decode_tok_s']:.1f}" + (f" ({r['decode_tok_s'] / b:.2f}x)" if b else "")
        lines.append([method, scheme, f"{r['ppl']['wikitext2']:.3f} ({rel['wikitext2']:.3f}x)",
                      f"{r['ppl']['c4']:.3f} ({rel['c4']:.3f}x)", f"{r['file_bytes']:,}", f"{r['resident_bytes']:,}",
                      speed, verdict, r["measured"]])
    update_section("methods", f"""## Methods side by side (`bench/methods.py`)

Command: `python bench/quality.py --windows 8 --calib-samples 64 --configs ...` (perplexity, file bytes), then
`python bench/methods.py --reps {a.reps} --tokens {a.tokens}` (resident bytes, decode speed). SmolLM2-135M-Instruct,
FP WikiText-2 {fp['wikitext2']:.3f}, C4 {fp['c4']:.3f} (first 8 windows of 2048). Resident: weight bytes a worker
holding the whole model keeps (the planner's count). Decode: greedy, {a.tokens} new tokens through the integer
decoder, median of {a.reps}; in brackets, relative to HAQ W8A8 per-token measured in the same run (rows of
other runs have no bracket: this shared machine's speed drifts between runs). Last column: when the row's
decode speed was measured (`--configs` re-measures some rows and keeps the rest). torch threads: {torch.get_num_threads()}.

{table(["method", "scheme", "WikiText-2 PPL (x FP)", "C4 PPL (x FP)", "file bytes", "resident bytes", "decode tok/s", "target", "measured"], lines)}
""")


if __name__ == "__main__":
    main()
