"""The Ray actor that owns a node's worker process: measures the node and runs the gRPC server.

The controller starts one per node, pinned with node affinity; everything after start-up (load a
shard, forward steps, release, health) goes over gRPC, not through Ray.
"""

from __future__ import annotations

import logging
import os

from .profile import measure_profile
from protos.security import Security

from .server import start_worker_server

__all__ = ["WorkerActor"]


class WorkerActor:
    """Wrapped with ray.remote by the controller (so this module imports without Ray running)."""

    def __init__(self, node_id: str, tier: str, budget_bytes: int | None, host: str,
                 security: dict | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.args = (node_id, tier, budget_bytes)
        self.host = host
        self.security = Security(**security) if security else Security()
        self.address = ""

    def start(self) -> str:
        """Measures the node (the controller calls the workers one at a time, so nodes sharing a
        machine do not disturb each other's measurement), starts the gRPC server -> its address.

        Idempotent: a second call returns the running server's address. When Ray restarts this
        actor after its process died, the new instance starts a new server (with no shard) on the
        controller's next call; the controller then loads a shard into it (rejoin)."""
        if not self.address:
            self.profile = measure_profile(*self.args)
            self.server, self.port, _ = start_worker_server(self.profile, self.host, security=self.security)
            self.address = f"{self.host}:{self.port}"
        return self.address

    def pid(self) -> int:
        """The worker process (bench/chaos.py kills it)."""
        return os.getpid()

    def node_profile(self) -> dict:
        return self.profile.to_dict()

    def stop(self) -> None:
        self.server.stop(grace=1.0)
