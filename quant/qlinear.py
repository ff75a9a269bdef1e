"""Runtime modules that hold int8 weights and run the integer kernels.

QuantLinear    replaces nn.Linear: int8 weight [N, K] + per-channel scale [N].
QuantExperts   replaces a Mixtral expert bank: int8 gate_up [E, 2I, D], down [E, D, I] + scales.
QuantEmbedding token embedding that reads int8 rows (shares lm_head's tensors when tied).
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import hadamard
from .int4 import expand_group_scale, num_groups, pack_int4
from .formats import RuntimeLinear, runtime_linear
from .kernels import int8_linear, unpack_w4
from .sparse import decode_sparse, encode_sparse

__all__ = ["QuantLinear", "QuantExperts", "QuantEmbedding"]


class _TrainableScales(torch.autograd.Function):
    """y = z * w_scale + bias, z = the integer kernel's output with unit weight scales.

    Forward runs the int8 kernel unchanged; backward gives w_scale (and bias) their exact gradients
    and the input a straight-through one (activation rounding treated as identity):
    dL/dx = (dL/dy * w_scale) @ W_int. So layers can be tuned (quant/tune.py) on integer weights."""

    @staticmethod
    def forward(ctx, x2, w_scale, bias, q, static):  # x2 [M, K], q int8 [N, K]
        z = int8_linear(x2, q, torch.ones_like(w_scale), None, static)  # [M, N]
        ctx.save_for_backward(z, q, w_scale)
        ctx.has_bias = bias is not None
        y = z * w_scale
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy):
        z, q, w_scale = ctx.saved_tensors
        gx = (gy * w_scale) @ q.float()  # [M, K]
        return gx, (gy * z).sum(dim=0), gy.sum(dim=0) if ctx.has_bias else None, None, None


class QuantLinear(nn.Module):
    """y = int8_linear(x): activations quantized per token, or with a static per-tensor scale; or
    act_scheme "tender": Tender's power-of-two channel groups per chunk (quant/tender.py)."""

    qweight: torch.Tensor  # [N, K] int8 (W8)
    qweight4: torch.Tensor  # [N, ceil(K / 2)] uint8, two int4 per byte (W4), read packed by int4_linear
    wmask: torch.Tensor | None  # [N, ceil(K / 8)] uint8 bitmask of nonzeros (sparse, quant/sparse.py)
    wvals: torch.Tensor | None  # nonzeros: int8 [nnz] (W8) or uint8 [1, ceil(nnz / 2)] (W4)
    w_scale: torch.Tensor  # [N], or [N, G] with weight groups
    w_group: torch.Tensor | None  # [] int64: columns per weight-scale group (W4 group-wise), else None
    w_zero: torch.Tensor | None  # uint8 like w_scale: W4 zero points (qweight4 then holds u in [0, 15]), else None
    bias: torch.Tensor | None  # [N]
    input_scale: torch.Tensor | None  # [] static activation scale
    input_offset: torch.Tensor | None  # [] static activation offset (MobileQuant's learned range), else None
    perm: torch.Tensor | None  # [K] int64, Tender: qweight's column order
    tender_groups: torch.Tensor | None  # [] int64, Tender
    rotate: torch.Tensor | None  # [] int64: Hadamard block of the online input rotation (quant/hadamard.py)

    def __init__(self, in_features: int, out_features: int, bias: bool, act_scheme: str, groups: int = 4,
                 w_bits: int = 8, w_group: int = 0, offset: bool = False, sparse_nnz: int | None = None,
                 zero: bool = False, rotate: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_scheme = in_features, out_features, act_scheme
        self.groups = groups  # Tender only
        self.w_bits = w_bits
        # Tender: qweight's column j is input channel perm[j] (ascending calibration magnitude)
        self.register_buffer("perm", torch.arange(in_features) if act_scheme == "tender" else None)
        self.register_buffer("tender_groups", torch.tensor(groups) if act_scheme == "tender" else None)
        self.sparse_nnz = sparse_nnz
        self._dense: torch.Tensor | None = None  # sparse: the decoded int8 weight, built on first use
        if sparse_nnz is not None:  # pruned: bitmask + nonzeros (quant/sparse.py)
            self.register_buffer("wmask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8))
            self.register_buffer("wvals", torch.zeros(sparse_nnz, dtype=torch.int8) if w_bits == 8 else
                                 torch.zeros(1, (sparse_nnz + 1) // 2, dtype=torch.uint8))
            self.register_buffer("qweight", None)
        elif w_bits == 4:  # two weights per byte, resident packed; the W4 kernel reads them packed
            self.register_buffer("qweight4", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
            self.register_buffer("qweight", None)
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.group_size = w_group  # 0: one weight scale per output channel
        ng = num_groups(in_features, w_group)
        self.register_buffer("w_scale", torch.ones(out_features, ng) if w_group > 0 else torch.ones(out_features))
        self.register_buffer("w_group", torch.tensor(w_group) if w_group > 0 else None)
        if zero and (w_bits != 4 or sparse_nnz is not None):
            raise ValueError("zero points are for dense 4-bit weights")
        self.register_buffer("w_zero", torch.zeros(self.w_scale.shape, dtype=torch.uint8) if zero else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # Static per-tensor activation scale ("tensor" scheme); unused for "token".
        self.register_buffer("input_scale", torch.ones(()) if act_scheme == "tensor" else None)
        # Asymmetric static range [o - 127 s, o + 127 s]: x - o is quantized; o's product with the
        # weights is folded into the bias at quantization time, so the matmul stays int8 x int8.
        if offset and act_scheme != "tensor":
            raise ValueError("an activation offset needs the static per-tensor scheme ('tensor')")
        self.register_buffer("input_offset", torch.zeros(()) if offset else None)
        # rotate > 0: the weights are stored as W H and each input row is rotated (x H) before it is
        # quantized; H block-diagonal Walsh-Hadamard with blocks of `rotate` columns
        if rotate and (act_scheme == "tender" or offset or in_features % rotate):
            raise ValueError(f"an input rotation (block {rotate}) needs in_features divisible by it, no Tender, no offset")
        self.rotate_block = rotate
        self.register_buffer("rotate", torch.tensor(rotate) if rotate else None)
        self._static: float | None = None
        self._offset: float | None = None

    @classmethod
    def from_quantized(cls, qweight, w_scale, bias, act_scheme, input_scale=None, groups: int = 4,
                       perm: torch.Tensor | None = None, w_bits: int = 8, w_group: int = 0,
                       input_offset: float | None = None, sparse: bool = False,
                       w_zero: torch.Tensor | None = None, rotate: int = 0) -> "QuantLinear":
        """perm (Tender): the column order qweight is stored in. w_bits 4: qweight holds values in [-7, 7],
        or with w_zero (integer zero points shaped like w_scale) u - z in [-15, 15].
        w_group > 0: w_scale is [N, ceil(K / w_group)], one scale per group of w_group columns.
        input_offset: the static range's centre; bias must already hold input_offset * rowsum(W).
        sparse: store only the nonzero weights and a bitmask (pruned layers; K a multiple of 8, else dense).
        rotate: qweight is of the rotated weights W H; inputs are rotated by the same block Hadamard."""
        sparse = sparse and qweight.shape[1] % 8 == 0 and w_zero is None
        nnz = int((qweight != 0).sum()) if sparse else None
        m = cls(qweight.shape[1], qweight.shape[0], bias is not None, act_scheme, groups, w_bits, w_group,
                input_offset is not None, nnz, zero=w_zero is not None, rotate=rotate)
        if sparse:
            m.wmask, m.wvals = encode_sparse(qweight.contiguous(), w_bits)
            qweight = None
        elif w_zero is not None:  # store u = q + z in [0, 15]
            m.w_zero = w_zero.round().to(torch.uint8).contiguous()
            u = qweight.to(torch.int16) + expand_group_scale(m.w_zero, qweight.shape[1], w_group).to(torch.int16)
            m.qweight4 = pack_int4(u.to(torch.int8), signed=False)
            qweight = None
        elif w_bits == 4:
            m.qweight4 = pack_int4(qweight)
            qweight = None
        if perm is not None:
            m.perm = perm.long().clone()  # one tensor per module (safetensors refuses shared storage)
        if qweight is not None:
            m.qweight = qweight.contiguous()
        m.w_scale = w_scale.float().contiguous()
        if bias is not None:
            m.bias = bias.float().contiguous()
        if act_scheme == "tensor":
            m.input_scale = torch.as_tensor(float(input_scale))
        if input_offset is not None:
            m.input_offset = torch.as_tensor(float(input_offset))
        return m

    def static_scale(self) -> float | None:
        if self.input_scale is None:
            return None
        if self._static is None:  # cached: .item() per call would cost a sync on GPU
            self._static = float(self.input_scale)
        return self._static

    def _offset_value(self) -> float:
        assert self.input_offset is not None
        if self._offset is None:  # cached like the static scale
            self._offset = float(self.input_offset)
        return self._offset

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """x minus the static activation offset (unchanged without one)."""
        if self.input_offset is None:
            return x
        return x - self._offset_value()

    def int8_weight(self) -> torch.Tensor:
        """[N, K] int8 (unpacked from 4 bits for W4, decoded once from the sparse form)."""
        if self.sparse_nnz is not None:
            if self._dense is None:
                assert self.wmask is not None and self.wvals is not None
                self._dense = decode_sparse(self.wmask, self.wvals, self.in_features)
            return self._dense
        return unpack_w4(self.qweight4, self.w_zero, self.in_features, self.group_size) if self.w_bits == 4 else self.qweight

    def trainable(self) -> bool:
        """Whether tuning can train this module's weight scales (per output channel, not Tender)."""
        return self.group_size == 0 and self.act_scheme != "tender"

    def runtime(self) -> RuntimeLinear:
        """This module's weights as the runtime object of their format (quant/formats.py). Built per
        call, on the module's own tensors (no copies): tuning and distillation change the scales."""
        tender = self.act_scheme == "tender"
        packed = self.w_bits == 4 and self.sparse_nnz is None and not tender
        offset = None if self.input_offset is None else self._offset_value()
        return runtime_linear(self.qweight4 if packed else self.int8_weight(), self.w_scale, self.static_scale(),
                              tender=tender, perm=self.perm if tender else None, groups=self.groups,
                              w_group=self.group_size, bias=self.bias, offset=offset,
                              w_zero=self.w_zero if packed else None, rotate=self.rotate_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.w_scale.requires_grad) and self.trainable():
            x = self.centred(x)
            if self.rotate_block:
                x = hadamard(x, self.rotate_block)
            x2 = x.reshape(-1, self.in_features).float()
            y = _TrainableScales.apply(x2, self.w_scale, self.bias, self.int8_weight(), self.static_scale())
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return self.runtime()(x).to(x.dtype)

    def extra_repr(self) -> str:
        g = (f" group={self.group_size}" if self.group_size else "") + (" asym" if self.w_zero is not None else "") + (f" nnz={self.sparse_nnz}" if self.sparse_nnz is not None else "") + (
            f" rotate={self.rotate_block}" if self.rotate_block else "")
        return f"in={self.in_features}, out={self.out_features}, w{self.w_bits}a8{g} act={self.act_scheme}"


class QuantExperts(nn.Module):
    """Mixtral expert bank, each expert a separately quantized unit (gpt-fast's [E, I, D] layout)."""

    gate_up_qweight: torch.Tensor  # [E, 2I, D] int8
    gate_up_scale: torch.Tensor  # [E, 2I]
    down_qweight: torch.Tensor  # [E, D, I] int8
    down_scale: torch.Tensor  # [E, D]
    gate_up_input_scale: torch.Tensor | None  # [E]
    down_input_scale: torch.Tensor | None  # [E]

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn, act_scheme: str) -> None:
        super().__init__()
        self.num_experts, self.act_scheme, self.act_fn = num_experts, act_scheme, act_fn
        self.register_buffer("gate_up_qweight", torch.zeros(num_experts, 2 * inter, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.ones(num_experts, 2 * inter))
        self.register_buffer("down_qweight", torch.zeros(num_experts, hidden, inter, dtype=torch.int8))
        self.register_buffer("down_scale", torch.ones(num_experts, hidden))
        static = act_scheme == "tensor"
        self.register_buffer("gate_up_input_scale", torch.ones(num_experts) if static else None)
        self.register_buffer("down_input_scale", torch.ones(num_experts) if static else None)

    def _static(self, name: str, e: int) -> float | None:
        t = getattr(self, name)
        return None if t is None else float(t[e])

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)  # [T, D]
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)  # tokens routed to expert e
            x = hidden[tok]  # [t, D]
            gu = int8_linear(x, self.gate_up_qweight[e], self.gate_up_scale[e], None, self._static("gate_up_input_scale", e))
            gate, up = gu.chunk(2, dim=-1)  # [t, I] each
            h = self.act_fn(gate) * up
            y = int8_linear(h, self.down_qweight[e], self.down_scale[e], None, self._static("down_input_scale", e))
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out


class QuantEmbedding(nn.Module):
    """Embedding lookup from int8 rows with per-row scales (a gather, not a matmul).

    When the model ties input and output embeddings, the rows are lm_head's own int8 weight,
    so the checkpoint stores them once.
    """

    qweight: torch.Tensor  # [V, D] int8 (untied only)
    w_scale: torch.Tensor  # [V]
    col_scale: torch.Tensor | None  # [D]

    def __init__(self, vocab: int, hidden: int, padding_idx: int | None, tied_to: QuantLinear | None) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self._tied = [tied_to] if tied_to is not None else None  # list: not a registered submodule
        if tied_to is None:
            self.register_buffer("qweight", torch.zeros(vocab, hidden, dtype=torch.int8))
            self.register_buffer("w_scale", torch.ones(vocab))
        # lm_head's rows carry its smoothing (W * s); a tied embedding multiplies by 1/s.
        self.register_buffer("col_scale", torch.ones(hidden) if tied_to is not None else None)

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tied is not None:
            head = self._tied[0]
            if head.perm is not None:  # Tender stores lm_head's columns reordered: undo it
                return head.qweight[:, torch.argsort(head.perm)], head.w_scale
            return head.qweight, head.w_scale
        return self.qweight, self.w_scale

    @property
    def weight(self) -> torch.Tensor:  # transformers asks for .weight.dtype/device
        return self._rows()[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, s = self._rows()
        rows = q[ids].float() * s[ids].unsqueeze(-1)  # [..., D]
        return rows if self.col_scale is None else rows * self.col_scale
