"""The controller: a Ray actor that discovers nodes, places the model, starts and loads one worker
per chosen node, watches their health and serves InferenceService.

It composes the pieces that decide: Ray finds nodes and starts processes on them (ray_nodes.py),
the planner places the layers (planner.py), rollout.py says what each node loads, health.py decides
which nodes are out, replacement.py (through workers/residency.py) which experts are fast; the
engine (engine.py) runs the steps. The data path is gRPC.

Failures (docs/reliability.md): the engine calls `recover` when a stage fails a step. The controller
finds the dead nodes (Ray's view of the node, a gRPC health check with a deadline, and the failed
step's own status), bans them with growing backoff, plans again over the rest with a new placement
version, loads every shard of it and only then hands it to the engine, which replays its sessions.
Ray restarts a dead worker process (max_restarts=-1); the health loop probes banned nodes when their
ban ends, readmits those that answer, adopts nodes that join the Ray cluster, and asks the engine to
re-plan so they are used again.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, open_channel
from quant.checkpoint import read_manifest
from workers.profile import POOL_LABEL, NodeProfile
from workers.residency import HYSTERESIS
from workers.shard import check_servable

from .engine import Engine, EngineOptions, StageError, Unavailable
from .health import BanList, dead_nodes
from .planner import Placement, PlacementError, PlanOptions, plan
from .ray_nodes import ray_alive, ray_nodes, start_worker_actor
from .replacement import replacement_maps
from .rollout import RolloutOptions, held_units, nodes_of, shard_spec
from .service import InferenceServicer, start_inference_server

__all__ = ["ServeOptions", "Controller", "start_controller"]

log = logging.getLogger("edgeweave.controller")


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"  # where InferenceService listens
    port: int = 0  # 0: any free port
    context: int = 2048
    batch: int = 4
    prefill_chunk: int = 256
    hop_ms: float = 1.0
    quantize_wire: bool = False
    stream_steps: bool = True  # one ForwardStream per stage (False: a unary Forward per step and stage)
    relay: bool = True  # stages pass steps on to each other (a chain); False: the front end calls each (a star)
    pipeline_depth: int = 0  # relayed steps in flight at once, each for other sessions (0: auto_pipeline_depth)
    keep_awake: bool = True  # workers keep their cores from halting while steps arrive (workers/awake.py)
    pool: str = ""  # only the Ray nodes labelled edgeweave-pool=POOL ("": every node); several services, one cluster
    step_timeout_s: float = 30.0
    load_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0  # one health check's deadline
    health_patience_s: float = 10.0  # a second, longer check for a node Ray still reports alive
    # MoE checkpoints (docs/moe.md)
    fast_slots: int = 0  # experts per layer in each node's fast tier (0: half)
    remote_experts: int = 0  # experts per layer placed on another node than their layer
    redis_url: str = ""  # "" : $EDGEWEAVE_REDIS_URL, else a private Redis server started here
    prefetch: bool = True
    replace_interval_s: float = 5.0  # how often the controller revises the fast tiers from the statistics
    replace_hysteresis: float = HYSTERESIS  # log-count margin a cold expert needs to displace a resident one
    security: Security = field(default_factory=Security)  # TLS and token for every server and channel

    def __post_init__(self) -> None:
        if isinstance(self.security, dict):  # crossed a process boundary as a dict (asdict)
            object.__setattr__(self, "security", Security(**self.security))


def _log_placement(p: Placement) -> None:
    log.info("placement %s: %s", p.placement_id, [(s.node_id[:8], s.first, s.last) for s in p.stages])


class Controller:
    """Wrapped with ray.remote by start_controller."""

    def __init__(self, options: dict) -> None:
        import ray
        from transformers import AutoTokenizer

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.opts = opts = ServeOptions(**options)
        self.sec = opts.security
        self.root = root = Path(opts.checkpoint).resolve()
        self.manifest = read_manifest(root)
        check_servable(self.manifest)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.my_ip = ray.util.get_node_ip_address()
        self.workers: dict[str, Any] = {}
        self.cores: dict[str, int] = {}
        self.addresses: dict[str, str] = {}
        self.profile_of: dict[str, NodeProfile] = {}
        self.channels: dict[str, tuple[str, grpc.Channel]] = {}  # node -> (address, channel)
        self.bans = BanList()
        self._lock = threading.RLock()  # placement, addresses, channels, bans
        nodes = ray_nodes(opts.pool)
        if not nodes:
            raise ValueError(f"no alive Ray node is labelled {POOL_LABEL}={opts.pool} (ray start --labels)" if opts.pool
                             else "the Ray cluster has no alive node")
        for n in nodes:
            self._adopt(n)  # one at a time: nodes sharing a machine do not disturb each other's measurement
        self.popts = PlanOptions(context=opts.context, batch=opts.batch, prefill_chunk=opts.prefill_chunk,
                                 hop_ms=opts.hop_ms, fast_slots=opts.fast_slots, remote_experts=opts.remote_experts)
        self.placement = plan(self.manifest, list(self.profile_of.values()), self.popts, model=str(root))
        _log_placement(self.placement)
        self.moe = self.manifest.moe
        self.model_name = root.name
        self.redis_server, self.redis_url = self._start_redis()
        self.rollout = RolloutOptions(str(root), opts.keep_awake, opts.prefetch, self.redis_url, self.model_name,
                                      self.moe.experts if self.moe else 0)
        self.map_version = 0
        self.replacements = 0
        failed = self._load(self.placement)
        if failed:
            raise RuntimeError(f"loading the shards failed: {failed}")
        self.health_servicer = None  # set below; recover() cannot run before a request or a re-plan
        self.engine = Engine(self.placement, self.worker_addresses(),
                             {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set(),
                             EngineOptions(opts.step_timeout_s, opts.prefill_chunk, opts.quantize_wire,
                                           stream_steps=opts.stream_steps, relay=opts.relay,
                                           pipeline_depth=opts.pipeline_depth),
                             recover=self.recover, security=self.sec)
        self.server, self.port, self.health_servicer = start_inference_server(
            InferenceServicer(lambda: self.engine, self.tokenizer, root.name), opts.host, opts.port, security=self.sec)
        self.health: dict[str, str] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="edgeweave-health", daemon=True).start()
        if self.moe and opts.replace_interval_s > 0:
            threading.Thread(target=self._replace_loop, name="edgeweave-replace", daemon=True).start()

    def _start_redis(self):
        """MoE statistics: the user's Redis (--redis-url, $EDGEWEAVE_REDIS_URL), else a private one
        -> (the private server or None, the URL); ("" without MoE)."""
        if not self.moe:
            return None, ""
        from .redis_server import RedisServer, default_url

        url = self.opts.redis_url or default_url() or ""
        if url:
            return None, url
        server = RedisServer().start()
        log.info("started a private Redis server at %s", server.url)
        return server, server.url

    # ------------------------------------------------------------------ nodes
    def _adopt(self, n: dict, timeout_s: float = 120.0) -> None:
        """Starts a worker actor on Ray node n (pinned), waits for its server and profile."""
        import ray

        node_id, tier, cores, actor = start_worker_actor(n, self.my_ip, self.sec)
        address = ray.get(actor.start.remote(), timeout=timeout_s)
        profile = NodeProfile(**ray.get(actor.node_profile.remote(), timeout=timeout_s))
        with self._lock:
            self.workers[node_id], self.cores[node_id] = actor, cores
            self.addresses[node_id], self.profile_of[node_id] = address, profile
        log.info("node %s (%s) joined: worker at %s, budget %d bytes", node_id[:8], tier, address, profile.budget_bytes)

    def _channel(self, node_id: str) -> grpc.Channel:
        """The node's worker channel, opened again when its worker moved (a restart gets a new port)."""
        with self._lock:
            addr = self.addresses[node_id]
            have = self.channels.get(node_id)
            if have is None or have[0] != addr:
                if have is not None:
                    have[1].close()
                have = self.channels[node_id] = (addr, open_channel(addr, self.sec))
            return have[1]

    def _stub(self, node_id: str) -> pb_grpc.WorkerServiceStub:
        return pb_grpc.WorkerServiceStub(self._channel(node_id))

    @property
    def nodes_used(self) -> list[str]:
        return nodes_of(self.placement)

    def _check(self, node_id: str, timeout_s: float) -> grpc.StatusCode:
        """The worker's standard gRPC health check (no token needed) -> OK when it answers SERVING
        within the deadline; UNAVAILABLE when it is not serving or unknown; else the RPC's code
        (DEADLINE_EXCEEDED: a live but slow process; UNAVAILABLE: refused, the process is gone)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if node_id not in self.addresses:
            return grpc.StatusCode.UNAVAILABLE
        try:
            r = health_pb2_grpc.HealthStub(self._channel(node_id)).Check(health_pb2.HealthCheckRequest(service=""),
                                                                         timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK if r.status == health_pb2.HealthCheckResponse.SERVING else grpc.StatusCode.UNAVAILABLE

    def _answers(self, node_id: str, patient: bool = False) -> bool:
        """One health check; patient: when it only ran out of time (the process is there but busy,
        say a loaded machine), a second check with health_patience_s decides. A refused connection
        fails at once either way, so a node that is really gone is taken out without waiting."""
        code = self._check(node_id, self.opts.health_timeout_s)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and patient:
            log.info("node %s slow to answer a health check; giving it %.0fs", node_id[:8], self.opts.health_patience_s)
            code = self._check(node_id, self.opts.health_patience_s)
        return code == grpc.StatusCode.OK

    def _find_dead(self, nodes: list[str], err: StageError | None,
                   alive: set[str] | None = None) -> dict[str, str]:
        """node -> why it is taken out (health.dead_nodes on a fresh snapshot). alive: Ray's alive
        nodes when the caller has just read them."""
        alive = ray_alive() if alive is None else alive
        with self._lock:
            suspect = next((n for n, a in self.addresses.items() if err is not None and a == err.address), None)
        answers = {n: self._answers(n, patient=True) for n in nodes if alive is None or n in alive}
        return dead_nodes(nodes, alive, answers, suspect, err is not None and err.code == grpc.StatusCode.DEADLINE_EXCEEDED,
                          self.opts.step_timeout_s)

    def _take_out(self, dead: dict[str, str]) -> bool:
        """Bans each node (with its reason) so no placement uses it until it answers again -> any?"""
        for n, why in dead.items():
            with self._lock:
                b = self.bans.ban(n, time.monotonic(), why)
            log.warning("node %s taken out for %.0fs: %s", n[:8], b.backoff_s, why)
        return bool(dead)

    # ------------------------------------------------------------------ placement
    def recover(self, err: StageError | None) -> tuple[Placement, list[str]]:
        """Called by the engine between steps: a stage failed (err) or a re-plan was requested.
        Bans the dead nodes, plans over the rest with a new version and loads it completely
        -> (placement, stage addresses). Raises Unavailable when the rest cannot hold the model."""
        if err is not None:
            with self._lock:
                down = self.bans.down(time.monotonic())
            self._take_out(self._find_dead([n for n in self.nodes_used if n not in down], err))
        for _ in range(len(self.workers) + 1):
            with self._lock:
                down = self.bans.down(time.monotonic())
                live = [p for n, p in self.profile_of.items() if n not in down]
                popts = replace(self.popts, version=self.placement.version + 1)
            try:
                placement = plan(self.manifest, live, popts, model=str(self.root))
            except PlacementError as e:
                self._serving(False)
                gone = ", ".join(f"{n[:8]} ({why})" for n, why in down.items()) or "none"
                raise Unavailable(f"nodes down: {gone}; the {len(live)} remaining cannot hold the model: {e}. "
                                  f"Requests fail until a node returns or joins") from e
            failed = self._load(placement)
            if not failed:
                with self._lock:
                    self.placement = placement
                self._serving(True)
                _log_placement(placement)
                return placement, self.worker_addresses()
            self._take_out({n: f"loading its shard failed: {why}" for n, why in failed.items()})
        raise Unavailable("no placement could be loaded: every attempt lost a node")

    def _serving(self, ok: bool) -> None:
        from grpc_health.v1 import health_pb2

        if self.health_servicer is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", pb.DESCRIPTOR.services_by_name["InferenceService"].full_name):
            self.health_servicer.set(name, status)

    def _load(self, placement: Placement) -> dict[str, str]:
        """Loads every shard of the placement (in parallel) -> {node: error} for those that failed."""
        def load(node_id: str) -> str:
            try:
                spec = shard_spec(placement, node_id, self.addresses, self.cores[node_id], self.rollout)
                r = self._stub(node_id).LoadShard(pb.LoadShardRequest(shard=spec), timeout=self.opts.load_timeout_s)
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"
            log.info("node %s loaded its shard for %s: %d bytes in %.1fs", node_id[:8], placement.placement_id,
                     r.weight_bytes, r.load_seconds)
            return ""

        nodes = nodes_of(placement)
        with ThreadPoolExecutor(len(nodes)) as ex:
            return {n: e for n, e in zip(nodes, ex.map(load, nodes)) if e}

    # ------------------------------------------------------------------ MoE replacement
    def replace_now(self) -> dict:
        """One replacement round: read the statistics, choose each fast tier (replacement.py), send the
        maps that changed as a new version -> {node id: {layer: experts}} of what was sent."""
        from workers.route_stats import connect, read_stats

        assert self.moe is not None
        client = connect(self.redis_url)
        try:
            st = read_stats(client, self.model_name, self.placement.layers, self.moe.experts)
        finally:
            client.close()
        health = self._worker_health()
        fast = {n: {lx.layer: list(lx.experts) for lx in h.fast} for n, h in health.items()}
        held = {n: held_units(self.placement, n, self.moe.experts) for n in health}
        sent = replacement_maps(st, fast, held, self.placement.fast_slots, self.opts.replace_hysteresis)
        for n, layers in sent.items():
            self.map_version += 1
            changed = [pb.LayerExperts(layer=l, experts=e) for l, e in layers.items()]
            self._stub(n).SetExpertTiers(pb.ExpertTierMap(placement_id=self.placement.placement_id,
                                                          version=self.map_version, fast=changed), timeout=30.0)
            self.replacements += 1
            log.info("expert map v%d for node %s: %s", self.map_version, n[:8], layers)
        return sent

    def _replace_loop(self) -> None:
        while not self._stop.wait(self.opts.replace_interval_s):
            try:
                self.replace_now()
            except Exception as e:  # Redis or a worker away: keep the tiers as they are, try again later
                log.warning("expert replacement skipped: %s", e)

    def _worker_health(self) -> dict[str, pb.WorkerHealthResponse]:
        return {n: self._stub(n).Health(pb.WorkerHealthRequest(), timeout=5.0) for n in self.nodes_used}

    def expert_state(self) -> dict:
        """Per node: fast tier per layer, counters, map version (from the workers)."""
        out = {}
        for n, h in self._worker_health().items():
            out[n] = {"fast": {lx.layer: list(lx.experts) for lx in h.fast}, "hits": h.expert_hits,
                      "misses": h.expert_misses, "moves": h.expert_moves, "bytes_moved": h.expert_bytes_moved,
                      "map_version": h.expert_map_version}
        return out

    def worker_stats(self) -> dict:
        """Per node: the activation-path counts its recorder holds (recorded, flushed, buffered, lost)."""
        out = {}
        for n, h in self._worker_health().items():
            out[n] = {"stats_recorded": h.stats_recorded, "stats_flushed": h.stats_flushed,
                      "stats_buffered": h.stats_buffered, "stats_lost": h.stats_lost}
        return out

    def redis_address(self) -> str:
        return self.redis_url

    def _watch(self) -> None:
        """Every health_interval_s: takes out nodes that stopped answering (placed ones before a
        request trips on them, idle ones before a re-plan counts on them), probes banned nodes whose
        ban is over, adopts nodes that joined Ray; asks the engine to re-plan when the set of usable
        nodes changed."""
        while not self._stop.wait(self.opts.health_interval_s):
            try:
                if self._check_nodes():
                    self.engine.request_replan()
            except Exception as e:  # keep watching whatever went wrong this round
                log.warning("health round failed: %s", e)

    def _check_nodes(self) -> bool:
        import ray

        now = time.monotonic()
        with self._lock:
            down = self.bans.down(now)
            known = [n for n in self.workers if n not in down]  # idle spares too: a re-plan counts on them
            expired = self.bans.expired(now)
        alive = ray_alive()
        changed = self._take_out(self._find_dead(known, None, alive))
        alive = alive or set()
        for n in expired:  # a restarted worker actor starts a new server on this call
            try:
                addr = ray.get(self.workers[n].start.remote(), timeout=5.0) if n in alive else ""
            except Exception:
                addr = ""
            with self._lock:
                if addr:
                    self.addresses[n] = addr
            if addr and self._answers(n):
                with self._lock:
                    self.bans.readmit(n)
                log.info("node %s is back (worker at %s)", n[:8], addr)
                changed = True
            else:
                with self._lock:
                    self.bans.extend(n, time.monotonic())
        for node in ray_nodes(self.opts.pool):
            if node["NodeID"] not in self.workers:
                try:
                    self._adopt(node)
                    changed = True
                except Exception as e:
                    log.warning("node %s could not join: %s", node["NodeID"][:8], e)
        with self._lock:
            self.health = {n: ("ok" if n in self.nodes_used else "idle") for n in self.workers}
            self.health.update({n: f"down ({why})" for n, why in self.bans.down(time.monotonic()).items()})
        return changed or (bool(self.engine.unavailable) and bool(expired))

    # ------------------------------------------------------------------ queried by drivers
    def address(self) -> str:
        return f"{self.opts.host}:{self.port}"

    def placement_dict(self) -> dict:
        return self.placement.to_dict()

    def worker_addresses(self) -> list[str]:
        with self._lock:
            return [self.addresses[s.node_id] for s in self.placement.stages]

    def worker_pids(self) -> dict[str, int]:
        """node id -> pid of its worker process (bench/chaos.py kills one)."""
        import ray

        return {n: ray.get(self.workers[n].pid.remote(), timeout=10.0) for n in self.nodes_used}

    def stats(self) -> dict:
        st = self.engine.stats
        med = [statistics.median(x) if x else None for x in st.hop_overhead_ms]
        comp = [statistics.median(x) if x else None for x in st.compute_ms]
        return {"steps": st.steps, "tokens": st.tokens, "wire_bytes": st.wire_bytes,
                "hop_overhead_ms_median": med, "compute_ms_median": comp, "relayed": st.relayed,
                "overlapped_steps": st.overlapped_steps,
                "health": dict(self.health),
                "placement_id": self.placement.placement_id, "recoveries": st.recoveries,
                "recovery_s": list(st.recovery_s), "replayed_tokens": st.replayed_tokens,
                "unavailable": self.engine.unavailable, "replanning": self.engine.replanning}

    def reset_stats(self) -> None:
        st = self.engine.stats
        st.steps = st.tokens = st.wire_bytes = st.overlapped_steps = 0
        for x in (*st.hop_overhead_ms, *st.compute_ms):
            x.clear()

    def shutdown(self) -> None:
        self._stop.set()
        self.server.stop(grace=2.0)
        self.engine.close()
        with self._lock:
            for _, ch in self.channels.values():
                ch.close()
        if self.redis_server is not None:
            self.redis_server.close()


def start_controller(opts: ServeOptions):
    """Starts the controller actor on this driver's node and waits until it serves -> (handle, address)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    remote_controller: Any = ray.remote(num_cpus=0, max_concurrency=8)(Controller)  # type: ignore[call-overload]
    actor = remote_controller.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(asdict(opts))
    t0 = time.time()
    address = ray.get(actor.address.remote())
    log.info("serving on %s (ready in %.1fs)", address, time.time() - t0)
    return actor, address
