"""Tender's decomposition and kernel: power-of-two groups, shift-accumulated int8 products."""

import pytest
import torch

from quant.kernels import int8_linear, quantize_weight_per_channel
from quant.tender import tender_linear, tender_linear_reference, tender_quantize
from tests.conftest import sqnr_db


def _outlier_acts(m=64, k=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :4] *= 60  # a few outlier channels, as in LLM activations
    x[:, 10] += 25  # a channel with a large offset (what the bias removal is for)
    return x


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_groups_have_power_of_two_scales_cover_every_channel_and_are_contiguous(groups):
    x = _outlier_acts()
    order = torch.argsort(x.abs().amax(0))  # the stored order: ascending calibration magnitude
    xs = x[:, order]
    c = tender_quantize(xs, groups)
    a = (xs - c.bias).abs().amax(0)
    scales = c.channel_scales()
    assert torch.all(a <= scales * 127 * (1 + 1e-5)), "every channel fits its group's range"
    assert torch.all(c.group[1:] >= c.group[:-1]), "groups are contiguous column ranges"
    assert c.starts[0] == 0 and c.starts[-1] == x.shape[1]
    needed = torch.ceil(torch.log2((a / (c.s0 * 127)).clamp_min(1e-30))).clamp(0, groups - 1)
    coarser = int((c.group > needed).sum())
    assert coarser <= 16 * groups, f"{coarser} channels got a coarser scale than they need"
    ratios = torch.unique(scales / c.s0)
    assert all(float(r).is_integer() and (int(r) & (int(r) - 1)) == 0 for r in ratios)
    assert torch.allclose(c.q.float() * scales + c.bias, xs, atol=float(scales.max()) / 2 + 1e-4)


def test_shift_accumulated_kernel_equals_exact_products():
    x = _outlier_acts(m=40, k=192)
    w = torch.randn(96, 192)
    qw, sw = quantize_weight_per_channel(w)
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(5))
    got = tender_linear(x, qw[:, perm], sw, groups=4, chunk=16, perm=perm)
    ref = tender_linear_reference(x, qw[:, perm], sw, groups=4, chunk=16, perm=perm)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    same = tender_linear_reference(x[:, perm], qw[:, perm], sw, groups=4, chunk=16)  # perm = a column order only
    assert torch.allclose(got, same, rtol=1e-5, atol=1e-4)


def test_tender_is_closer_to_float_than_per_tensor_w8a8_on_outlier_activations():
    x = _outlier_acts(m=64, k=256, seed=1)
    w = torch.randn(128, 256) / 16
    b = torch.randn(128)
    qw, sw = quantize_weight_per_channel(w)
    fp = torch.nn.functional.linear(x, w, b)
    perm = torch.argsort(x.abs().amax(0))  # what quantization stores: columns by calibration magnitude
    tender = sqnr_db(fp, tender_linear(x, qw[:, perm], sw, b, groups=4, perm=perm))
    static = sqnr_db(fp, int8_linear(x, qw, sw, b, static_scale=float(x.abs().max()) / 127))
    assert tender > static + 6, (tender, static)  # at least 4x less noise power
    assert tender > 30


def test_int64_accumulation_when_int32_could_overflow():
    k = 4096
    x = torch.full((2, k), 1.0)
    x[:, :200] = 1e6  # 200 channels in the top group: sum 2^15 * 127^2 * 200 is far past int32
    x[1] *= -1
    w = torch.full((4, k), 127, dtype=torch.int8)
    sw = torch.ones(4)
    got = tender_linear(x, w, sw, groups=16)
    fp = x @ w.float().t()
    assert torch.allclose(got, fp, rtol=1e-3), (got[:, 0], fp[:, 0])


def test_tender_checkpoint_round_trip_and_quality(tmp_path):
    """--method tender end to end on a tiny Llama: saved, reloaded, and close to the float model."""
    from quant.checkpoint import load_checkpoint, save_checkpoint
    from quant.config import QuantConfig
    from quant.pipeline import quantize
    from quant.qlinear import QuantLinear
    from tests.conftest import VOCAB, tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers=2, init_range=0.2)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="tender", act_scheme="tender", tender_groups=4, search_tokens=128)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    report = quantize(model, cfg, calib, progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "t")
    loaded, _, manifest = load_checkpoint(out)
    lins = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.act_scheme == "tender" and m.groups == 4 for m in lins)
    with torch.no_grad():
        got = loaded(ids).logits
    assert sqnr_db(ref, got) > 20


def test_tender_is_only_its_own_activation_scheme():
    from quant.config import QuantConfig

    with pytest.raises(ValueError, match="tender"):
        QuantConfig(method="tender", act_scheme="token")
    with pytest.raises(ValueError, match="tender"):
        QuantConfig(method="haq", act_scheme="tender")


def test_tender_with_w4_weights_round_trips_and_serves(tmp_path):
    """Tender's W4 variant: 4-bit weights (packed, in the stored column order) with more groups."""
    from quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from quant.config import QuantConfig
    from quant.pipeline import quantize
    from tests.conftest import VOCAB, lean_matches_transformers, sqnr_db, tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers=2, init_range=0.2)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="tender", act_scheme="tender", w_bits=4, tender_groups=8, search_tokens=128)
    report = quantize(model, cfg, torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)),
                      progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "t4")
    t = read_manifest(out).tensors
    assert t["model.layers.0.mlp.down_proj.qweight4"].dtype == "uint8" and "model.layers.0.mlp.down_proj.perm" in t
    loaded, _, _ = load_checkpoint(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, model(ids).logits, atol=1e-5) and sqnr_db(ref, got) > 3
    assert lean_matches_transformers(loaded, 8)
