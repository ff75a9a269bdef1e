"""The layer-wise steps every layer-by-layer method shares (HAQ, RTN, Tender, LUC's final pass, and
MobileQuant's capture and lm_head), public so that each method composes them without importing another.

A decoder layer at a time: capture the calibration activations entering it (capture_first_layer_inputs,
then run_layer carries them to the next layer), collect each smoothing group's input statistics
(collect_stats), choose and fold smoothing or a Hadamard rotation (smooth_group), round the group's
weights (convert_group: GPTQ or RTN, W8 or W4, dense or sparse) and swap in QuantLinears. What a method
does differently is a trait of quant.methods, not a branch on its name.
"""

from __future__ import annotations


from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec, Group
from .calibration import ActStats
from .config import QuantConfig
from .gptq import gptq_quantize
from .hadamard import hadamard, hadamard_block
from .int4 import quantize_weight_int4, search_w4_scale
from .kernels import quantize_weight_per_channel, static_act_scale
from .qlinear import QuantEmbedding, QuantExperts, QuantLinear
from .smoothing import search_smoothing

__all__ = ["CALIB_BATCH", "QuantReport", "LayerScheme", "layer_scheme", "set_module", "capture_first_layer_inputs",
           "run_layer", "collect_stats", "model_group_stats", "group_weights", "fold_smoothing", "quantize_linears",
           "quantize_experts", "rotation_candidates", "rotate_weights", "search_group", "smooth_group", "convert_group",
           "lm_head_group", "static_scale", "needs_hessian", "ROTATED", "MIN_ROTATE_BLOCK"]

CALIB_BATCH = 4  # calibration sequences per forward pass


@dataclass
class QuantReport:
    """What the pipeline chose, per layer and group; stored in the manifest."""

    choices: dict[str, dict] = field(default_factory=dict)  # "layers.3.qkv" -> {alpha, clip, error}
    config: QuantConfig | None = None  # the config as run (LUC: with the per-layer policy it chose)


@dataclass(frozen=True)
class LayerScheme:
    """How one decoder layer's linears are stored."""

    bits: int  # 8 or 4
    sparsity: float  # fraction of weights pruned (Hessian-aware), 0 for dense
    group: int  # W4: columns per weight scale, 0: per output channel
    asym: bool = False  # W4 with zero points (dense layers only)

    @classmethod
    def of(cls, cfg: QuantConfig, bits: int, sparsity: float, group: int | None = None) -> "LayerScheme":
        """group: this W4 layer's weight-scale group (None: the config's w_group)."""
        w4 = bits == 4
        return cls(bits, sparsity, (cfg.w_group if group is None else group) if w4 else 0,
                   cfg.w_asym and w4 and sparsity == 0)

    @classmethod
    def of_option(cls, cfg: QuantConfig, option: tuple) -> "LayerScheme":
        """A LUC option or policy entry: (bits, sparsity) or (bits, sparsity, group)."""
        return cls.of(cfg, int(option[0]), float(option[1]), int(option[2]) if len(option) > 2 else None)


def layer_scheme(cfg: QuantConfig, i: int) -> LayerScheme:
    """Layer i's scheme: from LUC's policy when there is one, else the config's uniform one."""
    if cfg.layer_policy:
        return LayerScheme.of_option(cfg, cfg.layer_policy[i])
    return LayerScheme.of(cfg, cfg.w_bits, 0.0)


class _Stop(Exception):
    pass


def static_scale(cfg: QuantConfig, st: ActStats, s: torch.Tensor, clip: float) -> float | None:
    """A group's static activation scale: with --act-scheme tensor, clip x the calibration |max| of its
    smoothed input x / s (quant.kernels.static_act_scale); None for per-token scales and Tender's groups."""
    if cfg.act_scheme != "tensor":
        return None
    return static_act_scale((st.channel_max() / s).max().item(), clip)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def capture_first_layer_inputs(model, layers, calib_ids) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments entering decoder layer 0, one entry per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib_ids.split(CALIB_BATCH):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer, batches: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    out = []
    for hidden, kwargs in batches:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


MIN_ROTATE_BLOCK = 16  # smaller Hadamard blocks spread too little to be worth a candidate
ROTATED = "@rotated"  # suffix of a group's statistics taken of its rotated input (x H)


