"""What each node is told to load for a placement, and what it holds (pure: placement in, messages out).

The controller sends shard_spec(...) to every node a placement uses (LoadShard), all of them before
the engine switches to the placement; held_units says which MoE experts a node holds, which the
replacement round may move between its tiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protos import edgeweave_v1_pb2 as pb

from .planner import Placement

__all__ = ["RolloutOptions", "nodes_of", "shard_spec", "held_units"]


@dataclass(frozen=True)
class RolloutOptions:
    """What every shard of a service shares."""

    checkpoint: str
    keep_awake: bool = True
    prefetch: bool = True
    redis_url: str = ""  # MoE statistics
    model_name: str = ""
    moe_experts: int = 0  # experts per layer (0: a dense model)


def nodes_of(placement: Placement) -> list[str]:
    """Every node a placement uses: its stages, then nodes that only host experts."""
    stages = [s.node_id for s in placement.stages]
    return stages + [h.node_id for h in placement.expert_hosts if h.node_id not in stages]


def shard_spec(placement: Placement, node_id: str, addresses: Mapping[str, str], threads: int,
               o: RolloutOptions) -> pb.ShardSpec:
    """The shard node_id loads: its stage's layers (if any), the next stage it relays to, its KV
    budget, and for MoE the experts it asks other nodes for and the experts it hosts for others."""
    k = next((i for i, s in enumerate(placement.stages) if s.node_id == node_id), None)
    stage = placement.stages[k] if k is not None else None
    spec = pb.ShardSpec(checkpoint=o.checkpoint, placement_id=placement.placement_id, max_context=placement.context,
                        threads=threads, keep_awake=o.keep_awake)
    if stage is not None:
        spec.first_layer, spec.last_layer, spec.embed, spec.head = stage.first, stage.last, stage.embed, stage.head
        spec.kv_budget_bytes = stage.kv_bytes
        if k is not None and k + 1 < len(placement.stages):  # relayed steps go on to the next stage
            spec.next_stage = addresses[placement.stages[k + 1].node_id]
    if o.moe_experts:
        remote = placement.remote_units()
        if stage is not None:
            for (layer, e), host in sorted(remote.items()):
                if stage.first <= layer < stage.last:
                    spec.experts.add(layer=layer, expert=e, address=addresses[host])
        for (layer, e), host in sorted(remote.items()):
            if host == node_id:
                spec.hosted.add(layer=layer, expert=e)
        spec.fast_slots, spec.redis_url, spec.model_name = placement.fast_slots, o.redis_url, o.model_name
        spec.prefetch = o.prefetch
    return spec


def held_units(placement: Placement, node_id: str, n_experts: int) -> set[tuple[int, int]]:
    """(layer, expert) units node_id holds: its layers' experts not placed elsewhere, and those it hosts."""
    remote = placement.remote_units()
    stage = next((s for s in placement.stages if s.node_id == node_id), None)
    own = {(l, e) for l in range(stage.first, stage.last) for e in range(n_experts)} if stage else set()
    return {u for u in own if u not in remote} | {u for u, h in remote.items() if h == node_id}
