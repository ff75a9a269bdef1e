"""GPTQ-style Hessian-aware rounding (HAQ step 2): pure math, no hooks.

Quantizes W [N, K] column by column in blocks, spreading each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer input
(H = 2 X^T X / T). Rows are independent, so linears sharing an input (q, k, v) are quantized
in one call on their concatenated rows.
"""

from __future__ import annotations

import torch

from .int4 import expand_group_scale

__all__ = ["gptq_quantize", "refit_scales"]


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
    refit: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float, h [K, K] input Hessian -> (int8 q [N, K], float32 scale), w ~ q * scale.
    scale: what to round to: [N] per output channel (default absmax / qmax), or with group > 0
    [N, G], one per group of `group` columns, fixed before rounding (static groups, so act-order
    and groups combine).
    zero (4 bits, asymmetric): integer zero points shaped like scale; each weight becomes u - z with
    u in [0, 15] (quant/int4.py), and q holds u - z in [-15, 15].
    sparsity > 0 (SparseGPT, Edge-LLM's Hessian-aware pruning): in each block of columns the
    fraction `sparsity` of weights with the least w^2 / [H^-1]_jj^2 is set to zero, and their error is
    spread over the remaining columns like rounding error.
    refit: rounds of refitting the scales to the codes (refit_scales), each after the first followed
    by rounding again to the refit scales; 0: the scales stay as given."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().double().clone()  # [N, K]
    h = h.detach().double().clone()  # [K, K]
    n, k = w.shape
    if scale is None:
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax  # [N]; fixed per output channel
    scale = scale.double()
    if zero is not None:  # per column: q in [-z, 2^bits - 1 - z]
        col_lo = -expand_group_scale(zero.double(), k, group)  # [N, K]
        col_hi = col_lo + (2 ** bits - 1)
    else:
        col_lo = torch.full((n, k), -float(qmax), dtype=torch.float64)
        col_hi = -col_lo
    dead = torch.diag(h) == 0  # channels never active in calibration
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    inv = torch.argsort(perm)
    hinv = _inverse_hessian_cholesky(h[perm][:, perm], damp)  # [K, K] upper

    w_p, lo_p, hi_p = w[:, perm], col_lo[:, perm], col_hi[:, perm]  # [N, K] each, in rounding order

    def round_to(scale: torch.Tensor) -> torch.Tensor:  # [N, K] codes in the original column order
        col_scale = expand_group_scale(scale, k, group)[:, perm]  # [N, K]
        return _round(w_p, hinv, col_scale, lo_p, hi_p, block, sparsity)[:, inv]

    q = round_to(scale)
    for r in range(refit):
        scale = refit_scales(w, h, q, scale, group)
        if r + 1 < refit:
            q = round_to(scale)
    return q.to(torch.int8).contiguous(), scale.float()


def _round(w: torch.Tensor, hinv: torch.Tensor, col_scale: torch.Tensor, col_lo: torch.Tensor, col_hi: torch.Tensor,
           block: int, sparsity: float) -> torch.Tensor:
    """GPTQ's rounding, columns in the (permuted) order given: w [N, K], hinv [K, K] upper Cholesky
    factor of H^-1, per-column scales and code ranges [N, K] -> codes [N, K] (float64)."""
    w = w.clone()
    k = w.shape[1]
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
    return q


def refit_scales(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int = 0,
                 ridge: float = 1e-6) -> torch.Tensor:
    """Least-squares weight scales for fixed integer codes: w [N, K] the float weights, h [K, K] the
    input Hessian (X^T X), q [N, K] the codes (u - z with zero points), scale [N] or [N, G].

    With the codes fixed, a row's quantized weights sum_g s_g q_g are linear in its G scales, so the
    layer's output error on the calibration inputs, (w - sum_g s_g q_g)^T H (w - sum_g s_g q_g), is a
    G x G least-squares problem per row: (U^T H U) s = U^T H w with U's columns the row's codes group by
    group. GPTQ chose the codes for the scales it was given; this chooses the scales for those codes.
    A row keeps its old scales where the new ones are not all positive and finite, or do not lower
    its error. -> scales shaped like `scale`."""
    n, k = w.shape
    g = 1 if scale.dim() == 1 else scale.shape[1]
    size = k if scale.dim() == 1 else group
    w, h, q, old = w.double(), h.double(), q.double(), scale.double().reshape(n, g)
    pad = g * size - k

    def per_group(x: torch.Tensor) -> torch.Tensor:  # [N, K] -> [N, G]: sums over each group's columns
        return torch.nn.functional.pad(x, (0, pad)).view(n, g, size).sum(-1)

    b = per_group(q * (w @ h))  # [N, G]
    a = torch.empty(n, g, g, dtype=torch.float64)  # [N, G, G]
    for j in range(g):
        cols = slice(j * size, min((j + 1) * size, k))
        a[:, :, j] = per_group(q * (q[:, cols] @ h[cols, :]))
    diag = torch.diagonal(a, dim1=1, dim2=2)  # [N, G]
    reg = ridge * diag.mean(dim=1).clamp(min=1e-30)[:, None, None] * torch.eye(g, dtype=torch.float64)
    try:
        new = torch.linalg.solve(a + reg, b[..., None])[..., 0]  # [N, G]
    except RuntimeError:  # singular for every row: nothing to refit
        return scale

    def err(s: torch.Tensor) -> torch.Tensor:  # [N]: the row's error up to its constant w^T H w
        return (s[:, None, :] @ a @ s[..., None])[:, 0, 0] - 2 * (s * b).sum(-1)

    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1) & (err(new) < err(old))
    out = torch.where(ok[:, None], new, old)
    return out.reshape(scale.shape).to(scale.dtype)
