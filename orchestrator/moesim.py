"""`edgeweave moe-sim`: replay a routing trace through the fast-tier policies and report.

Hit rate counts experts resident when a token needs them (prefetched ones included); bytes moved
count every expert copied into the fast tier (demand loads and prefetches); "% of Belady" compares
with Belady's MIN, the offline optimum of demand paging, on the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quant.manifest import expert_bytes, fast_tier_fraction
from workers.residency import PathStats, StatsWeights

from .experts import LFUPolicy, LRUPolicy, SimResult, StatsPolicy, TokenRoute, belady, simulate

__all__ = ["POLICIES", "MIXTRAL_8X7B", "SimConfig", "run_sim", "format_sim"]

POLICIES = ("lru", "lfu", "stats", "belady")
MIXTRAL_8X7B = {"hidden": 4096, "inter": 14336, "layers": 32, "experts": 8}  # Mixtral-8x7B's config.json


@dataclass(frozen=True)
class SimConfig:
    slots: int = 4
    policies: tuple[str, ...] = POLICIES
    hidden: int = MIXTRAL_8X7B["hidden"]  # expert shapes, for bytes
    inter: int = MIXTRAL_8X7B["inter"]
    weights: StatsWeights = StatsWeights()


def _row(r: SimResult, opt: SimResult, ebytes: int) -> dict:
    return {"policy": r.policy, "hit_rate": r.hit_rate, "pct_of_belady": 100 * r.hit_rate / opt.hit_rate,
            "experts_moved_per_token": r.loads_per_token, "bytes_moved_per_token": r.loads_per_token * ebytes,
            "hits": r.hits, "accesses": r.accesses, "loads": r.loads, "tokens": r.tokens}


def run_sim(tokens: Sequence[TokenRoute], cfg: SimConfig, warm: Sequence[TokenRoute] = ()) -> dict:
    """Every policy in cfg over `tokens`. The stats policy first learns from `warm` (statistics of
    earlier traffic, as Redis would hold them), then keeps learning online."""
    if not tokens:
        raise ValueError("no tokens to simulate (check --sequences)")
    layers = max(len(t.routes) for t in (*tokens, *warm))
    experts = 1 + max(max(r) for t in (*tokens, *warm) for r in t.routes if r)
    if not 1 <= cfg.slots <= experts:
        raise ValueError(f"--slots {cfg.slots} must be in [1, {experts}] (the trace has {experts} experts per layer)")
    unknown = set(cfg.policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    opt = belady(tokens, cfg.slots)
    ebytes = expert_bytes(cfg.hidden, cfg.inter)
    rows = []
    for name in cfg.policies:
        if name == "belady":
            r = opt
        elif name == "lru":
            r = simulate(tokens, LRUPolicy(layers, cfg.slots), cfg.slots)
        elif name == "lfu":
            r = simulate(tokens, LFUPolicy(layers, cfg.slots, experts), cfg.slots)
        else:
            stats = PathStats(layers, experts)
            if warm:
                simulate(warm, StatsPolicy(layers, cfg.slots, stats, cfg.weights), cfg.slots)
            r = simulate(tokens, StatsPolicy(layers, cfg.slots, stats, cfg.weights), cfg.slots)
        rows.append(_row(r, opt, ebytes))
    return {"layers": layers, "experts": experts, "slots": cfg.slots, "tokens": len(tokens),
            "warm_tokens": len(warm), "expert_bytes_int8": ebytes,
            "fast_tier_fraction_of_fp16": fast_tier_fraction(cfg.hidden, cfg.inter, experts, cfg.slots),
            "weights": cfg.weights.__dict__, "results": rows}


def format_sim(rep: dict) -> str:
    head = (f"{rep['tokens']} tokens x {rep['layers']} layers, {rep['slots']} of {rep['experts']} experts per layer "
            f"in the fast tier" + (f"; stats warmed on {rep['warm_tokens']} other tokens" if rep["warm_tokens"] else ""))
    lines = [head, f"{'policy':8} {'hit rate':>8} {'% Belady':>8} {'moved/token':>11} {'MB moved/token':>14}"]
    for r in rep["results"]:
        lines.append(f"{r['policy']:8} {r['hit_rate']:8.4f} {r['pct_of_belady']:7.1f}% "
                     f"{r['experts_moved_per_token']:11.2f} {r['bytes_moved_per_token'] / 1e6:14.1f}")
    lines.append(f"fast tier ({rep['slots']} int8 experts per layer) = {100 * rep['fast_tier_fraction_of_fp16']:.1f}% "
                 f"of the float16 expert weights ({rep['expert_bytes_int8']:,} bytes per int8 expert)")
    return "\n".join(lines)
