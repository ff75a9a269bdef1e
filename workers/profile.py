"""Node profiles: what a node offers (memory in bytes, measured int8 speed, tier).

A node publishes its tier and memory budget when Ray starts on it (`ray start --memory BYTES
--labels edgeweave-tier=cpu`, see cluster.yaml); the worker on it measures the rest.
`NodeProfile` is plain data so the planner stays a pure function; `measure_profile` is the edge.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from quant.manifest import parse_bytes

__all__ = ["NodeProfile", "measure_profile", "measure_int8_gops", "load_profiles", "parse_bytes", "TIER_LABEL",
           "POOL_LABEL"]

TIER_LABEL = "edgeweave-tier"  # Ray node label carrying the tier
POOL_LABEL = "edgeweave-pool"  # Ray node label: which pool of nodes a node belongs to (ServeOptions.pool)


@dataclass(frozen=True)
class NodeProfile:
    node_id: str
    tier: str  # "gpu", "cpu", "slow-cpu", ...
    budget_bytes: int  # what edgeweave may use here: weights + KV cache + activations
    int8_gops: float  # measured int8 matmul throughput at M = 1, 10^9 multiply-accumulates/s
    cpu_total_bytes: int = 0
    cpu_available_bytes: int = 0
    gpu_total_bytes: int = 0
    gpu_available_bytes: int = 0
    cores: int = 1

    def __post_init__(self) -> None:
        if self.budget_bytes < 0 or self.int8_gops <= 0:
            raise ValueError(f"node {self.node_id}: budget_bytes must be >= 0 and int8_gops > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def measure_int8_gops(k: int = 2048, n: int = 4096, reps: int = 9) -> float:
    """Median throughput of the int8 linear at M = 1 on a weight larger than typical caches."""
    import torch

    from quant.kernels import int8_linear

    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) + 0.5
    x = torch.randn(1, k)
    int8_linear(x, w, s, None, None)  # builds/loads the kernel
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        int8_linear(x, w, s, None, None)
        times.append(time.perf_counter() - t0)
    return n * k / sorted(times)[len(times) // 2] / 1e9


def measure_profile(node_id: str, tier: str, budget_bytes: int | None) -> NodeProfile:
    """The profile of the node this runs on. budget_bytes None: 80% of the available memory."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    gpu_total = gpu_avail = 0
    if torch.cuda.is_available():
        gpu_avail, gpu_total = torch.cuda.mem_get_info()
    budget = int(0.8 * vm.available) if budget_bytes is None else budget_bytes
    return NodeProfile(node_id, tier, budget, measure_int8_gops(), vm.total, vm.available, gpu_total, gpu_avail,
                       len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def load_profiles(path: str | Path) -> list[NodeProfile]:
    """Node profiles from a JSON file: a list of objects with NodeProfile's fields.

    budget_bytes may be written as a size string ("300MB"); int8_gops defaults to 1.0."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read node profiles: {e}") from e
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{p}: expected a non-empty JSON list of nodes")
    out = []
    fields = set(NodeProfile.__dataclass_fields__)
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "budget_bytes" not in item:
            raise ValueError(f"{p}: node {i} needs at least budget_bytes")
        unknown = set(item) - fields
        if unknown:
            raise ValueError(f"{p}: node {i} has unknown fields {sorted(unknown)}")
        d = {"node_id": f"node{i}", "tier": "cpu", "int8_gops": 1.0, **item}
        d["budget_bytes"] = parse_bytes(d["budget_bytes"])
        out.append(NodeProfile(**d))
    return out
