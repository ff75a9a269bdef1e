"""Decode tokens/s: quantized SmolLM2 (int8 kernels) vs the same model in float32 transformers.

Greedy, 128 new tokens after a short prompt, median of 5 runs each, both through the same
generation loop (quant.generate), so the ratio isolates the model. Adds llama.cpp on the same
GGUF when llama-cpp-python is installed.

    python bench/decode.py CHECKPOINT_DIR [--reps 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import machine, table, update_section, write_results  # noqa: E402
from quant.checkpoint import load_checkpoint  # noqa: E402
from quant.generate import HFDecoder, SamplingConfig, generate_tokens  # noqa: E402
from workers.decode import make_decoder  # noqa: E402
from quant.models import load_float_model, resolve_model  # noqa: E402
from workers.llama_stage import LocalLlama  # noqa: E402

PROMPT = "The history of the city begins in the early middle ages, when"


def decode_rate(decoder, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """-> (decode tokens/s after the first token, seconds to first token)."""
    cfg = SamplingConfig(max_new_tokens=tokens)
    t0 = time.perf_counter()
    stamps = []
    for _ in generate_tokens(decoder, prompt_ids, cfg, eos_ids=set()):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - t0


def llama_cpp_rate(tokens: int, reps: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    src = resolve_model("smollm2-135m")
    llm = Llama(model_path=str(src.directory / src.gguf_file), n_threads=torch.get_num_threads(), verbose=False)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        out = llm(PROMPT, max_tokens=tokens, temperature=0.0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    qmodel, tok, manifest = load_checkpoint(a.checkpoint)
    fmodel, _ = load_float_model("smollm2-135m")
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    res: dict[str, list] = {"int8": [], "int8_ops": [], "fp32": []}
    fast = make_decoder(qmodel)
    ops = LocalLlama(qmodel, native=False) if isinstance(fast, LocalLlama) and fast.stage.native_ready else None
    for _ in range(a.reps):  # interleaved, so all see the same machine load
        res["int8"].append(decode_rate(fast, ids, a.tokens))
        if ops is not None:
            res["int8_ops"].append(decode_rate(ops, ids, a.tokens))
        res["fp32"].append(decode_rate(HFDecoder(fmodel), ids, a.tokens))
    res = {k: v for k, v in res.items() if v}
    med = {k: statistics.median(r for r, _ in v) for k, v in res.items()}
    ttft = {k: statistics.median(t for _, t in v) for k, v in res.items()}
    lcpp = llama_cpp_rate(a.tokens, a.reps)
    m = manifest.method
    label = f"{m['method']} W8A8 {m['act_scheme']}"
    write_results("decode", {"runs": res, "median_tok_s": med, "ttft_s": ttft, "llama_cpp_tok_s": lcpp, "checkpoint": label})
    ratio = med["int8"] / med["fp32"]
    rows = [["float32 transformers", f"{med['fp32']:.1f}", f"{ttft['fp32'] * 1e3:.0f}", "1.00x"]]
    if "int8_ops" in med:
        rows.append([f"edgeweave {label}, stage as torch ops (`native=False`)", f"{med['int8_ops']:.1f}",
                     f"{ttft['int8_ops'] * 1e3:.0f}", f"{med['int8_ops'] / med['fp32']:.2f}x"])
    rows.append([f"edgeweave {label}" + (", C stage (default)" if "int8_ops" in med else ""), f"{med['int8']:.1f}",
                 f"{ttft['int8'] * 1e3:.0f}", f"**{ratio:.2f}x**"])
    rows.append(["llama.cpp Q4_1 (llama-cpp-python)", f"{lcpp:.1f}" if lcpp else "not installed", "", ""])
    mc = machine()
    update_section("decode", f"""## Decode speed (`bench/decode.py`)

Command: `python bench/decode.py {a.checkpoint} --reps {a.reps} --tokens {a.tokens}`. SmolLM2-135M, greedy,
{a.tokens} new tokens, median of {a.reps} interleaved runs, {mc['cores']} cores ({', '.join(mc['isa'])}).

{table(["model", "decode tokens/s", "time to first token ms", "vs float32"], rows)}
""")
    print(f"int8 {med['int8']:.1f} tok/s, fp32 {med['fp32']:.1f} tok/s, ratio {ratio:.2f}x, llama.cpp {lcpp}")


if __name__ == "__main__":
    main()
