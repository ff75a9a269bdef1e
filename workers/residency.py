"""Which experts are resident in a fast tier: the one place that decides it (pure).

Every residency decision of the product goes through this module: the worker's prefetch before each
layer (prefetch_scores + choose_resident), the worker's fast tier on a miss (admit_on_miss), the
controller's replacement round from the statistics in Redis (replacement_scores + choose_resident),
and `edgeweave moe-sim`'s StatsPolicy (orchestrator/experts.py), so simulation and serving agree.

Statistics (PathStats), per layer l and expert f, all counts:
  act[l, f]          tokens that took f at layer l (decayed)
  l1[l, e, f]        a token took e at layer l-1 and f at layer l  (layer-to-layer transition)
  l2[l, e, f]        ... e at layer l-2 and f at layer l           (two layers back: more lead time)
  t1[l, e, f]        the previous token took e at layer l, this one f (same layer, token to token)

Prediction: each source gives a smoothed conditional distribution P(f | e); the score of f is
  prior * log P(f) + sum over sources of w * (log P(f | source) - log P(f)),
a weighted naive-Bayes product: each source contributes only what it adds to the base rate, so a
layer with fewer known sources (the first layers, a sequence's first token) is still well scaled.
METHODS.md section 5 found no single source reliable (transitions ~0.30 recall, previous token
~0.35-0.40), so it combines them.

Residency (choose_resident): the K best-scoring experts, but an expert replaces a resident one only
when its score is higher by `hysteresis` (log units): no thrashing between near ties, fewer bytes moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PathStats", "StatsWeights", "HYSTERESIS", "transition_sources", "choose_resident", "prefetch_scores",
           "replacement_scores", "admit_on_miss"]

Route = Sequence[tuple[int, ...] | None]  # a token's experts per layer (None where not known)

HYSTERESIS = 0.4  # log-score margin an expert needs to replace a resident one (prefetch and replacement alike)


@dataclass(frozen=True)
class StatsWeights:
    """Log-linear weights of the prediction sources; defaults tuned on GSM8K problem 0 of the real
    Mixtral trace (BENCHMARKS.md reports problem 1, held out)."""

    l1: float = 1.0
    l2: float = 0.8
    t1: float = 0.8
    prior: float = 1.8  # weight of the base rate log P(f); each source adds w * (log P(f | source) - log P(f))
    alpha: float = 1.0  # additive smoothing of every count row
    hysteresis: float = HYSTERESIS  # log-score margin an expert needs to replace a resident one


def transition_sources(route: Sequence[tuple[int, ...] | None], prev_token: Sequence[tuple[int, ...] | None] | None,
                       layer: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The expert sets a token's experts at `layer` are counted against, by kind: "l1" / "l2" the
    same token one / two layers earlier, "t1" the previous token at the same layer (known ones only).
    PathStats and the Redis writer (route_stats.route_deltas) both count exactly these."""
    for kind, src in (("l1", route[layer - 1] if layer >= 1 else None), ("l2", route[layer - 2] if layer >= 2 else None),
                      ("t1", prev_token[layer] if prev_token is not None and layer < len(prev_token) else None)):
        if src is not None:
            yield kind, src


