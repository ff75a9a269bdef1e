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


@pytest.mark.parametrize("extra", [{}, {"act_scheme": "tensor"}, {"w_bits": 4, "w_group": 16, "w_asym": True},
                                   {"w_bits": 4}, {"rotate_down": True},
                                   {"w_bits": 4, "w_group": 16, "w_asym": True, "rotate_residual": True}])
def test_c_stage_matches_the_torch_ops_stage(extra, calib_ids):
    """The one-call C stage (norms, RoPE, cache, attention, integer linears) computes what the torch-ops
    stage does: outputs and KV caches agree to float rounding, over a prompt fed in pieces."""
    model = tiny_model("llama")
    quantize(model, QuantConfig(method="haq", search_tokens=256, **extra), calib_ids, progress=False)
    native = LlamaStage.of_model(model, max_positions=128)
    ops = LlamaStage(native.dims, model.state_dict(), 0, 2, 128, native=False)
    assert native.native_ready and not ops.native_ready
    x = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    outs = []
    for stage in (native, ops):
        cache = stage.new_cache(32)
        outs.append((torch.cat([stage.forward(x[a:b], cache) for a, b in ((0, 5), (5, 6), (6, 7), (7, 12))]), cache))
    (y1, c1), (y2, c2) = outs
    # static activation scales round a few more values differently; per-token ones agree to float rounding
    floor = 60 if extra.get("act_scheme") == "tensor" else 120
    assert c1.length == c2.length == 12
    k1, k2, v1, v2 = (t[:, :, :12] for t in (c1.k, c2.k, c1.v, c2.v))  # past `length` the cache is unwritten
    assert sqnr_db(y2, y1) > floor and sqnr_db(k2, k1) > floor - 20 and sqnr_db(v2, v1) > floor - 20


def test_a_session_gets_the_same_bits_alone_and_batched(qmodel):
    """A decode step batched with another session's prompt gives bit-identical rows: sessions never
    influence each other's tokens, whatever the front end batches together. (Not Tender: its
    activation groups are chosen per chunk of rows, so batch neighbours share them.)"""
    stage = LlamaStage.of_model(qmodel, max_positions=128)
    assert stage.native_ready == (qmodel.model.layers[0].self_attn.q_proj.perm is None)
    if not stage.native_ready:  # Tender: the torch-ops stage, checked against transformers above
        return
    g = torch.Generator().manual_seed(4)
    d = qmodel.config.hidden_size
    prompt_a, step_a, prompt_b = torch.randn(6, d, generator=g), torch.randn(1, d, generator=g), torch.randn(9, d, generator=g)
    alone = stage.new_cache(32)
    stage.forward(prompt_a, alone)
    want = stage.forward(step_a, alone)
    a, b = stage.new_cache(32), stage.new_cache(32)
    stage.forward(prompt_a, a)
    got, _ = stage.forward_batch([step_a, prompt_b], [a, b])
    assert torch.equal(got, want) and torch.equal(a.k[:, :, :7], alone.k[:, :, :7])


def test_a_checkpoint_whose_shapes_do_not_match_its_config_is_refused_before_any_c_code_runs(qmodel):
    """The C stage trusts tensor sizes, so they are checked when the stage is built."""
    tensors = dict(qmodel.state_dict())
    if "model.layers.1.mlp.down_proj.perm" in tensors:  # Tender runs on torch ops, which check shapes themselves
        return
    dims = LlamaStage.of_model(qmodel, max_positions=16).dims
    bad = dict(tensors)
    bad["model.layers.1.mlp.down_proj.qweight"] = tensors["model.layers.1.mlp.down_proj.qweight"][:, :-8].contiguous()
    with pytest.raises(ValueError, match="do not fit its 128-wide input"):
        LlamaStage(dims, bad, 0, 2, 16)
    bad = dict(tensors)
    for t in ("qweight", "w_scale"):
        bad[f"model.layers.1.self_attn.o_proj.{t}"] = tensors[f"model.layers.1.self_attn.o_proj.{t}"][:32].contiguous()
    with pytest.raises(ValueError, match="layer 1: o has 32 outputs"):
        LlamaStage(dims, bad, 0, 2, 16)


@pytest.mark.parametrize("method,scheme", [("haq", "tensor"), ("rtn", "token")])
def test_a_rotated_checkpoint_decodes_like_the_transformers_path(method, scheme, calib_ids):
    """Layers whose down_proj input is rotated (--rotate-down) run rotated in the lean stage too."""
    model = tiny_model("llama", init_range=0.2)
    for layer in model.model.layers:
        layer.mlp.up_proj.weight.data[[3, 40]] *= 60.0  # outliers that make rotation win
    report = quantize(model, QuantConfig(method=method, act_scheme=scheme, search_tokens=256, rotate_down=True),
                      calib_ids, progress=False)
    assert any(c.get("rotate") for c in report.choices.values())
    ids = torch.tensor([3, 17, 42, 99, 5, 7, 11])
    with torch.no_grad():
        want = model(ids[None]).logits[0]  # QuantLinear modules, rotation in torch
    for native in (True, False):
        local = LocalLlama(model, max_positions=64, native=native)
        cache = local.new_cache(16)
        got = torch.stack([local.step(ids[i:i + 1], cache) for i in range(len(ids))])
        assert sqnr_db(want, got) > 40
    cfg = SamplingConfig(max_new_tokens=16)
    assert list(generate_tokens(LocalLlama(model, max_positions=64), [3, 17, 42], cfg, set())) == \
        list(generate_tokens(HFDecoder(model), [3, 17, 42], cfg, set()))
