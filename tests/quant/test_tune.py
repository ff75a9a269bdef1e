"""Adaptive layer tuning through the integer kernel, its memory accounting, and exit voting."""

import pytest
import torch

from quant.kernels import quantize_activations_reference
from quant.qlinear import QuantLinear
from quant.evaluate import mean_window_loss
from quant.tune import TuneConfig, tune
from quant.voting import voting_perplexity
from tests.conftest import VOCAB


def test_trainable_scales_give_the_float_gradients():
    """Through the int8 kernel: dL/dw_scale exact, dL/dx straight-through (activation rounding as identity)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (24, 40), dtype=torch.int8, generator=g)
    ws = torch.rand(24, generator=g) * 0.01 + 0.001
    bias = torch.randn(24, generator=g)
    m = QuantLinear.from_quantized(q, ws, bias, "token")
    m.w_scale.requires_grad_(True)
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    gy = torch.randn(5, 24, generator=g)
    (m(x) * gy).sum().backward()
    xq, sx = quantize_activations_reference(x.detach())
    x_deq = xq.float() * sx[:, None]  # what the kernel multiplies
    ws_f = ws.detach().clone().requires_grad_(True)
    x_f = x.detach().clone().requires_grad_(True)
    y_f = (x_deq + x_f - x_f.detach()) @ (q.float() * ws_f[:, None]).t() + bias  # STE on x
    (y_f * gy).sum().backward()
    assert torch.allclose(m.w_scale.grad, ws_f.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x_f.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture
def tiny_ckpt_model(tmp_path):
    from quant.checkpoint import load_checkpoint
    from tests.conftest import tiny_checkpoint
    out = tiny_checkpoint(tmp_path / "ck", layers=3, init_range=0.2)
    return load_checkpoint(out)


def test_windowed_tuning_lowers_the_loss_with_less_memory(tiny_ckpt_model, tmp_path):
    from quant.checkpoint import load_checkpoint, save_checkpoint
    from quant.config import QuantConfig
    from quant.layerwise import QuantReport

    model, tok, manifest = tiny_ckpt_model
    g = torch.Generator().manual_seed(7)
    vocab = torch.randint(2, 40, (VOCAB,), generator=g)  # a skewed "user text": few distinct tokens
    train = vocab[torch.randint(0, VOCAB, (8, 32), generator=g)]
    held = vocab[torch.randint(0, VOCAB, (2, 32), generator=g)]
    scales_before = model.model.layers[0].mlp.down_proj.w_scale.clone()
    qweight_before = model.model.layers[0].mlp.down_proj.qweight.clone()
    r = tune(model, train, held, TuneConfig(window=1, steps=12, batch=2, lr=3e-2), progress=False)
    assert r.windows == 3 and r.loss_after < r.loss_before - 0.05, r
    assert r.peak_window_bytes < r.full_model_bytes  # back-propagation depth 1 of 3 layers
    assert not torch.equal(model.model.layers[0].mlp.down_proj.w_scale, scales_before)
    assert torch.equal(model.model.layers[0].mlp.down_proj.qweight, qweight_before)  # integers untouched
    report = QuantReport(choices={**manifest.choices, "tune": r.to_dict()}, config=QuantConfig.from_dict(manifest.method))
    out = save_checkpoint(model, tok, report.config, report, tmp_path / "tuned")
    loaded, _, m2 = load_checkpoint(out)
    assert m2.choices["tune"]["windows"] == 3
    assert mean_window_loss(loaded, held) == pytest.approx(r.loss_after, rel=1e-5)


def test_voting_over_exits(tiny_ckpt_model):
    from quant.evaluate import perplexity

    model, _, _ = tiny_ckpt_model
    ids = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(3))
    plain = perplexity(model, ids, 32, 3, progress=False).ppl
    assert voting_perplexity(model, ids, 32, 3, (3,), progress=False).ppl == pytest.approx(plain, rel=1e-5)
    mixed = voting_perplexity(model, ids, 32, 3, (2, 3), (1.0, 3.0), progress=False).ppl
    assert mixed > 0 and mixed != pytest.approx(plain)
    with pytest.raises(ValueError, match="exits"):
        voting_perplexity(model, ids, 32, 3, (0, 3), progress=False)
