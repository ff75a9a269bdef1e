import pytest
import torch
import torch.nn.functional as F

from quant.kernels import (attention_row, int8_linear, int8_linear_reference, int8_matmul, int8_matmul_reference,
                           quantize_activations, quantize_activations_reference, quantize_weight_per_channel)
from tests.conftest import sqnr_db

# M around the kernel's 8-row tiles (8, 9, 17) and 64-row tasks (64, 129); K with and without a
# tail past the last 16 columns, and past 3072 (few rows take the 2 x 4 tiles there).
SHAPES = [(1, 64, 576), (2, 70, 576), (5, 33, 100), (8, 40, 576), (9, 17, 1536), (17, 5, 50), (64, 130, 1536),
          (129, 257, 64), (3, 9, 4104)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_matmul_is_exact_on_full_range_inputs(m, n, k):
    # Full-range operands are where int16-saturating kernels (vpmaddubsw) go wrong.
    g = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))


@pytest.mark.parametrize("m,k", [(1, 4096), (3, 4100), (15, 11008), (1, 3104)])
@pytest.mark.parametrize("with_min", [False, True])
def test_long_row_decode_is_exact_with_any_int8(m, k, with_min):
    """Few rows with K > 3072 (decode at 7B widths) take the vpmaddubsw tiles, exact for weights of any
    int8 value (-128 included) and activations in [-127, 127]; an activation of -128 (with_min) is
    still exact, by the path that widens to int16 (vpmaddubsw's sign trick cannot take it)."""
    g = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (13, k), dtype=torch.int8, generator=g)
    b[:, :64] = torch.tensor([-128, 127]).repeat(32)  # the largest pair sums: 2 * 128 * 127
    a[:, :64] = torch.tensor([-127, 127]).repeat(32)
    if with_min:
        a[-1, 5] = -128
    assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))


def test_int8_matmul_extremes_do_not_overflow():
    a = torch.full((3, 4096), 127, dtype=torch.int8)
    b = torch.full((8, 4096), -127, dtype=torch.int8)
    assert int(int8_matmul(a, b)[0, 0]) == -127 * 127 * 4096


@pytest.mark.parametrize("static", [None, 0.02])
@pytest.mark.parametrize("k", [576, 1536, 45])  # 45: the vector loop's 32 columns, then the scalar tail
def test_activation_quantization_matches_reference_bit_for_bit(static, k):
    x = torch.randn(37, k) * 3
    x[3, 10] = 80.0  # an outlier channel
    q1, s1 = quantize_activations(x, static)
    q2, s2 = quantize_activations_reference(x, static)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    assert q1.dtype == torch.int8 and int(q1.abs().max()) <= 127


def test_activation_quantization_rounds_halves_to_even_and_clamps():
    # x / 0.5 lands exactly on halves (-2.5 -> -2, 1.5 -> 2, 2.5 -> 2) and far past the int8 range
    x = torch.tensor([[-1.25, 0.75, 1.25, 0.25, -0.25, 300.0, -300.0, 63.75] * 5])  # [1, 40]
    q, s = quantize_activations(x, 0.5)
    assert q[0, :8].tolist() == [-2, 2, 2, 0, 0, 127, -127, 127] and torch.equal(q[0, :32], q[0, 8:40])
    assert torch.equal(q, quantize_activations_reference(x, 0.5)[0])


@pytest.mark.parametrize("static", [None, 0.05])
def test_int8_linear_matches_reference_and_float(static):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 576)
    w = torch.randn(192, 576) * 0.05
    bias = torch.randn(192)
    q, s = quantize_weight_per_channel(w)
    y = int8_linear(x, q, s, bias, static)
    assert y.shape == (3, 7, 192)
    assert torch.allclose(y, int8_linear_reference(x, q, s, bias, static), rtol=1e-5, atol=1e-5)
    assert sqnr_db(F.linear(x, w, bias), y) > 30  # W8A8 vs float


def test_zero_rows_and_shape_errors():
    q, s = quantize_weight_per_channel(torch.randn(16, 32))
    assert torch.count_nonzero(int8_linear(torch.zeros(2, 32), q, s)) == 0
    with pytest.raises(ValueError, match="channels"):
        int8_linear(torch.randn(2, 31), q, s)
    with pytest.raises(TypeError, match="int8"):
        int8_linear(torch.randn(2, 32), q.float(), s)


@pytest.mark.parametrize("m,k", [(1, 17), (2, 37), (5, 100), (3, 16)])
def test_vector_kernel_handles_any_k(m, k):
    """K not a multiple of 16 takes the vector path plus a scalar tail (Tender's group slices)."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (9, k), dtype=torch.int8, generator=g)
    assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("s,hd", [(1, 64), (7, 16), (8, 64), (9, 8), (100, 64), (33, 128), (20, 12), (300, 96)])
def test_attention_row_matches_softmax_reference(s, hd, simd):
    """The C stage's attention (vector exp and 8-key dot products, or the portable loop) against torch."""
    g = torch.Generator().manual_seed(s * 1000 + hd)
    q, keys, values = torch.randn(hd, generator=g) * 3, torch.randn(s, hd, generator=g), torch.randn(s, hd, generator=g)
    scale = hd ** -0.5
    ref = torch.softmax(keys.double() @ q.double() * scale, 0) @ values.double()
    out = attention_row(q, keys, values, scale, simd)
    assert sqnr_db(ref.float(), out) > 110


def test_attention_row_with_one_dominant_key_and_underflowing_rest():
    """Scores far below the maximum underflow to zero weight instead of producing NaN."""
    keys = torch.zeros(16, 8)
    keys[5] = 100.0
    values = torch.arange(16 * 8, dtype=torch.float32).view(16, 8)
    out = attention_row(torch.ones(8), keys, values, 1.0)
    assert torch.equal(out, values[5])
