"""GPTQ-style Hessian-aware rounding (HAQ step 2): pure math, no hooks.

Quantizes W [N, K] column by column in blocks, spreading each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer input
(H = 2 X^T X / T). Rows are independent, so linears sharing an input (q, k, v) are quantized
in one call on their concatenated rows.
"""

from __future__ import annotations

import torch

from .int4 import expand_group_scale

__all__ = ["gptq_quantize"]


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; raises more damping until it is positive definite."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype)
    mean_diag = torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * (10 ** attempt) * mean_diag * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("Hessian is not positive definite even with 10^5 x damping; calibration data is degenerate")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 8,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    scale: torch.Tensor | None = None,
    group: int = 0,
    sparsity: float = 0.0,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float, h [K, K] input Hessian -> (int8 q [N, K], float32 scale), w ~ q * scale.
    scale: what to round to: [N] per output channel (default absmax / qmax), or with group > 0
    [N, G], one per group of `group` columns, fixed before rounding (static groups, so act-order
    and groups combine).
    zero (4 bits, asymmetric): integer zero points shaped like scale; each weight becomes u - z with
    u in [0, 15] (quant/int4.py), and q holds u - z in [-15, 15].
    sparsity > 0 (SparseGPT, Edge-LLM's Hessian-aware pruning): in each block of columns the
    fraction `sparsity` of weights with the least w^2 / [H^-1]_jj^2 is set to zero, and their error is
    spread over the remaining columns like rounding error."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().double().clone()  # [N, K]
    h = h.detach().double().clone()  # [K, K]
    n, k = w.shape
    if scale is None:
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax  # [N]; fixed per output channel
    col_scale = expand_group_scale(scale.double(), k, group)  # [N, K]
    if zero is not None:  # per column: q in [-z, 2^bits - 1 - z]
        col_lo = -expand_group_scale(zero.double(), k, group)  # [N, K]
        col_hi = col_lo + (2 ** bits - 1)
    else:
        col_lo, col_hi = torch.full_like(col_scale, -qmax), torch.full_like(col_scale, qmax)
    dead = torch.diag(h) == 0  # channels never active in calibration
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h, col_scale, col_lo, col_hi = w[:, perm], h[perm][:, perm], col_scale[:, perm], col_lo[:, perm], col_hi[:, perm]
    hinv = _inverse_hessian_cholesky(h, damp)  # [K, K] upper
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        pruned = torch.zeros_like(w1, dtype=torch.bool)  # [N, B]
        if sparsity > 0:  # mask chosen per block from the weights as updated so far
            score = w1.pow(2) / torch.diag(hinv1).pow(2)[None, :]
            n_prune = int(score.numel() * sparsity)
            if n_prune:
                pruned.view(-1)[torch.topk(score.view(-1), n_prune, largest=False).indices] = True
        for i in range(i2 - i1):
            col = w1[:, i]
            sc = col_scale[:, i1 + i]  # [N]
            qcol = torch.clamp(torch.round(col / sc), col_lo[:, i1 + i], col_hi[:, i1 + i]).masked_fill(pruned[:, i], 0.0)
            q[:, i1 + i] = qcol
            e = (col - qcol * sc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q[:, inv].to(torch.int8).contiguous(), scale.float()
