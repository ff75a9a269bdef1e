"""Adaptive layer tuning and voting on a quantized SmolLM2 checkpoint (Edge-LLM, issue 5).

Tunes CHECKPOINT on a slice of the C4 sample (documents from the middle of the file: neither the
scored first windows nor the calibration tail) with windows of --window layers, then reports:
held-out perplexity (first --windows windows of WikiText-2 and C4) before and after, tuning
memory per window vs tuning the whole model at once (quant/tune.py counts autograd's saved
activations plus gradients and Adam moments exactly; peak RSS of this process is printed too),
and perplexity with voting over the last exits of the tuned model.

    python bench/tune.py bench/results/checkpoints/haq-token [--window 2] [--steps 16] [--windows 4]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import table, update_section, write_results  # noqa: E402
from quant.calibration import SHARED_DATA, read_text  # noqa: E402
from quant.checkpoint import load_checkpoint  # noqa: E402
from quant.evaluate import perplexity, tokenize_for_eval  # noqa: E402
from quant.tune import TuneConfig, tune  # noqa: E402
from quant.voting import voting_perplexity  # noqa: E402

TEXTS = {"wikitext2": SHARED_DATA / "wikitext2" / "test.txt", "c4": SHARED_DATA / "c4" / "validation_2k.jsonl"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4, help="2048-token windows scored per text")
    ap.add_argument("--exits", default="28,30;26,28,30", help="voting exit sets, ';'-separated")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok, manifest = load_checkpoint(a.checkpoint)
    ids = {k: tokenize_for_eval(tok, read_text(p, max_chars=a.windows * 2048 * 8)) for k, p in TEXTS.items()}
    c4 = read_text(TEXTS["c4"])
    middle = c4[len(c4) // 3: len(c4) // 3 + a.samples * a.seq_len * 6]  # unseen by eval (start) and calibration (end)
    train = tokenize_for_eval(tok, middle)
    n = min(a.samples, train.numel() // a.seq_len)
    train_ids = train[: n * a.seq_len].view(n, a.seq_len)
    held = train_ids[-4:]
    train_ids = train_ids[:-4]
    before = {k: perplexity(model, v, 2048, a.windows).ppl for k, v in ids.items()}
    t0 = time.time()
    cfg = TuneConfig(window=a.window, steps=a.steps, lr=a.lr)
    r = tune(model, train_ids, held, cfg)
    seconds = time.time() - t0
    after = {k: perplexity(model, v, 2048, a.windows).ppl for k, v in ids.items()}
    layers = model.config.num_hidden_layers
    votes = {}
    for spec in a.exits.split(";"):
        exits = tuple(int(e) for e in spec.split(","))
        votes[spec] = {k: voting_perplexity(model, v, 2048, a.windows, exits).ppl for k, v in ids.items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"checkpoint": a.checkpoint, "method": manifest.method["method"], "window": a.window, "steps": a.steps,
           "lr": a.lr, "train_windows": int(train_ids.shape[0]), "seq_len": a.seq_len, "before": before, "after": after,
           "voting": votes, "report": r.to_dict(), "seconds": seconds, "peak_rss_bytes": rss}
    print(res)
    write_results("tune", res)
    mib = 2**20
    rows = [["no tuning", f"{before['wikitext2']:.3f}", f"{before['c4']:.3f}", ""],
            [f"tuned, window {a.window}", f"{after['wikitext2']:.3f}", f"{after['c4']:.3f}",
             f"{r.peak_window_bytes / mib:.0f} MiB per window vs {r.full_model_bytes / mib:.0f} MiB whole model "
             f"({r.full_model_bytes / r.peak_window_bytes:.1f}x)"]]
    for spec, v in votes.items():
        rows.append([f"tuned + voting over exits {spec} (of {layers})", f"{v['wikitext2']:.3f}", f"{v['c4']:.3f}", ""])
    update_section("tune", f"""## Adaptive layer tuning and voting (`bench/tune.py`)

Command: `python bench/tune.py {a.checkpoint} --window {a.window} --steps {a.steps} --lr {a.lr} --windows {a.windows}`.
Tuned on {train_ids.shape[0]} windows of {a.seq_len} tokens from the middle of the C4 sample (the held-out loss
on 4 more: {r.loss_before:.4f} -> {r.loss_after:.4f}); {r.windows} windows of {a.window} layers, {a.steps} steps each,
{seconds:.0f} s. Scored: first {a.windows} windows of 2048 tokens of WikiText-2 and C4. Tuning memory is autograd's
saved activations plus gradients and Adam moments of the {r.trainable_params:,} trainable parameters (weight
scales, norms), counted exactly; this process's peak RSS was {rss / 2**30:.2f} GiB (model, data and evaluation included).

{table(["model", "WikiText-2 PPL", "C4 PPL", "tuning memory"], rows)}
""")


if __name__ == "__main__":
    main()
