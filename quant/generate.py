"""Token-by-token generation with a KV cache: sampling and the decode loop (pure of any runtime).

The lean integer decoder and text streaming of one process are workers/decode.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "pick_token", "HFDecoder", "generate_tokens"]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, seed: int, step: int) -> int:
    """logits [V] -> next token id. Token `step` of a seeded run draws from a generator seeded by
    (seed, step), so a pipeline that samples on another process gives the same tokens."""
    if temperature == 0:
        return int(torch.argmax(logits))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class HFDecoder:
    """Any transformers CausalLM (float or quantized modules) behind the decoder interface."""

    def __init__(self, model) -> None:
        self.model = model

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """ids [T] -> logits [V] of the last position; the cache grows by T."""
        return self.model(input_ids=ids[None], past_key_values=cache, use_cache=True).logits[0, -1]


def generate_tokens(decoder, prompt_ids: list[int], cfg: SamplingConfig, eos_ids: set[int]) -> Iterator[int]:
    """Yields new token ids: one prefill of the prompt, then one decode step per token.

    decoder: anything with new_cache() and step(ids [T], cache) -> logits [V] (HFDecoder here, the lean
    integer decoder of workers/decode.py)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    cache = decoder.new_cache()
    x = torch.tensor(prompt_ids)  # [T]
    for step in range(cfg.max_new_tokens):
        tok = pick_token(decoder.step(x, cache), cfg.temperature, cfg.top_p, cfg.seed, step)
        yield tok
        if tok in eos_ids:
            return
        x = torch.tensor([tok])
