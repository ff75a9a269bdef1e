"""One runtime object per weight format: how a quantized linear runs, in one place.

  W8Linear         int8 [N, K], a scale per output row (W8A8; sparse W8 decoded to dense at load)
  W8GroupedLinear  int8 codes with a scale per row and group of columns (W4 codes decoded from sparse storage)
  W4Linear         int4 packed two per byte [N, K / 2], optional zero points, scales per row or group
  TenderLinear     int8 or packed int4 codes in Tender's column order, power-of-two channel groups

Every consumer dispatches through these: QuantLinear.forward (quant/qlinear.py, the transformers
modules), the lean stage's linears (workers/llama_stage.py, from checkpoint tensors with fused_linear)
and the C stage, whose struct each object describes itself (`native`, or None where the C stage has
no kernel for the format). An object subtracts its static activation offset and applies its online
Hadamard rotation before the integer product.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .hadamard import hadamard
from .int4 import pack_int4
from .kernels import int4_linear, int8_linear, int8_linear_grouped, unpack_w4
from .native import EwLinear
from .sparse import decode_sparse
from .tender import tender_linear

__all__ = ["RuntimeLinear", "W8Linear", "W8GroupedLinear", "W4Linear", "TenderLinear", "runtime_linear", "fused_linear"]


@dataclass(frozen=True)
class RuntimeLinear:
    qweight: torch.Tensor  # [N, K] int8, or [N, ceil(K / 2)] uint8 (packed int4)
    w_scale: torch.Tensor  # [N], or [N, groups]
    static: float | None  # static per-tensor activation scale; None: per-token dynamic scales
    bias: torch.Tensor | None = None  # [N] (MobileQuant: the static offset's product with the weights)
    offset: float | None = None  # static activation offset, subtracted before quantizing
    rotate: int = 0  # Hadamard block of the online input rotation (quant/hadamard.py), 0: none

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float -> [..., N] float32."""
        if self.offset is not None:
            x = x - self.offset
        if self.rotate:
            x = hadamard(x, self.rotate)
        return self.apply(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def native(self, k: int, keep: list[torch.Tensor]) -> EwLinear | None:
        """This linear as the C stage's struct (quant/csrc/llama_stage.c), or None where the C stage has
        no kernel for it. keep: collects the tensors the struct points into, which must outlive it."""
        return None

    def _struct(self, k: int, keep: list[torch.Tensor], bits: int, group: int, zero: torch.Tensor | None) -> EwLinear:
        n = self.qweight.shape[0]
        g = -(-k // group) if bits == 4 else 1
        # the C code trusts these sizes: check them here, so an inconsistent checkpoint fails cleanly
        if (self.qweight.shape != (n, (k + 1) // 2 if bits == 4 else k) or self.w_scale.numel() != n * g
                or (zero is not None and zero.numel() != n * g)
                or (self.bias is not None and self.bias.numel() != n)
                or (self.rotate and (k % self.rotate or self.rotate & (self.rotate - 1)))):
            raise ValueError(f"a linear's tensors do not fit its {k}-wide input: weight {list(self.qweight.shape)}, "
                             f"scales {list(self.w_scale.shape)}, rotation block {self.rotate}; re-run edgeweave quantize")
        parts = [self.qweight.contiguous(), self.w_scale.float().contiguous(),
                 None if zero is None else zero.contiguous(),
                 None if self.bias is None else self.bias.float().contiguous()]
        keep.extend(t for t in parts if t is not None)
        w, sw, z, bias = (None if t is None else t.data_ptr() for t in parts)
        return EwLinear(bits=bits, n=n, k=k, w=w, sw=sw, zero=z, group=group, bias=bias,
                        static_scale=float(self.static or 0.0), offset=float(self.offset or 0.0),
                        has_offset=int(self.offset is not None), rotate=self.rotate)


@dataclass(frozen=True)
class W8Linear(RuntimeLinear):
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.w_scale, self.bias, self.static)

    def native(self, k: int, keep: list[torch.Tensor]) -> EwLinear | None:
        return self._struct(k, keep, 8, 0, None)


@dataclass(frozen=True)
class W8GroupedLinear(RuntimeLinear):
    w_group: int = 0  # columns per weight scale

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear_grouped(x, self.qweight, self.w_scale, self.w_group, self.bias, self.static)


@dataclass(frozen=True)
class W4Linear(RuntimeLinear):
    w_group: int = 0  # columns per weight scale, 0: one per output row
    w_zero: torch.Tensor | None = None  # zero points like w_scale (qweight then holds u in [0, 15])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.w_scale, self.w_group, self.bias, self.static, self.w_zero)

    def native(self, k: int, keep: list[torch.Tensor]) -> EwLinear | None:
        group = self.w_group or k
        return None if group % 2 else self._struct(k, keep, 4, group, self.w_zero)


@dataclass(frozen=True)
class TenderLinear(RuntimeLinear):
    perm: torch.Tensor | None = None  # qweight's column order (quant/tender.py)
    groups: int = 0  # channel groups
    w_group: int = 0
    w_zero: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qweight  # Tender's W4 stays packed and is unpacked on every call
        if q.dtype == torch.uint8:
            q = unpack_w4(q, self.w_zero, x.shape[-1], self.w_group)
        return tender_linear(x, q, self.w_scale, self.bias, self.groups, perm=self.perm)


def runtime_linear(qweight: torch.Tensor, w_scale: torch.Tensor, static: float | None, *, tender: bool = False,
                   perm: torch.Tensor | None = None, groups: int = 0, w_group: int = 0,
                   bias: torch.Tensor | None = None, offset: float | None = None, w_zero: torch.Tensor | None = None,
                   rotate: int = 0) -> RuntimeLinear:
    """The runtime object of these tensors' format."""
    if tender:
        return TenderLinear(qweight, w_scale, static, bias, offset, rotate, perm, groups, w_group, w_zero)
    if qweight.dtype == torch.uint8:
        return W4Linear(qweight, w_scale, static, bias, offset, rotate, w_group, w_zero)
    if w_group:
        return W8GroupedLinear(qweight, w_scale, static, bias, offset, rotate, w_group)
    return W8Linear(qweight, w_scale, static, bias, offset, rotate)


def _weight(tensors: Mapping[str, torch.Tensor], p: str) -> torch.Tensor:
    """int8 [N, K], or W4 packed uint8 [N, K / 2]; a sparse weight is decoded to that dense form here
    (sparse storage is used only when K is a multiple of 8, so K = 8 x the mask's bytes per row)."""
    if f"{p}.wmask" in tensors:
        vals, mask = tensors[f"{p}.wvals"], tensors[f"{p}.wmask"]
        q = decode_sparse(mask, vals, 8 * mask.shape[1])
        return pack_int4(q) if vals.dtype == torch.uint8 else q
    return tensors[f"{p}.qweight4"] if f"{p}.qweight4" in tensors else tensors[f"{p}.qweight"]


def _shared(tensors: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], suffix: str, convert, what: str):
    """The one value of tensor `{prefix}.{suffix}` (None where absent) that every prefix shares."""
    values = {convert(t) if (t := tensors.get(f"{p}.{suffix}")) is not None else None for p in prefixes}
    if len(values) != 1:
        raise ValueError(f"fused linears {prefixes} do not share their {what}")
    return values.pop()


def fused_linear(tensors: Mapping[str, torch.Tensor], *prefixes: str) -> RuntimeLinear:
    """Several linears that read one input (checkpoint tensors `{prefix}.qweight` or `.qweight4` or the
    sparse pair, `.w_scale`, and what the format adds), rows concatenated: one activation quantization."""
    static = _shared(tensors, prefixes, "input_scale", float, "activation scale")
    offset = _shared(tensors, prefixes, "input_offset", float, "activation offset")
    w_group = _shared(tensors, prefixes, "w_group", int, "weight-scale groups") or 0
    rotate = _shared(tensors, prefixes, "rotate", int, "input rotation") or 0
    perms = [tensors.get(f"{p}.perm") for p in prefixes]
    perm = perms[0]
    if any(q is not perm and (q is None or perm is None or not torch.equal(q, perm)) for q in perms):
        raise ValueError(f"fused linears {prefixes} do not share their Tender column order")
    groups = int(tensors[f"{prefixes[0]}.tender_groups"]) if perm is not None else 0
    biases = [tensors.get(f"{p}.bias") for p in prefixes]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.float() if b is not None else torch.zeros(tensors[f"{p}.w_scale"].shape[0]) for p, b in zip(prefixes, biases)])
    weights = [_weight(tensors, p) for p in prefixes]
    if len({w.dtype for w in weights}) != 1:
        raise ValueError(f"fused linears {prefixes} do not share their weight bits")
    zeros = [tensors.get(f"{p}.w_zero") for p in prefixes]
    if len({z is None for z in zeros}) != 1:
        raise ValueError(f"fused linears {prefixes} do not share their weight format (zero points or not)")
    w4 = weights[0].dtype == torch.uint8  # W4 stays packed in memory
    return runtime_linear(torch.cat(weights).contiguous(), torch.cat([tensors[f"{p}.w_scale"].float() for p in prefixes]),
                          static, tender=perm is not None, perm=None if perm is None else perm.long(), groups=groups,
                          w_group=w_group if w4 else 0, bias=bias, offset=offset,
                          w_zero=None if zeros[0] is None else torch.cat([z for z in zeros if z is not None]),
                          rotate=rotate)
