"""Edge-LLM's layer-wise unified compression (LUC, METHODS.md section 3).

1. Sensitivity: for every decoder layer l and every option o = (bits, sparsity[, W4 group]), only layer l is
   compressed with o (Hessian-aware rounding, with SparseGPT-style pruning when sparsity > 0, on
   the float model's own inputs) and cost[l][o] = the mean KL divergence of its next-token
   distributions from the float model's on calibration windows (luc_cost "kl"; "loss": the
   calibration loss increase, which is noisier and can fall below zero for a harmful option).
2. Policy: one option per layer minimizing the summed cost under the budget (`allocate`, an exact
   knapsack over sizes rounded up to 1/4000 of the budget, so the budget is never exceeded). The
   budget is the whole tensor file (--target-bytes), a fraction of the decoder's uniform-W8 bytes
   (--target-ratio), or a mean sparsity (--avg-sparsity, bits fixed to --w-bits).
3. The HAQ pipeline then runs with that per-layer policy (pipeline.layer_scheme); the manifest
   records the policy and the measured costs, and pruned layers are stored sparse (sparse.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .arch import arch_spec
from .config import QuantConfig
from .evaluate import mean_window_kl, mean_window_loss, window_log_probs
from .gptq import gptq_quantize
from .int4 import expand_group_scale, num_groups, search_w4_scale
from .layerwise import LayerScheme, model_group_stats
from .sparse import sparse_bytes

__all__ = ["linear_bytes", "allocate", "choose_policy", "RESOLUTION"]

RESOLUTION = 4000  # knapsack units per budget


def linear_bytes(n: int, k: int, bits: int, sparsity: float, group: int, block: int = 128, static: bool = False,
                 asym: bool = False) -> int:
    """Upper bound of the bytes one quantized [N, K] linear stores with (bits, sparsity): weights
    (dense, or bitmask + nonzeros), float32 scales (and uint8 zero points for dense asymmetric
    W4), and the small extras QuantLinear keeps."""
    g = group if bits == 4 else 0
    zeros = bits == 4 and asym and sparsity <= 0
    extra = (4 + zeros) * n * num_groups(k, g) + (8 if g else 0) + (4 if static else 0)
    if sparsity <= 0 or k % 8:
        return (n * k if bits == 8 else n * ((k + 1) // 2)) + extra
    pruned = sum(int(n * min(block, k - i) * sparsity) for i in range(0, k, block))  # at least this many, per GPTQ block
    return sparse_bytes(n, k, n * k - pruned, bits) + extra


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int,
             resolution: int = RESOLUTION) -> list[int]:
    """Per layer l the option o_l minimizing sum_l costs[l][o_l] with sum_l sizes[l][o_l] <= budget.

    Sizes are rounded up to budget / resolution units, so the answer always fits. Raises ValueError
    when even the smallest option of every layer does not fit."""
    smallest = sum(min(s) for s in sizes)
    if budget <= 0 or smallest > budget:
        raise ValueError(f"the budget ({budget:,}) is below the smallest policy ({smallest:,}): "
                         f"raise it by {smallest - max(budget, 0):,} or add smaller options")
    for res in (min(resolution, budget), 16 * resolution, budget):  # finer units when rounding up overflowed
        picks = _allocate(costs, sizes, budget, min(res, budget))
        if picks is not None:
            return picks
    raise AssertionError("unreachable: at one byte per unit the smallest policy fits")


def _allocate(costs, sizes, budget: int, resolution: int) -> list[int] | None:
    unit = budget / resolution
    inf = float("inf")
    dp = torch.zeros(resolution + 1, dtype=torch.float64)  # dp[c]: least cost of the layers so far within c units
    picks = []
    for cost, size in zip(costs, sizes, strict=True):
        new = torch.full_like(dp, inf)
        pick = torch.full((resolution + 1,), -1, dtype=torch.long)
        for o, (c, s) in enumerate(zip(cost, size, strict=True)):
            u = math.ceil(s / unit - 1e-9)
            if u > resolution:
                continue
            cand = torch.full_like(dp, inf)
            cand[u:] = dp[: resolution + 1 - u] + c
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, o), pick)
        dp = new
        picks.append((pick, [math.ceil(s / unit - 1e-9) for s in size]))
    if not math.isfinite(float(dp[resolution])):  # rounding up made the tightest policy overflow
        return None
    out, c = [], resolution
    for pick, units in reversed(picks):
        o = int(pick[c])
        out.append(o)
        c -= units[o]
    return out[::-1]


def _fixed_bytes(model, spec, linear_names: set[str]) -> int:
    """Bytes of everything but the decoder linears in the quantized file: lm_head (and an untied
    embedding) as int8 rows with float32 scales, every other tensor float32."""
    total = 0
    head = model.get_output_embeddings().weight
    tied = model.get_input_embeddings().weight is head
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in linear_names:
            continue
        if name == "lm_head.weight" or (name == f"{spec.embed_path}.weight" and not tied):
            v, d = t.shape
            total += v * d + 4 * v + 4 * d + 8  # int8 rows, row scales, a column scale, a static scale
        elif name != f"{spec.embed_path}.weight":  # a tied embedding reads lm_head's rows
            total += t.numel() * 4
    return total


def _option_sizes(model, spec, layers, cfg: QuantConfig, options: list) -> tuple[list[list[int]], int]:
    """-> (sizes[layer][option], the budget) in the budget's unit: weights kept (--avg-sparsity) or
    decoder linear bytes (--target-bytes, --target-ratio)."""
    static = cfg.act_scheme == "tensor"
    shapes = [[(layer.get_submodule(p).out_features, layer.get_submodule(p).in_features) for g in spec.groups
               for p in g.linears] for layer in layers]
    if cfg.avg_sparsity:  # size = weights kept
        sizes = [[sum(math.ceil(n * k * (1 - o[1])) for n, k in sh) for o in options] for sh in shapes]
        return sizes, int(sum(n * k for sh in shapes for n, k in sh) * (1 - cfg.avg_sparsity))
    schemes = [LayerScheme.of_option(cfg, o) for o in options]
    sizes = [[sum(linear_bytes(n, k, sc.bits, sc.sparsity, sc.group, cfg.gptq_block, static, sc.asym)
                  for n, k in sh) for sc in schemes]
             for sh in shapes]
    w8 = sum(linear_bytes(n, k, 8, 0.0, 0, cfg.gptq_block, static) for sh in shapes for n, k in sh)
    names = {f"{spec.layers_path}.{i}.{p}" for i in range(len(layers)) for g in spec.groups for p in g.linears}
    fixed = _fixed_bytes(model, spec, names)
    budget = int(cfg.target_ratio * w8) if cfg.target_ratio else cfg.target_bytes - fixed
    if budget <= 0:
        raise ValueError(f"--target-bytes {cfg.target_bytes:,} leaves nothing for the decoder layers: the rest of "
                         f"the model alone takes {fixed:,} bytes")
    return sizes, budget


def _try_option(layer, spec, originals: dict, hess: dict, cfg: QuantConfig, option: tuple) -> None:
    """Puts layer's weights rounded with `option` (dequantized, float) in place; only this layer changes."""
    scheme = LayerScheme.of_option(cfg, option)
    for g in spec.groups:
        w = torch.cat([originals[p] for p in g.linears])  # [sum N, K]
        h = hess[g.name]
        w4, zero = (search_w4_scale(w, torch.diag(h).float(), cfg.w4_clip_grid, scheme.group, scheme.asym)
                    if scheme.bits == 4 else (None, None))
        q, scale = gptq_quantize(w, h, scheme.bits, cfg.gptq_block, cfg.gptq_damp, cfg.gptq_act_order, w4,
                                 scheme.group, scheme.sparsity, zero)
        deq = q.float() * expand_group_scale(scale, w.shape[1], scheme.group)
        start = 0
        for p in g.linears:
            lin = layer.get_submodule(p)
            lin.weight.data.copy_(deq[start:start + lin.out_features])
            start += lin.out_features


