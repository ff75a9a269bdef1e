"""4-bit weights packed two per byte (pure tensor math; the W4A8 methods build on it).

A signed 4-bit value v in [-7, 7] is stored as its two's-complement nibble. Column 2j goes in
the low nibble of byte j, column 2j+1 in the high nibble; an odd K is padded with a zero nibble.
Unpacking gives int8 again, so the int8 x int8 -> int32 kernels run W4A8 unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX4", "pack_int4", "unpack_int4", "quantize_weight_int4", "search_w4_scale"]

QMAX4 = 7  # symmetric int4: [-7, 7]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-7, 7] -> uint8 [N, ceil(K / 2)]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4 takes int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -QMAX4 or int(q.max()) > QMAX4):
        raise ValueError(f"int4 values must be in [-{QMAX4}, {QMAX4}]")
    n, k = q.shape
    if k % 2:
        q = torch.cat([q, q.new_zeros(n, 1)], dim=1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's-complement nibbles
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K / 2)] -> int8 [N, K]."""
    if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed int4 must be uint8 [N, {(k + 1) // 2}] for K = {k}, got {p.dtype} {tuple(p.shape)}")
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=2).reshape(p.shape[0], -1)[:, :k]  # [N, K] nibbles
    return torch.where(both > 7, both - 16, both).to(torch.int8).contiguous()


def search_w4_scale(w: torch.Tensor, energy: torch.Tensor | None, grid: tuple[float, ...]) -> torch.Tensor:
    """Per output channel, the 4-bit scale absmax * c / 7 with c from grid minimizing
    sum_k energy_k (w_nk - round-to-nearest(w_nk))^2 -> scale [N]. energy [K]: the input's
    per-channel mean square (diag of the Hessian), None: all ones."""
    w = w.float()
    e = torch.ones(w.shape[1]) if energy is None else energy.float().clamp_min(0)
    amax = w.abs().amax(dim=1).clamp(min=1e-8)  # [N]
    best, best_err = amax / QMAX4, torch.full((w.shape[0],), float("inf"))
    for c in grid:
        s = amax * c / QMAX4
        err = ((w - torch.clamp(torch.round(w / s[:, None]), -QMAX4, QMAX4) * s[:, None]) ** 2 * e).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def quantize_weight_int4(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric 4-bit weights per output channel: w [N, K] -> (int8 [N, K] in
    [-7, 7], scale [N]). scale None: absmax / 7."""
    if scale is None:
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / QMAX4  # [N]
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX4, QMAX4).to(torch.int8)
    return q, scale.float()
