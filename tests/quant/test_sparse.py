"""Sparse weights: lossless bitmask encoding that really shrinks, and Hessian-aware pruning that
hits its ratio and beats pruning by magnitude on the layer's output."""

import pytest
import torch

from quant.gptq import gptq_quantize
from quant.sparse import decode_sparse, encode_sparse, sparse_bytes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [1, 8, 13, 576])
def test_encode_decode_round_trip_and_bytes(bits, k):
    g = torch.Generator().manual_seed(k)
    qmax = 127 if bits == 8 else 7
    q = torch.randint(-qmax, qmax + 1, (6, k), dtype=torch.int8, generator=g)
    q[torch.rand(6, k, generator=g) < 0.5] = 0
    mask, vals = encode_sparse(q, bits)
    assert torch.equal(decode_sparse(mask, vals, k), q)
    nnz = int((q != 0).sum())
    assert mask.numel() + vals.numel() == sparse_bytes(6, k, nnz, bits)
    if k == 576:  # half zeros: the encoding is smaller than dense storage
        assert sparse_bytes(6, k, nnz, bits) < 6 * k * bits // 8


def test_mismatched_mask_and_values_are_refused():
    q = torch.tensor([[1, 0, 2, 0]], dtype=torch.int8)
    mask, vals = encode_sparse(q, 8)
    with pytest.raises(ValueError, match="int8 \\[2\\]"):
        decode_sparse(mask, vals[:1], 4)
    with pytest.raises(ValueError, match="mask"):
        decode_sparse(mask, vals, 20)


def test_hessian_aware_pruning_hits_the_ratio_and_beats_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) * torch.linspace(0.2, 3.0, 64)  # unequal channel energy
    x[:, 32:] += 0.8 * x[:, :32]  # correlated channels: error can be compensated
    w = torch.randn(48, 64, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    q, s = gptq_quantize(w, h, bits=8, sparsity=0.5)
    assert (q == 0).float().mean().item() >= 0.5
    mag = w * (w.abs() >= w.abs().median(dim=1, keepdim=True).values)  # 50% by magnitude per row, float
    err_h = (x @ (q.float() * s[:, None]).t() - x @ w.t()).pow(2).mean()
    err_m = (x @ mag.t() - x @ w.t()).pow(2).mean()
    assert err_h < 0.7 * err_m
    with pytest.raises(ValueError, match="sparsity"):
        gptq_quantize(w, h, sparsity=1.0)
