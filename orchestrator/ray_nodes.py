"""The Ray adapter: which Ray nodes edgeweave may use, what each offers, and the worker actor pinned
to one. Everything else in the orchestrator sees plain data (node ids, budgets, addresses).

A node publishes its budget as Ray's `memory` resource and its tier as the `edgeweave-tier` label
(`ray start --memory ... --labels edgeweave-tier=cpu`); nodes without them get 80% of their
available memory and tier "cpu" ("gpu" when Ray sees a GPU).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from protos.security import Security
from workers.profile import POOL_LABEL, TIER_LABEL

__all__ = ["NODE_RESOURCE", "node_offers", "usable_nodes", "ray_nodes", "ray_alive", "start_worker_actor"]

NODE_RESOURCE = "edgeweave_node"  # nodes started by `edgeweave up --local` carry it; others are used too


def node_offers(node: dict) -> tuple[str, str, int | None, int]:
    """A ray.nodes() entry -> (node id, tier, budget bytes or None, cores)."""
    res, labels = node.get("Resources", {}), node.get("Labels", {}) or {}
    tier = labels.get(TIER_LABEL) or ("gpu" if res.get("GPU", 0) > 0 else "cpu")
    budget = int(res["memory"]) if res.get("memory") else None
    return node["NodeID"], tier, budget, max(int(res.get("CPU", 1)), 1)


def usable_nodes(nodes: list[dict], pool: str = "") -> list[dict]:
    """ray.nodes() entries -> the alive nodes edgeweave may use: those with the edgeweave_node resource
    if any node has it, and, with a pool, only those labelled edgeweave-pool=pool."""
    alive = [n for n in nodes if n.get("Alive")]
    if any(NODE_RESOURCE in n.get("Resources", {}) for n in alive):
        alive = [n for n in alive if NODE_RESOURCE in n.get("Resources", {})]
    if pool:
        alive = [n for n in alive if (n.get("Labels") or {}).get(POOL_LABEL) == pool]
    return alive


def ray_nodes(pool: str = "") -> list[dict]:
    """Alive Ray nodes edgeweave may use (those with the edgeweave_node resource, if any has it)."""
    import ray

    return usable_nodes(ray.nodes(), pool)


def ray_alive() -> set[str] | None:
    """The ids of the nodes Ray reports alive; None when the GCS is unreachable (decide from gRPC alone)."""
    import ray

    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:
        return None


def start_worker_actor(n: dict, my_ip: str, security: Security) -> tuple[str, str, int, Any]:
    """Starts a worker actor pinned to Ray node n -> (node id, tier, cores, the actor handle).
    Ray restarts a dead worker process (max_restarts=-1)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.actor import WorkerActor

    node_id, tier, budget, cores = node_offers(n)
    host = "127.0.0.1" if n["NodeManagerAddress"] == my_ip else n["NodeManagerAddress"]
    # Ray gives actors OMP_NUM_THREADS=1; the kernels should use the node's cores, and idle
    # OpenMP threads should not spin long (a machine may run several stages' processes).
    env = {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": "10000"}
    remote_worker: Any = ray.remote(num_cpus=0, max_restarts=-1)(WorkerActor)
    actor = remote_worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                                  runtime_env={"env_vars": env}).remote(node_id, tier, budget, host, asdict(security))
    return node_id, tier, cores, actor
