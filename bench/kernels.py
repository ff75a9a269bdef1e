"""Quantized linear (activation quantization + int8 GEMM + rescale) vs float32 F.linear.

Weights rotate among copies totalling more than 4x the last-level cache, so every call streams
its weights from memory. Reports median microseconds, speed-up, achieved GB/s of weight traffic,
and the machine's measured read bandwidth; at M=512 a breakdown of where the time goes.

    python bench/kernels.py [--reps 15]
    python bench/kernels.py --tender [--reps 15]   # Tender's kernel next to plain W8A8 (own section)
    python bench/kernels.py --w4 [--reps 15]       # the packed W4A8 kernel next to W8A8 (own section)
    python bench/kernels.py --decode-gemm [--baseline OLD.c]  # decode-sized GEMMs over 30 layers (own section)
    python bench/kernels.py --decode-w4 [--baseline OLD.c]    # the same for the packed W4A8 linear (own section)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/kernels.py
# would shadow the `kernels` package that transformers imports)
from bench.report import machine, median_time, table, update_section, write_results  # noqa: E402
from quant.int4 import pack_int4, unpack_int4  # noqa: E402
from quant.kernels import W4_FUSED_MAX_M, W4_NIBBLE_PER_CHANNEL_MAX_M, int4_linear, int8_linear, int8_linear_grouped, int8_matmul, quantize_activations  # noqa: E402
from quant.tender import tender_linear  # noqa: E402

LLC_BYTES = 32 << 20
SHAPES = {  # name: (out N, in K)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "smollm2 lm_head 49152x576": (49152, 576),
    "4096x4096": (4096, 4096),
    "4096x14336": (14336, 4096),
}
TOKENS = (1, 8, 64, 512)


def read_bandwidth() -> float:
    """GB/s of a full-tensor read (sum) over 1 GiB: the ceiling for weight streaming."""
    x = torch.ones(1 << 28)  # 1 GiB float32
    t = median_time(lambda: x.sum(), reps=5)
    return x.numel() * 4 / t / 1e9


def copies_for(bytes_each: int) -> int:
    return max(2, -(-4 * LLC_BYTES // bytes_each))


def rotating_weights(n: int, k: int):
    """-> (float32 copies, int8 copies, int8 scales [N], generator): enough copies of [N, K] that
    cycling through them streams the weights from memory on every call."""
    g = torch.Generator().manual_seed(0)
    wf = [torch.randn(n, k, generator=g) for _ in range(copies_for(4 * n * k))]
    wq = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(copies_for(n * k))]
    return wf, wq, torch.rand(n, generator=g) * 0.01, g


def bench_shape(n: int, k: int, reps: int) -> list[dict]:
    wf, wq, ws, g = rotating_weights(n, k)
    rows = []
    for m in TOKENS:
        x = torch.randn(m, k, generator=g)
        i = [0]

        def f32():
            i[0] += 1
            return F.linear(x, wf[i[0] % len(wf)])

        def i8():
            i[0] += 1
            return int8_linear(x, wq[i[0] % len(wq)], ws)

        r = max(3, reps // (1 + m // 64)) if n * k > 10_000_000 else reps
        tf, tq = median_time(f32, r), median_time(i8, r)
        rows.append({"m": m, "f32_us": tf * 1e6, "int8_us": tq * 1e6, "speedup": tf / tq,
                     "f32_gbs": 4 * n * k / tf / 1e9, "int8_gbs": n * k / tq / 1e9,
                     "int8_gmacs": m * n * k / tq / 1e9, "f32_gmacs": m * n * k / tf / 1e9})
    return rows


def breakdown(n: int, k: int, m: int, reps: int) -> dict:
    """Microseconds in each stage of the quantized linear at M tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g)
    q, sx = quantize_activations(x)
    acc = int8_matmul(q, w)
    return {
        "quantize_us": median_time(lambda: quantize_activations(x), reps) * 1e6,
        "int8_gemm_us": median_time(lambda: int8_matmul(q, w), reps) * 1e6,
        "rescale_us": median_time(lambda: acc.float() * (sx[:, None] * ws[None, :]), reps) * 1e6,
        "fused_us": median_time(lambda: int8_linear(x, w, ws), reps) * 1e6,
        "f32_us": median_time(lambda: F.linear(x, w.float()), reps) * 1e6,
    }


