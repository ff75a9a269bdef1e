"""A real local Ray cluster of several nodes on one machine (separate raylet processes).

Each node gets its own memory budget (Ray's `memory` resource), a tier label and the
`edgeweave_node` resource, exactly what `ray start` publishes on a real edge machine
(cluster.yaml), so the controller treats both the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .ray_nodes import NODE_RESOURCE
from workers.profile import POOL_LABEL, TIER_LABEL

__all__ = ["LocalNode", "LocalCluster"]


@dataclass(frozen=True)
class LocalNode:
    memory_bytes: int
    tier: str = "cpu"
    cpus: int = 0  # 0: this machine's cores shared out among the nodes (at least 1 each)
    pool: str = ""  # the edgeweave-pool label ("": none); a service with ServeOptions.pool uses only its pool


class LocalCluster:
    """Context manager: starts the head and N-1 more raylets, connects this process, tears down."""

    def __init__(self, nodes: list[LocalNode]) -> None:
        if not nodes:
            raise ValueError("a local cluster needs at least one node")
        self.nodes = nodes
        self.cluster: Any = None

    def _args(self, n: LocalNode) -> dict:
        share = max((os.cpu_count() or 1) // len(self.nodes), 1)  # nodes on one machine share its cores
        return {"num_cpus": n.cpus or share, "memory": n.memory_bytes,
                "resources": {NODE_RESOURCE: 1}, "labels": {TIER_LABEL: n.tier, **({POOL_LABEL: n.pool} if n.pool else {})}}

    def __enter__(self) -> "LocalCluster":
        import ray
        from ray.cluster_utils import Cluster

        head = {**self._args(self.nodes[0]), "include_dashboard": False}
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        for n in self.nodes[1:]:
            self.cluster.add_node(**self._args(n))
        ray.init(address=self.cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        self.cluster.wait_for_nodes()
        return self

    def add_node(self, n: LocalNode) -> str:
        """Starts one more raylet (a node joining) -> its Ray node id."""
        node = self.cluster.add_node(**self._args(n))
        self.cluster.wait_for_nodes()
        return node.node_id

    def remove_node(self, node_id: str) -> None:
        """Stops a (non-head) node's raylet and everything on it, as when a machine goes away."""
        for node in self.cluster.worker_nodes:
            if node.node_id == node_id:
                self.cluster.remove_node(node, allow_graceful=False)
                return
        raise ValueError(f"{node_id} is not a non-head node of this cluster")

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
