import pytest
import torch

from quant.checkpoint import load_checkpoint, save_checkpoint
from quant.config import QuantConfig
from quant.hadamard import hadamard, hadamard_block
from quant.pipeline import quantize
from tests.conftest import sqnr_db, tiny_model, tiny_tokenizer


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


@pytest.mark.parametrize("k,block", [(16, 8), (1536, 512), (64, 64), (12, 4)])
def test_hadamard_is_the_block_diagonal_sylvester_matrix_and_its_own_inverse(k, block):
    x = torch.randn(3, k, dtype=torch.float64)
    ref = x @ torch.block_diag(*[_sylvester(block).double()] * (k // block))
    y = hadamard(x, block)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(hadamard(y, block), x, atol=1e-12) and torch.allclose(y.norm(), x.norm())


def test_block_choice_and_bad_blocks():
    assert [hadamard_block(k) for k in (1536, 576, 128, 14336, 7)] == [512, 64, 128, 2048, 0]
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.randn(2, 12), 6)
    with pytest.raises(ValueError, match="dividing 12"):
        hadamard(torch.randn(2, 12), 8)


def test_rotating_down_proj_recovers_its_outlier_channels_without_smoothing(calib_ids, test_ids):
    """Plant channel outliers in down_proj's input: with static per-tensor scales and plain RTN they
    take the whole int8 range; the online rotation spreads them and wins most of the error back."""
    errs = {}
    for rot in (False, True):
        model = tiny_model("llama")
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.data[[3, 40]] *= 60.0
        with torch.no_grad():
            ref = model(test_ids).logits
        quantize(model, QuantConfig(method="rtn", act_scheme="tensor", rotate_down=rot), calib_ids, progress=False)
        with torch.no_grad():
            errs[rot] = sqnr_db(ref, model(test_ids).logits)
        assert (model.model.layers[0].mlp.down_proj.rotate_block == 128) == rot
        assert model.model.layers[0].mlp.up_proj.rotate_block == 0
    assert errs[True] > errs[False] + 6


@pytest.mark.parametrize("arch,method", [("llama", "haq"), ("opt", "rtn")])
def test_rotation_is_chosen_per_layer_and_survives_the_checkpoint(arch, method, calib_ids, test_ids, tmp_path):
    """Rotating competes with smoothing (haq) or plain rounding (rtn) on each layer's output error; a
    layer with planted outliers in down_proj's (fc2's) input takes it, and the checkpoint brings back
    exactly that model."""
    model = tiny_model(arch)
    first = model.model.layers[0].mlp.up_proj if arch == "llama" else model.model.decoder.layers[0].fc1
    first.weight.data[[3, 40]] *= 60.0
    cfg = QuantConfig(method=method, act_scheme="tensor", search_tokens=256, rotate_down=True)
    report = quantize(model, cfg, calib_ids, progress=False)
    with torch.no_grad():
        want = model(test_ids).logits
    loaded, _, manifest = load_checkpoint(save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "ck"))
    name = "down" if arch == "llama" else "fc2"
    downs = [f"model.layers.{i}.mlp.down_proj" if arch == "llama" else f"model.decoder.layers.{i}.fc2" for i in (0, 1)]
    chosen = [report.choices[f"layers.{i}.{name}"] for i in (0, 1)]
    assert chosen[0]["rotate"] == 128 and chosen[0]["mse"] < chosen[0]["mse_unrotated"]
    assert [manifest.modules[d]["rotate"] for d in downs] == [c["rotate"] for c in chosen]
    with torch.no_grad():
        assert torch.equal(loaded(test_ids).logits, want)


def test_rotation_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="--rotate-down and --rotate-all work with rtn and haq"):
        QuantConfig(method="tender", act_scheme="tender", rotate_down=True)


def test_rotate_all_lets_attention_inputs_rotate_and_the_checkpoint_keeps_it(calib_ids, test_ids, tmp_path):
    """With --rotate-all the attention's q/k/v input competes too: planted outliers in layer 0's input
    norm make its q/k/v group take the rotation (by a lower output error), all three linears carry
    it, and the checkpoint brings back exactly that model."""
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm.weight.data[[3, 40]] *= 60.0
    cfg = QuantConfig(method="rtn", act_scheme="tensor", search_tokens=256, rotate_all=True)
    report = quantize(model, cfg, calib_ids, progress=False)
    with torch.no_grad():
        want = model(test_ids).logits
    chosen = report.choices["layers.0.qkv"]
    assert chosen["rotate"] == 64 and chosen["mse"] < chosen["mse_unrotated"]
    loaded, _, manifest = load_checkpoint(save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "ck"))
    assert [manifest.modules[f"model.layers.0.self_attn.{p}_proj"]["rotate"] for p in "qkv"] == [64] * 3
    with torch.no_grad():
        assert torch.equal(loaded(test_ids).logits, want)
