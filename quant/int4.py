"""4-bit weights packed two per byte (pure tensor math; the W4A8 methods build on it).

A signed 4-bit value v in [-7, 7] is stored as its two's-complement nibble. Column 2j goes in
the low nibble of byte j, column 2j+1 in the high nibble; an odd K is padded with a zero nibble.
Unpacking gives int8 again, so the int8 x int8 -> int32 kernels run W4A8 unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX4", "pack_int4", "unpack_int4", "quantize_weight_int4", "search_w4_scale", "expand_group_scale",
           "num_groups", "group_absmax"]

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


def num_groups(k: int, group: int) -> int:
    """Weight scale groups along K: group 0 is per output channel (one group); the last group may be shorter."""
    return 1 if group <= 0 else -(-k // group)


def expand_group_scale(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """scale [N] (per channel) or [N, G] (groups of `group` columns) -> [N, K], one scale per weight."""
    if scale.dim() == 1:
        return scale[:, None].expand(-1, k)
    return scale.repeat_interleave(group, dim=1)[:, :k]


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], the last group zero-padded (zeros change no absmax and no error)."""
    n, k = w.shape
    g = num_groups(k, group)
    size = k if group <= 0 else group
    return torch.nn.functional.pad(w, (0, g * size - k)).reshape(n, g, size)


def group_absmax(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [N, K] -> max |w| per row [N] (group 0) or per row and column group [N, G]."""
    m = _grouped(w, group).abs().amax(dim=2)  # [N, G]
    return m[:, 0] if group <= 0 else m


def search_w4_scale(w: torch.Tensor, energy: torch.Tensor | None, grid: tuple[float, ...], group: int = 0) -> torch.Tensor:
    """Per output channel (group 0) or per group of `group` columns, the 4-bit scale absmax * c / 7
    with c from grid minimizing sum_k energy_k (w_nk - round-to-nearest(w_nk))^2.
    energy [K]: the input's per-channel mean square (diag of the Hessian), None: all ones.
    -> scale [N] (group 0) or [N, G]."""
    w = w.float()
    e = torch.ones(w.shape[1]) if energy is None else energy.float().clamp_min(0)
    wg = _grouped(w, group)  # [N, G, S]
    eg = _grouped(e[None, :], group)  # [1, G, S]
    amax = wg.abs().amax(dim=2).clamp(min=1e-8)  # [N, G]
    best, best_err = amax / QMAX4, torch.full(amax.shape, float("inf"))
    for c in grid:
        s = (amax * c / QMAX4)[..., None]  # [N, G, 1]
        err = ((wg - torch.clamp(torch.round(wg / s), -QMAX4, QMAX4) * s) ** 2 * eg).sum(dim=2)
        better = err < best_err
        best, best_err = torch.where(better, s[..., 0], best), torch.where(better, err, best_err)
    return best[:, 0] if group <= 0 else best


def quantize_weight_int4(w: torch.Tensor, scale: torch.Tensor | None = None, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric 4-bit weights: w [N, K] -> (int8 [N, K] in [-7, 7], scale [N] or,
    with group > 0, [N, G]). scale None: absmax / 7 per channel or group."""
    if scale is None:
        scale = search_w4_scale(w, None, (1.0,), group)
    full = expand_group_scale(scale, w.shape[1], group)  # [N, K]
    q = torch.clamp(torch.round(w / full), -QMAX4, QMAX4).to(torch.int8)
    return q, scale.float()
