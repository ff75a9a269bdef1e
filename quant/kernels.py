"""Integer kernels: int8 x int8 -> int32 with one float rescale, and their float references.

Contract for every kernel here: activations float32 [M, K] are quantized symmetrically to int8
(per token, or with one static per-tensor scale), weights are int8 [N, K] with one float32 scale
per output channel, the product accumulates in int32, and the only float work after it is
`acc * (s_x[m] * s_w[n]) (+ bias[n])`.

On CPU the products run in edgeweave's C kernel (quant/csrc/int8_gemm.c); on CUDA in
torch._int_mm. Nothing here dequantizes weights to float for a float matmul.
"""

from __future__ import annotations

import torch

from .int4 import check_packed, num_groups, unpack_int4, unpack_int4_zero
from .native import load_kernels

__all__ = [
    "quantize_activations",
    "quantize_activations_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_linear",
    "int8_linear_reference",
    "int8_matmul_cols",
    "int8_linear_grouped",
    "int8_linear_grouped_reference",
    "quantize_weight_per_channel",
    "int4_linear",
    "int4_linear_reference",
    "W4_FUSED_MAX_M",
    "unpack_w4",
    "attention_row",
    "static_act_scale",
    "QMAX",
]

W4_FUSED_MAX_M = 16  # up to this many rows the packed-W4 kernel runs; above, unpack once and use the GEMM
# ... except where the kernel multiplies nibbles as bytes (K and group multiples of 64): there it beats
# unpacking at any row count with group scales (0.69-0.95x the time at M = 128-2048), and up to 128
# rows with one scale per row (0.94x at 128, 1.5x at 2048). One thread, SmolLM2's shapes.
W4_NIBBLE_PER_CHANNEL_MAX_M = 128

QMAX = 127  # symmetric int8: [-127, 127], so negation never overflows


def static_act_scale(absmax: float, clip: float = 1.0) -> float:
    """The one rule for a static per-tensor activation scale: clip x the calibration |max| maps to
    QMAX (never zero). Every method that stores static scales (haq, rtn, luc and mobilequant with
    --act-scheme tensor, MoE expert inputs) takes them from here."""
    return max(clip * absmax, 1e-8) / QMAX


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_linear_args(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    if w.dtype != torch.int8 or w.dim() != 2:
        raise TypeError(f"weight must be int8 [N, K], got {w.dtype} {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"activation has {x.shape[-1]} channels, weight expects {w.shape[1]}")
    if w_scale.shape != (w.shape[0],):
        raise ValueError(f"weight scale must be [{w.shape[0]}], got {tuple(w_scale.shape)}")


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric weights per output channel: w [N, K] -> (int8 [N, K], scale [N])."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax  # [N]
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale.float()


def quantize_activations_reference(
    x: torch.Tensor, static_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (int8 [M, K], scales [M]); per token unless a static scale is given."""
    if static_scale is not None and static_scale > 0:
        scales = torch.full((x.shape[0],), static_scale, dtype=torch.float32, device=x.device)
    else:
        amax = x.abs().amax(dim=1)  # [M]
        scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(x / scales[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scales


def quantize_activations(
    x: torch.Tensor, static_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference; the C kernel on CPU (bit-identical results)."""
    if x.device.type != "cpu":
        return quantize_activations_reference(x, static_scale)
    x = x.contiguous().float()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    scales = torch.empty((m,), dtype=torch.float32)
    load_kernels().ew_quantize_rows(m, k, x.data_ptr(), float(static_scale or 0.0), q.data_ptr(), scales.data_ptr())
    return q, scales


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K], b int8 [N, K] -> exact int32 [M, N] via int64 arithmetic."""
    return (a.long() @ b.long().t()).to(torch.int32)


def _int_mm_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm on CUDA needs M > 16 (cuBLASLt int8): pad the rows, then drop the padding."""
    m = a.shape[0]
    if m <= 16:
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
    return torch._int_mm(a, b.t())[:m]


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] . b int8 [N, K]^T -> int32 [M, N], exact (int32 accumulation)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.device.type == "cuda":
        return _int_mm_cuda(a, b)
    a, b = a.contiguous(), b.contiguous()
    m, k = a.shape
    out = torch.empty((m, b.shape[0]), dtype=torch.int32)
    load_kernels().ew_gemm_s8s8s32(m, b.shape[0], k, a.data_ptr(), b.data_ptr(), out.data_ptr())
    return out


def _linear_unfused(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    static_scale: float | None, mm) -> torch.Tensor:
    """torch quantizes, `mm` multiplies int8 x int8 -> int32/int64, one float rescale."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    q, sx = quantize_activations_reference(x2, static_scale)
    y = mm(q, w).float() * (sx[:, None] * w_scale[None, :])  # [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def int8_linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                          static_scale: float | None = None) -> torch.Tensor:
    """Float reference of int8_linear: same quantization, int64 product, same rescale."""
    return _linear_unfused(x, w, w_scale, bias, static_scale, int8_matmul_reference)


def int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                static_scale: float | None = None) -> torch.Tensor:
    """Quantized linear: x float [..., K], w int8 [N, K], w_scale [N] -> float32 [..., N].

    static_scale: the per-tensor activation scale from calibration, or None for per-token
    dynamic scales.
    """
    _check_linear_args(x, w, w_scale)
    if x.device.type == "cuda":  # unfused: int8_matmul dispatches to torch._int_mm
        return _linear_unfused(x, w, w_scale, bias, static_scale, int8_matmul)
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # [M, K]
    m, k = x2.shape
    n = w.shape[0]
    q = torch.empty((m, k), dtype=torch.int8)
    acc = torch.empty((m, n), dtype=torch.int32)
    sx = torch.empty((m,), dtype=torch.float32)
    y = torch.empty((m, n), dtype=torch.float32)
    load_kernels().ew_linear_w8a8(
        m, n, k, x2.data_ptr(), float(static_scale or 0.0), w.data_ptr(), w_scale.data_ptr(),
        _ptr(bias), q.data_ptr(), acc.data_ptr(), sx.data_ptr(), y.data_ptr(),
    )
    return y.reshape(*x.shape[:-1], n)


def int8_matmul_cols(a: torch.Tensor, b: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Columns [k0, k1) of a int8 [M, K] and b int8 [N, K] -> int32 [M, N]; on CPU without copying
    them (the C kernel takes row strides)."""
    if a.device.type == "cuda":
        return int8_matmul(a[:, k0:k1].contiguous(), b[:, k0:k1].contiguous())
    a, b = a.contiguous(), b.contiguous()
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32)
    load_kernels().ew_gemm_s8s8s32_ld(m, n, k1 - k0, a.data_ptr() + k0, k, b.data_ptr() + k0, k, out.data_ptr(), n)
    return out