def collect_stats(layer, groups, batches, keep_per_batch: int,
                   rotate: dict[str, int] | None = None, plain: bool = True, hessian: bool = True,
                   skip_hessian: Collection[str] = ()) -> dict[str, ActStats]:
    """Per group, statistics of its input. rotate: group name -> Hadamard block; those groups also get
    statistics of the rotated input under name + ROTATED (plain=False: only those). hessian=False: no
    X^T X (round-to-nearest W8 never reads it; at 7B the down projection's is 485 MB); skip_hessian:
    the groups that get none either (quant.pipeline takes theirs after the smoothing choice)."""
    rotate = rotate or {}
    stats = {g.name: ActStats(keep_per_batch=keep_per_batch, with_hessian=hessian and g.name not in skip_hessian)
             for g in groups if plain or g.name not in rotate}
    stats |= {g.name + ROTATED: ActStats(keep_per_batch=keep_per_batch, with_hessian=hessian and g.name not in skip_hessian)
              for g in groups if g.name in rotate}

    def record(g: Group):
        block = rotate.get(g.name, 0)
        st, st_rot = stats.get(g.name), stats.get(g.name + ROTATED)

        def hook(_m, args):
            if st is not None:
                st.add(args[0])
            if st_rot is not None:
                st_rot.add(hadamard(args[0], block))
        return hook

    handles = [layer.get_submodule(g.input_of).register_forward_pre_hook(record(g)) for g in groups]
    try:
        run_layer(layer, batches)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def model_group_stats(model, spec: ArchSpec, calib_ids: torch.Tensor, keep: int,
                      with_hessian: bool = True) -> list[dict[str, ActStats]]:
    """Per decoder layer and group, statistics of the unmodified model's group inputs (one forward
    over the calibration windows; for methods that look at every layer at once: LUC, MobileQuant)."""
    layers = model.get_submodule(spec.layers_path)
    stats = [{g.name: ActStats(keep_per_batch=keep, with_hessian=with_hessian) for g in spec.groups} for _ in layers]
    handles = [layer.get_submodule(g.input_of).register_forward_pre_hook(lambda _m, a, st=stats[i][g.name]: st.add(a[0]))
               for i, layer in enumerate(layers) for g in spec.groups]
    try:
        for batch in calib_ids.split(CALIB_BATCH):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def group_weights(layer, g: Group) -> torch.Tensor:
    """All weights reading the group's input, rows concatenated: [sum N, K]."""
    if g.experts is not None:
        gu = layer.get_submodule(g.experts).gate_up_proj.data  # [E, 2I, D]
        return gu.reshape(-1, gu.shape[-1])
    return torch.cat([layer.get_submodule(p).weight.data for p in g.linears])


def fold_smoothing(layer, g: Group, s: torch.Tensor) -> None:
    """X -> X / s at the producer, W -> W * s at every reader: the float model is unchanged."""
    prev = layer.get_submodule(g.prev)
    if isinstance(prev, nn.Linear):  # v -> o, up -> down, fc1 -> fc2: divide producer rows
        s_rows = s.view(-1, g.heads_per_kv, g.head_dim)[:, 0, :].reshape(-1) if g.heads_per_kv > 1 else s
        prev.weight.data /= s_rows[:, None]
        if prev.bias is not None:
            prev.bias.data /= s_rows
    else:  # RMSNorm / LayerNorm
        prev.weight.data /= s
        if getattr(prev, "bias", None) is not None:
            prev.bias.data /= s
    for p in g.linears + g.float_readers:
        layer.get_submodule(p).weight.data *= s
    if g.experts is not None:
        layer.get_submodule(g.experts).gate_up_proj.data *= s


def quantize_linears(layer, g: Group, h: torch.Tensor | None, cfg: QuantConfig, static: float | None,
                      perm: torch.Tensor | None, scheme: LayerScheme, rotate: int = 0) -> None:
    """perm (Tender): store the weights' columns in this order. scheme: this layer's bits, sparsity and
    weight groups (layer_scheme: LUC's per-layer policy, else the config's). rotate: the weights are
    already rotated (W H, rotate_weights); the modules rotate their inputs by the same block."""
    bits, sparsity, group = scheme.bits, scheme.sparsity, scheme.group
    w = group_weights(layer, g)
    w4 = zero = None
    if bits == 4:  # clip search per output channel (or group), weighted by the input's channel energy
        w4, zero = search_w4_scale(w, torch.diag(h).float() if h is not None else None, cfg.w4_clip_grid, group,
                                   scheme.asym)
    if cfg.traits.hessian_rounding and h is not None:
        q, scale = gptq_quantize(w, h, bits, cfg.gptq_block, cfg.gptq_damp, cfg.gptq_act_order, w4, group, sparsity,
                                 zero, refit=cfg.gptq_refit, own_h=True)
        del h
    elif w4 is not None:
        q, scale = quantize_weight_int4(w, w4, group, zero)
    else:
        q, scale = quantize_weight_per_channel(w, bits)
    if perm is not None:
        q = q[:, perm].contiguous()
    start = 0
    for p in g.linears:
        lin = layer.get_submodule(p)
        n = lin.out_features
        bias = None if lin.bias is None else lin.bias.data
        set_module(layer, p, QuantLinear.from_quantized(q[start:start + n], scale[start:start + n],
                                                        bias, cfg.act_scheme, static, cfg.tender_groups, perm,
                                                        bits, group if bits == 4 else 0, sparse=sparsity > 0,
                                                        w_zero=None if zero is None else zero[start:start + n],
                                                        rotate=rotate))
        start += n


