"""Packed 4-bit weights: exact round trip, half the bytes, and the int8 kernel on unpacked values."""

import pytest
import torch

from quant.int4 import pack_int4, quantize_weight_int4, unpack_int4
from quant.kernels import int8_matmul, int8_matmul_reference


@pytest.mark.parametrize("k", [1, 2, 7, 64, 577])
def test_round_trip_is_exact_and_halves_the_bytes(k):
    q = torch.randint(-7, 8, (5, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(p, k), q)


def test_out_of_range_and_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


def test_w4_weights_through_the_int8_kernel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    q, s = quantize_weight_int4(w)
    assert int(q.abs().max()) == 7
    assert torch.allclose(q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-6)
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=g)
    assert torch.equal(int8_matmul(a, unpack_int4(pack_int4(q), 64)), int8_matmul_reference(a, q))
