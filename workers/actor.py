"""The Ray actor that owns a node's worker process: measures the node and runs the gRPC server.

The controller starts one per node, pinned with node affinity; everything after start-up (load a
shard, forward steps, release, health) goes over gRPC, not through Ray.
"""

from __future__ import annotations

import logging

from orchestrator.profile import measure_profile

from .server import start_worker_server

__all__ = ["WorkerActor"]


class WorkerActor:
    """Wrapped with ray.remote by the controller (so this module imports without Ray running)."""

    def __init__(self, node_id: str, tier: str, budget_bytes: int | None, host: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.args = (node_id, tier, budget_bytes)
        self.host = host

    def start(self) -> str:
        """Measures the node (the controller calls the workers one at a time, so nodes sharing a
        machine do not disturb each other's measurement), starts the gRPC server -> its address."""
        self.profile = measure_profile(*self.args)
        self.server, self.port, _ = start_worker_server(self.profile, self.host)
        return f"{self.host}:{self.port}"

    def node_profile(self) -> dict:
        return self.profile.to_dict()

    def stop(self) -> None:
        self.server.stop(grace=1.0)