def _sensitivity(model, spec, layers, cfg: QuantConfig, options: list, calib_ids: torch.Tensor,
                 progress: bool) -> tuple[list[list[float]], float]:
    """-> (costs[layer][option]: KL from the float model, or loss increase, with only that layer
    compressed; the float model's loss on the evaluation windows)."""
    eval_ids = calib_ids[: cfg.luc_eval_windows]
    hess = [{name: st.hessian() for name, st in row.items()} for row in model_group_stats(model, spec, calib_ids, 1)]
    base = mean_window_loss(model, eval_ids)
    ref = window_log_probs(model, eval_ids) if cfg.luc_cost == "kl" else None

    def cost() -> float:
        return mean_window_kl(model, eval_ids, ref) if ref is not None else mean_window_loss(model, eval_ids) - base
    costs: list[list[float]] = []
    bar = tqdm(total=len(layers) * len(options), desc="luc sensitivity", disable=not progress)
    for i, layer in enumerate(layers):
        originals = {p: layer.get_submodule(p).weight.data.clone() for g in spec.groups for p in g.linears}
        row = []
        for option in options:
            _try_option(layer, spec, originals, hess[i], cfg, option)
            row.append(cost())
            for p, w0 in originals.items():
                layer.get_submodule(p).weight.data.copy_(w0)
            bar.update(1)
            bar.set_postfix(layer=i, cost=f"{row[-1]:.4f}")
        costs.append(row)
    bar.close()
    return costs, base


def choose_policy(model, cfg: QuantConfig, calib_ids: torch.Tensor, progress: bool = True) -> tuple[QuantConfig, dict]:
    """Measure every layer's sensitivity to every option and choose the per-layer policy under the
    budget -> (cfg with layer_policy, what was measured and chosen, for the manifest)."""
    t0 = time.time()
    spec = arch_spec(model)
    if any(g.experts is not None for g in spec.groups):
        raise ValueError("luc supports dense models (Llama, Mistral, OPT); quantize MoE models with haq or rtn")
    layers = model.get_submodule(spec.layers_path)
    options = [o for o in cfg.luc_options if not cfg.avg_sparsity or o[0] == cfg.w_bits]
    if not options:
        raise ValueError(f"no luc option has {cfg.w_bits} bits (--avg-sparsity keeps the bits at --w-bits)")
    sizes, budget = _option_sizes(model, spec, layers, cfg, options)
    costs, base = _sensitivity(model, spec, layers, cfg, options, calib_ids, progress)
    picks = allocate(costs, sizes, budget)
    policy = tuple(options[o] for o in picks)
    info = {
        "options": [list(o) for o in options],
        "budget": budget,
        "budget_kind": "kept weights" if cfg.avg_sparsity else "decoder linear bytes",
        "predicted": sum(sizes[i][o] for i, o in enumerate(picks)),
        "base_loss": base,
        "cost": cfg.luc_cost,
        "sensitivity": costs,  # [layer][option]: KL from the float model (or loss increase) with only that layer compressed
        "sizes": sizes,
        "predicted_cost": sum(costs[i][o] for i, o in enumerate(picks)),
        "seconds": round(time.time() - t0, 1),
    }
    return dataclasses.replace(cfg, layer_policy=policy), info
