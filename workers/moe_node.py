"""A worker's MoE state for one shard: its expert units and tiers, the runner, the calls to experts
held on other nodes, the statistics writer (Redis) and the thread reading the statistics back.

The servicer makes one per LoadShard of an MoE checkpoint and closes it when the next shard loads.
"""

from __future__ import annotations

import logging
import threading

import grpc
import torch

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, open_channel
from quant.manifest import Manifest

from .moe import ExpertStore, MoERunner
from .route_stats import StatsRecorder, connect, read_stats
from .steps import Refused
from .wire import decode_tensor, encode_tensor

__all__ = ["MoENode", "REMOTE_EXPERT_TIMEOUT_S", "STATS_REFRESH_S"]

log = logging.getLogger("edgeweave.worker")

REMOTE_EXPERT_TIMEOUT_S = 30.0  # deadline of one ExpertForward call to another node
STATS_REFRESH_S = 3.0  # how often the statistics are read back from Redis (prefetch predicts from them)


def _units(s: pb.ShardSpec, n_layers: int, n_experts: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], str]]:
    """-> (the units held here: the shard's experts not placed elsewhere, and those hosted for others;
    (layer, expert) -> address of the experts of this shard's layers that run on another node)."""
    remote: dict[tuple[int, int], str] = {}
    for u in s.experts:
        if not (s.first_layer <= u.layer < s.last_layer and u.expert < n_experts):
            raise ValueError(f"shard.experts: layer {u.layer} expert {u.expert} is not in this shard")
        if u.address:
            remote[(u.layer, u.expert)] = u.address
    for u in s.hosted:
        if not (u.layer < n_layers and u.expert < n_experts):
            raise ValueError(f"shard.hosted: layer {u.layer} expert {u.expert} is not in the model")
    own = [(l, e) for l in range(s.first_layer, s.last_layer) for e in range(n_experts) if (l, e) not in remote]
    return own + [(u.layer, u.expert) for u in s.hosted], remote


class MoENode:
    def __init__(self, s: pb.ShardSpec, manifest: Manifest, security: Security) -> None:
        assert manifest.moe is not None
        n_experts, k, n_layers = manifest.moe.experts, manifest.moe.top_k, manifest.n_layers
        units, remote = _units(s, n_layers, n_experts)
        slots = int(s.fast_slots) or max(n_experts // 2, 1)
        device = torch.device("cuda") if torch.cuda.is_available() else None
        self.spec, self.security, self.n_layers, self.n_experts = s, security, n_layers, n_experts
        self.store = ExpertStore(s.checkpoint, units, slots, device)
        self.recorder = StatsRecorder(s.redis_url, s.model_name or "model", n_layers, n_experts) if s.redis_url else None
        self.runner = MoERunner(self.store, k, range(s.first_layer, s.last_layer), n_layers, n_experts, remote,
                                self._call_remote, s.prefetch, self.recorder)
        self._peers: dict[str, pb_grpc.WorkerServiceStub] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        """Starts reading the statistics back from Redis (only where they are written)."""
        if self.recorder is not None:
            threading.Thread(target=self._refresh_stats, name="edgeweave-stats-read", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self.recorder is not None:
            self.recorder.close(timeout_s=2.0)

    def _call_remote(self, layer: int, expert: int, x: torch.Tensor):
        """Starts ExpertForward on the node holding the expert -> a function that waits for its output."""
        addr = self.runner.remote[(layer, expert)]
        stub = self._peers.get(addr)
        if stub is None:
            stub = self._peers[addr] = pb_grpc.WorkerServiceStub(open_channel(addr, self.security))
        fut = stub.ExpertForward.future(pb.ExpertRequest(placement_id=self.spec.placement_id, layer=layer, expert=expert,
                                                         hidden=encode_tensor(x.float())), timeout=REMOTE_EXPERT_TIMEOUT_S)

        def result() -> torch.Tensor:
            try:
                resp = fut.result()
            except grpc.RpcError as e:
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              f"expert {expert} of layer {layer} at {addr}: {e.code().name}: {e.details()}") from e
            return decode_tensor(resp.output, "output", pb.FLOAT32, rank=2, max_elems=x.numel()).view_as(x)
        return result

    def _refresh_stats(self) -> None:
        """Reads the statistics from Redis every few seconds (prefetch uses them); Redis may be away."""
        client = connect(self.spec.redis_url)
        while not self._stop.wait(STATS_REFRESH_S):
            try:
                self.runner.set_snapshot(read_stats(client, self.spec.model_name or "model", self.n_layers,
                                                    self.n_experts))
            except Exception as e:  # Redis away: keep predicting from what is known
                log.debug("statistics refresh failed: %s", e)
