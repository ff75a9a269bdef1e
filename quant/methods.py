"""What each quantization method does, as data: one `MethodTraits` per method in one registry (pure).

The pipeline, the layer-wise steps and the config's validation ask these traits ("does this method
round with GPTQ?") instead of comparing the method's name, so a new method is one new entry here
(and, if it does not run layer by layer, one handler in quant.pipeline.HANDLERS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ActScheme", "MethodTraits", "METHOD_TRAITS", "method_traits"]

ActScheme = Literal["token", "tensor", "tender"]


@dataclass(frozen=True)
class MethodTraits:
    name: str
    smooths: bool  # searches a smoothing strength per group and folds it (HAQ's first step)
    hessian_rounding: bool  # rounds with GPTQ (HAQ's second step); else round to nearest
    haq_lm_head: bool  # lm_head smoothed and GPTQ-rounded (it is also the tied embedding)
    static_clip_search: bool  # searches the clip grid of static activation scales
    group_scales: bool  # Tender: power-of-two channel groups instead of static per-tensor scales
    column_order: bool  # Tender: weight columns stored in the order of their channels' ranges
    rotations: bool  # --rotate-down / --rotate-all (online Hadamard)
    residual_rotation: bool  # --rotate-residual (QuaRot's R1)
    distills: bool  # --kd-steps
    zero_points: bool  # --w-asym
    w4: bool  # --w-bits 4
    w4_groups: bool  # --w-group with --w-bits 4
    per_layer_policy: bool  # LUC: bits and sparsity chosen per layer under a budget
    expert_banks: bool  # MoE expert banks (W8A8 only)
    only_scheme: ActScheme | None = None  # the one activation scheme it goes with (None: any)
    default_w_group: int = 0  # `edgeweave quantize` without --w-group
    rotates_down_by_default: bool = False  # `edgeweave quantize` without --rotate-down / --no-rotate-down


METHOD_TRAITS: dict[str, MethodTraits] = {t.name: t for t in (
    MethodTraits("rtn", smooths=False, hessian_rounding=False, haq_lm_head=False, static_clip_search=False,
                 rotations=True, residual_rotation=True, distills=True, zero_points=True, w4=True, w4_groups=True,
                 per_layer_policy=False, group_scales=False, column_order=False, expert_banks=True),
    MethodTraits("haq", smooths=True, hessian_rounding=True, haq_lm_head=True, static_clip_search=True,
                 rotations=True, residual_rotation=True, distills=True, zero_points=True, w4=True, w4_groups=True,
                 per_layer_policy=False, group_scales=False, column_order=False, expert_banks=True,
                 rotates_down_by_default=True),
    MethodTraits("tender", smooths=False, hessian_rounding=False, haq_lm_head=False, static_clip_search=False,
                 group_scales=True, column_order=True, rotations=False, residual_rotation=False, distills=False,
                 zero_points=False, w4=True, w4_groups=False, per_layer_policy=False, expert_banks=False,
                 only_scheme="tender"),
    MethodTraits("mobilequant", smooths=False, hessian_rounding=False, haq_lm_head=True, static_clip_search=False,
                 group_scales=False, column_order=False, rotations=False, residual_rotation=False, distills=False,
                 zero_points=False, w4=True, w4_groups=True, per_layer_policy=False, expert_banks=False,
                 only_scheme="tensor"),
    MethodTraits("luc", smooths=True, hessian_rounding=True, haq_lm_head=True, static_clip_search=True,
                 rotations=False, residual_rotation=True, distills=True, zero_points=True, w4=True, w4_groups=True,
                 per_layer_policy=True, group_scales=False, column_order=False, expert_banks=True,
                 default_w_group=128),
)}


def method_traits(name: str) -> MethodTraits:
    t = METHOD_TRAITS.get(name)
    if t is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_TRAITS)}")
    return t