def _grouped(x, w, w_scale, group: int, bias, static_scale, quant, mm) -> torch.Tensor:
    if w.dtype != torch.int8 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"weight must be int8 [N, {x.shape[-1]}], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if group <= 0 or w_scale.shape != (n, -(-k // group)):
        raise ValueError(f"group scales must be [{n}, ceil({k} / group)] with group > 0, got {tuple(w_scale.shape)}, group {group}")
    x2 = x.reshape(-1, k).float()  # [M, K]
    q, sx = quant(x2, static_scale)
    y = torch.zeros((x2.shape[0], n), dtype=torch.float32, device=x.device)
    for g, k0 in enumerate(range(0, k, group)):
        y.addcmul_(mm(q, w, k0, min(k0 + group, k)).float(), w_scale[:, g])  # int32 partial, its group's scale
    y *= sx[:, None]
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n)


def int8_linear_grouped(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group: int,
                        bias: torch.Tensor | None = None, static_scale: float | None = None) -> torch.Tensor:
    """Quantized linear with one weight scale per group of `group` input columns (W4 group-128):
    x float [..., K], w int8 [N, K], w_scale [N, G] -> float32 [..., N]. Activations int8 as in
    int8_linear; each group's int8 x int8 product accumulates in int32 over its columns, then is
    rescaled by its group's weight scales and summed."""
    return _grouped(x, w, w_scale, group, bias, static_scale, quantize_activations, int8_matmul_cols)


def int8_linear_grouped_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group: int,
                                  bias: torch.Tensor | None = None, static_scale: float | None = None) -> torch.Tensor:
    """The same with exact int64 products."""
    return _grouped(x, w, w_scale, group, bias, static_scale, quantize_activations_reference,
                    lambda a, b, k0, k1: int8_matmul_reference(a[:, k0:k1], b[:, k0:k1]))


