"""The gRPC WorkerService: one per node, hosting one shard and the KV caches of its sessions.

Every request is validated before any state changes; bad input gets INVALID_ARGUMENT, an unknown
session NOT_FOUND, a full KV cache RESOURCE_EXHAUSTED, a request for another placement
FAILED_PRECONDITION, always with a message (workers/steps.py validates). Forward steps run one at
a time (a lock): the kernels already use every core of the node, and the front end batches concurrent
sessions into one step. Relayed steps travel on workers/relay.py's plumbing; MoE experts live in
workers/moe.py, deciding residency through workers/residency.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import grpc
import torch

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security
from protos.serving import start_server
from quant.checkpoint import read_manifest
from quant.generate import pick_token
from quant.manifest import ShardRange

from .awake import KeepAwake
from .llama_stage import KVCache
from .moe import ExpertStore, MoERunner, expert_forward
from .moe_node import MoENode
from .profile import NodeProfile
from .relay import MAX_RELAY_ID, Relays
from .route_stats import StatsRecorder
from .shard import LoadedShard, load_shard
from .steps import MAX_ITEMS, MAX_SESSION_ID, Refused, RouteShape, StepItem, check_placement, parse_step, refusal_status
from .wire import WireError, decode_tensor, encode_activation, encode_tensor, next_stage_items

__all__ = ["WorkerServicer", "start_worker_server", "MAX_ITEMS", "MAX_SESSION_ID"]

log = logging.getLogger("edgeweave.worker")

MAX_STREAMS = 4  # open ForwardStream calls per worker; each holds one of the server's threads
SERVER_THREADS = 12  # streams and subscriptions at their bounds leave 4 for unary calls and health
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$")


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, profile: NodeProfile, security: Security | None = None) -> None:
        self.profile, self.security = profile, security or Security()
        self.shard: LoadedShard | None = None
        self.spec: pb.ShardSpec | None = None
        self.sessions: dict[str, KVCache] = {}
        self.awake: KeepAwake | None = None  # keeps the cores from halting while steps arrive (ShardSpec.keep_awake)
        self.lock = threading.Lock()  # guards shard, sessions and the compute
        # MoE (docs/moe.md)
        self.moe: MoENode | None = None
        self.store: ExpertStore | None = None  # the moe node's, or None for a dense shard
        self.runner: MoERunner | None = None
        self.recorder: StatsRecorder | None = None
        self.map_version = 0
        self.last_route: dict[str, list] = {}  # session -> its last token's route (t1 statistics, prefetch)
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)  # open ForwardStream calls
        # relayed steps (docs/runtime.md, "Hop pattern"): the front ends' Subscribe queues by relay id,
        # and the stream to the next stage (workers/relay.py)
        self.relays = Relays(self.security)

    # ------------------------------------------------------------------ helpers
    def _run(self, context: grpc.ServicerContext, fn):
        try:
            return fn()
        except (Refused, ValueError, FileNotFoundError) as e:
            status = refusal_status(e)
            assert status is not None
            context.abort(*status)

    def _kv_used(self) -> int:
        return sum(c.nbytes for c in self.sessions.values())

    # ------------------------------------------------------------------ RPCs
    def LoadShard(self, request: pb.LoadShardRequest, context):
        def run():
            s = request.shard
            if not s.checkpoint or not s.placement_id:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "shard.checkpoint and shard.placement_id are required")
            if s.max_context < 1 or s.max_context > 1 << 20:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"shard.max_context {s.max_context} is not in [1, 2^20]")
            if s.next_stage and (s.head or not _ADDRESS.match(s.next_stage)):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                             f"shard.next_stage {s.next_stage[:300]!r} must be host:port, and empty on the last stage")
            t0 = time.perf_counter()
            if s.threads:
                torch.set_num_threads(int(s.threads))
            manifest = read_manifest(s.checkpoint)
            moe = MoENode(s, manifest, self.security) if manifest.moe else None
            t0 = time.monotonic()
            log.warning("loading layers %d-%d of %s", s.first_layer, s.last_layer - 1, s.checkpoint)
            shard = load_shard(s.checkpoint, ShardRange(s.first_layer, s.last_layer, s.embed, s.head), s.max_context,
                               moe=moe.runner.hook if moe else None, manifest=manifest)
            log.warning("loaded layers %d-%d: %.2f GB of weights in %.1f s", s.first_layer, s.last_layer - 1,
                        shard.weight_bytes / 1e9, time.monotonic() - t0)
            with self.lock:
                if self.moe is not None:
                    self.moe.close()
                self.shard, self.spec, self.sessions = shard, s, {}
                if self.awake is not None:
                    self.awake.release()
                self.awake = KeepAwake() if s.keep_awake else None
                self.moe, self.map_version, self.last_route = moe, 0, {}
                self.store, self.runner, self.recorder = (moe.store, moe.runner, moe.recorder) if moe else (None, None, None)
                self.relays.end_all()  # they served the previous placement
                if moe is not None:
                    moe.start()
            log.info("loaded layers [%d, %d) embed=%s head=%s for %s (%d bytes)", s.first_layer, s.last_layer,
                     s.embed, s.head, s.placement_id, shard.weight_bytes)
            return pb.LoadShardResponse(weight_bytes=shard.weight_bytes, load_seconds=time.perf_counter() - t0)
        return self._run(context, run)

    # ------------------------------------------------------------------ MoE
    def _expert_state(self, placement_id: str) -> tuple[ExpertStore, pb.ShardSpec]:
        store, spec = self.store, self.spec
        if store is None or spec is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no experts")
        check_placement(placement_id, spec)
        return store, spec

    def ExpertForward(self, request: pb.ExpertRequest, context):
        def run():
            store, spec = self._expert_state(request.placement_id)
            if (request.layer, request.expert) not in store.units:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"expert {request.expert} of layer {request.layer} is not held here")
            assert self.shard is not None
            d = self.shard.dims.hidden
            x = decode_tensor(request.hidden, "hidden", pb.FLOAT32, rank=2, max_elems=MAX_ITEMS * spec.max_context * d)
            if x.shape[1] != d or x.shape[0] < 1:
                raise WireError(f"hidden must be [t >= 1, {d}], got {list(x.shape)}")
            w = store.weights(request.layer, request.expert, x.shape[0])
            with torch.inference_mode():
                y = expert_forward(w, x.to(w.gate_up.device)).to("cpu").float()
            return pb.ExpertResponse(output=encode_tensor(y))
        return self._run(context, run)

    def SetExpertTiers(self, request: pb.ExpertTierMap, context):
        def run():
            with self.lock:  # between steps: a step never sees its experts change tier
                store, _ = self._expert_state(request.placement_id)
                if request.version <= self.map_version:
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"expert map version {request.version} is not newer than {self.map_version}")
                for lx in request.fast:
                    bad = [e for e in lx.experts if (lx.layer, e) not in store.units]
                    if bad or len(lx.experts) > store.slots:
                        raise WireError(f"layer {lx.layer}: experts {bad or list(lx.experts)} are not held here "
                                        f"or exceed the {store.slots} fast slots")
                moved = nbytes = 0
                for lx in request.fast:
                    m, b = store.set_resident(lx.layer, list(lx.experts))
                    moved, nbytes = moved + m, nbytes + b
                self.map_version = request.version
                return pb.ExpertTierResponse(version=self.map_version, moved=moved, bytes_moved=nbytes)
        return self._run(context, run)

    def Forward(self, request: pb.ForwardRequest, context):
        return self._run(context, lambda: self._forward(request, context))

    def ForwardStream(self, request_iterator, context):
        """Forward steps over one long-lived call (one response per request, in order). A refused
        step ends the stream with Forward's status. Streams hold a server thread each, so at most
        MAX_STREAMS are open; the rest of the pool stays free for unary calls and health checks."""
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_STREAMS} ForwardStream calls are already open on this worker; use Forward")
        try:
            for request in request_iterator:
                if request.relay_id:
                    self._relay(request, context)  # answered further down the chain, or on Subscribe
                else:
                    yield self._run(context, lambda: self._forward(request, context))
        finally:
            self._streams.release()

    # ------------------------------------------------------------------ relayed steps (chain)
    def _relay(self, request: pb.ForwardRequest, context) -> None:
        """Runs a relayed step and passes its output on: to the next stage's ForwardStream, or, on
        the last stage, to the front end's Subscribe call. A refusal is reported on this stage's
        Subscribe call; without one the stream ends with the status, as an unrelayed step's would."""
        rid, seq = request.relay_id, request.relay_seq
        try:
            if len(rid) > MAX_RELAY_ID:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"relay_id must be 1..{MAX_RELAY_ID} characters")
            if len(request.stage_ms) > 64:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "stage_ms lists more than 64 stages")
            resp, spec = self._forward_spec(request, context)
            stage_ms = [*request.stage_ms, resp.compute_ms]
            if spec.head:
                self.relays.deliver(rid, pb.RelayEvent(seq=seq, result=resp, stage_ms=stage_ms,
                                                 relay_bytes=request.relay_bytes), context)
                return
            if not spec.next_stage:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "this stage has no next stage (ShardSpec.next_stage): step it without relay_id")
            nxt = pb.ForwardRequest(placement_id=request.placement_id,
                                    items=next_stage_items(request.items, resp.results),
                                    quantize_output=request.quantize_output, relay_id=rid, relay_seq=seq,
                                    stage_ms=stage_ms)
            nxt.relay_bytes = request.relay_bytes + nxt.ByteSize() + 10  # the field itself: at most 10 bytes
            self.relays.pass_on(spec.next_stage, rid, seq, nxt)
        except (Refused, ValueError, FileNotFoundError) as e:
            status = refusal_status(e)
            assert status is not None
            self.relays.deliver(rid, pb.RelayEvent(seq=seq, error_code=status[0].value[0], error=status[1]), context,
                                abort_with=status)

    def Subscribe(self, request: pb.SubscribeRequest, context):
        """The front end's end of relayed steps: a ready event (seq 0), then the results (last stage)
        and failures (any stage) of relayed steps with this relay id, until the call ends or a new
        shard is loaded."""
        rid = request.relay_id
        if not 1 <= len(rid) <= MAX_RELAY_ID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"relay_id must be 1..{MAX_RELAY_ID} characters")
        with self.lock:
            spec = self.spec
        try:
            if spec is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded; call LoadShard first")
            check_placement(request.placement_id, spec)
        except Refused as e:
            context.abort(e.code, e.message)
        assert spec is not None  # context.abort raised otherwise
        yield from self.relays.subscribe(rid, pb.RelayEvent(seq=0, can_relay=bool(spec.head or spec.next_stage),
                                                             next_stage=spec.next_stage), context)

    def _forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        if request.relay_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "relayed steps (relay_id) go over ForwardStream")
        return self._forward_spec(request, context)[0]

    def _forward_spec(self, request: pb.ForwardRequest, context) -> tuple[pb.ForwardResponse, pb.ShardSpec]:
        """-> the step's response and the spec of the shard that ran it."""
        with self.lock:
            if self.shard is None or self.spec is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded; call LoadShard first")
            shard, spec = self.shard, self.spec
            route_shape = RouteShape(self.runner.k, self.runner.n_experts) if self.runner is not None else None
            items = parse_step(request, shard, spec, self.sessions, self._kv_used(), route_shape)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the step started")
            t0 = time.perf_counter()
            if self.awake is not None:
                self.awake.touch()
            for it in items:
                if it.session_id not in self.sessions:
                    self.sessions[it.session_id] = shard.stage.new_cache(it.max_tokens)
            caches = [self.sessions[it.session_id] for it in items]
            runner = self.runner
            if runner is not None:
                known, prev = [], []
                first = shard.range.first
                for it in items:
                    for t in range(it.x.shape[0]):
                        r = it.route[t].tolist() if it.route is not None else []
                        known.append({first - len(r) + j: tuple(r[j]) for j in range(len(r))})
                        prev.append(self.last_route.get(it.session_id))
                runner.begin_step(known, prev)
            with torch.inference_mode():
                hs = [shard.embed(it.x) if shard.embed is not None else it.x for it in items]
                outs = shard.stage.forward_batch(hs, caches)
                routes = self._end_moe_step(items, shard) if runner is not None else None
                results = []
                if shard.head is not None:
                    logits = shard.head(torch.stack([o[-1] for o in outs]))  # [B, V]
                    for it, lg in zip(items, logits):
                        tok = pick_token(lg, it.temperature, it.top_p, it.seed, it.step)
                        results.append(pb.StepResult(session_id=it.session_id, token=tok))
                else:
                    for j, (it, o) in enumerate(zip(items, outs)):
                        results.append(pb.StepResult(session_id=it.session_id,
                                                     hidden=encode_activation(o, request.quantize_output)))
                        route = routes[j] if routes is not None else None
                        if route is not None:
                            results[-1].route.CopyFrom(route)
            return pb.ForwardResponse(results=results, compute_ms=(time.perf_counter() - t0) * 1e3), spec

    def _end_moe_step(self, items: list[StepItem], shard: LoadedShard) -> list[pb.Tensor | None]:
        """Records the step's routes; -> per item, the route tensor for the next stage."""
        assert self.runner is not None
        rows = self.runner.end_step()
        last, k = shard.range.last, self.runner.k
        out: list[pb.Tensor | None] = []
        at = 0
        for it in items:
            mine = rows[at: at + it.x.shape[0]]
            at += it.x.shape[0]
            if mine:
                self.last_route[it.session_id] = mine[-1]
            layers = [l for l in (last - 2, last - 1) if l >= 0 and all(r[l] is not None for r in mine)]
            if not layers:
                out.append(None)
                continue
            t = torch.tensor([[list(r[l] or ()) for l in layers] for r in mine], dtype=torch.int32)
            t = t.view(len(mine), len(layers), k)  # [T, R, k]
            out.append(encode_tensor(t))
        return out

    def Release(self, request: pb.ReleaseRequest, context):
        if len(request.session_ids) > 4 * MAX_ITEMS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {4 * MAX_ITEMS} sessions per Release")
        with self.lock:
            n = sum(self.sessions.pop(s, None) is not None for s in request.session_ids)
            for s in request.session_ids:
                self.last_route.pop(s, None)
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
            resp = pb.WorkerHealthResponse(placement_id=spec.placement_id if spec else "", sessions=len(self.sessions),
                                           kv_bytes_used=self._kv_used(), kv_budget_bytes=spec.kv_budget_bytes if spec else 0)
            if self.store is not None:
                c = self.store.counters()
                resp.expert_map_version, resp.expert_hits, resp.expert_misses = self.map_version, c.hits, c.misses
                resp.expert_moves, resp.expert_bytes_moved = c.moves, c.bytes_moved
                if self.recorder is not None:
                    rc = self.recorder.counters()
                    resp.stats_recorded, resp.stats_flushed = rc.recorded, rc.flushed
                    resp.stats_buffered, resp.stats_lost = rc.buffered, rc.lost
                for layer in sorted({l for l, _ in self.store.units}):
                    resp.fast.add(layer=layer, experts=sorted(self.store.resident(layer)))
            return resp


def start_worker_server(profile: NodeProfile, host: str = "127.0.0.1", port: int = 0,
                        security: Security | None = None) -> tuple[grpc.Server, int, WorkerServicer]:
    """Starts a WorkerService on host:port (0: any free port) -> (server, port, servicer).
    With TLS configured and security.mutual, only clients with a certificate from the CA get in."""
    servicer = WorkerServicer(profile, security)
    server, bound, _ = start_server(pb_grpc.add_WorkerServiceServicer_to_server, servicer, "WorkerService", host, port,
                                    SERVER_THREADS, security, mutual=True)
    return server, bound, servicer
