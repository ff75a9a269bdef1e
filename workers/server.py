"""The gRPC WorkerService: one per node, hosting one shard and the KV caches of its sessions.

Every request is validated before any state changes; bad input gets INVALID_ARGUMENT, an unknown
session NOT_FOUND, a full KV cache RESOURCE_EXHAUSTED, a request for another placement
FAILED_PRECONDITION, always with a message. Forward steps run one at a time (a lock): the kernels
already use every core of the node, and the front end batches concurrent sessions into one step.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from orchestrator.profile import NodeProfile
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.serving import start_server
from quant.checkpoint import CheckpointError
from quant.generate import pick_token

from .llama_stage import KVCache
from .shard import LoadedShard, ShardRange, load_shard
from .wire import WireError, decode_activation, decode_tensor, encode_activation

__all__ = ["WorkerServicer", "start_worker_server", "MAX_ITEMS", "MAX_SESSION_ID"]

log = logging.getLogger("edgeweave.worker")

MAX_ITEMS = 256  # sessions in one forward step
MAX_SESSION_ID = 128


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class _Item:
    session_id: str
    x: torch.Tensor  # token ids [T] (first stage) or hidden [T, D]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    step: int


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, profile: NodeProfile) -> None:
        self.profile = profile
        self.shard: LoadedShard | None = None
        self.spec: pb.ShardSpec | None = None
        self.sessions: dict[str, KVCache] = {}
        self.lock = threading.Lock()  # guards shard, sessions and the compute

    # ------------------------------------------------------------------ helpers
    def _run(self, context: grpc.ServicerContext, fn):
        try:
            return fn()
        except _Abort as e:
            context.abort(e.code, e.message)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except CheckpointError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (FileNotFoundError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _kv_used(self) -> int:
        return sum(c.nbytes for c in self.sessions.values())

    # ------------------------------------------------------------------ RPCs
    def LoadShard(self, request: pb.LoadShardRequest, context):
        def run():
            s = request.shard
            if not s.checkpoint or not s.placement_id:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "shard.checkpoint and shard.placement_id are required")
            if s.max_context < 1 or s.max_context > 1 << 20:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard.max_context {s.max_context} is not in [1, 2^20]")
            t0 = time.perf_counter()
            if s.threads:
                torch.set_num_threads(int(s.threads))
            shard = load_shard(s.checkpoint, ShardRange(s.first_layer, s.last_layer, s.embed, s.head), s.max_context)
            with self.lock:
                self.shard, self.spec, self.sessions = shard, s, {}
            log.info("loaded layers [%d, %d) embed=%s head=%s for %s (%d bytes)", s.first_layer, s.last_layer,
                     s.embed, s.head, s.placement_id, shard.weight_bytes)
            return pb.LoadShardResponse(weight_bytes=shard.weight_bytes, load_seconds=time.perf_counter() - t0)
        return self._run(context, run)

    def _parse(self, request: pb.ForwardRequest, shard: LoadedShard, spec: pb.ShardSpec) -> list[_Item]:
        if request.placement_id != spec.placement_id:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"placement {request.placement_id!r} is not the loaded one ({spec.placement_id!r})")
        if not 1 <= len(request.items) <= MAX_ITEMS:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"a step carries 1..{MAX_ITEMS} items, got {len(request.items)}")
        seen: set[str] = set()
        items = []
        new_bytes = 0
        for k, it in enumerate(request.items):
            sid = it.session_id
            what = f"items[{k}]"
            if not 1 <= len(sid) <= MAX_SESSION_ID:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}.session_id must be 1..{MAX_SESSION_ID} characters")
            if sid in seen:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: session {sid!r} appears twice in one step")
            seen.add(sid)
            cache = self.sessions.get(sid)
            have = 0 if cache is None else cache.length
            if cache is None and it.position != 0:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"{what}: unknown session {sid!r} (released, or never started here)")
            if it.position != have:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{what}: session {sid!r} is at position {have} here, the step says {it.position}")
            limit = cache.max_len if cache is not None else it.max_tokens
            if cache is None and not 1 <= it.max_tokens <= spec.max_context:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{what}.max_tokens {it.max_tokens} must be in [1, {spec.max_context}] for a new session")
            room = limit - have
            kind = it.WhichOneof("input")
            if shard.embed is not None:
                if kind != "token_ids":
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: the first stage takes token_ids")
                x = decode_tensor(it.token_ids, f"{what}.token_ids", pb.INT64, rank=1, max_elems=max(room, 0))
                if x.numel() == 0:
                    raise WireError(f"{what}.token_ids is empty")
                if int(x.min()) < 0 or int(x.max()) >= shard.vocab:
                    raise WireError(f"{what}.token_ids must be in [0, {shard.vocab})")
            else:
                if kind != "hidden":
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: this stage takes hidden states")
                if room < 1:
                    raise WireError(f"{what}: session {sid!r} is full ({limit} tokens)")
                x = decode_activation(it.hidden, f"{what}.hidden", shard.dims.hidden, room)
            if x.shape[0] > room:
                raise WireError(f"{what}: {x.shape[0]} tokens at position {have} would pass the session's {limit}")
            sp = it.sampling
            if shard.head is not None and (not sp.temperature >= 0 or not 0 <= sp.top_p <= 1):
                raise WireError(f"{what}.sampling: temperature must be >= 0 and top_p in [0, 1]")
            if cache is None:
                new_bytes += KVCache.size_bytes(len(shard.stage.layers), shard.dims, it.max_tokens)
            items.append(_Item(sid, x, it.max_tokens, float(sp.temperature), float(sp.top_p) or 1.0, int(sp.seed),
                               int(it.step)))
        used = self._kv_used()
        if used + new_bytes > spec.kv_budget_bytes:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"KV cache full: {used:,} bytes in use + {new_bytes:,} for new sessions > budget "
                         f"{spec.kv_budget_bytes:,}; retry after other sessions finish")
        return items

    def Forward(self, request: pb.ForwardRequest, context):
        def run():
            with self.lock:
                if self.shard is None or self.spec is None:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded; call LoadShard first")
                shard, spec = self.shard, self.spec
                items = self._parse(request, shard, spec)
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the step started")
                t0 = time.perf_counter()
                for it in items:
                    if it.session_id not in self.sessions:
                        self.sessions[it.session_id] = shard.stage.new_cache(it.max_tokens)
                caches = [self.sessions[it.session_id] for it in items]
                with torch.inference_mode():
                    hs = [shard.embed(it.x) if shard.embed is not None else it.x for it in items]
                    outs = shard.stage.forward_batch(hs, caches)
                    results = []
                    if shard.head is not None:
                        logits = shard.head(torch.stack([o[-1] for o in outs]))  # [B, V]
                        for it, lg in zip(items, logits):
                            tok = pick_token(lg, it.temperature, it.top_p, it.seed, it.step)
                            results.append(pb.StepResult(session_id=it.session_id, token=tok))
                    else:
                        for it, o in zip(items, outs):
                            results.append(pb.StepResult(session_id=it.session_id,
                                                         hidden=encode_activation(o, request.quantize_output)))
                return pb.ForwardResponse(results=results, compute_ms=(time.perf_counter() - t0) * 1e3)
        return self._run(context, run)

    def Release(self, request: pb.ReleaseRequest, context):
        if len(request.session_ids) > 4 * MAX_ITEMS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {4 * MAX_ITEMS} sessions per Release")
        with self.lock:
            n = sum(self.sessions.pop(s, None) is not None for s in request.session_ids)
        return pb.ReleaseResponse(released=n)

    def Profile(self, request, context):
        p = self.profile
        return pb.NodeProfile(node_id=p.node_id, tier=p.tier, cpu_total_bytes=p.cpu_total_bytes,
                              cpu_available_bytes=p.cpu_available_bytes, gpu_total_bytes=p.gpu_total_bytes,
                              gpu_available_bytes=p.gpu_available_bytes, budget_bytes=p.budget_bytes,
                              int8_gops=p.int8_gops, cores=p.cores)

    def Health(self, request, context):
        with self.lock:
            spec = self.spec
            return pb.WorkerHealthResponse(placement_id=spec.placement_id if spec else "", sessions=len(self.sessions),
                                           kv_bytes_used=self._kv_used(), kv_budget_bytes=spec.kv_budget_bytes if spec else 0)


def start_worker_server(profile: NodeProfile, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.Server, int, WorkerServicer]:
    """Starts a WorkerService on host:port (0: any free port) -> (server, port, servicer)."""
    servicer = WorkerServicer(profile)
    server, bound = start_server(pb_grpc.add_WorkerServiceServicer_to_server, servicer, "WorkerService", host, port, 8)
    return server, bound, servicer
