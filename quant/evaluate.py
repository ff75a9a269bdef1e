"""Perplexity with the GPTQ/SmoothQuant protocol (METHODS.md section 6).

The text is tokenized once, cut into non-overlapping windows of `ctx` tokens (tail dropped, no
BOS added per window), and PPL = exp(mean next-token NLL over all windows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity", "tokenize_for_eval", "mean_window_loss", "window_log_probs",
           "mean_window_kl"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    ctx: int
    tokens: int  # tokens scored (windows * (ctx - 1))
    nll: float  # mean NLL per scored token

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_for_eval(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def mean_window_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss (nats) over windows [N, L], one window at a time (the logits are large)."""
    total = 0.0
    for row in ids:
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()  # [L-1, V]
        total += F.cross_entropy(logits, row[1:]).item()
    return total / ids.shape[0]


@torch.no_grad()
def window_log_probs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per window of ids [N, L], the model's next-token log-probabilities [L, V] (float32: N * L * V * 4
    bytes in all, about 100 MB per 512-token window at SmolLM2's 49k vocabulary)."""
    return [F.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), dim=-1) for row in ids]


@torch.no_grad()
def mean_window_kl(model, ids: torch.Tensor, ref: list[torch.Tensor]) -> float:
    """Mean KL(ref || model) per token (nats) over windows ids [N, L], ref from window_log_probs of the
    reference model. Never negative, and less noisy than a loss difference: every token's whole
    distribution counts, not only the probability of the next token in the text."""
    total = 0.0
    for row, p in zip(ids, ref, strict=True):
        q = F.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), dim=-1)  # [L, V]
        total += F.kl_div(q, p, log_target=True, reduction="batchmean").item()
    return total / ids.shape[0]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, ctx: int = 2048, windows: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """ids: LongTensor [T] of the whole text. windows: first N windows (None: all)."""
    available = ids.numel() // ctx
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one {ctx}-token window; use a smaller --ctx")
    if windows is not None and windows > available:
        raise ValueError(f"asked for {windows} windows of {ctx} tokens but the text has only {available}")
    n = windows or available
    total, count = 0.0, 0
    for w in tqdm(range(n), desc=f"perplexity ctx={ctx}", disable=not progress):
        x = ids[w * ctx : (w + 1) * ctx][None]  # [1, ctx]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [1, ctx, V]
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += nll.item()
        count += ctx - 1
    return PerplexityResult(math.exp(total / count), n, ctx, count, total / count)
