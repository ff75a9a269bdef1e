"""GPTQ-style Hessian-aware rounding (HAQ step 2): pure math, no hooks.

Quantizes W [N, K] column by column in blocks, spreading each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer input
(H = 2 X^T X / T). Rows are independent, so linears sharing an input (q, k, v) are quantized
in one call on their concatenated rows.
"""

from __future__ import annotations

import torch

from .calibration import hessian_dtype
from .int4 import expand_group_scale

__all__ = ["gptq_quantize", "refit_scales", "ROWS"]

ROWS = 1024  # weight rows rounded together (their working copies: ROWS x K each)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float, consume: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; raises more damping until it is positive definite.
    consume: h's memory is released (h set to an empty tensor) once its factor is had, so that at most two [K, K]
    tensors exist at once (K = 11008 at 7B: 485 MB each in float32)."""
    mean_diag = torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        a = h.clone()
        a.diagonal().add_(damp * (10 ** attempt) * mean_diag)  # H + damp * mean(diag H) * I
        try:
            torch.linalg.cholesky(a, out=a)
        except torch.linalg.LinAlgError:
            continue
        if consume:
            h.set_(torch.empty(0, dtype=h.dtype).untyped_storage())  # h holds nothing now: its [K, K] memory goes
        hinv = torch.cholesky_inverse(a)
        del a
        return torch.linalg.cholesky(hinv, upper=True, out=hinv)
    raise RuntimeError("Hessian is not positive definite even with 10^5 x damping; calibration data is degenerate")


def _permute_in_place(h: torch.Tensor, perm: torch.Tensor) -> None:
    """h <- h[perm][:, perm] in h's own memory (one [K, K] temporary for the rows, then row blocks)."""
    h.copy_(h.index_select(0, perm))
    for r0 in range(0, h.shape[0], ROWS):
        h[r0:r0 + ROWS] = h[r0:r0 + ROWS].index_select(1, perm)


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
    own_h: bool = False,
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
    by rounding again to the refit scales; 0: the scales stay as given.
    own_h: h is a tensor of hessian_dtype(K) the caller hands over: it is changed in place, not copied,
    and emptied (set to an empty tensor) before this returns (at 7B the down projection's H is 485 MB). The work is
    in hessian_dtype(K): float64 up to HESSIAN_F64_MAX_K input channels, float32 beyond, as GPTQ itself.
    Rows are rounded ROWS at a time (each independent), so the working copies are [ROWS, K], not [N, K]."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    qmax = 2 ** (bits - 1) - 1
    w = w.detach()
    n, k = w.shape
    dtype = hessian_dtype(k)
    h = h if own_h and h.dtype == dtype else h.detach().to(dtype, copy=True)  # [K, K]; h itself: emptying it frees it
    if scale is None:  # the float32 max, then float64: the same as the max of the float64 copy
        scale = w.abs().amax(dim=1).double().clamp(min=1e-8) / qmax  # [N]; fixed per output channel
    scale = scale.double()
    dead = torch.diag(h) == 0  # channels never active in calibration
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    if refit:
        hinv = _inverse_hessian_cholesky(h[perm][:, perm], damp)  # [K, K] upper
    else:  # h is not needed again: permute it in place of itself, and let it go once factorized
        _permute_in_place(h, perm)
        hinv = _inverse_hessian_cholesky(h, damp, consume=True)
        del h

    def round_to(scale: torch.Tensor) -> torch.Tensor:  # int8 [N, K] codes in the original column order
        return _round_rows(w, hinv, scale, zero, dead, perm, bits, group, block, sparsity)

    q = round_to(scale)
    for r in range(refit):
        wd = w.double()
        wd[:, dead] = 0.0
        scale = refit_scales(wd, h, q.double(), scale, group)
        if r + 1 < refit:
            q = round_to(scale)
    return q.contiguous(), scale.float()


def _round_rows(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                dead: torch.Tensor, perm: torch.Tensor, bits: int, group: int, block: int, sparsity: float) -> torch.Tensor:
    """_round over w [N, K] ROWS rows at a time -> int8 codes [N, K] in the original column order."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    inv = torch.argsort(perm)
    q = torch.empty((n, k), dtype=torch.int8)
    dtype = hinv.dtype  # the working precision (hessian_dtype(K))
    for r0 in range(0, n, ROWS):
        r1 = min(r0 + ROWS, n)
        wr = w[r0:r1].to(dtype)
        wr[:, dead] = 0.0
        if zero is not None:  # per column: q in [-z, 2^bits - 1 - z]
            lo = -expand_group_scale(zero[r0:r1].to(dtype), k, group)  # [R, K]
        else:
            lo = torch.full((r1 - r0, k), -float(qmax), dtype=dtype)
        hi = lo + (2 ** bits - 1) if zero is not None else -lo
        col_scale = expand_group_scale(scale[r0:r1], k, group).to(dtype)[:, perm]  # [R, K]
        q[r0:r1] = _round(wr[:, perm], hinv, col_scale, lo[:, perm], hi[:, perm], block, sparsity)[:, inv].to(torch.int8)
    return q


def _round(w: torch.Tensor, hinv: torch.Tensor, col_scale: torch.Tensor, col_lo: torch.Tensor, col_hi: torch.Tensor,
           block: int, sparsity: float) -> torch.Tensor:
    """GPTQ's rounding, columns in the (permuted) order given: w [N, K], hinv [K, K] upper Cholesky
    factor of H^-1, per-column scales and code ranges [N, K] -> codes [N, K] (w's dtype).
    Within a block the columns are worked on transposed ([B, N]: a column is a contiguous row), which
    changes no arithmetic, only how fast each of the block's B column steps runs."""
    w = w.clone()
    k = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        hinv1 = hinv[i1:i2, i1:i2]
        pruned = torch.zeros_like(w[:, i1:i2], dtype=torch.bool)  # [N, B]
        if sparsity > 0:  # mask chosen per block from the weights as updated so far
            score = w[:, i1:i2].pow(2) / torch.diag(hinv1).pow(2)[None, :]
            n_prune = int(score.numel() * sparsity)
            if n_prune:
                pruned.view(-1)[torch.topk(score.view(-1), n_prune, largest=False).indices] = True
        w1, sc, lo, hi = (t[:, i1:i2].t().contiguous() for t in (w, col_scale, col_lo, col_hi))  # [B, N]
        pr = pruned.t().contiguous()
        q1, err1 = torch.empty_like(w1), torch.empty_like(w1)  # [B, N]
        for i in range(i2 - i1):
            col = w1[i]
            qcol = torch.clamp(torch.round(col / sc[i]), lo[i], hi[i]).masked_fill_(pr[i], 0.0)
            q1[i] = qcol
            e = (col - qcol * sc[i]) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * e[None, :]
            err1[i] = e
        q[:, i1:i2] = q1.t()
        w[:, i2:] -= err1.t().contiguous() @ hinv[i1:i2, i2:]
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
