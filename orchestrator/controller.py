"""The controller: a Ray actor that discovers nodes, places the model, starts and loads one worker
per chosen node, watches their health and serves InferenceService.

Ray is used to find nodes and to start processes on them (node affinity); the data path is gRPC.
A node publishes its budget as Ray's `memory` resource and its tier as the `edgeweave-tier` label
(`ray start --memory ... --labels edgeweave-tier=cpu`); nodes without them get 80% of their
available memory and tier "cpu" ("gpu" when Ray sees a GPU).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from quant.checkpoint import read_manifest
from workers.shard import check_servable, moe_shape
from workers.wire import GRPC_OPTIONS

from .engine import Engine, EngineOptions
from .planner import Placement, PlanOptions, plan
from .profile import TIER_LABEL, NodeProfile
from .service import InferenceServicer, start_inference_server

__all__ = ["ServeOptions", "Controller", "start_controller", "node_offers"]

log = logging.getLogger("edgeweave.controller")

NODE_RESOURCE = "edgeweave_node"  # nodes started by `edgeweave up --local` carry it; others are used too


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
    step_timeout_s: float = 30.0
    load_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    # MoE checkpoints (docs/moe.md)
    fast_slots: int = 0  # experts per layer in each node's fast tier (0: half)
    remote_experts: int = 0  # experts per layer placed on another node than their layer
    redis_url: str = ""  # "" : $EDGEWEAVE_REDIS_URL, else a private Redis server started here
    prefetch: bool = True
    replace_interval_s: float = 5.0  # how often the controller revises the fast tiers from the statistics
    replace_hysteresis: float = 0.4  # log-count margin a cold expert needs to displace a resident one


def node_offers(node: dict) -> tuple[str, str, int | None, int]:
    """A ray.nodes() entry -> (node id, tier, budget bytes or None, cores)."""
    res, labels = node.get("Resources", {}), node.get("Labels", {}) or {}
    tier = labels.get(TIER_LABEL) or ("gpu" if res.get("GPU", 0) > 0 else "cpu")
    budget = int(res["memory"]) if res.get("memory") else None
    return node["NodeID"], tier, budget, max(int(res.get("CPU", 1)), 1)


class Controller:
    """Wrapped with ray.remote by start_controller."""

    def __init__(self, options: dict) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from transformers import AutoTokenizer

        from workers.actor import WorkerActor

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.opts = opts = ServeOptions(**options)
        root = Path(opts.checkpoint).resolve()
        self.manifest = read_manifest(root)
        check_servable(self.manifest)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        my_ip = ray.util.get_node_ip_address()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(NODE_RESOURCE in n.get("Resources", {}) for n in nodes):
            nodes = [n for n in nodes if NODE_RESOURCE in n.get("Resources", {})]
        remote_worker: Any = ray.remote(num_cpus=0, max_restarts=0)(WorkerActor)
        self.workers: dict[str, Any] = {}
        self.cores: dict[str, int] = {}
        for n in nodes:
            node_id, tier, budget, cores = node_offers(n)
            host = "127.0.0.1" if n["NodeManagerAddress"] == my_ip else n["NodeManagerAddress"]
            # Ray gives actors OMP_NUM_THREADS=1; the kernels should use the node's cores, and idle
            # OpenMP threads should not spin long (a machine may run several stages' processes).
            env = {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": "10000"}
            self.workers[node_id] = remote_worker.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                runtime_env={"env_vars": env}).remote(node_id, tier, budget, host)
            self.cores[node_id] = cores
        ids = list(self.workers)
        self.addresses: dict[str, str] = {i: ray.get(self.workers[i].start.remote()) for i in ids}  # one at a time
        self.profiles = [NodeProfile(**d) for d in ray.get([self.workers[i].node_profile.remote() for i in ids])]
        popts = PlanOptions(context=opts.context, batch=opts.batch, prefill_chunk=opts.prefill_chunk, hop_ms=opts.hop_ms,
                            fast_slots=opts.fast_slots, remote_experts=opts.remote_experts)
        self.placement = plan(self.manifest, self.profiles, popts, model=str(root))
        log.info("placement %s: %s", self.placement.placement_id,
                 [(s.node_id[:8], s.first, s.last) for s in self.placement.stages])
        self.moe = moe_shape(self.manifest)
        self.model_name = root.name
        self.redis_server = None
        self.redis_url = ""
        if self.moe:
            from .redis_stats import RedisServer, default_url

            self.redis_url = opts.redis_url or default_url() or ""
            if not self.redis_url:
                self.redis_server = RedisServer().start()
                self.redis_url = self.redis_server.url
                log.info("started a private Redis server at %s", self.redis_url)
        self.nodes_used = [s.node_id for s in self.placement.stages] + [
            h.node_id for h in self.placement.expert_hosts if h.node_id not in {s.node_id for s in self.placement.stages}]
        self.channels = {n: grpc.insecure_channel(self.addresses[n], options=GRPC_OPTIONS) for n in self.nodes_used}
        self.map_version = 0
        self.replacements = 0
        self._load(self.placement, root)
        self.engine = Engine(self.placement, [self.addresses[s.node_id] for s in self.placement.stages],
                             {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set(),
                             EngineOptions(opts.step_timeout_s, opts.prefill_chunk, opts.quantize_wire))
        self.server, self.port = start_inference_server(InferenceServicer(lambda: self.engine, self.tokenizer, root.name),
                                                        opts.host, opts.port)
        self.health: dict[str, str] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="edgeweave-health", daemon=True).start()
        if self.moe and opts.replace_interval_s > 0:
            threading.Thread(target=self._replace_loop, name="edgeweave-replace", daemon=True).start()

    def _spec(self, placement: Placement, root: Path, node_id: str) -> pb.ShardSpec:
        stage = next((s for s in placement.stages if s.node_id == node_id), None)
        spec = pb.ShardSpec(checkpoint=str(root), placement_id=placement.placement_id, max_context=placement.context,
                            threads=self.cores[node_id])
        if stage is not None:
            spec.first_layer, spec.last_layer, spec.embed, spec.head = stage.first, stage.last, stage.embed, stage.head
            spec.kv_budget_bytes = stage.kv_bytes
        if self.moe:
            remote = placement.remote_units()
            if stage is not None:
                for (layer, e), host in sorted(remote.items()):
                    if stage.first <= layer < stage.last:
                        spec.experts.add(layer=layer, expert=e, address=self.addresses[host])
            for (layer, e), host in sorted(remote.items()):
                if host == node_id:
                    spec.hosted.add(layer=layer, expert=e)
            spec.fast_slots, spec.redis_url, spec.model_name = placement.fast_slots, self.redis_url, self.model_name
            spec.prefetch = self.opts.prefetch
        return spec

    def _load(self, placement: Placement, root: Path) -> None:
        def load(node_id: str) -> pb.LoadShardResponse:
            return pb_grpc.WorkerServiceStub(self.channels[node_id]).LoadShard(
                pb.LoadShardRequest(shard=self._spec(placement, root, node_id)), timeout=self.opts.load_timeout_s)

        with ThreadPoolExecutor(len(self.nodes_used)) as ex:
            for n, r in zip(self.nodes_used, ex.map(load, self.nodes_used)):
                log.info("node %s loaded its shard: %d bytes in %.1fs", n[:8], r.weight_bytes, r.load_seconds)

    # ------------------------------------------------------------------ MoE replacement
    def held_units(self, node_id: str) -> set[tuple[int, int]]:
        assert self.moe is not None
        remote = self.placement.remote_units()
        stage = next((s for s in self.placement.stages if s.node_id == node_id), None)
        own = {(l, e) for l in range(stage.first, stage.last) for e in range(self.moe[0])} if stage else set()
        return {u for u in own if u not in remote} | {u for u, h in remote.items() if h == node_id}

    def replace_now(self) -> dict:
        """One replacement round: read the statistics, choose each fast tier (hysteresis), send the
        maps that changed as a new version -> {node id: {layer: experts}} of what was sent."""
        import numpy as np

        from .experts import choose_resident
        from .redis_stats import connect, read_stats

        assert self.moe is not None
        client = connect(self.redis_url)
        try:
            st = read_stats(client, self.model_name, self.placement.layers, self.moe[0])
        finally:
            client.close()
        sent: dict = {}
        for n, h in self._worker_health().items():
            held = self.held_units(n)
            changed = []
            for lx in h.fast:
                counts = st.act[lx.layer]
                if counts.sum() == 0:
                    continue
                scores = np.log(counts + 1.0)
                cur = frozenset(int(e) for e in lx.experts)
                new = choose_resident(scores, cur, self.placement.fast_slots or len(cur), self.opts.replace_hysteresis,
                                      allowed=[e for l, e in held if l == lx.layer])
                if new != cur:
                    changed.append(pb.LayerExperts(layer=lx.layer, experts=sorted(new)))
            if changed:
                self.map_version += 1
                pb_grpc.WorkerServiceStub(self.channels[n]).SetExpertTiers(pb.ExpertTierMap(placement_id=self.placement.placement_id, version=self.map_version,
                                                     fast=changed), timeout=30.0)
                self.replacements += 1
                sent[n] = {c.layer: list(c.experts) for c in changed}
                log.info("expert map v%d for node %s: %s", self.map_version, n[:8], sent[n])
        return sent

    def _replace_loop(self) -> None:
        while not self._stop.wait(self.opts.replace_interval_s):
            try:
                self.replace_now()
            except Exception as e:  # Redis or a worker away: keep the tiers as they are, try again later
                log.warning("expert replacement skipped: %s", e)

    def _worker_health(self) -> dict[str, pb.WorkerHealthResponse]:
        return {n: pb_grpc.WorkerServiceStub(self.channels[n]).Health(pb.WorkerHealthRequest(), timeout=5.0)
                for n in self.nodes_used}

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
        """Health of every stage's worker, by RPC with a deadline."""
        while not self._stop.wait(self.opts.health_interval_s):
            for s in self.placement.stages:
                try:
                    pb_grpc.WorkerServiceStub(self.channels[s.node_id]).Health(pb.WorkerHealthRequest(), timeout=2.0)
                    state = "ok"
                except grpc.RpcError as e:
                    state = f"unreachable ({e.code().name})"
                if self.health.get(s.node_id) != state:
                    log.info("node %s: %s", s.node_id[:8], state)
                self.health[s.node_id] = state

    # ------------------------------------------------------------------ queried by drivers
    def address(self) -> str:
        return f"{self.opts.host}:{self.port}"

    def placement_dict(self) -> dict:
        return self.placement.to_dict()

    def worker_addresses(self) -> list[str]:
        return [self.addresses[s.node_id] for s in self.placement.stages]

    def stats(self) -> dict:
        st = self.engine.stats
        med = [statistics.median(x) if x else None for x in st.hop_overhead_ms]
        comp = [statistics.median(x) if x else None for x in st.compute_ms]
        return {"steps": st.steps, "tokens": st.tokens, "wire_bytes": st.wire_bytes,
                "hop_overhead_ms_median": med, "compute_ms_median": comp, "health": dict(self.health)}

    def reset_stats(self) -> None:
        st = self.engine.stats
        st.steps = st.tokens = st.wire_bytes = 0
        for x in (*st.hop_overhead_ms, *st.compute_ms):
            x.clear()

    def shutdown(self) -> None:
        self._stop.set()
        self.server.stop(grace=2.0)
        self.engine.close()
        for ch in self.channels.values():
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
