"""MobileQuant: straight-through quantizers, training lowers the loss it reports, the folded integer
model computes what was trained, and the checkpoint is integer-only (static scales and offsets)."""

import pytest
import torch

from quant.config import QuantConfig
from quant.mobilequant import fake_quant_static, fake_quant_weight_clipped, round_ste
from tests.conftest import VOCAB, lean_matches_transformers, sqnr_db, tiny_model, tiny_tokenizer


def test_straight_through_gradients_reach_inputs_ranges_and_clips():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 5.0], requires_grad=True)
    scale = torch.tensor(0.01, requires_grad=True)
    offset = torch.tensor(0.5, requires_grad=True)
    y = fake_quant_static(x, scale, offset)
    assert torch.allclose(y.detach(), torch.tensor([-0.77, -0.26, 0.0, 0.24, 1.77]), atol=1e-6)
    (y * torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # clipped values pass no gradient
    assert scale.grad == pytest.approx(-127 + 2 * 127) and offset.grad == pytest.approx(3.0)  # clipped ends move
    assert torch.equal(round_ste(torch.tensor([0.4, 0.6])), torch.tensor([0.0, 1.0]))

    w = torch.tensor([[1.0, -0.5, 0.1], [0.2, 0.3, -0.4]])
    theta = torch.zeros(2, requires_grad=True)
    wq = fake_quant_weight_clipped(w, torch.sigmoid(theta), 7)
    assert wq.detach().abs().amax(dim=1).tolist() == pytest.approx([0.5, 0.2])  # clipped at sigmoid(0) = half
    (wq - w).pow(2).sum().backward()
    assert (theta.grad < 0).all()  # less clipping lowers the error: gradient says so


def outlier_model(arch: str):
    """A tiny random model with a few activation-outlier channels, as real LLMs have (METHODS.md
    section 6: per-channel maxima 6-21x the median): the case smoothing and learned ranges are for."""
    model = tiny_model(arch, layers=2, init_range=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "layer_norm.weight")) and "layers" in name:
                p[:3] *= 15
    return model


def _mq(arch: str, w_bits: int = 8, epochs: int = 4, w_group: int = 0):
    from quant.pipeline import quantize

    model = outlier_model(arch)
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method="mobilequant", act_scheme="tensor", w_bits=w_bits, w_group=w_group, search_tokens=128,
                      mq_epochs=epochs, mq_batch=2, mq_lr_transform=1e-2, mq_lr_clip=1e-2, mq_lr_range=1e-4)
    report = quantize(model, cfg, calib, progress=False)
    return model, cfg, report


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_training_lowers_the_loss_and_beats_static_rtn(arch):
    from quant.pipeline import quantize

    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    ref = outlier_model(arch)(ids).logits.detach()
    model, _, report = _mq(arch)
    mq = report.choices["mobilequant"]
    assert mq["loss_end"] < 0.97 * mq["loss_start"], mq
    rtn = outlier_model(arch)
    quantize(rtn, QuantConfig(method="rtn", act_scheme="tensor", search_tokens=128),
             torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1)), progress=False)
    with torch.no_grad():
        assert sqnr_db(ref, model(ids).logits) > sqnr_db(ref, rtn(ids).logits)


def test_folded_integer_model_computes_what_was_trained():
    """The simulated model (transforms at the readers, fake quantization) and the converted one
    (transforms folded into norms and v/up rows, int8 kernels, offsets in the bias) agree."""
    from quant import mobilequant as mqm
    from quant.arch import arch_spec
    from quant.layerwise import QuantReport, model_group_stats

    model = tiny_model("llama", layers=2, init_range=0.2)
    cfg = QuantConfig(method="mobilequant", act_scheme="tensor", search_tokens=128, quantize_lm_head=False)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    spec = arch_spec(model)
    with torch.no_grad():
        stats = model_group_stats(model, spec, calib, 64, with_hessian=False)
    gqs, _ = mqm._wrap(model, spec, stats, cfg, 127)
    with torch.no_grad():  # move the learned parameters away from their initial values
        g = torch.Generator().manual_seed(0)
        for row in gqs:
            for gq in row:
                gq.u.normal_(0, 0.3, generator=g)
                gq.offset_steps.fill_(3.0)
        sim = mqm._final_hidden(model, calib[:2])
        mqm._convert(model, spec, gqs, cfg, QuantReport())
        got = mqm._final_hidden(model, calib[:2])
    assert sqnr_db(sim, got) > 35  # equal up to float summation order at rounding boundaries


@pytest.mark.parametrize("w_bits,w_group", [(8, 0), (4, 16)])
def test_checkpoint_is_integer_only_and_serves_identically(tmp_path, w_bits, w_group):
    from quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from quant.qlinear import QuantLinear

    model, cfg, report = _mq("llama", w_bits, epochs=1, w_group=w_group)
    out = save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "mq")
    manifest = read_manifest(out)
    assert manifest.method["method"] == "mobilequant"
    loaded, _, _ = load_checkpoint(out)
    lins = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.static_scale() is not None for m in lins)  # no per-token statistics at run time
    assert all(m.input_offset is not None for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and "layers" in n)
    if w_bits == 4:
        assert "model.layers.0.mlp.up_proj.qweight4" in manifest.tensors
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert lean_matches_transformers(loaded, 8)


def test_mobilequant_is_static_only_and_dense_only():
    with pytest.raises(ValueError, match="integer-only"):
        QuantConfig(method="mobilequant", act_scheme="token")
    from quant.pipeline import quantize
    with pytest.raises(ValueError, match="dense models"):
        quantize(tiny_model("mixtral"), QuantConfig(method="mobilequant", act_scheme="tensor"),
                 torch.randint(0, VOCAB, (2, 16)), progress=False)
