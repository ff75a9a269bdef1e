import pytest
import torch

from quant.config import QuantConfig
from quant.pipeline import quantize
from quant.qlinear import QuantExperts, QuantLinear
from tests.conftest import sqnr_db, tiny_model


@pytest.mark.parametrize("arch", ["llama", "opt", "mixtral"])
@pytest.mark.parametrize("method,scheme", [("rtn", "token"), ("haq", "token"), ("haq", "tensor")])
def test_quantized_logits_stay_close_to_float(arch, method, scheme, calib_ids, test_ids):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(test_ids).logits
    quantize(model, QuantConfig(method=method, act_scheme=scheme, search_tokens=256), calib_ids, progress=False)
    with torch.no_grad():
        out = model(test_ids).logits
    assert sqnr_db(ref, out) > 25
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.act_scheme == scheme for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # every float linear replaced
    if arch == "mixtral":
        assert any(isinstance(m, QuantExperts) for m in model.modules())


def test_haq_smoothing_beats_rtn_on_outlier_activations(calib_ids, test_ids):
    """Plant the channel outliers real LLMs have; HAQ's smoothing must recover what RTN loses."""
    errs = {}
    for method in ("rtn", "haq"):
        model = tiny_model("llama")
        for layer in model.model.layers:
            layer.input_layernorm.weight.data[[5, 17]] = 40.0
            layer.post_attention_layernorm.weight.data[[9]] = 30.0
        with torch.no_grad():
            ref = model(test_ids).logits
        quantize(model, QuantConfig(method=method, act_scheme="tensor", search_tokens=256), calib_ids, progress=False)
        with torch.no_grad():
            errs[method] = sqnr_db(ref, model(test_ids).logits)
    assert errs["haq"] > errs["rtn"] + 3


def test_unsupported_architecture_is_refused(calib_ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="not supported"):
        quantize(model, QuantConfig(), calib_ids % 64, progress=False)


def test_true_sequential_gptq_rounds_later_groups_on_quantized_inputs(tmp_path):
    """gptq_sequential: o, gate/up and down take their Hessians after the groups before them are rounded.
    The result differs from one-pass statistics, stays close to float, and survives a reload."""
    from quant.checkpoint import load_checkpoint, save_checkpoint
    from tests.conftest import VOCAB, tiny_tokenizer

    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_model("llama", layers=2, init_range=0.2)(ids).logits
    out = {}
    for seq in (False, True):
        m = tiny_model("llama", layers=2, init_range=0.2)
        cfg = QuantConfig(method="haq", w_bits=4, w_group=16, act_scheme="token", search_tokens=128, gptq_sequential=seq)
        report = quantize(m, cfg, calib, progress=False)
        with torch.no_grad():
            out[seq] = m(ids).logits
        if seq:
            loaded, _, manifest = load_checkpoint(save_checkpoint(m, tiny_tokenizer(), cfg, report, tmp_path / "seq"))
            assert manifest.method["gptq_sequential"] is True
            with torch.no_grad():
                assert torch.allclose(loaded(ids).logits, out[seq], atol=1e-5)
    assert not torch.equal(out[False], out[True])  # the later groups were rounded against other Hessians
    assert abs(sqnr_db(ref, out[True]) - sqnr_db(ref, out[False])) < 3  # tiny random W4: both about 6.5 dB
