"""quantize(model, config, calib_ids): the steps before any method, then the method's handler.

The handler is HANDLERS[method] (MobileQuant, trained end to end), else quantize_layerwise, built
from quant/layerwise.py's steps with the method's traits (quant/methods.py). Layer by layer, each
layer sees the outputs of the already-quantized layers before it (as GPTQ does), so errors are
corrected where they arise. Per layer: record each smoothing group's input statistics with forward
pre-hooks, choose smoothing (HAQ) and static activation ranges, fold the smoothing into the
producing norm or linear, round the weights (GPTQ for HAQ, RTN for the baseline) and swap in
QuantLinear / QuantExperts modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, arch_spec
from .calibration import HESSIAN_F64_MAX_K, ActStats
from .config import QuantConfig
from .layerwise import (ROTATED, QuantReport, capture_first_layer_inputs, collect_stats, convert_group, layer_scheme,
                        lm_head_group, needs_hessian, rotation_candidates, run_layer, smooth_group)
from .luc import choose_policy
from .mobilequant import quantize_mobilequant

__all__ = ["quantize", "quantize_layerwise", "quantize_layer", "layer_search_tokens", "QuantReport", "HANDLERS"]


Handler = Callable[[nn.Module, QuantConfig, torch.Tensor, bool], QuantReport]


@torch.no_grad()
def quantize(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True) -> QuantReport:
    """Quantize a transformers CausalLM in place. calib_ids: LongTensor [N, L] calibration windows.

    Steps that come before any method (the residual rotation, LUC's per-layer policy), then the
    method's handler: HANDLERS[method], else the layer-by-layer pipeline (quantize_layerwise)."""
    choices: dict = {}
    if cfg.rotate_residual:  # before anything looks at the weights: every later step sees the rotated model
        from .rotation import rotate_residual

        q = rotate_residual(model, seed=cfg.calib.seed)
        choices["rotate_residual"] = {"seed": cfg.calib.seed, "hidden": q.shape[0]}
    if cfg.traits.per_layer_policy and not cfg.layer_policy:  # choose the per-layer policy first
        cfg, choices["luc"] = choose_policy(model, cfg, calib_ids, progress)  # a config with layer_policy filled in
    report = HANDLERS.get(cfg.method, quantize_layerwise)(model, cfg, calib_ids, progress)
    report.choices = {**choices, **report.choices}
    return report


def _quantize_mobilequant(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool) -> QuantReport:
    """MobileQuant is trained end to end, not layer by layer."""
    with torch.enable_grad():
        return quantize_mobilequant(model, cfg, calib_ids, progress)


def quantize_layerwise(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool) -> QuantReport:
    """One decoder layer at a time (rtn, haq, tender, luc's final pass), then lm_head, then distillation."""
    spec = arch_spec(model)
    model.eval()
    teacher = copy.deepcopy(model) if cfg.kd_steps else None  # the float model, for distillation
    layers = model.get_submodule(spec.layers_path)
    torch.manual_seed(cfg.calib.seed)  # token samples drawn as quant.stream draws them
    batches = capture_first_layer_inputs(model, layers, calib_ids)
    keep = layer_search_tokens(cfg, batches)
    report = QuantReport(config=cfg)
    bits = "per-layer bits" if cfg.layer_policy else f"W{cfg.w_bits}A{cfg.a_bits}"
    for i, layer in enumerate(tqdm(layers, desc=f"quantize {cfg.method} {bits}-{cfg.act_scheme}", disable=not progress)):
        quantize_layer(i, layer, spec, batches, keep, cfg, report)
        batches = run_layer(layer, batches)  # the next layer sees this layer's quantized output
    if cfg.quantize_lm_head:
        lm_head_group(model, spec, batches, cfg, keep, report)
    if teacher is not None:
        report.choices["distill"] = _distill(model, teacher, cfg, calib_ids, progress)
    return report


def layer_search_tokens(cfg: QuantConfig, batches: list) -> int:
    """Tokens each calibration batch keeps for the searches (cfg.search_tokens spread over batches, rounded up)."""
    return max(1, -(-cfg.search_tokens // len(batches)))


def quantize_layer(i: int, layer: nn.Module, spec: ArchSpec, batches, keep: int, cfg: QuantConfig,
                   report: QuantReport) -> None:
    """Decoder layer i in place: statistics, smoothing or rotation folded, weights rounded, QuantLinears in."""
    candidates = rotation_candidates(layer, spec, cfg)
    hessian = needs_hessian(cfg, layer_scheme(cfg, i))
    wide = {g.name for g in spec.groups if hessian and g.experts is None
            and cast(nn.Linear, layer.get_submodule(g.linears[0])).in_features > HESSIAN_F64_MAX_K}
    stats = collect_stats(layer, spec.groups, batches, keep, candidates, hessian=hessian, skip_hessian=wide)
    # All folds first: the v->o and up->down folds rescale rows of linears another group rounds.
    chosen = [smooth_group(layer, g, stats, cfg, f"layers.{i}.{g.name}", report, layer_scheme(cfg, i),
                           candidates.get(g.name, 0)) for g in spec.groups]
    rotate = {g.name: r for g, (_, _, _, r) in zip(spec.groups, chosen) if r}
    del stats  # what is kept is in `chosen`: the statistics of a variant not chosen (rotated or not) go now
    for j, g in enumerate(spec.groups):
        if g.name in wide:  # its Hessian now, of the one variant chosen (folds in the float weights)
            s, static, _, r = chosen[j]
            chosen[j] = (torch.ones_like(s), static, _fresh_stats(layer, g, batches, keep, rotate, r, hessian), r)
    for j, g in enumerate(spec.groups):
        s, static, st, r = chosen[j]
        chosen[j] = None  # type: ignore[call-overload]  # each group's statistics go once it is rounded
        if cfg.gptq_sequential and j > 0 and g.experts is None and cfg.traits.hessian_rounding:
            # this group's input with the groups before it already rounded; the folds are in the
            # weights now, so these statistics are of x / s already (and of x H where rotated)
            del st  # its X^T X goes before the fresh one is made
            st, s = _fresh_stats(layer, g, batches, keep, rotate, r, hessian), torch.ones_like(s)
        convert_group(layer, g, st, s, static, cfg, layer_scheme(cfg, i), r)
        del st


def _fresh_stats(layer: nn.Module, g, batches, keep: int, rotate: dict[str, int], r: int, hessian: bool) -> ActStats:
    """Group g's input statistics taken now, of the variant chosen (rotated by r, or plain): the
    smoothing folds are in the weights, so these are of x / s already (and of x H where rotated)."""
    fresh = collect_stats(layer, [g], batches, keep, rotate, plain=not r, hessian=hessian)
    return fresh[g.name + ROTATED if r else g.name]


def _distill(model: nn.Module, teacher: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool) -> dict:
    from .distill import distill_scales, interleave_windows, sample_windows

    kd_ids = calib_ids
    if cfg.kd_data == "mixed":  # calibration windows alternating with the float model's own text
        n = min(calib_ids.shape[0], -(-cfg.kd_steps // 2))
        sampled = sample_windows(teacher, n, calib_ids.shape[1], seed=cfg.calib.seed, progress=progress)
        kd_ids = interleave_windows(calib_ids[:n], sampled)
    return distill_scales(model, teacher, kd_ids, cfg.kd_steps, cfg.kd_lr, progress).to_dict()


# Methods that do not run layer by layer; every other method is quantize_layerwise with its traits.
HANDLERS: dict[str, Handler] = {"mobilequant": _quantize_mobilequant}
