"""End-to-end distillation of the weight scales of a quantized model (`--kd-steps`).

After HAQ has chosen every integer code (GPTQ), the float parts of the model are still free: each
quantized linear's weight scales (per output channel, or per group of columns) and the RMSNorm
weights. This tunes them jointly, end to end, so that the quantized model's next-token
distributions match the float model's (KL divergence on the calibration windows). The codes, zero
points and everything the kernels read as integers stay as they are, so the checkpoint keeps its
size and format; only float tensors change.

The training forward of each quantized linear is a float one with the same arithmetic as the
integer kernel: activations fake-quantized per token (or with the static scale) with a
straight-through rounding, weights (codes - zero) * scale, so the scale gradients are exact.
lm_head keeps its scales (the tied embedding reads them) but passes gradients through.

Per-layer least squares on the same scales (`--refit-scales`) fit the calibration sample and made
the model worse; here the objective is the model's output, which is what perplexity measures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hadamard import hadamard
from .int4 import expand_group_scale
from .kernels import quantize_activations_reference
from .qlinear import QuantExperts, QuantLinear

__all__ = ["DistillReport", "distill_scales", "interleave_windows", "sample_windows", "tunable_linears"]


@dataclass(frozen=True)
class DistillReport:
    steps: int
    params: int  # trained float parameters (scale multipliers and norm weights)
    kl_first: float  # KL (nats per token) of the first step's window, before any update
    kl_last: float  # mean KL of the last min(8, steps) steps' windows
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tunable_linears(model: nn.Module) -> list[QuantLinear]:
    """The quantized linears whose scales distillation trains: all but lm_head (a tied embedding
    reads its scales). Raises ValueError for what it cannot run in float: Tender's channel
    groups and MoE expert banks."""
    head = getattr(model, "lm_head", None)
    if any(isinstance(m, QuantExperts) for m in model.modules()):
        raise ValueError("scale distillation (--kd-steps) does not run MoE expert banks; quantize without it")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m is not head]
    if any(m.act_scheme == "tender" for m in linears):
        raise ValueError("scale distillation (--kd-steps) does not run Tender's channel groups")
    return linears


def _fake_quant_rows(x: torch.Tensor, static: float | None) -> torch.Tensor:
    """x [..., K] -> the int8 kernel's activation rounding (quantize_activations_reference: per row,
    or the static scale), with x's gradient passed straight through."""
    q, s = quantize_activations_reference(x.detach().reshape(-1, x.shape[-1]), static)  # [M, K], [M]
    return x + ((q.float() * s[:, None]).reshape(x.shape) - x).detach()


@contextlib.contextmanager
def _float_forward(linears: list[QuantLinear], log_scales: list[torch.Tensor | None]) -> Iterator[None]:
    """Inside: each linear computes fake_quant(x) @ ((codes - zero) * scale * exp(log_scale))^T in
    float (differentiable in log_scale and x); the integer forward again afterwards."""
    saved = []
    for m, ls in zip(linears, log_scales, strict=True):
        codes = m.int8_weight().float()  # [N, K]: codes - zero, as the kernel multiplies them
        static = m.static_scale()

        def forward(x: torch.Tensor, m=m, ls=ls, codes=codes, static=static) -> torch.Tensor:
            x = m.centred(x)
            if m.rotate_block:
                x = hadamard(x, m.rotate_block)
            scale = m.w_scale if ls is None else m.w_scale * torch.exp(ls)  # [N] or [N, G]
            w = codes * (scale[:, None] if scale.dim() == 1 else expand_group_scale(scale, m.in_features, m.group_size))
            y = _fake_quant_rows(x.float(), static) @ w.t()  # [..., N]
            return y + m.bias if m.bias is not None else y

        saved.append(m.__dict__.get("forward"))
        m.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, f in zip(linears, saved, strict=True):
            if f is None:
                del m.forward
            else:
                m.forward = f  # type: ignore[method-assign]


@torch.no_grad()
def sample_windows(teacher: nn.Module, n: int, length: int, seed: int = 0, batch: int = 8,
                   progress: bool = True) -> torch.Tensor:
    """-> [n, length] token ids sampled from the float model (temperature 1, no top-k or top-p),
    each window from a random first token, as LLM-QAT's data-free distillation does: text in the
    model's own distribution rather than one corpus's. Seeded: the same seed gives the same windows."""
    vocab = int(getattr(teacher, "config").vocab_size)  # a transformers model
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, n, batch), desc="sample distillation windows", disable=not progress):
        b = min(batch, n - i)
        ids = torch.randint(0, vocab, (b, 1), generator=gen)  # [b, 1]
        cache = None
        for _ in range(length - 1):
            o = teacher(ids[:, -1:] if cache is not None else ids, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float(), dim=-1)  # [b, V]
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
        out.append(ids)
    return torch.cat(out)[:n]


def interleave_windows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, L], [n, L] -> [2n, L]: a[0], b[0], a[1], b[1], ..."""
    if a.shape != b.shape:
        raise ValueError(f"windows to interleave differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.stack([a, b], dim=1).reshape(-1, a.shape[1])


def distill_scales(model: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor, steps: int, lr: float,
                   progress: bool = True) -> DistillReport:
    """Trains, in place, the weight scales of tunable_linears(model) and its norm weights for `steps`
    Adam steps, one calibration window [L] per step (calib_ids [N, L], cycled), against teacher's
    next-token distributions. Norm weights take lr / 10."""
    t0 = time.time()
    linears = tunable_linears(model)
    log_scales = [torch.zeros_like(m.w_scale, requires_grad=True) for m in linears]
    norms = [p for n, p in model.named_parameters() if "norm" in n.split(".")[-2]]
    frozen = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in norms:
        p.requires_grad_(True)
    head = getattr(model, "lm_head", None)
    extra = [head] if isinstance(head, QuantLinear) else []  # passes gradients, keeps its scales
    opt = torch.optim.Adam([{"params": log_scales, "lr": lr}, {"params": norms, "lr": lr / 10}])
    kls: list[float] = []
    model.eval()
    teacher.eval()
    try:
        with _float_forward(linears + extra, log_scales + [None] * len(extra)), torch.enable_grad():
            bar = tqdm(range(steps), desc="distill scales", disable=not progress)
            for step in bar:
                ids = calib_ids[step % calib_ids.shape[0]].unsqueeze(0)  # [1, L]
                with torch.no_grad():
                    target = F.log_softmax(teacher(ids).logits.float(), dim=-1)  # [1, L, V]
                pred = F.log_softmax(model(ids).logits.float(), dim=-1)
                loss = F.kl_div(pred, target, log_target=True, reduction="none").sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                kls.append(loss.item())
                bar.set_postfix(kl=f"{kls[-1]:.4f}")
        with torch.no_grad():
            for m, ls in zip(linears, log_scales, strict=True):
                m.w_scale.mul_(torch.exp(ls))
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen.get(id(p), False))
    tail = kls[-8:]
    return DistillReport(steps, sum(t.numel() for t in log_scales) + sum(p.numel() for p in norms),
                         kls[0] if kls else 0.0, sum(tail) / len(tail) if tail else 0.0, time.time() - t0)