class PathStats:
    """Counts of expert activations and transitions for a model of L layers x E experts."""

    KINDS = ("l1", "l2", "t1")

    def __init__(self, layers: int, experts: int) -> None:
        self.layers, self.experts = layers, experts
        self.act = np.zeros((layers, experts))  # [L, E]
        self.trans = {k: np.zeros((layers, experts, experts)) for k in self.KINDS}  # [L, E, E] each

    def observe(self, route: Sequence[tuple[int, ...] | None], prev_token: Sequence[tuple[int, ...] | None] | None,
                layers: range | None = None) -> None:
        """One token: route[l] its experts at layer l; prev_token the previous token's route (same sequence)."""
        for l in layers if layers is not None else range(self.layers):
            now = route[l]
            if now is None:
                continue
            cols = list(now)
            self.act[l, cols] += 1
            for kind, src in transition_sources(route, prev_token, l):
                self.trans[kind][l][np.ix_(list(src), cols)] += 1

    def decay(self, factor: float) -> None:
        self.act *= factor
        for t in self.trans.values():
            t *= factor

    def merge(self, other: "PathStats") -> None:
        self.act += other.act
        for k in self.KINDS:
            self.trans[k] += other.trans[k]

    def scores(self, layer: int, w: StatsWeights, l1: Sequence[int] | None = None, l2: Sequence[int] | None = None,
               t1: Sequence[int] | None = None) -> np.ndarray:
        """[E] log-scores of each expert being taken at `layer`, given what is known so far:
        the token's experts one and two layers back, and the previous token's experts here."""
        a, e = w.alpha, self.experts
        prior = np.log((self.act[layer] + a) / (self.act[layer].sum() + a * e))  # log P(f)
        s = w.prior * prior
        for kind, src, wt in (("l1", l1, w.l1), ("l2", l2, w.l2), ("t1", t1, w.t1)):
            if src is None or len(src) == 0 or wt == 0:
                continue
            rows = self.trans[kind][layer][list(src)]  # [k, E]
            cond = np.log((rows + a) / (rows.sum(-1, keepdims=True) + a * e)).mean(0)  # log P(f | source)
            s = s + wt * (cond - prior)  # what this source adds to the base rate
        return s


def choose_resident(scores: np.ndarray, resident: frozenset[int], slots: int, hysteresis: float,
                    allowed: Iterable[int] | None = None) -> frozenset[int]:
    """The new resident set: best-scoring experts fill free slots; a candidate replaces the worst
    resident only when its score is higher by more than `hysteresis`. allowed: experts this tier may hold."""
    ok = None if allowed is None else set(allowed)
    cand = [int(f) for f in np.argsort(-scores, kind="stable") if ok is None or int(f) in ok]
    res = set(resident)
    for f in cand[:slots]:
        if f in res:
            continue
        if len(res) < slots:
            res.add(f)
            continue
        worst = min(res, key=lambda g: (scores[g], g))
        if scores[f] - scores[worst] > hysteresis:
            res.remove(worst)
            res.add(f)
    return frozenset(res)


def prefetch_scores(stats: PathStats, weights: StatsWeights, layer: int, rows: Sequence[Route],
                    prevs: Sequence[Route | None]) -> np.ndarray | None:
    """[E] log-probabilities of each expert being needed at `layer` by any row of a step: for each row
    the softmax of its scores (its path so far, its previous token), the max over rows. None: no rows."""
    probs = None
    for row, prev in zip(rows, prevs):
        s = stats.scores(layer, weights, row[layer - 1] if layer >= 1 else None, row[layer - 2] if layer >= 2 else None,
                         prev[layer] if prev is not None else None)
        p = np.exp(s - s.max())
        p /= p.sum()
        probs = p if probs is None else np.maximum(probs, p)
    return None if probs is None else np.log(probs)


def replacement_scores(stats: PathStats, layer: int) -> np.ndarray | None:
    """[E] scores of the controller's replacement round: log(1 + decayed activations) of `layer`;
    None when nothing has been counted there yet (keep the tier as it is)."""
    counts = stats.act[layer]
    if counts.sum() == 0:
        return None
    return np.log(counts + 1.0)


def admit_on_miss(resident: Iterable[int], expert: int, slots: int, scores: np.ndarray | None = None) -> list[int]:
    """The fast set after a miss on `expert` that the cost rule moved up: it joins, and when the tier
    is full the resident expert with the lowest score leaves (without scores, the highest-numbered)."""
    rest = set(resident) - {expert}
    while rest and len(rest) >= slots:  # make room: the lowest score leaves (ties: the higher number)
        rest.remove(max(rest) if scores is None else min(rest, key=lambda g: (float(scores[g]), -g)))
    return [expert, *sorted(rest)][:slots]
