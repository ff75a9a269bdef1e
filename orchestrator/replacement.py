"""The controller's expert replacement round (pure): statistics snapshot + each node's fast tiers ->
the new tier maps, decided by workers/residency.py exactly as a worker's own prefetch is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from workers.residency import PathStats, choose_resident, replacement_scores

__all__ = ["replacement_maps"]


def replacement_maps(stats: PathStats, fast: Mapping[str, Mapping[int, Sequence[int]]],
                     held: Mapping[str, set[tuple[int, int]]], slots: int,
                     hysteresis: float) -> dict[str, dict[int, list[int]]]:
    """node -> {layer: its new fast experts}, only for the layers whose fast set changes.
    fast: each node's fast tier per layer now; held: the units each node holds; slots: per layer
    (0: as many as the layer has now)."""
    out: dict[str, dict[int, list[int]]] = {}
    for node, layers in fast.items():
        for layer, experts in layers.items():
            scores = replacement_scores(stats, layer)
            if scores is None:
                continue
            cur = frozenset(int(e) for e in experts)
            new = choose_resident(scores, cur, slots or len(cur), hysteresis,
                                  allowed=[e for l, e in held.get(node, set()) if l == layer])
            if new != cur:
                out.setdefault(node, {})[layer] = sorted(new)
    return out
