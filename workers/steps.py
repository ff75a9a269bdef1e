"""Validation of a worker's incoming steps into typed items (pure of gRPC servers: it raises, the
servicer answers with the status).

Every field of a ForwardRequest that crosses the process boundary is checked here before any compute:
placement id, item count, session ids (length, duplicates, known, at the right position), token ids
(range) or hidden states (shape, dtype, byte length), the session's room, sampling parameters, MoE
routes, and the KV bytes new sessions would reserve against the stage's budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import torch

from protos import edgeweave_v1_pb2 as pb
from quant.checkpoint import CheckpointError

from .llama_stage import KVCache
from .shard import LoadedShard
from .wire import WireError, decode_activation, decode_tensor

__all__ = ["Refused", "StepItem", "RouteShape", "parse_step", "check_placement", "refusal_status", "MAX_ITEMS",
           "MAX_SESSION_ID"]

MAX_ITEMS = 256  # sessions in one forward step
MAX_SESSION_ID = 128


class Refused(Exception):
    """A request refused with a gRPC status code and a message the caller can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class StepItem:
    session_id: str
    x: torch.Tensor  # token ids [T] (first stage) or hidden [T, D]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    step: int
    route: torch.Tensor | None = None  # MoE: int32 [T, R, k] experts at the R layers before this stage


@dataclass(frozen=True)
class RouteShape:
    """What a MoE stage accepts as an item's route: k experts per layer, each in [0, experts)."""

    k: int
    experts: int


def refusal_status(e: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status a refused request gets for `e`; None for an unexpected error (a bug)."""
    if isinstance(e, Refused):
        return e.code, e.message
    if isinstance(e, (WireError, FileNotFoundError)) or (isinstance(e, ValueError) and not isinstance(e, CheckpointError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, CheckpointError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    return None


def check_placement(placement_id: str, spec: pb.ShardSpec) -> None:
    if placement_id != spec.placement_id:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"placement {placement_id!r} is not the loaded one ({spec.placement_id!r})")


def _session_room(it, what: str, cache: KVCache | None, spec: pb.ShardSpec) -> tuple[int, int]:
    """-> (the session's position here, its room in tokens); checks id, position and max_tokens."""
    sid = it.session_id
    have = 0 if cache is None else cache.length
    if cache is None and it.position != 0:
        raise Refused(grpc.StatusCode.NOT_FOUND, f"{what}: unknown session {sid!r} (released, or never started here)")
    if it.position != have:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"{what}: session {sid!r} is at position {have} here, the step says {it.position}")
    if cache is None and not 1 <= it.max_tokens <= spec.max_context:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{what}.max_tokens {it.max_tokens} must be in [1, {spec.max_context}] for a new session")
    limit = cache.max_len if cache is not None else it.max_tokens
    return have, limit - have


def _decode_input(it, what: str, shard: LoadedShard, room: int, limit: int) -> torch.Tensor:
    """The item's token ids [T] (first stage) or hidden states [T, D], checked against the room left."""
    kind = it.WhichOneof("input")
    if shard.embed is not None:
        if kind != "token_ids":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: the first stage takes token_ids")
        x = decode_tensor(it.token_ids, f"{what}.token_ids", pb.INT64, rank=1, max_elems=max(room, 0))
        if x.numel() == 0:
            raise WireError(f"{what}.token_ids is empty")
        if int(x.min()) < 0 or int(x.max()) >= shard.vocab:
            raise WireError(f"{what}.token_ids must be in [0, {shard.vocab})")
    else:
        if kind != "hidden":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: this stage takes hidden states")
        if room < 1:
            raise WireError(f"{what}: session {it.session_id!r} is full ({limit} tokens)")
        x = decode_activation(it.hidden, f"{what}.hidden", shard.dims.hidden, room)
    return x


def _decode_route(it, what: str, tokens: int, shape: RouteShape | None) -> torch.Tensor | None:
    if not it.HasField("route") or shape is None:
        return None
    route = decode_tensor(it.route, f"{what}.route", pb.INT32, rank=3, max_elems=tokens * 2 * shape.k)
    if route.shape[0] != tokens or route.shape[1] > 2 or route.shape[2] != shape.k or (
            route.numel() and (int(route.min()) < 0 or int(route.max()) >= shape.experts)):
        raise WireError(f"{what}.route must be [{tokens}, <=2, {shape.k}] experts in [0, {shape.experts})")
    return route


def parse_step(request: pb.ForwardRequest, shard: LoadedShard, spec: pb.ShardSpec, sessions: Mapping[str, KVCache],
               kv_used: int, route_shape: RouteShape | None) -> list[StepItem]:
    """A ForwardRequest -> its items, every field checked; Refused / WireError say what is wrong."""
    check_placement(request.placement_id, spec)
    if not 1 <= len(request.items) <= MAX_ITEMS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a step carries 1..{MAX_ITEMS} items, got {len(request.items)}")
    seen: set[str] = set()
    items = []
    new_bytes = 0
    for k, it in enumerate(request.items):
        sid, what = it.session_id, f"items[{k}]"
        if not 1 <= len(sid) <= MAX_SESSION_ID:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}.session_id must be 1..{MAX_SESSION_ID} characters")
        if sid in seen:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: session {sid!r} appears twice in one step")
        seen.add(sid)
        cache = sessions.get(sid)
        have, room = _session_room(it, what, cache, spec)
        limit = have + room
        x = _decode_input(it, what, shard, room, limit)
        if x.shape[0] > room:
            raise WireError(f"{what}: {x.shape[0]} tokens at position {have} would pass the session's {limit}")
        sp = it.sampling
        if shard.head is not None and (not sp.temperature >= 0 or not 0 <= sp.top_p <= 1):
            raise WireError(f"{what}.sampling: temperature must be >= 0 and top_p in [0, 1]")
        if cache is None:
            new_bytes += KVCache.size_bytes(len(shard.stage.layers), shard.dims, it.max_tokens)
        items.append(StepItem(sid, x, it.max_tokens, float(sp.temperature), float(sp.top_p) or 1.0, int(sp.seed),
                              int(it.step), _decode_route(it, what, x.shape[0], route_shape)))
    if kv_used + new_bytes > spec.kv_budget_bytes:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"KV cache full: {kv_used:,} bytes in use + {new_bytes:,} for new sessions > budget "
                      f"{spec.kv_budget_bytes:,}; retry after other sessions finish")
    return items