def quantize_experts(layer, g: Group, x: torch.Tensor, cfg: QuantConfig, static: float | None) -> None:
    """Mixtral experts: per-expert RTN int8 (GPTQ needs per-expert Hessians; see docs)."""
    assert g.experts is not None
    if not cfg.traits.expert_banks or cfg.w_bits != 8:
        raise ValueError("MoE expert banks are quantized W8A8 with haq or rtn only (no tender, no --w-bits 4 yet)")
    bank = layer.get_submodule(g.experts)
    router = layer.get_submodule(g.float_readers[0])
    e, two_i, d = bank.gate_up_proj.shape
    q = QuantExperts(e, d, two_i // 2, bank.act_fn, cfg.act_scheme)
    _, _, top = router(x)  # [T, k] experts of the search tokens (smoothed router, same routing)
    down_static = []
    for k in range(e):
        q.gate_up_qweight[k], q.gate_up_scale[k] = quantize_weight_per_channel(bank.gate_up_proj.data[k])
        q.down_qweight[k], q.down_scale[k] = quantize_weight_per_channel(bank.down_proj.data[k])
        xe = x[(top == k).any(dim=-1)]  # tokens routed to expert k
        gate, up = (xe @ bank.gate_up_proj.data[k].t()).chunk(2, dim=-1)
        hmax = (bank.act_fn(gate) * up).abs().max().item() if xe.numel() else 1.0
        down_static.append(static_act_scale(hmax))
    if static is not None:
        q.gate_up_input_scale = torch.full((e,), static)
        q.down_input_scale = torch.tensor(down_static)
    set_module(layer, g.experts, q)


def rotation_candidates(layer, spec: ArchSpec, cfg: QuantConfig) -> dict[str, int]:
    """Group name -> Hadamard block, for the groups whose input may be rotated (cfg.rotate_down: the
    MLP's down projection; cfg.rotate_all: every dense group)."""
    if not (cfg.rotate_down or cfg.rotate_all):
        return {}
    out = {}
    for g in spec.groups:
        if g.experts is None and not g.float_readers and (cfg.rotate_all or g.name in ("down", "fc2")) and (
                b := hadamard_block(layer.get_submodule(g.input_of).in_features)) >= MIN_ROTATE_BLOCK:
            out[g.name] = b
    return out


def rotate_weights(layer, g: Group, block: int) -> None:
    """W -> W H for the group's linears. The float layer is not run again before they are replaced by
    QuantLinears that rotate their input, which restores y = (W H)(x H)^T = W x^T."""
    for p in g.linears:
        lin = layer.get_submodule(p)
        lin.weight.data = hadamard(lin.weight.data, block)


def search_group(layer, g: Group, st: ActStats, cfg: QuantConfig, scheme: LayerScheme, rotate: int = 0):
    """The smoothing (and static clip) with the least group output error; rotate > 0: of the rotated
    input (st holds its statistics) with the weights rotated alike, and no smoothing."""
    per_token = cfg.act_scheme == "token"
    smooth = cfg.traits.smooths and g.prev is not None and not rotate
    clips = cfg.clip_grid if cfg.traits.static_clip_search else (1.0,)
    w = group_weights(layer, g)
    return search_smoothing(st.samples(cfg.search_tokens), st.channel_max(), hadamard(w, rotate) if rotate else w,
                            cfg.alpha_grid, clips, per_token, g.heads_per_kv, g.head_dim, allow_smoothing=smooth,
                            w_bits=scheme.bits, w_group=scheme.group, w_asym=scheme.asym)


def smooth_group(layer, g: Group, stats: dict[str, ActStats], cfg: QuantConfig, tag: str, report: QuantReport,
                  scheme: LayerScheme, rotate: int = 0):
    """Choose and fold smoothing (float model unchanged). rotate > 0: rotating the input competes with
    smoothing on the same output error, and when it wins the weights are rotated in place.
    Returns (s [K], static act scale or None, the statistics to round with, the block rotated or 0)."""
    st = stats[g.name]
    choice = search_group(layer, g, st, cfg, scheme)
    unrotated = choice.error
    if rotate:
        rot = search_group(layer, g, stats[g.name + ROTATED], cfg, scheme, rotate)
        if rot.error < choice.error:
            choice, st = rot, stats[g.name + ROTATED]
            rotate_weights(layer, g, rotate)
        else:
            rotate = 0
    if choice.alpha is not None:
        fold_smoothing(layer, g, choice.scales)
    static = static_scale(cfg, st, choice.scales, choice.clip)
    report.choices[tag] = {"alpha": choice.alpha, "clip": choice.clip, "mse": choice.error}
    if stats.get(g.name + ROTATED) is not None:
        report.choices[tag] |= {"rotate": rotate, "mse_unrotated": unrotated}
    return choice.scales, static, st, rotate


def _smoothed_hessian(st: ActStats, s: torch.Tensor) -> torch.Tensor:
    """H of X / s, [K, K] (hessian_dtype(K)), made in place of the statistics' X^T X, which they no
    longer hold (the group is being rounded, nothing reads it again), row block by row block."""
    h = st.take_hessian()
    for r0 in range(0, h.shape[0], 1024):
        r1 = min(r0 + 1024, h.shape[0])
        h[r0:r1] /= (s[r0:r1, None] * s[None, :]).to(h.dtype)
    return h


def needs_hessian(cfg: QuantConfig, scheme: LayerScheme) -> bool:
    """Whether rounding reads the input Hessian: GPTQ, or W4's clip search (its diagonal)."""
    return cfg.traits.hessian_rounding or scheme.bits == 4


def convert_group(layer, g: Group, st: ActStats, s: torch.Tensor, static: float | None, cfg: QuantConfig,
                   scheme: LayerScheme, rotate: int = 0) -> None:
    if g.experts is not None:
        quantize_experts(layer, g, st.samples(cfg.search_tokens) / s, cfg, static)
    else:
        h = None if st.xtx is None else _smoothed_hessian(st, s)
        perm = torch.argsort(st.channel_max() / s) if cfg.traits.column_order else None  # Tender's column order
        quantize_linears(layer, g, h, cfg, static, perm, scheme, rotate)


def lm_head_group(model, spec: ArchSpec, batches, cfg: QuantConfig, keep: int, report: QuantReport,
                  embed_weight: Callable[[], torch.Tensor] | None = None) -> None:
    """lm_head as one more group: smoothing folded into the final norm, then GPTQ (HAQ) or RTN.

    A tied embedding reads lm_head's int8 rows and undoes the smoothing with a [D] column scale.
    embed_weight: where an untied embedding's float rows come from, read only once lm_head is
    quantized (quant.stream reads them from the model's files then; default: the module's weight).
    """
    head = model.get_output_embeddings()
    norm = model.get_submodule(spec.final_norm_path)
    st = ActStats(keep_per_batch=keep)
    for hidden, _ in batches:
        st.add(norm(hidden))
    per_token = cfg.act_scheme == "token"
    haq = cfg.traits.haq_lm_head  # lm_head: HAQ smoothing and rounding
    # A vocabulary-wide output gives plenty of signal per token: search on fewer tokens.
    choice = search_smoothing(st.samples(min(cfg.search_tokens, 512)), st.channel_max(), head.weight.data, cfg.alpha_grid,
                              cfg.clip_grid if haq else (1.0,), per_token, allow_smoothing=haq)
    s = choice.scales
    tied = model.get_input_embeddings().weight is head.weight
    emb = model.get_submodule(spec.embed_path)
    if choice.alpha is not None:
        norm.weight.data /= s
        if getattr(norm, "bias", None) is not None:
            norm.bias.data /= s
    w = head.weight.data * s  # a new tensor: the tied embedding keeps its float rows
    static = static_scale(cfg, st, s, choice.clip)
    report.choices["lm_head"] = {"alpha": choice.alpha, "clip": choice.clip, "mse": choice.error}
    if haq:  # lm_head stays 8-bit under W4 too (it is also the tied embedding)
        q, scale = gptq_quantize(w, _smoothed_hessian(st, s), 8, cfg.gptq_block, cfg.gptq_damp, cfg.gptq_act_order,
                                 own_h=True)
    else:
        q, scale = quantize_weight_per_channel(w, 8)
    del w
    perm = torch.argsort(st.channel_max() / s) if cfg.traits.column_order else None
    if perm is not None:
        q = q[:, perm].contiguous()
    qhead = QuantLinear.from_quantized(q, scale, None, cfg.act_scheme, static, cfg.tender_groups, perm)
    del head
    set_module(model, "lm_head", qhead)  # the float head goes (a tied one lives on as the embedding)
    qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, qhead if tied else None)
    if tied:
        qemb.col_scale = (1.0 / s).float()  # rows of W * s, read back as W
    else:
        qemb.qweight, qemb.w_scale = quantize_weight_per_channel(embed_weight() if embed_weight else emb.weight.data, 8)
    set_module(model, spec.embed_path, qemb)


