"""Packed 4-bit weights: exact round trip, half the bytes, and the int8 kernel on unpacked values."""

import pytest
import torch

from quant.int4 import (expand_group_scale, pack_int4, quantize_weight_int4, search_w4_scale, unpack_int4,
                        unpack_int4_zero)
from quant.kernels import int8_linear_grouped, int8_linear_grouped_reference, int8_matmul, int8_matmul_reference


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


@pytest.mark.parametrize("k", [64, 200, 576])  # 200 and 576: the last group is shorter than 128
def test_group_scales_follow_each_group_and_beat_one_scale_per_row(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(16, k, generator=g)
    w[:, :8] *= 20  # an outlier group: a per-row scale wastes the other groups' levels
    qc, sc = quantize_weight_int4(w)
    qg, sg = quantize_weight_int4(w, group=128)
    assert sg.shape == (16, -(-k // 128))
    for j, k0 in enumerate(range(0, k, 128)):  # each group's largest weight maps to +-7
        assert torch.equal(qg[:, k0:k0 + 128].abs().amax(dim=1), torch.full((16,), 7, dtype=torch.int8))
        assert torch.allclose(sg[:, j], w[:, k0:k0 + 128].abs().amax(dim=1) / 7)
    err_c = (qc.float() * sc[:, None] - w).pow(2).sum()
    err_g = (qg.float() * expand_group_scale(sg, k, 128) - w).pow(2).sum()
    assert err_g < err_c if k > 128 else torch.equal(qg, qc)
    # the searched clip never does worse than absmax on the energy-weighted error it minimizes
    searched, zero = search_w4_scale(w, None, (1.0, 0.9, 0.8, 0.7), 128)
    assert zero is None
    qs, _ = quantize_weight_int4(w, searched, 128)
    assert (qs.float() * expand_group_scale(searched, k, 128) - w).pow(2).sum() <= err_g + 1e-4


@pytest.mark.parametrize("group", [0, 128])
def test_zero_points_store_16_levels_and_beat_symmetric_on_skewed_weights(group):
    """--w-asym: u in [0, 15] packed, a zero point per row or group, u - z through the int8 kernel."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 300, generator=g) * 0.5 + 0.8  # mostly positive rows: symmetric wastes the negative half
    s_sym, _ = search_w4_scale(w, None, (1.0,), group)
    s_asym, zero = search_w4_scale(w, None, (1.0,), group, asym=True)
    assert zero is not None and zero.shape == s_asym.shape and bool(((zero >= 0) & (zero <= 15)).all())
    assert torch.equal(zero, zero.round())
    q, _ = quantize_weight_int4(w, s_asym, group, zero)
    z_full = expand_group_scale(zero, 300, group)
    assert bool(((q >= -z_full) & (q <= 15 - z_full)).all())  # u = q + z in [0, 15]
    u = (q + z_full.to(torch.int8)).to(torch.int8)
    packed = pack_int4(u, signed=False)
    assert torch.equal(unpack_int4_zero(packed, zero.to(torch.uint8), 300, group), q)  # exact round trip
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[16]], dtype=torch.int8), signed=False)
    err_asym = (q.float() * expand_group_scale(s_asym, 300, group) - w).pow(2).sum()
    q_sym, _ = quantize_weight_int4(w, s_sym, group)
    err_sym = (q_sym.float() * expand_group_scale(s_sym, 300, group) - w).pow(2).sum()
    assert err_asym < 0.5 * err_sym
    a = torch.randint(-127, 128, (3, 300), dtype=torch.int8, generator=g)
    assert torch.equal(int8_matmul(a, q), int8_matmul_reference(a, q))


def test_gptq_with_zero_points_stays_in_range_and_beats_rounding():
    from quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.2, 3.0, 256)  # uneven input channels
    w = torch.randn(32, 256, generator=g) * 0.3 + 0.2
    h = (x.t() @ x).double()
    s, zero = search_w4_scale(w, torch.diag(h).float(), (1.0, 0.9, 0.8), 64, asym=True)
    q, _ = gptq_quantize(w, h, 4, 64, 0.01, True, s, 64, 0.0, zero)
    z_full = expand_group_scale(zero, 256, 64)
    assert bool(((q >= -z_full) & (q <= 15 - z_full)).all())
    q_rtn, _ = quantize_weight_int4(w, s, 64, zero)
    deq = lambda t: t.float() * expand_group_scale(s, 256, 64)  # noqa: E731
    out_err = lambda t: (x @ (deq(t) - w).t()).pow(2).mean()  # noqa: E731
    assert out_err(q) < 0.8 * out_err(q_rtn)  # Hessian-aware rounding lowers the output error


@pytest.mark.parametrize("static", [None, 0.05])
@pytest.mark.parametrize("m,k", [(1, 576), (7, 200), (33, 256)])
def test_grouped_kernel_matches_reference_and_float(m, k, static):
    g = torch.Generator().manual_seed(m * k)
    w = torch.randn(40, k, generator=g)
    q, s = quantize_weight_int4(w, group=128)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(40, generator=g)
    got = int8_linear_grouped(x, q, s, 128, bias, static)
    ref = int8_linear_grouped_reference(x, q, s, 128, bias, static)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)  # same integers; only float summation order differs
    wdeq = q.float() * expand_group_scale(s, k, 128)
    exact = x @ wdeq.t() + bias  # float with the same 4-bit weights: only activation rounding differs
    assert (got - exact).pow(2).mean() < 1e-3 * exact.pow(2).mean()
    with pytest.raises(ValueError, match="group scales"):
        int8_linear_grouped(x, q, s[:, :1], 128)


def test_w4_group128_checkpoint_round_trip_and_stage(tmp_path):
    """--w-group 128: [N, G] scales in the file, the same logits after reload and in a worker stage."""
    from quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from quant.config import QuantConfig
    from quant.pipeline import quantize
    from tests.conftest import VOCAB, lean_matches_transformers, sqnr_db, tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers=2, init_range=0.2)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    errs = {}
    for group, asym in ((0, False), (16, False), (16, True)):
        m = tiny_model("llama", layers=2, init_range=0.2)
        cfg = QuantConfig(method="haq", w_bits=4, w_group=group, act_scheme="token", search_tokens=128, w_asym=asym)
        report = quantize(m, cfg, calib, progress=False)
        out = save_checkpoint(m, tiny_tokenizer(), cfg, report, tmp_path / f"g{group}{asym}")
        loaded, _, manifest = load_checkpoint(out)
        with torch.no_grad():
            got = loaded(ids).logits
            assert torch.allclose(got, m(ids).logits, atol=1e-5)
        errs[group, asym] = sqnr_db(ref, got)
        if group:
            t = read_manifest(out).tensors
            assert t["model.layers.0.mlp.down_proj.w_scale"].shape == (64, 128 // 16)  # [N = D, I / 16]
            assert manifest.modules["model.layers.0.mlp.down_proj"]["w_group"] == 16
            assert manifest.modules["model.layers.0.mlp.down_proj"]["w_zero"] == asym
            assert ("model.layers.0.mlp.down_proj.w_zero" in t) == asym
            if asym:
                assert t["model.layers.0.mlp.down_proj.w_zero"].shape == (64, 128 // 16)
                assert t["model.layers.0.mlp.down_proj.w_zero"].dtype == "uint8"
            assert lean_matches_transformers(loaded, 8)
    assert errs[16, False] > errs[0, False]  # finer scales: closer to float
    assert errs[16, True] > errs[0, False]


def test_w_group_and_w_asym_need_w4():
    from quant.config import QuantConfig
    with pytest.raises(ValueError, match="--w-group"):
        QuantConfig(method="haq", w_bits=8, w_group=128)
    with pytest.raises(ValueError, match="--w-asym"):
        QuantConfig(method="haq", w_bits=8, w_asym=True)
    with pytest.raises(ValueError, match="--w-asym"):
        QuantConfig(method="mobilequant", w_bits=4, act_scheme="tensor", w_asym=True)


def test_w4a8_checkpoint_is_packed_reloads_and_stays_close(tmp_path):
    """--w-bits 4 end to end on a tiny Llama: packed in the file and in memory, reloaded, close to float."""
    from quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from quant.config import QuantConfig
    from quant.pipeline import quantize
    from quant.qlinear import QuantLinear
    from tests.conftest import VOCAB, lean_matches_transformers, sqnr_db, tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers=2, init_range=0.2)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="haq", w_bits=4, act_scheme="token", search_tokens=128)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    report = quantize(model, cfg, calib, progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "w4")
    tensors = read_manifest(out).tensors
    q = tensors["model.layers.0.self_attn.q_proj.qweight4"]
    assert q.dtype == "uint8" and q.shape == (64, 32)  # [N, K / 2]
    assert "model.layers.0.self_attn.q_proj.qweight" not in tensors
    assert tensors["lm_head.qweight"].dtype == "int8"  # lm_head stays 8-bit
    loaded, _, _ = load_checkpoint(out)
    lin = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(lin, QuantLinear) and lin.w_bits == 4 and lin.qweight4.dtype == torch.uint8
    with torch.no_grad():
        got = loaded(ids).logits
    assert sqnr_db(ref, got) > 3  # a random tiny model is harsh on 4 bits; the real model is in BENCHMARKS.md
    assert lean_matches_transformers(loaded, 8)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group", [0, 128, 16])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 200), (8, 1536), (1, 37), (11, 256), (40, 256)])
# 37: odd K, the scalar tail; 11: a second block of rows in the packed kernel; 40: unpacked once, then the GEMM
def test_packed_w4_kernel_matches_the_unpacked_reference(m, k, group, asym):
    """The decode kernel reads the nibbles directly: same int32 group sums as the int8 reference."""
    from quant.kernels import int4_linear, int4_linear_reference

    g = torch.Generator().manual_seed(m * k + group)
    w = torch.randn(40, k, generator=g) + (0.3 if asym else 0.0)
    scale, zero = search_w4_scale(w, None, (1.0, 0.9), group, asym=asym)
    q, scale = quantize_weight_int4(w, scale, group, zero)
    if asym:
        zero8 = zero.to(torch.uint8)
        packed = pack_int4((q + expand_group_scale(zero8, k, group).to(torch.int8)).to(torch.int8), signed=False)
    else:
        zero8 = None
        packed = pack_int4(q)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(40, generator=g)
    for static in (None, 0.03):
        got = int4_linear(x, packed, scale, group, bias, static, zero8)
        ref = int4_linear_reference(x, packed, scale, group, bias, static, zero8)
        assert got.shape == (m, 40)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="weight scales"):
        int4_linear(x, packed, scale[:5], group, bias)
    if zero8 is not None:  # zero points of the wrong type are refused, not read as bytes
        with pytest.raises(ValueError, match="zero points must be uint8"):
            int4_linear(x, packed, scale, group, bias, None, zero8.float())
    from quant.int4 import unpack_int4, unpack_int4_zero
    from quant.kernels import unpack_w4
    torch_unpacked = unpack_int4(packed, k) if zero8 is None else unpack_int4_zero(packed, zero8, k, group)
    assert torch.equal(unpack_w4(packed, zero8, k, group), torch_unpacked)  # the C unpacking, bit for bit
