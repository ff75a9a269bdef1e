"""The `edgeweave` command: quantize, eval, generate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _load_any(name_or_dir: str):
    """A quantized checkpoint directory, or a model (full precision). -> (model, tokenizer, label)."""
    from quant.checkpoint import is_checkpoint, load_checkpoint
    from quant.models import load_float_model

    if is_checkpoint(name_or_dir):
        model, tok, manifest = load_checkpoint(name_or_dir)
        m = manifest["method"]
        return model, tok, f"{m['method']} W{m['w_bits']}A{m['a_bits']} {m['act_scheme']}"
    model, tok = load_float_model(name_or_dir)
    return model, tok, "fp32"


def cmd_quantize(a: argparse.Namespace) -> int:
    import torch

    from quant.calibration import calibration_windows
    from quant.checkpoint import save_checkpoint
    from quant.config import CalibConfig, QuantConfig
    from quant.models import load_float_model
    from quant.pipeline import quantize

    calib = CalibConfig(path=a.calib, samples=a.calib_samples, seq_len=a.calib_len)
    cfg = QuantConfig(method=a.method, w_bits=a.w_bits, a_bits=a.a_bits, act_scheme=a.act_scheme, calib=calib)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_float_model(a.model)
    ids = calibration_windows(tok, calib)
    print(f"calibrating on {ids.shape[0]} x {ids.shape[1]} tokens from {calib.path or 'the C4 sample'}", file=sys.stderr)
    report = quantize(model, cfg, ids)
    out = save_checkpoint(model, tok, cfg, report, a.out)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    print(f"wrote {out} ({size:,} bytes of tensors) in {time.time() - t0:.0f}s")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from quant.calibration import SHARED_DATA, read_text
    from quant.evaluate import perplexity, tokenize_for_eval

    text_path = a.text or SHARED_DATA / "wikitext2" / "test.txt"
    text = read_text(text_path)
    model, tok, label = _load_any(a.model)
    res = perplexity(model, tokenize_for_eval(tok, text), ctx=a.ctx, windows=a.windows)
    print(f"{a.model} [{label}] perplexity {res.ppl:.4f} on {res.windows} windows x {res.ctx} tokens of {text_path}")
    if a.json:
        Path(a.json).write_text(json.dumps({**res.to_dict(), "model": a.model, "text": str(text_path), "label": label}, indent=1))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from quant.generate import SamplingConfig, stream_text

    if a.model is None:
        raise SystemExit("edgeweave generate: give a model or checkpoint directory")
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    model, tok, _ = _load_any(a.model)
    sys.stdout.write(a.prompt)
    for piece in stream_text(model, tok, a.prompt, cfg):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The README's main job: quantize the default model if needed, then stream a reply."""
    from quant.checkpoint import is_checkpoint

    if not is_checkpoint(a.out):
        print(f"quantizing {a.model} with HAQ W8A8 into {a.out} (once; about 5-10 minutes on 2 cores)", file=sys.stderr)
        q = build_parser().parse_args(["quantize", a.model, "--method", "haq", "--out", a.out])
        if cmd_quantize(q) != 0:
            return 1
    g = build_parser().parse_args(["generate", a.out, a.prompt, "--max-new-tokens", str(a.max_new_tokens)])
    return cmd_generate(g)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeweave", description="Quantize, place and serve LLMs on edge clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="post-training quantization to an int8 checkpoint")
    q.add_argument("model", help="smollm2-135m, a Hugging Face model directory, or a .gguf file")
    q.add_argument("--method", choices=("rtn", "haq"), default="haq")
    q.add_argument("--w-bits", type=int, default=8)
    q.add_argument("--a-bits", type=int, default=8)
    q.add_argument("--act-scheme", choices=("token", "tensor"), default="token",
                   help="token: per-token dynamic activation scales; tensor: static per-tensor scales")
    q.add_argument("--calib", default=None, help="calibration text (.txt or .jsonl); default: the C4 sample")
    q.add_argument("--calib-samples", type=int, default=64)
    q.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint (METHODS.md section 6)")
    e.add_argument("model")
    e.add_argument("--text", default=None, help="default: ../shared/data/wikitext2/test.txt")
    e.add_argument("--ctx", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    e.add_argument("--json", default=None, help="write {ppl, windows, ctx, tokens, ...} here")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="stream text from a model or checkpoint")
    g.add_argument("model", nargs="?")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="quantize the default model if needed, then generate with it")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--out", default="checkpoints/smollm2-135m-haq-w8a8")
    d.add_argument("--prompt", default="The three most useful things to know about edge computing are")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:  # ModelNotFound, CheckpointError, bad text, bad options
        print(f"edgeweave {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
