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

__all__ = ["DistillReport", "distill_scales", "flip_codes", "undo_flips", "interleave_windows", "sample_windows", "tunable_linears"]


@dataclass(frozen=True)
class DistillReport:
    steps: int
    params: int  # trained float parameters (scale multipliers and norm weights)
    kl_first: float  # KL (nats per token) of the first step's window, before any update
    kl_last: float  # mean KL of the last min(8, steps) steps' windows
    seconds: float
    codes_flipped: int = 0  # integer codes moved by the kept flip rounds (flip_every > 0)
    flip_rounds_kept: int = 0
    flip_rounds: int = 0
    check_kl_first: float = 0.0  # held-out KL before the first flip round
    check_kl_last: float = 0.0  # held-out KL after the last round (undone rounds: before it)

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
def _float_forward(linears: list[QuantLinear], log_scales: list[torch.Tensor | None],
                   grad_codes: bool = False) -> Iterator[list[torch.Tensor]]:
    """Inside: each linear computes fake_quant(x) @ ((codes - zero) * scale * exp(log_scale))^T in
    float (differentiable in log_scale and x); the integer forward again afterwards. Yields each
    linear's codes as a float tensor [N, K] that the forward reads (changing one changes the model);
    with grad_codes, they are leaves that collect their gradients in .grad."""
    saved, all_codes = [], []
    for m, ls in zip(linears, log_scales, strict=True):
        codes = m.int8_weight().float().requires_grad_(grad_codes and ls is not None and m.sparse_nnz is None)  # [N, K]: codes - zero, as the kernel multiplies them
        static = m.static_scale()
        all_codes.append(codes)

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
        yield all_codes
    finally:
        for m, f in zip(linears, saved, strict=True):
            if f is None:
                del m.forward
            else:
                m.forward = f  # type: ignore[method-assign]


@torch.no_grad()
def flip_codes(linears: list[QuantLinear], codes: list[torch.Tensor], rate: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """In each linear, moves the `rate` fraction of its codes [N, K] whose accumulated loss gradient
    (codes[i].grad) is largest one integer step against that gradient, within the linear's code
    range (QuantLinear.code_range), and clears the gradients. -> per linear (flat indices, steps),
    what undo_flips takes back."""
    done = []
    for m, c in zip(linears, codes, strict=True):
        g, c.grad = c.grad, None
        k = int(rate * c.numel())
        if g is None or k == 0:
            done.append((torch.zeros(0, dtype=torch.long), torch.zeros(0)))
            continue
        step = -torch.sign(g)  # [N, K]
        lo, hi = m.code_range()
        ok = (c + step >= lo) & (c + step <= hi) & (step != 0)
        score = torch.where(ok, g.abs(), torch.zeros(()))
        idx = torch.topk(score.flatten(), k).indices
        idx = idx[score.flatten()[idx] > 0]
        d = step.flatten()[idx]
        c.view(-1)[idx] += d
        done.append((idx, d))
    return done


@torch.no_grad()
def undo_flips(codes: list[torch.Tensor], done: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for c, (idx, d) in zip(codes, done, strict=True):
        c.view(-1)[idx] -= d


@torch.no_grad()
def _kl(model: nn.Module, ids: torch.Tensor, ref: list[torch.Tensor]) -> float:
    """Mean KL(ref || model) per token over windows ids [N, L] (ref: the teacher's log-probs [L, V])."""
    total = 0.0
    for row, p in zip(ids, ref, strict=True):
        q = F.log_softmax(model(row[None]).logits[0].float(), dim=-1)  # [L, V]
        total += F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()
    return total / ids.shape[0]


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
                   progress: bool = True, flip_every: int = 0, flip_rate: float = 2e-4,
                   check_ids: torch.Tensor | None = None) -> DistillReport:
    """Trains, in place, the weight scales of tunable_linears(model) and its norm weights for `steps`
    Adam steps, one calibration window [L] per step (calib_ids [N, L], cycled), against teacher's
    next-token distributions. Norm weights take lr / 10.

    flip_every > 0 also moves integer codes: every flip_every steps, in each dense linear the
    flip_rate fraction of codes with the largest loss gradient summed over those steps move one step
    against it (flip_codes). The flips are kept only if the KL on the held-out windows check_ids
    [C, L] falls; the rate then grows by half, else the flips are undone and the rate quartered."""
    t0 = time.time()
    linears = tunable_linears(model)
    if flip_every and (check_ids is None or not len(check_ids)):
        raise ValueError("flipping codes (flip_every > 0) needs held-out windows to check each round on")
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
    flips = _Flips(flip_rate)
    model.eval()
    teacher.eval()
    try:
        with _float_forward(linears + extra, log_scales + [None] * len(extra), grad_codes=flip_every > 0) as codes, \
                torch.enable_grad():
            codes = codes[: len(linears)]
            dense = [i for i, m in enumerate(linears) if m.sparse_nnz is None]
            check_ref = ([F.log_softmax(teacher(row[None]).logits[0].float(), dim=-1).detach() for row in check_ids]
                         if flip_every and check_ids is not None else [])  # [L, V] each
            bar = tqdm(range(steps), desc="distill scales" + (" and codes" if flip_every else ""), disable=not progress)
            for step in bar:
                ids = calib_ids[step % calib_ids.shape[0]].unsqueeze(0)  # [1, L]
                with torch.no_grad():
                    target = F.log_softmax(teacher(ids).logits.float(), dim=-1)  # [1, L, V]
                pred = F.log_softmax(model(ids).logits.float(), dim=-1)
                loss = F.kl_div(pred, target, log_target=True, reduction="none").sum(-1).mean()
                opt.zero_grad()
                loss.backward()  # the codes' gradients add up over steps until the next flip
                opt.step()
                kls.append(loss.item())
                if flip_every and (step + 1) % flip_every == 0:
                    assert check_ids is not None
                    flips.round(model, [linears[i] for i in dense], [codes[i] for i in dense], check_ids, check_ref)
                    for c in codes:
                        c.grad = None
                bar.set_postfix(kl=f"{kls[-1]:.4f}", **({"flips": flips.kept} if flip_every else {}))
        with torch.no_grad():
            for m, ls in zip(linears, log_scales, strict=True):
                m.w_scale.mul_(torch.exp(ls))
            if flips.kept:
                for i in dense:
                    linears[i].set_codes(codes[i].detach().round().to(torch.int8))
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen.get(id(p), False))
    tail = kls[-8:]
    return DistillReport(steps, sum(t.numel() for t in log_scales) + sum(p.numel() for p in norms),
                         kls[0] if kls else 0.0, sum(tail) / len(tail) if tail else 0.0, time.time() - t0,
                         flips.kept, flips.rounds_kept, flips.rounds, flips.check_first, flips.check_last)


class _Flips:
    """The code-flip rounds of one distillation: the current rate and what was kept."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.kept = self.rounds = self.rounds_kept = 0
        self.check_first = self.check_last = 0.0

    def round(self, model: nn.Module, linears: list[QuantLinear], codes: list[torch.Tensor], check_ids: torch.Tensor,
              check_ref: list[torch.Tensor]) -> None:
        before = _kl(model, check_ids, check_ref)
        if not self.rounds:
            self.check_first = before
        done = flip_codes(linears, codes, self.rate)
        after = _kl(model, check_ids, check_ref)
        self.rounds += 1
        if after < before:
            self.kept += sum(int(idx.numel()) for idx, _ in done)
            self.rounds_kept += 1
            self.rate *= 1.5
            self.check_last = after
        else:
            undo_flips(codes, done)
            self.rate /= 4
            self.check_last = before
