"""Routing traces and cache policies for `edgeweave moe-sim` (pure).

A trace (JSONL: layer, token_idx, experts per line) is replayed token by token through a policy:
LRU and LFU demand paging, StatsPolicy (activation-path statistics with prefetch, deciding through
workers/residency.py exactly as a worker does) and Belady's MIN as the offline bound. The
statistics, their prediction rule and every residency decision live in workers/residency.py.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.residency import PathStats, StatsWeights, choose_resident

__all__ = ["RoutingRecord", "TokenRoute", "load_trace", "token_routes", "LRUPolicy", "LFUPolicy", "StatsPolicy",
           "SimResult", "simulate", "belady", "TraceError"]


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
