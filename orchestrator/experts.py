"""Which MoE experts sit in each fast tier: activation-path statistics and cache policies (pure).

The same code serves three callers: `edgeweave moe-sim` replays a routing trace through it, the
workers use StatsPolicy to prefetch the experts predicted for the next layer, and the controller
uses `choose_resident` on the statistics read from Redis to decide replacement.

Statistics (PathStats), per layer l and expert f, all counts:
  act[l, f]          tokens that took f at layer l (decayed)
  l1[l, e, f]        a token took e at layer l-1 and f at layer l  (layer-to-layer transition)
  l2[l, e, f]        ... e at layer l-2 and f at layer l           (two layers back: more lead time)
  t1[l, e, f]        the previous token took e at layer l, this one f (same layer, token to token)

Prediction: each source gives a smoothed conditional distribution P(f | e); the score of f is
  prior * log P(f) + sum over sources of w * (log P(f | source) - log P(f)),
a weighted naive-Bayes product: each source contributes only what it adds to the base rate, so a
layer with fewer known sources (the first layers, a sequence's first token) is still well scaled. METHODS.md section 5 found no
single source reliable (transitions ~0.30 recall, previous token ~0.35-0.40), so it combines them.

Residency (choose_resident): the K best-scoring experts, but an expert replaces a resident one
only when its score is higher by `hysteresis` (log units): no thrashing between near ties, and
fewer bytes moved.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RoutingRecord", "TokenRoute", "load_trace", "token_routes", "PathStats", "StatsWeights",
           "choose_resident", "LRUPolicy", "LFUPolicy", "StatsPolicy", "SimResult", "simulate", "belady",
           "expert_bytes", "fast_tier_fraction", "TraceError"]


class TraceError(ValueError):
    """A routing trace line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class RoutingRecord:
    sequence: int  # problem / request id
    token: int  # token index within the sequence
    layer: int
    experts: tuple[int, ...]  # top-k experts the router chose


@dataclass(frozen=True)
class TokenRoute:
    """One token's path through the layers: routes[l] = experts at layer l (None where not recorded)."""

    sequence: int
    token: int
    routes: tuple[tuple[int, ...] | None, ...]


def load_trace(path: str | Path) -> list[RoutingRecord]:
    """JSONL with layer, token_idx, experts (and problem_id, optional) per line."""
    out = []
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: no such routing trace")
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                experts = tuple(int(e) for e in r["experts"])
                rec = RoutingRecord(int(r.get("problem_id", 0)), int(r["token_idx"]), int(r["layer"]), experts)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise TraceError(f"{p}:{n}: not a routing record (needs layer, token_idx, experts): {e}") from e
            if rec.layer < 0 or rec.token < 0 or not experts or min(experts) < 0 or len(set(experts)) != len(experts):
                raise TraceError(f"{p}:{n}: bad layer, token_idx or experts in {line.strip()[:120]}")
            out.append(rec)
    if not out:
        raise TraceError(f"{p}: the trace is empty")
    return out


def token_routes(records: Iterable[RoutingRecord], layers: int | None = None) -> list[TokenRoute]:
    """Records -> one TokenRoute per (sequence, token), in sequence then token order."""
    recs = list(records)
    n_layers = layers or 1 + max(r.layer for r in recs)
    by: dict[tuple[int, int], list[tuple[int, ...] | None]] = {}
    for r in recs:
        by.setdefault((r.sequence, r.token), [None] * n_layers)[r.layer] = r.experts
    return [TokenRoute(s, t, tuple(by[(s, t)])) for s, t in sorted(by)]


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class StatsWeights:
    """Log-linear weights of the prediction sources; defaults tuned on GSM8K problem 0 of the real
    Mixtral trace (BENCHMARKS.md reports problem 1, held out)."""

    l1: float = 1.0
    l2: float = 0.8
    t1: float = 0.8
    prior: float = 1.8  # weight of the base rate log P(f); each source adds w * (log P(f | source) - log P(f))
    alpha: float = 1.0  # additive smoothing of every count row
    hysteresis: float = 0.4  # log-score margin an expert needs to replace a resident one


