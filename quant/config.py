"""The quantization config: one frozen dataclass, serialized into every manifest. Which options a method
takes is a trait of the method (quant.methods), not a comparison with its name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .methods import METHOD_TRAITS, ActScheme, method_traits

__all__ = ["ActScheme", "CalibConfig", "QuantConfig", "METHODS"]

METHODS = tuple(METHOD_TRAITS)
CONFIG_VERSION = 1


@dataclass(frozen=True)
class CalibConfig:
    """Which text calibrates, and how much of it."""

    path: str | None = None  # None: the C4 sample in ../shared/data when present
    samples: int = 64  # sequences
    seq_len: int = 512  # tokens per sequence
    seed: int = 0


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized. `method` picks the algorithm; the rest are its knobs.

    rtn: round-to-nearest int8 weights per output channel, no smoothing.
    haq: smoothing with a per-layer migration strength chosen on calibration data, then
         GPTQ-style Hessian-aware rounding (METHODS.md section 1).
    tender: round-to-nearest int8 weights per output channel; activations decomposed per chunk
         into power-of-two channel groups (quant/tender.py, METHODS.md section 4). Its act scheme
         is always "tender".
    mobilequant: learned transforms, weight clips and static activation ranges trained end to end
         against the float model's final hidden states (quant/mobilequant.py, METHODS.md
         section 2). Integer-only: its act scheme is always "tensor".
    luc: Edge-LLM's layer-wise unified compression: each decoder layer's sensitivity to every
         (bits, sparsity) option in luc_options is measured, a policy is chosen under the budget
         (target_bytes, target_ratio or avg_sparsity), then HAQ runs with the per-layer policy
         (SparseGPT-style pruning inside the Hessian-aware rounding). quant/luc.py.
    """

    method: str = "haq"
    w_bits: int = 8
    a_bits: int = 8
    act_scheme: ActScheme = "token"
    # HAQ smoothing: migration strengths tried per smoothing group (METHODS.md: grid in [0.3, 0.95]).
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    # Static (per-tensor) activation scales: fractions of the calibration max tried as clip points.
    clip_grid: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    gptq_block: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    # Inside a decoder layer, take each group's Hessian after the groups before it are rounded
    # (o after q/k/v, down after gate/up): GPTQ's "true sequential" order. False: one pass of
    # statistics per layer, all groups seeing float inputs.
    gptq_sequential: bool = False
    # Rounds of refitting each row's weight scales by least squares to the integer codes GPTQ chose
    # (quant/gptq.refit_scales), rounding again to the refit scales between rounds. haq, luc.
    gptq_refit: int = 0
    # After quantizing: Adam steps of end-to-end distillation of every quantized linear's weight
    # scales and the norm weights against the float model (quant/distill.py), one calibration
    # window per step; the integer codes stay. rtn, haq, luc. 0: off.
    kd_steps: int = 0
    kd_lr: float = 3e-3  # for the log-scale multipliers; the norm weights take a tenth
    # What distillation trains on: "calib" (the calibration windows) or "mixed" (calibration windows
    # alternating with windows sampled from the float model itself, text of no one domain)
    kd_data: str = "calib"
    search_tokens: int = 4096  # calibration tokens kept per layer for the alpha/clip search
    quantize_lm_head: bool = True
    tender_groups: int = 4  # Tender: channel groups (power-of-two scales apart)
    # W4: per output channel, the scale is absmax * the clip ratio (of these) that minimizes the
    # rounding error weighted by the input's per-channel energy; lm_head stays 8-bit.
    w4_clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
    # W4 weight-scale groups: 0 = one scale per output channel; 128 = one per 128 input columns.
    w_group: int = 0
    # W4 with a zero point per channel or group (16 levels over [min, max]; quant/int4.py) instead of
    # symmetric [-7, 7]. Dense W4 layers only: LUC's pruned W4 layers stay symmetric.
    w_asym: bool = False
    # Rotate the MLP's down-projection input (down_proj, OPT's fc2) online by a block Hadamard
    # (quant/hadamard.py) instead of smoothing it: a few tokens' massive channels there set the
    # activation scale otherwise. The weights are stored rotated; the kernels rotate each row.
    rotate_down: bool = False
    # Let every linear group's input be rotated the same way (attention q/k/v and o, MLP gate/up and
    # down), each group choosing by its quantized output error; for 4-bit weights, whose input-channel
    # outliers the rotation spreads too. Blocks: the largest power of two dividing the width.
    rotate_all: bool = False
    # Rotate the residual stream by a seeded random orthogonal matrix folded into the weights before
    # anything else (quant/rotation.py; QuaRot's R1): norms folded into their readers, embeddings untied.
    # The float model is unchanged; its weights and activations lose their outlier channels. rtn, haq, luc.
    rotate_residual: bool = False
    # MobileQuant: smoothing strength of the initial transforms, training length and learning rates
    # (transforms and clips as in the paper; ranges act on log-scale and offset in initial
    # quantization steps, kept nearly fixed as in the paper).
    # None: start from HAQ's per-group searched smoothing and clip. On SmolLM2 the paper's fixed
    # a = 0.5 start had a final-hidden-state MSE of 0.22 (HAQ's search: 0.020); 64 steps brought it
    # to 0.19 and the checkpoint to 1.21x FP perplexity (BENCHMARKS.md, quality notes).
    mq_alpha: float | None = None
    mq_epochs: int = 2
    mq_batch: int = 2  # calibration windows per step
    mq_lr_transform: float = 1e-3
    mq_lr_clip: float = 1e-2
    mq_lr_range: float = 1e-4
    # LUC: per-layer (bits, sparsity) options, the budget (one of the three), the policy it chose.
    # An option may name its own W4 weight-scale group: (bits, sparsity, group); without one, w_group.
    luc_options: tuple[tuple, ...] = ((8, 0.0), (8, 0.5), (4, 0.0), (4, 0.5))
    target_bytes: int = 0  # the whole tensor file
    target_ratio: float = 0.0  # the decoder layers' weight bytes as a fraction of uniform W8
    avg_sparsity: float = 0.0  # mean fraction of decoder weights pruned (bits fixed to w_bits)
    luc_eval_windows: int = 4  # calibration windows scoring each option
    # what an option costs: "kl" = mean KL divergence of the next-token distribution from the float
    # model's (never negative); "loss" = the calibration loss increase (noisy: can go below zero)
    luc_cost: str = "kl"
    layer_policy: tuple[tuple, ...] = ()  # per decoder layer (bits, sparsity[, group]); () = uniform
    calib: CalibConfig = field(default_factory=CalibConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        t = method_traits(self.method)  # unknown method: ValueError naming the choices
        self._check_bits(t)
        self._check_options(t)
        if t.per_layer_policy:
            self._check_luc()
        elif self.layer_policy:
            raise ValueError("a per-layer policy belongs to --method luc")
        if not 1 <= self.tender_groups <= 16:
            raise ValueError(f"tender_groups must be in [1, 16], got {self.tender_groups}")

    def _check_bits(self, t) -> None:
        if self.a_bits != 8 or self.w_bits not in (8, 4) or (self.w_bits == 4 and not t.w4_groups and self.w_group):
            raise ValueError(
                f"W{self.w_bits}A{self.a_bits} is not supported by {self.method}; use --a-bits 8 and --w-bits 8 or 4 "
                f"(tender: 4-bit weights per output channel, no --w-group)"
            )
        if t.only_scheme == "tensor" and self.act_scheme != "tensor":
            raise ValueError("mobilequant is integer-only: its activations use static per-tensor scales ('tensor')")
        if self.mq_epochs < 0 or self.mq_batch < 1:
            raise ValueError(f"mobilequant needs --epochs >= 0 and a batch >= 1, got {self.mq_epochs}, {self.mq_batch}")
        if t.group_scales != (self.act_scheme == "tender"):
            raise ValueError("--method tender goes with its own activation scheme ('tender'), and only with it")
        if self.act_scheme not in ("token", "tensor", "tender"):
            raise ValueError(f"act scheme must be 'token' or 'tensor', got {self.act_scheme!r}")
        if self.w_group < 0 or (self.w_group and ((self.w_bits != 4 and not t.per_layer_policy) or self.w_group % 2)):
            raise ValueError(f"--w-group must be 0 (per output channel) or an even column count with --w-bits 4, "
                             f"got {self.w_group} with W{self.w_bits}")

    def _check_options(self, t) -> None:
        if self.w_asym and (not t.zero_points or (self.w_bits != 4 and not t.per_layer_policy)):
            raise ValueError(f"--w-asym (4-bit weights with zero points) works with rtn, haq and luc at --w-bits 4, "
                             f"not {self.method} W{self.w_bits}")
        if (self.rotate_down or self.rotate_all) and not t.rotations:
            raise ValueError(f"--rotate-down and --rotate-all work with rtn and haq, not {self.method}")
        if self.rotate_residual and not t.residual_rotation:
            raise ValueError(f"--rotate-residual works with rtn, haq and luc, not {self.method}")
        if self.gptq_refit < 0 or (self.gptq_refit and not t.hessian_rounding):
            raise ValueError(f"--refit-scales refits GPTQ's scales: it works with haq and luc, not {self.method}")
        if self.kd_steps < 0 or (self.kd_steps and not t.distills) or not self.kd_lr > 0:
            raise ValueError(f"--kd-steps distills the weight scales of rtn, haq and luc checkpoints (steps >= 0, "
                             f"lr > 0), not {self.method} with {self.kd_steps} steps at lr {self.kd_lr}")
        if self.kd_data not in ("calib", "mixed"):
            raise ValueError(f"--kd-data must be 'calib' or 'mixed', got {self.kd_data!r}")

    def _check_luc(self) -> None:
        budgets = sum(bool(b) for b in (self.target_bytes, self.target_ratio, self.avg_sparsity))
        if budgets != 1 and not self.layer_policy:
            raise ValueError("--method luc needs exactly one budget: --target-bytes, --target-ratio or --avg-sparsity")
        if self.luc_cost not in ("kl", "loss"):
            raise ValueError(f"luc_cost must be 'kl' or 'loss', got {self.luc_cost!r}")
        if self.act_scheme == "tender" or any(
                len(o) not in (2, 3) or o[0] not in (4, 8) or not 0 <= o[1] < 1
                or (len(o) == 3 and (o[2] < 0 or o[2] % 2 or o[0] != 4)) for o in self.luc_options):
            raise ValueError("luc options are (bits 4 or 8, sparsity in [0, 1)[, an even W4 group, 0: per "
                             "channel]) with activation scheme token or tensor")

    @property
    def traits(self):
        """What the method does (quant.methods.MethodTraits)."""
        return method_traits(self.method)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        calib = CalibConfig(**d.pop("calib", {}))
        for key in ("alpha_grid", "clip_grid", "w4_clip_grid"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("luc_options", "layer_policy"):
            if key in d:
                d[key] = tuple((int(o[0]), float(o[1]), *(int(g) for g in o[2:])) for o in d[key])
        return cls(calib=calib, **d)
