"""Shared fixtures: tiny random models built from transformers configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, OPTConfig,
                          OPTForCausalLM)

VOCAB = 256


def tiny_tokenizer():
    """Word-level: "t0 t1 ..." <-> ids; t0 is unknown, t1 end of sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1")


def tiny_checkpoint(out, arch: str = "llama", layers: int = 2, act_scheme: str = "token", seed: int = 0,
                    init_range: float | None = None):
    """A quantized (HAQ W8A8) tiny random model saved as a checkpoint directory -> its path."""
    from quant.checkpoint import save_checkpoint
    from quant.config import QuantConfig
    from quant.pipeline import quantize

    model = tiny_model(arch, seed, layers, init_range)
    calib = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method="haq", act_scheme=act_scheme, search_tokens=256)
    report = quantize(model, cfg, calib, progress=False)
    return save_checkpoint(model, tiny_tokenizer(), cfg, report, out)


def tiny_model(arch: str, seed: int = 0, layers: int = 2, init_range: float | None = None):
    """A random model; init_range (e.g. 0.2) gives less degenerate greedy output than the default 0.02."""
    extra = {} if init_range is None else {"initializer_range": init_range}
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, **extra,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    if arch == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, **extra, num_attention_heads=4,
                        word_embed_proj_dim=64, max_position_embeddings=256)
        return OPTForCausalLM(cfg).eval()
    if arch == "mixtral":
        cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, **extra,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            tie_word_embeddings=False)
        return MixtralForCausalLM(cfg).eval()
    raise ValueError(arch)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 20 log10(|x| / |x - y|)."""
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def test_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))


def lean_matches_transformers(model, max_new_tokens: int, prompt: tuple[int, ...] = (3, 4, 5)) -> bool:
    """The lean integer decoder (workers.llama_stage, what a worker runs) gives the same greedy tokens
    as transformers' forward of the same quantized modules."""
    from quant.generate import HFDecoder, SamplingConfig, generate_tokens
    from workers.llama_stage import LocalLlama

    s = SamplingConfig(max_new_tokens=max_new_tokens)
    lean = list(generate_tokens(LocalLlama(model, max_positions=64), list(prompt), s, set()))
    return lean == list(generate_tokens(HFDecoder(model), list(prompt), s, set()))
