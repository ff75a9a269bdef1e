"""MobileQuant (METHODS.md section 2): learned equivalent transforms, weight clipping and static
activation ranges, trained jointly end to end; integer-only W8A8 / W4A8 inference.

Per smoothing group (the linears reading one activation, arch.py) three things are learned:
  - transform scales s [K] = s_init * exp(u): X -> X / s at the producer, W -> W * s at every reader
    (s_init: smoothing with HAQ's per-group strength and static clip searched on the group's output
    error, or, with mq_alpha set, the paper's fixed SmoothQuant strength (0.5); under GQA one u per
    kv channel, repeated over its heads);
  - one static activation quantizer: scale d and offset o, x_hat = d * clamp(round((x/s - o) / d),
    -127, 127) + o (initialized from that clip, o = 0);
  - per linear, weight clipping gamma = sigmoid(theta) per output row (or per row and column
    group for W4 group-wise): the weight scale is gamma * absmax / qmax.
Rounding passes gradients straight through. The loss is the MSE between the full-precision and
the quantized model's final hidden states on the calibration windows; AdamW with cosine decay,
one learning rate per kind of parameter.

After training, s is folded exactly as HAQ folds smoothing (layerwise.fold_smoothing), weights
are rounded with the learned clips, and each linear becomes a QuantLinear with a static scale
and offset (the offset's product with the weights is added to the bias, so the matmul stays
int8 x int8 -> int32). lm_head is quantized as in HAQ with a static scale.

Simulating X / s at the reader instead of folding 1/s into the producer is exact in float: a norm
weight, v's rows (attention is linear in v, channel by channel) and up's rows (down reads
act(gate) * up) all pass a per-channel scale through, and per-row weight quantization of the
producer does not change when its rows are scaled.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, Group, arch_spec
from .config import QuantConfig
from .int4 import QMAX4, expand_group_scale, group_absmax, num_groups
from .kernels import QMAX, static_act_scale
from .layerwise import (CALIB_BATCH, QuantReport, capture_first_layer_inputs, fold_smoothing, lm_head_group,
                        model_group_stats, run_layer, set_module)
from .smoothing import group_error, search_smoothing, smoothing_scales, tie_kv_scales

__all__ = ["round_ste", "fake_quant_static", "fake_quant_weight_clipped", "quantize_mobilequant"]

THETA_INIT = 4.6  # sigmoid(4.6) = 0.99: weight clipping starts (almost) at absmax


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantizer with a learned range: x [..., K], scale [], offset [] -> float."""
    return torch.clamp(round_ste((x - offset) / scale), -QMAX, QMAX) * scale + offset


def weight_scale(w: torch.Tensor, gamma: torch.Tensor, qmax: int, group: int) -> torch.Tensor:
    """The clipped weight scale: gamma * absmax / qmax, [N] or [N, G] like gamma."""
    return (gamma * group_absmax(w, group)).clamp_min(1e-8) / qmax


def fake_quant_weight_clipped(w: torch.Tensor, gamma: torch.Tensor, qmax: int, group: int = 0) -> torch.Tensor:
    """Symmetric weights rounded to gamma * absmax / qmax steps (w [N, K], gamma [N] or [N, G] in (0, 1])."""
    scale = expand_group_scale(weight_scale(w, gamma, qmax, group), w.shape[1], group)  # [N, K]
    return torch.clamp(round_ste(w / scale), -qmax, qmax) * scale