def unpack_w4(packed: torch.Tensor, zero: torch.Tensor | None, k: int, group: int) -> torch.Tensor:
    """Packed int4 [N, ceil(K / 2)] -> the int8 [N, K] the kernels multiply: signed nibbles (zero None)
    or u - zero (zero uint8 [N] or [N, G]). In C on CPU; quant/int4.py's torch versions elsewhere."""
    n = packed.shape[0]
    if packed.device.type != "cpu":
        return unpack_int4(packed, k) if zero is None else unpack_int4_zero(packed, zero, k, group)
    check_packed(packed, k, zero, num_groups(k, group))
    g = k if group <= 0 else group
    packed = packed.contiguous()
    zero = None if zero is None else zero.contiguous()
    out = torch.empty((n, k), dtype=torch.int8)
    load_kernels().ew_unpack_int4(n, k, packed.data_ptr(), _ptr(zero), g, out.data_ptr())
    return out


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, group: int,
                          bias: torch.Tensor | None = None, static_scale: float | None = None,
                          zero: torch.Tensor | None = None) -> torch.Tensor:
    """int4_linear with the weights unpacked to int8 by torch ops and exact int64 products."""
    k = x.shape[-1]
    q = unpack_int4(packed, k) if zero is None else unpack_int4_zero(packed, zero, k, group)
    if group <= 0:
        return int8_linear_reference(x, q, w_scale, bias, static_scale)
    return int8_linear_grouped_reference(x, q, w_scale, group, bias, static_scale)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, static_scale: float | None = None,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 linear on packed 4-bit weights (quant/int4.py): x float [..., K], packed uint8
    [N, ceil(K / 2)], w_scale [N] (group 0) or [N, G], zero None (signed nibbles) or uint8 like
    w_scale -> float32 [..., N]. Activations int8 as in int8_linear; each group's products
    accumulate in int32, then take their group's scale.

    On CPU with at most W4_FUSED_MAX_M rows (decoding), one C call multiplies the packed nibbles
    directly, so the weights are read at half a byte each; with more rows (prefill) the weights
    are unpacked to int8 once and the int8 GEMM runs, unless the C call's byte-wise nibble products
    apply (see W4_NIBBLE_PER_CHANNEL_MAX_M), which are faster there too."""
    n, k = packed.shape[0], x.shape[-1]
    check_packed(packed, k, zero, num_groups(k, group))
    want = (n,) if group <= 0 else (n, num_groups(k, group))
    if w_scale.shape != want or (zero is not None and zero.shape != want):
        raise ValueError(f"weight scales (and zero points) must be {list(want)}, got {list(w_scale.shape)}"
                         + ("" if zero is None else f" and {list(zero.shape)}"))
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    nibbles = x.device.type == "cpu" and bool(load_kernels().ew_w4_nibble_path(k, k if group <= 0 else group))
    fused = m <= W4_FUSED_MAX_M or (nibbles and (group > 0 or m <= W4_NIBBLE_PER_CHANNEL_MAX_M))
    if x.device.type != "cpu" or not fused or (group > 0 and group % 2):
        q = unpack_w4(packed, zero, k, group)
        if group <= 0:
            return int8_linear(x, q, w_scale, bias, static_scale)
        return int8_linear_grouped(x, q, w_scale, group, bias, static_scale)
    x2 = x2.float().contiguous()
    packed, w_scale = packed.contiguous(), w_scale.float().contiguous()
    zero = None if zero is None else zero.contiguous()
    q = torch.empty((m, k), dtype=torch.int8)
    sx = torch.empty((m,), dtype=torch.float32)
    y = torch.empty((m, n), dtype=torch.float32)
    load_kernels().ew_linear_w4a8(
        m, n, k, x2.data_ptr(), float(static_scale or 0.0), packed.data_ptr(), _ptr(zero), w_scale.data_ptr(),
        k if group <= 0 else group, _ptr(bias), q.data_ptr(), sx.data_ptr(), y.data_ptr(),
    )
    return y.reshape(*x.shape[:-1], n)


def attention_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, simd: bool = True) -> torch.Tensor:
    """The C stage's attention for one query row (quant/csrc/llama_stage.c): q [hd], keys and values
    [S, hd] float32 -> softmax(keys @ q * scale) @ values, [hd]. simd False: the portable C path."""
    s, hd = keys.shape
    if q.shape != (hd,) or values.shape != (s, hd) or s < 1:
        raise ValueError(f"need q [hd], keys and values [S >= 1, hd]; got {list(q.shape)}, {list(keys.shape)}, "
                         f"{list(values.shape)}")
    q, keys, values = (t.float().contiguous() for t in (q, keys, values))
    out = torch.empty(hd, dtype=torch.float32)
    if load_kernels().ew_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), s, hd, float(scale), int(simd),
                                out.data_ptr()) != 0:
        raise MemoryError(f"no memory for {s} attention scores")
    return out
