"""Sparse integer weights: a bitmask of the nonzero weights plus their values (pure tensor math).

Hessian-aware pruning (SparseGPT, in gptq.py) zeroes a fraction of each layer's weights; this
format stores only what is left. The mask is [N, ceil(K / 8)] uint8, bit j % 8 of byte j // 8 set
when column j of that row is nonzero; the values are the nonzero weights in row-major order, int8
(W8) or packed two per byte (W4, int4.py). Encoding is lossless: decode(encode(q)) == q, and
weights that round to zero cost no value bytes. Workers decode to the dense form at load.
"""

from __future__ import annotations

import torch

from .int4 import pack_int4, unpack_int4

__all__ = ["encode_sparse", "decode_sparse", "sparse_bytes"]

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def encode_sparse(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (mask uint8 [N, ceil(K / 8)], values: int8 [nnz] (bits 8) or uint8 [1, ceil(nnz / 2)] (bits 4))."""
    if q.dtype != torch.int8 or q.dim() != 2 or bits not in (4, 8):
        raise ValueError(f"encode_sparse takes int8 [N, K] and bits 4 or 8, got {q.dtype} {tuple(q.shape)}, {bits}")
    n, k = q.shape
    nz = q != 0  # [N, K]
    padded = torch.nn.functional.pad(nz, (0, -k % 8)).view(n, -1, 8).to(torch.uint8)  # [N, K/8, 8]
    mask = (padded * _BITS).sum(dim=2, dtype=torch.uint8)  # [N, ceil(K / 8)]
    vals = q[nz]  # [nnz], row-major
    return mask.contiguous(), (vals if bits == 8 else pack_int4(vals.view(1, -1)))


def decode_sparse(mask: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of encode_sparse -> int8 [N, K]; refuses a mask and values that disagree."""
    if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != (k + 7) // 8:
        raise ValueError(f"sparse mask must be uint8 [N, {(k + 7) // 8}] for K = {k}, got {mask.dtype} {tuple(mask.shape)}")
    n = mask.shape[0]
    nz = ((mask.unsqueeze(-1) & _BITS) != 0).view(n, -1)[:, :k]  # [N, K] bool
    count = int(nz.sum())
    if values.dtype == torch.uint8:  # W4, packed
        if values.dim() != 2 or values.shape[0] != 1 or values.shape[1] != (count + 1) // 2:
            raise ValueError(f"packed sparse values must be uint8 [1, {(count + 1) // 2}] for {count} nonzeros")
        vals = unpack_int4(values, count)[0]
    elif values.dtype == torch.int8 and values.shape == (count,):
        vals = values
    else:
        raise ValueError(f"sparse values must be int8 [{count}] or packed uint8, got {values.dtype} {tuple(values.shape)}")
    out = torch.zeros((n, k), dtype=torch.int8)
    out[nz] = vals
    return out


def sparse_bytes(n: int, k: int, nnz: int, bits: int) -> int:
    """Stored bytes of an encoded [N, K] weight with nnz nonzeros."""
    return n * ((k + 7) // 8) + (nnz if bits == 8 else (nnz + 1) // 2)