TENDER_SHAPES = ("smollm2 q/o 576x576", "smollm2 gate/up 1536x576", "smollm2 down 576x1536", "4096x4096")


def bench_tender(reps: int) -> None:
    """Tender (G = 4 and 8) vs per-token W8A8 vs float32, same rotating weights."""
    results = {}
    for name in TENDER_SHAPES:
        n, k = SHAPES[name]
        wf, wq, ws, g = rotating_weights(n, k)
        rows = []
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            i = [0]

            def nxt(lst):
                i[0] += 1
                return lst[i[0] % len(lst)]

            r = max(3, reps // (1 + m // 64)) if n * k > 10_000_000 else reps
            t = {"f32": median_time(lambda: F.linear(x, nxt(wf)), r),
                 "w8a8": median_time(lambda: int8_linear(x, nxt(wq), ws), r),
                 "tender4": median_time(lambda: tender_linear(x, nxt(wq), ws, groups=4), r),
                 "tender8": median_time(lambda: tender_linear(x, nxt(wq), ws, groups=8), r)}
            rows.append({"m": m, **{f"{k_}_us": v * 1e6 for k_, v in t.items()}})
            print(name, m, {k_: round(v * 1e6) for k_, v in t.items()}, flush=True)
        results[name] = rows
    write_results("kernels_tender", {"shapes": results})
    md_rows = [[name, r["m"], f"{r['f32_us']:.0f}", f"{r['w8a8_us']:.0f}", f"{r['tender4_us']:.0f}",
                f"{r['tender8_us']:.0f}", f"{r['w8a8_us'] / r['tender4_us']:.2f}x"]
               for name, rs in results.items() for r in rs]
    update_section("kernels-tender", f"""## Tender's kernel next to W8A8 (`bench/kernels.py --tender`)

Command: `python bench/kernels.py --tender --reps {reps}`. Tender (quant/tender.py): per-chunk bias removal,
channel groups with power-of-two scales, one int8 GEMM per group on the group's channels, int32
shift-accumulate, one float rescale, plus the bias (two int8 rows) through the same GEMM. W8A8 = the fused
per-token kernel. Median microseconds; weights rotate as above.

{table(["shape (out x in)", "M", "f32 us", "W8A8 us", "Tender G=4 us", "Tender G=8 us", "W8A8 / Tender G=4"], md_rows)}

Tender's weights are stored in calibration-magnitude column order, so each group is a contiguous
column slice that the strided int8 GEMM streams in place (one pass over the weights in total, the
bias riding along as two extra rows). What it pays on this CPU is G GEMM calls on narrower slices,
the per-chunk grouping in torch, and the int32 shift-accumulate: about 2x plain W8A8 at M = 1-64 on
the large shape, more on SmolLM2's small ones where the fixed per-call cost dominates. The paper's
accelerator does the grouping in hardware. What Tender buys is accuracy without per-token float
scales: see the quality table (G = 8: 1.020x FP).
""")


W4_SHAPES = ("smollm2 q/o 576x576", "smollm2 gate/up 1536x576", "smollm2 down 576x1536", "4096x4096")


def bench_w4(reps: int) -> None:
    """Packed W4A8 (group-128 with zero points; per channel) vs W8A8 vs float32, and the path it
    replaced (unpack to int8 with torch, then the grouped GEMM). Same rotating-weights rule."""
    results = {}
    for name in W4_SHAPES:
        n, k = SHAPES[name]
        wf, wq, ws, g = rotating_weights(n, k)
        w4 = [pack_int4(torch.randint(0, 16, (n, k), dtype=torch.int8, generator=g), signed=False)
              for _ in range(copies_for(n * k // 2))]
        groups = -(-k // 128)
        sg = torch.rand(n, groups, generator=g) * 0.01
        zero = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=g)
        rows = []
        for m in (1, 8, 16, 64):
            x = torch.randn(m, k, generator=g)
            i = [0]

            def nxt(lst):
                i[0] += 1
                return lst[i[0] % len(lst)]

            r = max(3, reps // (1 + m // 64))
            t = {"f32": median_time(lambda: F.linear(x, nxt(wf)), r),
                 "w8a8": median_time(lambda: int8_linear(x, nxt(wq), ws), r),
                 "w4g128": median_time(lambda: int4_linear(x, nxt(w4), sg, 128, zero=zero), r),
                 "w4ch": median_time(lambda: int4_linear(x, nxt(w4), ws, 0), r),
                 "w4_unpack": median_time(lambda: int8_linear_grouped(x, unpack_int4(nxt(w4), k), sg, 128), max(3, r // 3))}
            rows.append({"m": m, **{f"{k_}_us": v * 1e6 for k_, v in t.items()}})
            print(name, m, {k_: round(v * 1e6) for k_, v in t.items()}, flush=True)
        results[name] = rows
    write_results("kernels_w4", {"shapes": results, "machine": machine()})
    md_rows = [[name, r["m"], f"{r['f32_us']:.0f}", f"{r['w8a8_us']:.0f}", f"{r['w4g128_us']:.0f}",
                f"{r['w4ch_us']:.0f}", f"{r['w4_unpack_us']:.0f}", f"{r['w8a8_us'] / r['w4g128_us']:.2f}x",
                f"{r['w4_unpack_us'] / r['w4g128_us']:.1f}x"]
               for name, rs in results.items() for r in rs]
    update_section("kernels-w4", f"""## The packed W4A8 kernel (`bench/kernels.py --w4`)

Command: `python bench/kernels.py --w4 --reps {reps}`. `quant/kernels.int4_linear`: one C call (`ew_linear_w4a8`)
multiplies the packed nibbles with up to 8 activation rows at a time, int32 per 128-column group, one
scale per group. It runs for up to {W4_FUSED_MAX_M} rows, and beyond that wherever K and the group are
multiples of 64 (the nibbles multiplied as bytes; up to {W4_NIBBLE_PER_CHANNEL_MAX_M} rows with one scale per row).
Otherwise the weights are unpacked to int8 once (in C) and the int8 GEMM runs. "unpack path" is what W4
layers ran before the packed kernel: torch unpacking to int8 on every call, then the grouped GEMM. Median
microseconds; weights rotate as above.

{table(["shape (out x in)", "M", "f32 us", "W8A8 us", "W4 g128 asym us", "W4 per-channel us", "unpack path us",
        "W8A8 / W4 g128", "unpack / W4 g128"], md_rows)}
""")


LAYER_SHAPES = ((1728, 576), (576, 576), (3072, 576), (576, 1536))  # SmolLM2 qkv, o, gate|up, down (N, K)


def _gemm_lib(source: Path | None):
    """The kernel library: edgeweave's (source None), or one built from another int8_gemm.c."""
    import ctypes
    import tempfile

    from quant.native import _compile, load_kernels
    if source is None:
        return load_kernels()
    target = Path(tempfile.mkdtemp()) / "baseline.so"
    _compile((source,), target)
    lib = ctypes.CDLL(str(target))
    lib.ew_gemm_s8s8s32.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ew_linear_w4a8.argtypes = [i64, i64, i64, ptr, ctypes.c_float, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr]
    return lib


def _ab_libs(baseline: Path | None) -> dict:
    """{"baseline": that source's library (if given), "edgeweave": ours}, in timing order."""
    libs = {"edgeweave": _gemm_lib(None)}
    return libs if baseline is None else {"baseline": _gemm_lib(baseline), **libs}


# (shapes (N, K), layers, threads, label): SmolLM2's four weight shapes over its 30 layers on one thread
# (a node's core), or Llama-2-7B's over 2 layers (404 MB) on the machine's 2 threads (a 7B stage).
DECODE_WIDTHS = {
    "smollm2": (LAYER_SHAPES, 30, 1, "SmolLM2's 30 layers (qkv 1728x576, o 576x576, gate|up 3072x576, down 576x1536: "
                "121 MB, streamed from memory), one thread"),
    "7b": (((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)), 2, 2,
           "2 layers of Llama-2-7B's widths (qkv 12288x4096, o 4096x4096, gate|up 22016x4096, down 4096x11008: "
           "404 MB, streamed from memory), 2 threads"),
}


def bench_decode_gemm(reps: int, baseline: Path | None, widths: str = "smollm2") -> None:
    """The int8 GEMM alone (ew_gemm_s8s8s32) over the layers of DECODE_WIDTHS[widths] at the row counts of
    decode steps: 1 session, and up to 8 (16) batched. The layers' weights exceed the L3, so every call
    streams its weights from memory, as in decode. With --baseline, another int8_gemm.c (e.g. an earlier
    commit's) is timed interleaved with this one. GB/s: weight bytes over time, next to the read bandwidth."""
    import numpy as np

    shapes, n_layers, threads, label = DECODE_WIDTHS[widths]
    torch.set_num_threads(threads)
    libs = _ab_libs(baseline)
    rng = np.random.default_rng(0)
    weights = [[rng.integers(-128, 128, s, dtype=np.int8) for s in shapes] for _ in range(n_layers)]
    layer_bytes = sum(n * k for n, k in shapes) * n_layers
    rows_m = (1, 2, 4, 8, 16) if widths == "smollm2" else (1, 2, 4, 8)
    ks = sorted({k for _, k in shapes})
    times: dict[tuple[str, int], list[float]] = {(name, m): [] for name in libs for m in rows_m}
    for _ in range(reps):
        for m in rows_m:
            a = {k: rng.integers(-127, 128, (m, k), dtype=np.int8) for k in ks}  # quantized: within [-127, 127]
            c = {s: np.zeros((m, s[0]), np.int32) for s in shapes}
            for name, lib in libs.items():
                t0 = time.perf_counter()
                for layer in weights:
                    for (n, k), w in zip(shapes, layer):
                        lib.ew_gemm_s8s8s32(m, n, k, a[k].ctypes.data, w.ctypes.data, c[(n, k)].ctypes.data)
                times[(name, m)].append(time.perf_counter() - t0)
                for (n, k), w in zip(shapes, weights[-1]):  # exact, or the timing means nothing
                    assert (c[(n, k)] == a[k].astype(np.int64) @ w.astype(np.int64).T).all(), name
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    bw = read_bandwidth()  # with the threads set above
    section = "kernels-decode" if widths == "smollm2" else f"kernels-decode-{widths}"
    write_results(section.replace("-", "_").replace("kernels_decode", "kernels_decode_gemm", 1),
                  {"ms": {f"{n} M={m}": v for (n, m), v in med.items()}, "weight_bytes": layer_bytes,
                   "read_bandwidth_gb_s": bw, "threads": threads, "baseline": str(baseline) if baseline else None,
                   "reps": reps})
    head = ["M (rows)", *(f"{n} ms" for n in libs), *(f"{n} GB/s" for n in libs), "x M = 1"]
    if baseline is not None:
        head.append("edgeweave / baseline")
    rows = []
    for m in rows_m:
        r = [m, *(f"{med[(n, m)]:.1f}" for n in libs), *(f"{layer_bytes / med[(n, m)] / 1e6:.1f}" for n in libs),
             f"{med[('edgeweave', m)] / med[('edgeweave', 1)]:.2f}"]
        if baseline is not None:
            r.append(f"**{med[('edgeweave', m)] / med[('baseline', m)]:.2f}x**")
        rows.append(r)
    print(table(head, rows))
    cmd = (f"python bench/kernels.py --decode-gemm{' --widths ' + widths if widths != 'smollm2' else ''}"
           + (f" --baseline {baseline}" if baseline else "") + f" --reps {reps}")
    update_section(section, f"""## Decode-sized int8 GEMMs{' at 7B widths' if widths == '7b' else ''} (`bench/kernels.py --decode-gemm{' --widths ' + widths if widths != 'smollm2' else ''}`)

Command: `{cmd}`. The int8 GEMM alone (`ew_gemm_s8s8s32`) over {label}, M rows as in a decode step of M
sessions (weights of any int8 value, activations in [-127, 127] as quantized ones are). Milliseconds for
all layers, median of {reps}{', interleaved with the baseline' if baseline else ''}; GB/s = weight bytes / time,
against this machine's read bandwidth of {bw:.1f} GB/s ({threads} thread{'s' if threads > 1 else ''}, summing 1 GiB of float32).

{table(head, rows)}
""")


def bench_decode_w4(reps: int, baseline: Path | None) -> None:
    """The packed W4A8 linear (ew_linear_w4a8: activation quantization, nibble products, group scales)
    over 30 layers of SmolLM2's shapes with zero points, group-128 and per output channel, one thread,
    at decode row counts; with --baseline, another int8_gemm.c timed interleaved with this one."""
    import numpy as np

    from quant.kernels import int4_linear_reference

    torch.set_num_threads(1)
    libs = _ab_libs(baseline)
    rng = np.random.default_rng(0)
    rows_m = (1, 8)
    med: dict[tuple[str, str, int], float] = {}
    for scheme, group_of in (("group-128", lambda k: 128), ("per-channel", lambda k: k)):
        layers = []
        for _ in range(30):
            layer = []
            for n, k in LAYER_SHAPES:
                g = group_of(k)
                layer.append((rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                              rng.integers(0, 16, (n, -(-k // g)), dtype=np.uint8),
                              rng.random((n, -(-k // g)), dtype=np.float32) * 0.01, g))
            layers.append(layer)
        for m in rows_m:
            x = {k: rng.standard_normal((m, k), dtype=np.float32) for k in (576, 1536)}
            q = {k: np.zeros((m, k), np.int8) for k in (576, 1536)}
            sx = np.zeros(m, np.float32)
            y = {s_: np.zeros((m, s_[0]), np.float32) for s_ in LAYER_SHAPES}
            times: dict[str, list[float]] = {name: [] for name in libs}
            for _ in range(reps):
                for name, lib in libs.items():
                    t0 = time.perf_counter()
                    for layer in layers:
                        for (n, k), (p, z, sw, g) in zip(LAYER_SHAPES, layer):
                            lib.ew_linear_w4a8(m, n, k, x[k].ctypes.data, 0.0, p.ctypes.data, z.ctypes.data,
                                               sw.ctypes.data, g, None, q[k].ctypes.data, sx.ctypes.data,
                                               y[(n, k)].ctypes.data)
                    times[name].append(time.perf_counter() - t0)
                    # y holds the last layer's outputs: right, or the timing means nothing
                    for (n, k), (p, z, sw, g) in zip(LAYER_SHAPES, layers[-1]):
                        ref = int4_linear_reference(torch.from_numpy(x[k]), torch.from_numpy(p), torch.from_numpy(sw),
                                                    g, None, None, torch.from_numpy(z))
                        assert torch.allclose(torch.from_numpy(y[(n, k)]), ref, rtol=1e-4, atol=1e-3), name
            for name in libs:
                med[(name, scheme, m)] = statistics.median(times[name]) * 1e3
    write_results("kernels_decode_w4", {"ms": {f"{n} {sc} M={m}": v for (n, sc, m), v in med.items()},
                                        "baseline": str(baseline) if baseline else None, "reps": reps})
    head = ["weights", "M (rows)", *(f"{n} ms" for n in libs)] + (["edgeweave / baseline"] if baseline else [])
    rows = []
    for scheme in ("group-128", "per-channel"):
        for m in rows_m:
            r = [scheme, m, *(f"{med[(n, scheme, m)]:.1f}" for n in libs)]
            if baseline is not None:
                r.append(f"**{med[('edgeweave', scheme, m)] / med[('baseline', scheme, m)]:.2f}x**")
            rows.append(r)
    print(table(head, rows))
    cmd = "python bench/kernels.py --decode-w4" + (f" --baseline {baseline}" if baseline else "") + f" --reps {reps}"
    update_section("kernels-decode-w4", f"""## Decode-sized packed W4A8 linears (`bench/kernels.py --decode-w4`)

Command: `{cmd}`. `ew_linear_w4a8` (activation quantization, products on the packed nibbles, zero
points, group scales) over SmolLM2's 30 layers with random 4-bit weights and zero points (60 MB
packed), one thread, M rows. Milliseconds for all 30 layers, median of {reps}{', interleaved with the baseline' if baseline else ''};
each run's last layer is checked against `int4_linear_reference`.

{table(head, rows)}
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tender", action="store_true", help="only Tender vs W8A8 (its own BENCHMARKS.md section)")
    ap.add_argument("--w4", action="store_true", help="only packed W4A8 vs W8A8 (its own BENCHMARKS.md section)")
    ap.add_argument("--decode-gemm", action="store_true",
                    help="only the int8 GEMM at decode row counts over 30 layers (its own BENCHMARKS.md section)")
    ap.add_argument("--decode-w4", action="store_true",
                    help="only the packed W4A8 linear at decode row counts over 30 layers (its own BENCHMARKS.md section)")
    ap.add_argument("--widths", choices=sorted(DECODE_WIDTHS), default="smollm2",
                    help="with --decode-gemm: SmolLM2's layer shapes (1 thread) or Llama-2-7B's (2 threads)")
    ap.add_argument("--baseline", type=Path,
                    help="with --decode-gemm or --decode-w4: another int8_gemm.c to time interleaved")
    args = ap.parse_args()
    if args.decode_gemm:
        bench_decode_gemm(args.reps, args.baseline, args.widths)
        return
    if args.decode_w4:
        bench_decode_w4(args.reps, args.baseline)
        return
    if args.tender:
        bench_tender(args.reps)
        return
    if args.w4:
        bench_w4(args.reps)
        return
    torch.set_num_threads(torch.get_num_threads())
    bw = read_bandwidth()
    results = {}
    for name, (n, k) in SHAPES.items():
        results[name] = bench_shape(n, k, args.reps)
        for r in results[name]:
            print(f"{name:28s} M={r['m']:4d} f32 {r['f32_us']:9.0f}us int8 {r['int8_us']:9.0f}us x{r['speedup']:.2f}", flush=True)
    where = {name: breakdown(*SHAPES[name], 512, 5) for name in ("smollm2 gate/up 1536x576", "4096x4096")}
    write_results("kernels", {"read_bandwidth_gbs": bw, "shapes": results, "breakdown_m512": where})

    rows = [[name, r["m"], f"{r['f32_us']:.0f}", f"{r['int8_us']:.0f}", f"**{r['speedup']:.2f}x**",
             f"{r['f32_gbs']:.1f}", f"{r['int8_gbs']:.1f}", f"{r['int8_gmacs']:.1f} / {r['f32_gmacs']:.1f}"]
            for name, rs in results.items() for r in rs]
    brk = [[name, *(f"{v:.0f}" for v in d.values())] for name, d in where.items()]
    m = machine()
    md = f"""## Integer kernels (`bench/kernels.py`)

Command: `python bench/kernels.py --reps {args.reps}`. Machine: {m['cores']} cores, ISA {', '.join(m['isa'])},
torch {m['torch']}. Measured read bandwidth (sum over 1 GiB): **{bw:.1f} GB/s**. Weights rotate among copies
totalling > 4x the 32 MiB L3, so each call streams its weights from memory. int8 includes the activation
quantization and the rescale. Median of {args.reps} (fewer for the largest shapes at large M).

{table(["shape (out x in)", "M", "f32 us", "int8 us", "speed-up", "f32 weight GB/s", "int8 weight GB/s", "GMAC/s int8 / f32"], rows)}

Where the time goes at M=512 (microseconds, median of 5):

{table(["shape", "quantize", "int8 GEMM", "rescale (torch)", "fused int8 linear", "f32 F.linear"], brk)}
"""
    update_section("kernels", md)


if __name__ == "__main__":
    main()