def transition_sources(route: Sequence[tuple[int, ...] | None], prev_token: Sequence[tuple[int, ...] | None] | None,
                       layer: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The expert sets a token's experts at `layer` are counted against, by kind: "l1" / "l2" the
    same token one / two layers earlier, "t1" the previous token at the same layer (known ones only).
    PathStats and the Redis writer (redis_stats.route_deltas) both count exactly these."""
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


# --------------------------------------------------------------------------- policies
class _Cache:
    def __init__(self, layers: int, slots: int) -> None:
        self.slots = slots
        self.resident: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(layers)]

    def reset(self) -> None:
        for r in self.resident:
            r.clear()


class LRUPolicy(_Cache):
    """Demand paging: a miss loads the expert, evicting the least recently used one."""

    name = "lru"

    def prefetch(self, layer: int, route: Sequence, prev_token: Sequence | None) -> int:
        return 0

    def access(self, layer: int, experts: tuple[int, ...]) -> tuple[int, int]:
        res, hits, loads = self.resident[layer], 0, 0
        for e in experts:
            if e in res:
                hits += 1
            else:
                if len(res) >= self.slots:
                    victim = next(v for v in res if v not in experts)
                    del res[victim]
                res[e] = None
                loads += 1
            res.move_to_end(e)
        return hits, loads

    def learn(self, route: Sequence, prev_token: Sequence | None) -> None:
        pass


class LFUPolicy(LRUPolicy):
    """Demand paging evicting the least frequently used expert (counts over the whole run)."""

    name = "lfu"

    def __init__(self, layers: int, slots: int, experts: int) -> None:
        super().__init__(layers, slots)
        self.count = np.zeros((layers, experts))

    def access(self, layer: int, experts: tuple[int, ...]) -> tuple[int, int]:
        res, hits, loads = self.resident[layer], 0, 0
        self.count[layer, list(experts)] += 1
        for e in experts:
            if e in res:
                hits += 1
                continue
            if len(res) >= self.slots:
                victim = min((v for v in res if v not in experts), key=lambda v: (self.count[layer, v], v))
                del res[victim]
            res[e] = None
            loads += 1
        return hits, loads


class StatsPolicy(_Cache):
    """Activation-path statistics with prefetch: before each layer runs, the experts predicted for
    it (from the token's path so far and the previous token) are moved up under hysteresis; a miss
    runs where the expert lives (no demand load)."""

    name = "stats"

    def __init__(self, layers: int, slots: int, stats: PathStats, weights: StatsWeights = StatsWeights(),
                 learn_online: bool = True) -> None:
        super().__init__(layers, slots)
        self.stats, self.w, self.learn_online = stats, weights, learn_online

    def prefetch(self, layer: int, route: Sequence, prev_token: Sequence | None) -> int:
        s = self.stats.scores(layer, self.w, route[layer - 1] if layer >= 1 else None,
                              route[layer - 2] if layer >= 2 else None,
                              prev_token[layer] if prev_token is not None else None)
        old = frozenset(self.resident[layer])
        new = choose_resident(s, old, self.slots, self.w.hysteresis)
        self.resident[layer] = OrderedDict.fromkeys(sorted(new))
        return len(new - old)

    def access(self, layer: int, experts: tuple[int, ...]) -> tuple[int, int]:
        return sum(e in self.resident[layer] for e in experts), 0

    def learn(self, route: Sequence, prev_token: Sequence | None) -> None:
        if self.learn_online:
            self.stats.observe(route, prev_token)


# --------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class SimResult:
    policy: str
    slots: int
    tokens: int
    accesses: int  # expert uses (tokens x layers x k)
    hits: int
    loads: int  # experts moved into the fast tier (demand loads and prefetches)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.accesses, 1)

    @property
    def loads_per_token(self) -> float:
        """Experts moved per token, summed over layers."""
        return self.loads / max(self.tokens, 1)


def simulate(tokens: Sequence[TokenRoute], policy, slots: int, cold_per_sequence: bool = True) -> SimResult:
    """Replays tokens in order through `policy`; each sequence starts with an empty fast tier
    (as a new request does) unless cold_per_sequence is False."""
    hits = loads = accesses = 0
    prev: TokenRoute | None = None
    for tr in tokens:
        same = prev is not None and prev.sequence == tr.sequence
        if not same and cold_per_sequence:
            policy.reset()
        prev_route = prev.routes if same and prev is not None else None
        for l, experts in enumerate(tr.routes):
            if experts is None:
                continue
            loads += policy.prefetch(l, tr.routes, prev_route)
            h, ld = policy.access(l, experts)
            hits, loads, accesses = hits + h, loads + ld, accesses + len(experts)
        policy.learn(tr.routes, prev_route)
        prev = tr
    return SimResult(policy.name, slots, len(tokens), accesses, hits, loads)


def belady(tokens: Sequence[TokenRoute], slots: int, cold_per_sequence: bool = True) -> SimResult:
    """Belady's MIN per layer (offline optimum of demand paging): a miss evicts the resident expert
    whose next use is farthest in the future."""
    layers = max(len(t.routes) for t in tokens)
    hits = loads = accesses = 0
    for l in range(layers):
        seq = [(t.sequence, t.routes[l] if l < len(t.routes) else None) for t in tokens]
        # next_use[i][e]: index of the next access to e after step i (within the sequence)
        nxt: list[dict[int, int]] = [dict() for _ in seq]
        upcoming: dict[int, int] = {}
        for i in range(len(seq) - 1, -1, -1):
            if i + 1 < len(seq) and cold_per_sequence and seq[i + 1][0] != seq[i][0]:
                upcoming = {}
            nxt[i] = dict(upcoming)
            here = seq[i][1]
            if here is not None:
                for e in here:
                    upcoming[e] = i
        res: set[int] = set()
        for i, (s, experts) in enumerate(seq):
            if cold_per_sequence and i > 0 and seq[i - 1][0] != s:
                res = set()
            if experts is None:
                continue
            for e in experts:
                accesses += 1
                if e in res:
                    hits += 1
                    continue
                if len(res) >= slots:
                    victim = max((v for v in res if v not in experts), key=lambda v: (nxt[i].get(v, math.inf), v))
                    res.remove(victim)
                res.add(e)
                loads += 1
    return SimResult("belady", slots, len(tokens), accesses, hits, loads)


# --------------------------------------------------------------------------- memory
def expert_bytes(hidden: int, inter: int, weight_bytes: float = 1.0, scale_bytes: int = 4) -> int:
    """One SwiGLU expert (gate and up [I, D], down [D, I]); int8 adds a float scale per output row."""
    params = 3 * hidden * inter
    scales = (2 * inter + hidden) * scale_bytes if weight_bytes == 1.0 else 0
    return int(params * weight_bytes) + scales


def fast_tier_fraction(hidden: int, inter: int, experts: int, slots: int) -> float:
    """Fast-tier bytes (slots int8 experts per layer) / float16 bytes of all experts."""
    return slots * expert_bytes(hidden, inter) / (experts * expert_bytes(hidden, inter, weight_bytes=2.0))

