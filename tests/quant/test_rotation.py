"""The residual rotation (quant/rotation.py): the float model computes the same function, its norms
carry no weights and its embeddings are untied; a residual stream's outlier channels are gone from
every linear's input; the checkpoint brings the rotated model back exactly, and the C stage runs it."""

import pytest
import torch

from quant.checkpoint import load_checkpoint, save_checkpoint
from quant.config import QuantConfig
from quant.generate import HFDecoder, SamplingConfig, generate_tokens
from quant.pipeline import quantize
from quant.rotation import random_orthogonal, rotate_residual
from tests.conftest import sqnr_db, tiny_model, tiny_tokenizer
from workers.llama_stage import LocalLlama


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(576, seed=3)
    assert torch.allclose(q.t() @ q, torch.eye(576, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, random_orthogonal(576, seed=3)) and not torch.equal(q, random_orthogonal(576, seed=4))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_the_rotated_float_model_computes_the_same_function(arch, test_ids):
    model = tiny_model(arch)
    for layer in model.model.layers:  # norms with weights far from 1, so that folding them matters
        layer.input_layernorm.weight.data.uniform_(0.2, 3.0)
        layer.post_attention_layernorm.weight.data.uniform_(0.2, 3.0)
    model.model.norm.weight.data.uniform_(0.2, 3.0)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (arch == "llama")
    with torch.no_grad():
        ref = model(test_ids).logits
        rotate_residual(model, seed=0)
        got = model(test_ids).logits
    assert sqnr_db(ref, got) > 100
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for layer in model.model.layers
               for n in (layer.input_layernorm, layer.post_attention_layernorm))
    with torch.no_grad():  # the embedding no longer reads like the float model's: its rows are rotated
        assert not torch.allclose(model.get_input_embeddings().weight, tiny_model(arch).get_input_embeddings().weight)


def test_other_architectures_and_methods_are_refused():
    with pytest.raises(ValueError, match="RMSNorm"):
        rotate_residual(tiny_model("opt"))
    with pytest.raises(ValueError, match="--rotate-residual works with rtn, haq and luc"):
        QuantConfig(method="tender", act_scheme="tender", rotate_residual=True)


def test_the_rotated_model_has_no_outlier_channels_in_its_linears_inputs(test_ids):
    """Planted massive channels in the residual stream (a few channels large in every token, as LLMs
    have): every q/k/v and gate/up input has channels over 5x the median channel's range; rotated, none
    stands out, so one activation scale (per token or per tensor) fits all channels."""

    def spread(model) -> float:  # over the inputs of every layer's q_proj and gate_proj: max / median channel range
        ranges = []
        hooks = [lin.register_forward_pre_hook(lambda _m, a: ranges.append(a[0].abs().amax(dim=(0, 1))))
                 for layer in model.model.layers for lin in (layer.self_attn.q_proj, layer.mlp.gate_proj)]
        with torch.no_grad():
            model(test_ids)
        for h in hooks:
            h.remove()
        return min(float(r.max() / r.median()) for r in ranges)

    model = tiny_model("llama")
    model.model.embed_tokens.weight.data[:, [3, 40]] *= 40.0
    assert spread(model) > 5  # without the planted channels: 1.3
    rotate_residual(model, seed=0)
    assert spread(model) < 2.5


def test_a_rotated_checkpoint_loads_back_exactly_and_runs_on_the_c_stage(calib_ids, test_ids, tmp_path):
    model = tiny_model("llama", init_range=0.2)
    cfg = QuantConfig(method="haq", act_scheme="token", w_bits=4, w_group=16, w_asym=True, search_tokens=256,
                      rotate_residual=True)
    report = quantize(model, cfg, calib_ids, progress=False)
    with torch.no_grad():
        want = model(test_ids).logits
    loaded, _, manifest = load_checkpoint(save_checkpoint(model, tiny_tokenizer(), cfg, report, tmp_path / "ck"))
    assert manifest.model_config["tie_word_embeddings"] is False
    assert manifest.method["rotate_residual"] is True
    with torch.no_grad():
        assert torch.equal(loaded(test_ids).logits, want)
    sampling = SamplingConfig(max_new_tokens=16)
    prompt = [3, 17, 42, 99, 5]
    assert list(generate_tokens(LocalLlama(loaded, max_positions=64), prompt, sampling, set())) == \
        list(generate_tokens(HFDecoder(loaded), prompt, sampling, set()))
