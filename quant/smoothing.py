"""Smoothing math (SmoothQuant / HAQ step 1): pure functions over tensors.

s_j = max|X_j|^a / max|W_:,j|^(1-a). X / s feeds the quantized weights W * s; 1/s is folded
into the module producing X. HAQ picks `a` per group by the group's output error on calibration
tokens, and (for static per-tensor activation scales) the clip point of the activation range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4 import absmax, expand_group_scale, group_absmax, quantize_weight_int4, search_w4_scale
from .kernels import QMAX, static_act_scale

__all__ = ["smoothing_scales", "tie_kv_scales", "fake_quant_weight", "fake_quant_act",
           "SmoothChoice", "search_smoothing", "group_error"]


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_absmax [K], w_absmax [K] -> s [K] > 0."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5, max=1e5)


def tie_kv_scales(s: torch.Tensor, heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """o-input scales [H * hd] -> scales equal across the heads sharing one kv head (GQA),
    so 1/s can be folded into v's output rows. Returns [H * hd]."""
    if heads_per_kv == 1:
        return s
    kv = s.numel() // (heads_per_kv * head_dim)
    per_kv = s.view(kv, heads_per_kv, head_dim).amax(dim=1)  # [kv, hd]
    return per_kv[:, None, :].expand(kv, heads_per_kv, head_dim).reshape(-1)


def fake_quant_weight(w: torch.Tensor, bits: int = 8, group: int = 0, asym: bool = False,
                      inplace: bool = False) -> torch.Tensor:
    """Simulated RTN per output channel (or per group of `group` columns), float out: symmetric, or
    (4 bits, asym) with a zero point as quant/int4.py stores it. For searching, not for inference.
    inplace (symmetric): the result is written over w (at 7B, gate|up's w is 360 MB)."""
    if asym:
        if bits != 4:
            raise ValueError("asymmetric weights are 4-bit only")
        scale, zero = search_w4_scale(w, None, (1.0,), group, asym=True)
        q, _ = quantize_weight_int4(w, scale, group, zero)
        return q.float() * expand_group_scale(scale, w.shape[1], group)
    qmax = 2 ** (bits - 1) - 1
    scale = expand_group_scale(group_absmax(w, group).clamp(min=1e-8) / qmax, w.shape[1], group)  # [N, K]
    q = w.div_(scale) if inplace else w / scale
    return q.round_().clamp_(-qmax, qmax).mul_(scale)


def fake_quant_act(x: torch.Tensor, static_scale: float | None) -> torch.Tensor:
    """Simulated int8 activations [T, K]: per token, or one static scale."""
    if static_scale is None:
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / QMAX
    else:
        scale = torch.tensor(static_scale)
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


@dataclass(frozen=True)
class SmoothChoice:
    alpha: float | None  # None: no smoothing
    clip: float  # static activation range = clip * calibration max (1.0 for per-token)
    error: float  # mean squared output error on the search tokens
    scales: torch.Tensor  # s [K]


def group_error(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, s: torch.Tensor,
                act_max: float, clips: tuple[float, ...], per_token: bool, w_bits: int = 8,
                w_group: int = 0, w_asym: bool = False) -> tuple[float, float]:
    wq = fake_quant_weight(w * s, w_bits, w_group, w_asym, inplace=True)  # [N, K]
    xs = x / s  # [T, K]
    best = (float("inf"), 1.0)
    for clip in ((1.0,) if per_token else clips):
        static = None if per_token else static_act_scale(act_max, clip)
        out = fake_quant_act(xs, static) @ wq.t()  # [T, N]; then in place: no more [T, N] temporaries
        err = out.sub_(ref).pow_(2).mean().item()
        best = min(best, (err, clip))
    return best


def search_smoothing(
    x: torch.Tensor,
    x_absmax: torch.Tensor,
    w: torch.Tensor,
    alphas: tuple[float, ...],
    clips: tuple[float, ...],
    per_token: bool,
    heads_per_kv: int = 1,
    head_dim: int = 0,
    allow_smoothing: bool = True,
    w_bits: int = 8,
    w_group: int = 0,
    w_asym: bool = False,
) -> SmoothChoice:
    """Pick the migration strength (and static clip) with the least group output error, with the
    weights rounded as they will be (w_bits, w_group, w_asym): 4-bit weights tolerate less migration.

    x [T, K] calibration activations; x_absmax [K] over all calibration tokens; w [N, K] all
    weights reading x, concatenated. alpha=None (no smoothing) competes too.
    """
    ref = x @ w.t()  # [T, N]
    w_absmax = absmax(w, 0)  # [K]: max |w| per column
    candidates: list[tuple[float | None, torch.Tensor]] = [(None, torch.ones_like(x_absmax))]
    if allow_smoothing:
        for a in alphas:
            s = tie_kv_scales(smoothing_scales(x_absmax, w_absmax, a), heads_per_kv, head_dim)
            candidates.append((a, s))
    # Two stages for static scales: each alpha with a coarse pair of clips, then the whole clip
    # grid for the best alpha only (31 instead of 84 output evaluations with the default grids).
    coarse = clips if len(clips) <= 2 else (clips[0], clips[len(clips) // 2])
    best: SmoothChoice | None = None
    for alpha, s in candidates:
        act_max = (x_absmax / s).max().item()
        err, clip = group_error(x, w, ref, s, act_max, coarse, per_token, w_bits, w_group, w_asym)
        if best is None or err < best.error:
            best = SmoothChoice(alpha, clip, err, s)
    assert best is not None
    if not per_token and len(clips) > len(coarse):
        err, clip = group_error(x, w, ref, best.scales, (x_absmax / best.scales).max().item(), clips, per_token,
                                w_bits, w_group, w_asym)
        if err < best.error:
            best = SmoothChoice(best.alpha, clip, err, best.scales)
    assert best is not None
    return best
