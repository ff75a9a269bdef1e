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
  4. The bias comes back as b @ W^T: b is quantized to int8 in two rows (b ~ s_1 b_1 + s_2 b_2, the
     second quantizing what the first leaves, about 14 bits) that ride along as two more rows of
     every group's product, summed without shifts.

Channel order. A group must be a contiguous slice of the weight's columns for the GEMM to stream
it without copying. Rather than gathering weight columns per chunk (a full extra pass over the
weights), the weight's columns are stored once, at quantization time, in ascending order of the
channels' calibration magnitude (`perm`). At run time each channel's group is raised to the
largest group of any channel before it in that order (a running maximum). So groups are
contiguous; a channel can only get a coarser scale than it needs, never a range too small for it.
(Rounding group starts to the kernel's 16-column vector width was tried and is harmful: the top
group often holds one massive-activation channel, and rounding pulls 15 ordinary channels into
its scale. The kernel handles any slice width instead.)
Weights are int8 per output channel (symmetric RTN), as for W8A8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels import QMAX, int8_matmul_cols, int8_matmul_reference

__all__ = ["TenderChunk", "tender_quantize", "tender_linear", "tender_linear_reference", "DEFAULT_GROUPS"]

DEFAULT_GROUPS = 4  # INT8; more for INT4 weights

Gemm = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]  # (A [M, K], B [N, K], k0, k1) -> int32 [M, N]


@dataclass(frozen=True)
class TenderChunk:
    """One chunk's decomposition, channels in the stored order."""

    q: torch.Tensor  # [M, K] int8
    group: torch.Tensor  # [K] int64, non-decreasing
    starts: list[int]  # [G + 1] first column of each group, then K
    s0: float  # scale of group 0; group i's is s0 * 2^i
    bias: torch.Tensor  # [K] float32, removed before quantizing

    @property
    def groups(self) -> int:
        return len(self.starts) - 1

    def channel_scales(self) -> torch.Tensor:
        """[K] float32: s_0 * 2^group."""
        return self.s0 * torch.pow(2.0, self.group.float())


def tender_quantize(x: torch.Tensor, groups: int = DEFAULT_GROUPS) -> TenderChunk:
    """x float32 [M, K], channels in the stored order -> its decomposition (steps 1-2 above)."""
    if groups < 1 or groups > 16:
        raise ValueError(f"groups must be in [1, 16], got {groups}")
    x = x.float()
    k = x.shape[1]
    bias = (x.amax(dim=0) + x.amin(dim=0)) / 2  # [K]
    xc = x - bias  # [M, K]
    a = xc.abs().amax(dim=0)  # [K]
    t_max = float(a.max()) if a.numel() else 0.0
    if t_max <= 0:
        return TenderChunk(torch.zeros_like(x, dtype=torch.int8), torch.zeros(k, dtype=torch.long),
                           [0] * groups + [k], 1.0, bias)
    s0 = t_max / 2 ** (groups - 1) / QMAX
    # smallest i with a <= s0 * 2^i * 127; float rounding can land one low, so check and bump
    need = torch.ceil(torch.log2((a / (s0 * QMAX)).clamp_min(2.0 ** -60))).clamp(0, groups - 1).long()
    need = torch.where(a > s0 * QMAX * torch.pow(2.0, need.float()), (need + 1).clamp(max=groups - 1), need)
    group = torch.cummax(need, dim=0).values  # contiguous: non-decreasing along the stored order
    starts = torch.searchsorted(group, torch.arange(groups + 1)).tolist()  # first column of each group; K
    scales = s0 * torch.pow(2.0, group.float())  # [K]
    q = torch.clamp(torch.round(xc / scales), -QMAX, QMAX).to(torch.int8)  # [M, K]
    return TenderChunk(q, group, starts, s0, bias)


def _gemm_reference(a: torch.Tensor, b: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    return int8_matmul_reference(a[:, k0:k1], b[:, k0:k1])


def _chunk_linear(c: TenderChunk, w: torch.Tensor, w_scale: torch.Tensor, gemm: Gemm) -> torch.Tensor:
    """Steps 3-4 for one chunk -> float32 [M, N]."""
    m = c.q.shape[0]
    rows, scales, rest = [], [], c.bias
    for _ in range(2):  # the bias as two int8 rows: b ~ s_1 b_1 + s_2 b_2
        amax = float(rest.abs().max()) if rest.numel() else 0.0
        s = amax / QMAX if amax > 0 else 1.0
        r = torch.clamp(torch.round(rest / s), -QMAX, QMAX)
        rows.append(r.to(torch.int8))
        scales.append(s)
        rest = rest - r * s
    a = torch.cat([c.q, torch.stack(rows)]).contiguous()  # [M + 2, K]: the bias rides along
    counts = [c.starts[i + 1] - c.starts[i] for i in range(c.groups)]
    bound = sum(n * 2**i for i, n in enumerate(counts)) * QMAX * QMAX  # |acc| <= sum_i 2^i n_i 127^2
    dtype = torch.int32 if bound < 2**31 else torch.int64
    acc = torch.zeros((m, w.shape[0]), dtype=dtype)
    accb = torch.zeros((2, w.shape[0]), dtype=torch.int64)
    for i in range(c.groups - 1, -1, -1):
        if i < c.groups - 1:
            acc.bitwise_left_shift_(1)
        if counts[i]:
            p = gemm(a, w, c.starts[i], c.starts[i + 1])  # [M + 2, N] int32
            acc += p[:m].to(dtype)
            accb += p[m:]
    y = acc.float() * (c.s0 * w_scale)[None, :]  # the one float rescale
    bias = (accb[0].float() * scales[0] + accb[1].float() * scales[1]) * w_scale  # [N]
    return y + bias[None, :]


def _linear(x, w, w_scale, bias, groups: int, chunk: int, perm: torch.Tensor | None, gemm: Gemm) -> torch.Tensor:
    if w.dtype != torch.int8 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"weight must be int8 [N, {x.shape[-1]}], got {w.dtype} {tuple(w.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    if perm is not None:
        x2 = x2[:, perm]  # the weight's column order
    outs = [_chunk_linear(tender_quantize(x2[i:i + chunk], groups), w, w_scale, gemm)
            for i in range(0, x2.shape[0], chunk)]
    y = torch.cat(outs) if outs else torch.zeros(0, w.shape[0])
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def tender_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  groups: int = DEFAULT_GROUPS, chunk: int = 256, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Tender linear on the int8 kernel: x float [..., K], w int8 [N, K] whose column j is input
    channel perm[j] (None: the identity), w_scale [N] -> float32 [..., N]."""
    return _linear(x, w, w_scale, bias, groups, chunk, perm, int8_matmul_cols)


def tender_linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                            groups: int = DEFAULT_GROUPS, chunk: int = 256, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The same decomposition with exact int64 products (checks the kernel and the shifts)."""
    return _linear(x, w, w_scale, bias, groups, chunk, perm, _gemm_reference)
