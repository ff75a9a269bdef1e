"""Tender (METHODS.md section 4): decomposed activation quantization with power-of-two group scales,
so partial products combine in int32 by shifts and one float rescale ends the linear.

For one chunk of tokens x [M, K] (pure tensor math, no module state):
  1. bias b = (max + min) / 2 per channel over the chunk; xc = x - b.
  2. Channel magnitudes a_c = max |xc_c|; T_max = max a_c. Group i of G has threshold
     T_i = T_max / 2^(G-1-i); channel c goes to the smallest group whose threshold covers a_c,
     and is quantized with scale s_i = T_i / 127 = s_0 * 2^i.
  3. Per group, an int8 x int8 -> int32 product P_i over that group's channels. Because adjacent
     scales differ by exactly 2x: acc = P_{G-1}; acc = (acc << 1) + P_i for i = G-2 .. 0 gives
     acc = sum_i 2^i P_i, and y = s_0 * s_w[n] * acc, with no per-group requantization.
  4. The bias comes back as b @ W^T; b is quantized to int8 (one scale) and goes through the same
     int8 product as a one-row matrix.
Weights are int8 per output channel (symmetric RTN), as for W8A8.
"""

from __future__ import annotations

import torch

from .kernels import QMAX, int8_matmul, int8_matmul_reference

__all__ = ["TenderChunk", "tender_quantize", "tender_linear", "tender_linear_reference", "DEFAULT_GROUPS"]

DEFAULT_GROUPS = 4  # INT8; more for INT4 weights


class TenderChunk:
    """One chunk's decomposition: q int8 [M, K], group [K] in [0, G), s0, bias [K] float32."""

    def __init__(self, q: torch.Tensor, group: torch.Tensor, s0: float, bias: torch.Tensor, groups: int) -> None:
        self.q, self.group, self.s0, self.bias, self.groups = q, group, s0, bias, groups

    def channel_scales(self) -> torch.Tensor:
        """[K] float32: s_0 * 2^group."""
        return self.s0 * torch.pow(2.0, self.group.float())


def tender_quantize(x: torch.Tensor, groups: int = DEFAULT_GROUPS) -> TenderChunk:
    """x float32 [M, K] -> its Tender decomposition (steps 1-2 above)."""
    if groups < 1 or groups > 16:
        raise ValueError(f"groups must be in [1, 16], got {groups}")
    x = x.float()
    bias = (x.amax(dim=0) + x.amin(dim=0)) / 2  # [K]
    xc = x - bias  # [M, K]
    a = xc.abs().amax(dim=0)  # [K]
    t_max = float(a.max()) if a.numel() else 0.0
    if t_max <= 0:
        return TenderChunk(torch.zeros_like(x, dtype=torch.int8), torch.zeros(x.shape[1], dtype=torch.long), 1.0, bias,
                           groups)
    # smallest i with a <= T_max / 2^(G-1-i)  <=>  i >= G-1 - log2(T_max / a)
    ratio = torch.log2(t_max / a.clamp_min(t_max * 2.0 ** -40))
    group = (groups - 1 - torch.floor(ratio)).clamp(0, groups - 1).long()  # [K]
    # floor() can land one group low when a sits exactly on a threshold in float: fix it up
    s0 = t_max / 2 ** (groups - 1) / QMAX
    scales = s0 * torch.pow(2.0, group.float())  # [K]
    group = torch.where(a > scales * QMAX * (1 + 1e-6), (group + 1).clamp(max=groups - 1), group)
    scales = s0 * torch.pow(2.0, group.float())
    q = torch.clamp(torch.round(xc / scales), -QMAX, QMAX).to(torch.int8)  # [M, K]
    return TenderChunk(q, group, s0, bias, groups)


def _bias_term(bias: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, matmul) -> torch.Tensor:
    """b [K] @ W^T with b as int8 (one scale) -> [N] float32."""
    amax = float(bias.abs().max()) if bias.numel() else 0.0
    if amax == 0:
        return torch.zeros(w.shape[0])
    sb = amax / QMAX
    bq = torch.clamp(torch.round(bias / sb), -QMAX, QMAX).to(torch.int8)[None, :]  # [1, K]
    return matmul(bq, w)[0].float() * (sb * w_scale)  # [N]


def _chunk_linear(c: TenderChunk, w: torch.Tensor, w_scale: torch.Tensor, matmul) -> torch.Tensor:
    """Steps 3-4 for one chunk -> float32 [M, N]."""
    order = torch.argsort(c.group, stable=True)  # channels grouped: group 0 first
    counts = torch.bincount(c.group, minlength=c.groups).tolist()
    qp = c.q[:, order].contiguous()  # [M, K]
    wp = w[:, order].contiguous()  # [N, K]
    ends = torch.tensor(counts).cumsum(0).tolist()
    starts = [e - n for e, n in zip(ends, counts)]
    # |acc| <= sum_i 2^i n_i 127^2: int32 unless that could overflow
    bound = sum(n * 2**i for i, n in enumerate(counts)) * QMAX * QMAX
    dtype = torch.int32 if bound < 2**31 else torch.int64
    acc = torch.zeros((c.q.shape[0], w.shape[0]), dtype=dtype)
    for i in range(c.groups - 1, -1, -1):
        if i < c.groups - 1:
            acc.bitwise_left_shift_(1)
        if counts[i]:
            acc += matmul(qp[:, starts[i]:ends[i]], wp[:, starts[i]:ends[i]]).to(dtype)
    y = acc.float() * (c.s0 * w_scale)[None, :]  # the one float rescale
    return y + _bias_term(c.bias, w, w_scale, matmul)[None, :]


def _linear(x, w, w_scale, bias, groups: int, chunk: int, matmul) -> torch.Tensor:
    if w.dtype != torch.int8 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"weight must be int8 [N, {x.shape[-1]}], got {w.dtype} {tuple(w.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    outs = [_chunk_linear(tender_quantize(x2[i:i + chunk], groups), w, w_scale, matmul)
            for i in range(0, x2.shape[0], chunk)]
    y = torch.cat(outs) if outs else torch.zeros(0, w.shape[0])
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def tender_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  groups: int = DEFAULT_GROUPS, chunk: int = 256) -> torch.Tensor:
    """Tender linear on the int8 kernels: x float [..., K], w int8 [N, K], w_scale [N] -> float32 [..., N]."""
    return _linear(x, w, w_scale, bias, groups, chunk, int8_matmul)


def tender_linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                            groups: int = DEFAULT_GROUPS, chunk: int = 256) -> torch.Tensor:
    """The same decomposition with exact int64 products (checks the shift-accumulate kernel)."""
    return _linear(x, w, w_scale, bias, groups, chunk, int8_matmul_reference)
