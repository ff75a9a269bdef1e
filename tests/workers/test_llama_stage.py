import pytest
import torch

from quant.config import QuantConfig
from quant.generate import HFDecoder, SamplingConfig, generate_tokens
from quant.pipeline import quantize
from tests.conftest import sqnr_db, tiny_model
from workers.llama_stage import LlamaStage, LocalLlama, supports


@pytest.fixture(params=["token", "tensor", "tender"])
def qmodel(request, calib_ids):
    model = tiny_model("llama")
    method = "tender" if request.param == "tender" else "haq"
    quantize(model, QuantConfig(method=method, act_scheme=request.param, search_tokens=256), calib_ids, progress=False)
    return model


def test_greedy_tokens_identical_to_transformers_path(qmodel):
    cfg = SamplingConfig(max_new_tokens=24)
    prompt = [3, 17, 42, 99, 5]
    ref = list(generate_tokens(HFDecoder(qmodel), prompt, cfg, set()))
    fast = list(generate_tokens(LocalLlama(qmodel, max_positions=256), prompt, cfg, set()))
    assert fast == ref


def test_prefill_in_chunks_equals_one_prefill(qmodel):
    """A stage fed a prompt in pieces (as a pipeline would) keeps one consistent KV cache."""
    stage = LlamaStage.of_model(qmodel, max_positions=128)
    x = torch.randn(12, qmodel.config.hidden_size)
    one = stage.forward(x, stage.new_cache(64))
    cache = stage.new_cache(64)
    parts = torch.cat([stage.forward(x[:5], cache), stage.forward(x[5:6], cache), stage.forward(x[6:], cache)])
    assert sqnr_db(one, parts) > 60 and cache.length == 12


def test_stages_compose_to_the_whole_model(qmodel):
    whole = LlamaStage.of_model(qmodel, max_positions=64)
    a, b = LlamaStage.of_model(qmodel, 0, 1, max_positions=64), LlamaStage.of_model(qmodel, 1, 2, max_positions=64)
    x = torch.randn(6, qmodel.config.hidden_size)
    assert torch.equal(whole.forward(x, whole.new_cache(16)), b.forward(a.forward(x, a.new_cache(16)), b.new_cache(16)))


def test_cache_overflow_is_refused(qmodel):
    stage = LlamaStage.of_model(qmodel, max_positions=64)
    cache = stage.new_cache(4)
    with pytest.raises(ValueError, match="over its cache of 4"):
        stage.forward(torch.randn(5, qmodel.config.hidden_size), cache)


def test_float_and_other_architectures_fall_back():
    assert not supports(tiny_model("llama"))  # not quantized
    assert not supports(tiny_model("opt"))
