"""4-bit weights packed two per byte (pure tensor math; the W4A8 methods build on it).

Symmetric: a signed value v in [-7, 7] is stored as its two's-complement nibble, w ~ v * scale.
Asymmetric: an unsigned value u in [0, 15] is stored with an integer zero point z in [0, 15] per
output channel or group, w ~ (u - z) * scale: 16 levels placed over [min, max] instead of 15 over
[-absmax, absmax]. Column 2j goes in the low nibble of byte j, column 2j+1 in the high nibble; an
odd K is padded with a zero nibble. Unpacking gives int8 again (u - z is in [-15, 15]), so the
int8 x int8 -> int32 kernels run W4A8 unchanged either way.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX4", "UMAX4", "check_packed", "pack_int4", "unpack_int4", "unpack_int4_zero", "quantize_weight_int4",
           "search_w4_scale", "expand_group_scale", "num_groups", "group_absmax"]

QMAX4 = 7  # symmetric int4: [-7, 7]
UMAX4 = 15  # asymmetric int4: [0, 15] with a zero point


def pack_int4(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """int8 [N, K] with values in [-7, 7] (signed) or [0, 15] (unsigned) -> uint8 [N, ceil(K / 2)]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4 takes int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    lo, hi = (-QMAX4, QMAX4) if signed else (0, UMAX4)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{'signed' if signed else 'unsigned'} int4 values must be in [{lo}, {hi}]")
    n, k = q.shape
    if k % 2:
        q = torch.cat([q, q.new_zeros(n, 1)], dim=1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's-complement nibbles
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def check_packed(p: torch.Tensor, k: int, zero: torch.Tensor | None = None, groups: int = 1) -> None:
    """Raises ValueError unless p is packed int4 uint8 [N, ceil(K / 2)] and zero (if any) uint8 with
    N * groups entries."""
    if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed int4 must be uint8 [N, {(k + 1) // 2}] for K = {k}, got {p.dtype} {tuple(p.shape)}")
    if zero is not None and (zero.dtype != torch.uint8 or zero.numel() != p.shape[0] * groups):
        raise ValueError(f"int4 zero points must be uint8 [{p.shape[0]}, {groups}], got {zero.dtype} {tuple(zero.shape)}")


def unpack_int4(p: torch.Tensor, k: int, signed: bool = True) -> torch.Tensor:
    """uint8 [N, ceil(K / 2)] -> int8 [N, K] in [-8, 7] (signed) or [0, 15]."""
    check_packed(p, k)
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=2).reshape(p.shape[0], -1)[:, :k]  # [N, K] nibbles
    if not signed:
        return both.contiguous()
    return torch.where(both > 7, both - 16, both).to(torch.int8).contiguous()


def unpack_int4_zero(p: torch.Tensor, zero: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Asymmetric: packed u [N, ceil(K / 2)], zero uint8 [N] or [N, G] -> int8 u - z [N, K] in [-15, 15]."""
    u = unpack_int4(p, k, signed=False)
    return (u - expand_group_scale(zero, k, group).to(torch.int8)).contiguous()


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


def absmax(w: torch.Tensor, dim: int) -> torch.Tensor:
    """max |w| along dim, as max(max w, -min w): the same values as w.abs().amax(dim), without an
    [N, K] temporary (gate|up at 7B: 360 MB)."""
    lo, hi = torch.aminmax(w, dim=dim)
    return torch.maximum(hi, -lo)


def group_absmax(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [N, K] -> max |w| per row [N] (group 0) or per row and column group [N, G]."""
    if group <= 0:
        return absmax(w, 1)
    return _grouped(w, group).abs().amax(dim=2)  # [N, G]


def _round4(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """wg [..., S] rounded to 4 bits with step s [..., 1] (and zero point z [..., 1]) -> the integers
    the kernel multiplies: v in [-7, 7], or u - z in [-z, 15 - z]."""
    if z is None:
        return torch.clamp(torch.round(wg / s), -QMAX4, QMAX4)
    return torch.clamp(torch.round(wg / s) + z, 0, UMAX4) - z


def _range4(wg: torch.Tensor, c: float, asym: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """wg [N, G, S], clip ratio c -> (step [N, G], zero [N, G] or None): symmetric absmax * c / 7, or
    asymmetric (max - min) * c / 15 over the range [min, max] (which always contains 0), with the
    integer zero point that maps 0 exactly."""
    if not asym:
        return (wg.abs().amax(dim=2) * c / QMAX4).clamp(min=1e-8), None
    lo, hi = wg.amin(dim=2).clamp(max=0) * c, wg.amax(dim=2).clamp(min=0) * c
    s = ((hi - lo) / UMAX4).clamp(min=1e-8)
    return s, torch.clamp(torch.round(-lo / s), 0, UMAX4)


def search_w4_scale(w: torch.Tensor, energy: torch.Tensor | None, grid: tuple[float, ...], group: int = 0,
                    asym: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per output channel (group 0) or per group of `group` columns, the 4-bit step from the clip
    ratio c in grid minimizing sum_k energy_k (w_nk - round-to-nearest(w_nk))^2: absmax * c / 7
    (symmetric), or (max - min) * c / 15 with a zero point (asym).
    energy [K]: the input's per-channel mean square (diag of the Hessian), None: all ones.
    -> (scale, zero): scale float [N] (group 0) or [N, G]; zero the same shape (float holding
    integers in [0, 15]) when asym, else None."""
    w = w.float()
    e = torch.ones(w.shape[1]) if energy is None else energy.float().clamp_min(0)
    wg = _grouped(w, group)  # [N, G, S]
    eg = _grouped(e[None, :], group)  # [1, G, S]
    best_s, best_z = _range4(wg, 1.0, asym)
    best_err = torch.full(best_s.shape, float("inf"))
    for c in grid:
        s, z = _range4(wg, c, asym)
        err = ((wg - _round4(wg, s[..., None], None if z is None else z[..., None]) * s[..., None]) ** 2 * eg).sum(dim=2)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
        if z is not None and best_z is not None:
            best_z = torch.where(better, z, best_z)
    if group <= 0:
        return best_s[:, 0], None if best_z is None else best_z[:, 0]
    return best_s, best_z


def quantize_weight_int4(w: torch.Tensor, scale: torch.Tensor | None = None, group: int = 0,
                         zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit weights: w [N, K] -> (int8 [N, K], scale [N] or, with group > 0,
    [N, G]). The int8 values are what the kernel multiplies: in [-7, 7], or with a zero point u - z
    in [-15, 15]. scale None: absmax / 7 per channel or group (symmetric; zero must be None)."""
    if scale is None:
        if zero is not None:
            raise ValueError("a zero point needs its scale")
        scale, _ = search_w4_scale(w, None, (1.0,), group)
    k = w.shape[1]
    full = expand_group_scale(scale, k, group)  # [N, K]
    z = None if zero is None else expand_group_scale(zero.float(), k, group)
    return _round4(w.float(), full, z).to(torch.int8), scale.float()
