"""Edge-LLM's voting (METHODS.md section 3): combine the next-token predictions of several exits.

An exit e in 1..L is the hidden state after decoder layer e, read out through the final norm and
lm_head (exit L is the model's own output). Voting averages the exits' probabilities with the
given weights: p = sum_e w_e softmax(logits_e) / sum_e w_e. Off by default: bench numbers say
whether it helps a given compressed (and tuned) model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .evaluate import PerplexityResult

__all__ = ["vote_log_probs", "voting_perplexity"]


def vote_log_probs(model, ids: torch.Tensor, exits: tuple[int, ...], weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """ids [1, T] -> log of the voted next-token distribution [T, V]."""
    from .tune import exit_logits

    n_layers = model.config.num_hidden_layers
    if not exits or any(not 1 <= e <= n_layers for e in exits):
        raise ValueError(f"exits must be layer counts in [1, {n_layers}], got {exits}")
    w = torch.tensor(weights if weights is not None else [1.0] * len(exits), dtype=torch.float64)
    if w.numel() != len(exits) or (w <= 0).any():
        raise ValueError("one positive weight per exit")
    w = (w / w.sum()).float()
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    logp = []
    for e in exits:  # hidden_states[e] is the output of layer e (the last entry is already normed)
        logits = out.logits[0] if e == n_layers else exit_logits(model, out.hidden_states[e])[0]
        logp.append(F.log_softmax(logits.float(), dim=-1))
    stacked = torch.stack(logp) + torch.log(w)[:, None, None]  # [E, T, V]
    return torch.logsumexp(stacked, dim=0)


@torch.no_grad()
def voting_perplexity(model, ids: torch.Tensor, ctx: int, windows: int, exits: tuple[int, ...],
                      weights: tuple[float, ...] | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of the voted prediction, same protocol as quant.evaluate.perplexity."""
    available = ids.numel() // ctx
    if windows > available or windows < 1:
        raise ValueError(f"asked for {windows} windows of {ctx} tokens but the text has {available}")
    total, count = 0.0, 0
    for i in tqdm(range(windows), desc=f"voting perplexity exits={','.join(map(str, exits))}", disable=not progress):
        x = ids[i * ctx:(i + 1) * ctx][None]
        logp = vote_log_probs(model, x, exits, weights)
        total += -logp[:-1].gather(1, x[0, 1:, None]).sum().item()
        count += ctx - 1
    return PerplexityResult(math.exp(total / count), windows, ctx, count, total / count)
