"""Tensors to and from edgeweave.v1 messages, validated (pure: no gRPC here).

Every decoder checks dtype, rank, shape, byte length and finiteness and raises WireError with a
message naming the field; servers turn WireError into INVALID_ARGUMENT. Nothing is unpickled.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protos import edgeweave_v1_pb2 as pb
from protos.limits import GRPC_OPTIONS, MAX_MESSAGE_BYTES

__all__ = ["WireError", "encode_tensor", "encode_ids", "decode_tensor", "encode_activation", "decode_activation",
           "next_stage_items", "MAX_MESSAGE_BYTES", "GRPC_OPTIONS"]

_TO_NP: dict[int, np.dtype] = {pb.FLOAT32: np.dtype("<f4"), pb.INT8: np.dtype("i1"), pb.INT32: np.dtype("<i4"), pb.INT64: np.dtype("<i8")}
_FROM_TORCH = {torch.float32: pb.FLOAT32, torch.int8: pb.INT8, torch.int32: pb.INT32, torch.int64: pb.INT64}


class WireError(ValueError):
    """A message that does not describe a valid tensor; the text says which field and why."""


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _FROM_TORCH:
        raise WireError(f"dtype {t.dtype} has no wire encoding")
    arr = t.detach().cpu().contiguous().numpy()
    return pb.Tensor(dtype=_FROM_TORCH[t.dtype], shape=list(t.shape), data=arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def encode_ids(ids: list[int]) -> pb.Tensor:
    """Token ids -> an INT64 [T] Tensor, without torch. The front end builds one per session and step
    while the threads streaming the last tokens to clients want the GIL: a torch op releases it, and
    they would hold it meanwhile (0.45 ms per step measured in the serving cluster)."""
    return pb.Tensor(dtype=pb.INT64, shape=[len(ids)], data=np.asarray(ids, dtype="<i8").tobytes())


def _check_shape(shape, what: str, rank: int | None, max_elems: int) -> tuple[int, ...]:
    dims = tuple(int(s) for s in shape)
    if rank is not None and len(dims) != rank:
        raise WireError(f"{what}: expected rank {rank}, got shape {list(dims)}")
    if any(s < 0 for s in dims):
        raise WireError(f"{what}: negative dimension in shape {list(dims)}")
    n = math.prod(dims)
    if n > max_elems:
        raise WireError(f"{what}: {n} elements is over the limit of {max_elems}")
    return dims


def decode_tensor(msg: pb.Tensor, what: str, dtype: int, rank: int | None = None,
                  max_elems: int = MAX_MESSAGE_BYTES) -> torch.Tensor:
    """-> a torch tensor; dtype is the required pb.DType."""
    if msg.dtype != dtype:
        raise WireError(f"{what}: dtype {pb.DType.Name(msg.dtype)} where {pb.DType.Name(dtype)} is required")
    dims = _check_shape(msg.shape, what, rank, max_elems)
    np_dtype = _TO_NP[dtype]
    want = math.prod(dims) * np_dtype.itemsize
    if len(msg.data) != want:
        raise WireError(f"{what}: {len(msg.data)} bytes of data for shape {list(dims)} "
                        f"({pb.DType.Name(dtype)}) which needs {want}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(dims).astype(np_dtype.newbyteorder("="), copy=True)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # numpy: a fifth of torch's call cost here
        raise WireError(f"{what}: contains NaN or Inf")
    return torch.from_numpy(arr)


def encode_activation(h: torch.Tensor, quantize: bool) -> pb.Activation:
    """h [T, D] float32 -> Activation; quantized: int8 per row with float32 scales (absmax / 127)."""
    if not quantize:
        return pb.Activation(dense=encode_tensor(h.float()))
    scale = (h.abs().amax(dim=-1) / 127.0).clamp_min(1e-8)  # [T]
    q = torch.round(h / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [T, D]
    return pb.Activation(quantized=pb.QuantizedTensor(
        shape=list(h.shape), values=q.numpy().tobytes(), scales=scale.float().numpy().astype("<f4").tobytes()))


def decode_activation(msg: pb.Activation, what: str, hidden: int, max_rows: int) -> torch.Tensor:
    """-> float32 [T, hidden] with 1 <= T <= max_rows."""
    kind = msg.WhichOneof("kind")
    shape = msg.dense.shape if kind == "dense" else msg.quantized.shape if kind == "quantized" else None
    if shape is not None:
        dims = _check_shape(shape, what, 2, MAX_MESSAGE_BYTES)
        if dims[1] != hidden or not 1 <= dims[0] <= max_rows:
            raise WireError(f"{what}: shape {list(dims)} where [1..{max_rows}, {hidden}] is required")
    if kind == "dense":
        h = decode_tensor(msg.dense, what, pb.FLOAT32, rank=2, max_elems=max_rows * hidden)
    elif kind == "quantized":
        qm = msg.quantized
        dims = _check_shape(qm.shape, what, 2, max_rows * hidden)
        if len(qm.values) != math.prod(dims):
            raise WireError(f"{what}: {len(qm.values)} int8 values for shape {list(dims)}")
        if len(qm.scales) != dims[0] * 4:
            raise WireError(f"{what}: {len(qm.scales)} bytes of scales for {dims[0]} rows (needs {dims[0] * 4})")
        scales = np.frombuffer(qm.scales, dtype="<f4").astype(np.float32)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise WireError(f"{what}: scales must be finite and > 0")
        q = np.frombuffer(qm.values, dtype=np.int8).reshape(dims).astype(np.float32)
        h = torch.from_numpy(q * scales[:, None])
    else:
        raise WireError(f"{what}: empty activation (neither dense nor quantized)")
    return h


def next_stage_items(items, results) -> list[pb.StepItem]:
    """A stage's step items and its results -> the next stage's items: the same sessions, positions
    and sampling, with the hidden states (and, for MoE, the tokens' last experts) as input. Used by
    the front end (star) and by a stage passing a relayed step on (chain)."""
    return [pb.StepItem(session_id=it.session_id, position=it.position, max_tokens=it.max_tokens, hidden=r.hidden,
                        step=it.step, sampling=it.sampling, route=r.route if r.HasField("route") else None)
            for it, r in zip(items, results, strict=True)]