class _GroupQuant(nn.Module):
    """One group's learned transform and activation quantizer (shared by the group's linears)."""

    def __init__(self, s_init: torch.Tensor, act_scale: float, heads_per_kv: int, head_dim: int) -> None:
        super().__init__()
        self.heads_per_kv, self.head_dim = heads_per_kv, head_dim
        self.register_buffer("s_init", s_init.float().clone())  # [K]
        n_free = s_init.numel() // heads_per_kv if heads_per_kv > 1 else s_init.numel()
        self.u = nn.Parameter(torch.zeros(n_free))  # log of the learned factor on s_init
        self.scale0 = act_scale
        self.log_scale = nn.Parameter(torch.zeros(()))  # d = scale0 * exp(log_scale)
        self.offset_steps = nn.Parameter(torch.zeros(()))  # o = scale0 * offset_steps
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def s(self) -> torch.Tensor:
        f = torch.exp(self.u)
        if self.heads_per_kv > 1:  # [kv, hd] -> [kv, heads_per_kv, hd]: equal over the heads of one kv head
            kv = f.numel() // self.head_dim
            f = f.view(kv, 1, self.head_dim).expand(kv, self.heads_per_kv, self.head_dim).reshape(-1)
        s_init: torch.Tensor = self.s_init  # type: ignore[assignment]
        return s_init * f

    def act_scale(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def act_offset(self) -> torch.Tensor:
        return self.scale0 * self.offset_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> the quantized x / s; computed once for all the group's readers."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        out = fake_quant_static(x / self.s(), self.act_scale(), self.act_offset())
        self._cache = (x, out)
        return out

    def clear(self) -> None:
        self._cache = None


class _SimLinear(nn.Module):
    """A frozen nn.Linear read through its group's quantizer, with learned weight clipping."""

    def __init__(self, lin: nn.Linear, gq: _GroupQuant, qmax: int, group: int) -> None:
        super().__init__()
        self.lin, self.gq, self.qmax, self.group = lin, gq, qmax, group
        n, k = lin.weight.shape
        shape = (n,) if group <= 0 else (n, num_groups(k, group))
        self.theta = nn.Parameter(torch.full(shape, THETA_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin: nn.Linear = self.lin  # type: ignore[assignment]
        w = lin.weight * self.gq.s()[None, :]  # [N, K]
        wq = fake_quant_weight_clipped(w, torch.sigmoid(self.theta), self.qmax, self.group)
        return F.linear(self.gq(x), wq, lin.bias)


def _group_weights(layer, g: Group) -> torch.Tensor:
    return torch.cat([layer.get_submodule(p).weight.data for p in g.linears])  # [sum N, K]


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, D]


def _wrap(model, spec: ArchSpec, stats, cfg: QuantConfig, qmax: int) -> tuple[list[list[_GroupQuant]], list[_SimLinear]]:
    """Swap every group linear for a _SimLinear; -> (per layer, its groups' quantizers; all sims)."""

    layers = model.get_submodule(spec.layers_path)
    gqs, sims = [], []
    for i, layer in enumerate(layers):
        row = []
        for g in spec.groups:
            st = stats[i][g.name]
            w = _group_weights(layer, g)
            x = st.samples(cfg.search_tokens)
            if cfg.mq_alpha is None:  # HAQ's search: strength and static clip per group, on the output error
                choice = search_smoothing(x, st.channel_max(), w, cfg.alpha_grid, cfg.clip_grid, False, g.heads_per_kv,
                                          g.head_dim, allow_smoothing=g.prev is not None, w_bits=cfg.w_bits,
                                          w_group=cfg.w_group)
                s, clip = choice.scales, choice.clip
            else:  # the paper's fixed SmoothQuant strength, then the clip search
                s = tie_kv_scales(smoothing_scales(st.channel_max(), w.abs().amax(dim=0), cfg.mq_alpha), g.heads_per_kv,
                                  g.head_dim) if g.prev is not None else torch.ones(w.shape[1])
                act_max = (st.channel_max() / s).max().item()
                _, clip = group_error(x, w, x @ w.t(), s, act_max, cfg.clip_grid, False, cfg.w_bits, cfg.w_group)
            act_max = (st.channel_max() / s).max().item()
            gq = _GroupQuant(s, static_act_scale(act_max, clip), g.heads_per_kv, g.head_dim)
            row.append(gq)
            for p in g.linears:
                sim = _SimLinear(layer.get_submodule(p), gq, qmax, cfg.w_group)
                set_module(layer, p, sim)
                sims.append(sim)
        gqs.append(row)
    return gqs, sims


def _convert(model, spec: ArchSpec, gqs: list[list[_GroupQuant]], cfg: QuantConfig, report) -> None:
    """Fold the learned transforms, round with the learned clips, swap in QuantLinear modules."""
    from .qlinear import QuantLinear

    qmax = QMAX4 if cfg.w_bits == 4 else QMAX
    layers = model.get_submodule(spec.layers_path)
    for i, layer in enumerate(layers):
        thetas = {}
        for g in spec.groups:  # unwrap: the original linears come back, still in float
            for p in g.linears:
                sim = layer.get_submodule(p)
                thetas[p] = sim.theta.detach()
                set_module(layer, p, sim.lin)
        for g, gq in zip(spec.groups, gqs[i], strict=True):  # all folds first (v->o rescales v's rows)
            if g.prev is not None:
                fold_smoothing(layer, g, gq.s().detach())
        for g, gq in zip(spec.groups, gqs[i], strict=True):
            d, o = float(gq.act_scale()), float(gq.act_offset())
            report.choices[f"layers.{i}.{g.name}"] = {"act_scale": d, "act_offset": o,
                                                     "transform_mean_abs_log": float(gq.u.detach().abs().mean())}
            for p in g.linears:
                lin = layer.get_submodule(p)
                w = lin.weight.data  # [N, K], already W * s
                scale = weight_scale(w, torch.sigmoid(thetas[p]), qmax, cfg.w_group)
                full = expand_group_scale(scale, w.shape[1], cfg.w_group)
                q = torch.clamp(torch.round(w / full), -qmax, qmax).to(torch.int8)
                bias = torch.zeros(w.shape[0]) if lin.bias is None else lin.bias.data.float().clone()
                bias += o * (q.float() * full).sum(dim=1)  # W (d q + o) = d W q + o rowsum(W)
                set_module(layer, p, QuantLinear.from_quantized(q, scale, bias, "tensor", d, w_bits=cfg.w_bits,
                                                                w_group=cfg.w_group, input_offset=o))


@torch.no_grad()
def _eval_loss(model, ids: torch.Tensor, target: torch.Tensor, gqs, batch: int) -> float:
    total = 0.0
    for b in range(0, ids.shape[0], batch):
        total += F.mse_loss(_final_hidden(model, ids[b:b + batch]), target[b:b + batch]).item() * ids[b:b + batch].shape[0]
        for row in gqs:
            for gq in row:
                gq.clear()
    return total / ids.shape[0]


def quantize_mobilequant(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True):
    """Quantize a transformers CausalLM in place with MobileQuant -> QuantReport."""

    spec = arch_spec(model)
    if any(g.experts is not None for g in spec.groups):
        raise ValueError("mobilequant supports dense models (Llama, Mistral, OPT); quantize MoE models with haq or rtn")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    report = QuantReport(config=cfg)
    t0 = time.time()
    with torch.no_grad():
        target = torch.cat([_final_hidden(model, b) for b in calib_ids.split(cfg.mq_batch)])  # [N, L, D]
        n_batches = -(-calib_ids.shape[0] // CALIB_BATCH)
        stats = model_group_stats(model, spec, calib_ids, max(1, -(-cfg.search_tokens // n_batches)), with_hessian=False)
    qmax = QMAX4 if cfg.w_bits == 4 else QMAX
    gqs, sims = _wrap(model, spec, stats, cfg, qmax)
    del stats
    params = {
        "transform": [gq.u for row in gqs for gq in row],
        "clip": [s.theta for s in sims],
        "range": [p for row in gqs for gq in row for p in (gq.log_scale, gq.offset_steps)],
    }
    lrs = {"transform": cfg.mq_lr_transform, "clip": cfg.mq_lr_clip, "range": cfg.mq_lr_range}
    opt = torch.optim.AdamW([{"params": params[k], "lr": lrs[k]} for k in params], weight_decay=0.0)
    n = calib_ids.shape[0]
    steps = cfg.mq_epochs * -(-n // cfg.mq_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    loss_start = _eval_loss(model, calib_ids, target, gqs, cfg.mq_batch)
    g = torch.Generator().manual_seed(cfg.calib.seed)
    bar = tqdm(total=steps, desc=f"mobilequant W{cfg.w_bits}A8 train", disable=not progress)
    ema = None
    for _ in range(cfg.mq_epochs):
        for idx in torch.randperm(n, generator=g).split(cfg.mq_batch):
            loss = F.mse_loss(_final_hidden(model, calib_ids[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for row in gqs:
                for gq in row:
                    gq.clear()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4g}", start=f"{loss_start:.4g}")
    bar.close()
    loss_end = _eval_loss(model, calib_ids, target, gqs, cfg.mq_batch)
    with torch.no_grad():
        _convert(model, spec, gqs, cfg, report)
        layers: nn.ModuleList = model.get_submodule(spec.layers_path)  # type: ignore[assignment]
        lm_ids = calib_ids[: max(1, min(n, 16))]
        batches = capture_first_layer_inputs(model, layers, lm_ids)
        for layer in layers:
            batches = run_layer(layer, batches)
        if cfg.quantize_lm_head:
            lm_head_group(model, spec, batches, cfg, max(1, -(-cfg.search_tokens // len(batches))), report)
    report.choices["mobilequant"] = {"loss_start": loss_start, "loss_end": loss_end, "steps": steps,
                                     "epochs": cfg.mq_epochs, "seconds": round(time.time() - t0, 1)}
    return report
