"""Mixtral experts on a worker: routing, per-expert int8 compute, fast and slow tiers, remote experts.

Each expert of each layer is a unit: int8 gate_up [2I, D] and down [D, I] with per-row scales,
sliced from the checkpoint's [E, 2I, D] / [E, D, I] banks. A worker holds its units in two tiers:
  fast  resident tensors on the fast device (the GPU where there is one, else RAM), `slots` per layer
  slow  where the unit lives otherwise: read from the checkpoint file on demand (a memory-mapped
        safetensors slice; on a CPU-only edge node the slow tier is its storage)
Experts placed on another node run there (ExpertForward RPC with the routed tokens' rows).

The arithmetic is the same int8 kernel wherever a unit lives, and outputs are summed in ascending
expert order exactly as quant.qlinear.QuantExperts does, so the output matches the single-process
model bit for bit (tests/orchestrator/test_moe_runtime.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quant.kernels import int8_linear
from quant.manifest import expert_tensor_prefix

from .residency import PathStats, StatsWeights, admit_on_miss, choose_resident, prefetch_scores

__all__ = ["ExpertWeights", "route_tokens", "expert_forward", "ExpertCost", "move_on_miss", "ExpertStore",
           "TierCounters", "moe_block", "MoERunner"]

BANKS = ("gate_up_qweight", "gate_up_scale", "down_qweight", "down_scale")
STATICS = ("gate_up_input_scale", "down_input_scale")


@dataclass(frozen=True)
class ExpertWeights:
    gate_up: torch.Tensor  # [2I, D] int8
    gate_up_scale: torch.Tensor  # [2I]
    down: torch.Tensor  # [D, I] int8
    down_scale: torch.Tensor  # [D]
    gate_up_static: float | None  # static activation scales ("tensor" scheme)
    down_static: float | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.gate_up_scale, self.down, self.down_scale))

    def to(self, device: torch.device) -> "ExpertWeights":
        g, gs, d, ds = (t.to(device, copy=True) for t in (self.gate_up, self.gate_up_scale, self.down, self.down_scale))
        return ExpertWeights(g, gs, d, ds, self.gate_up_static, self.down_static)


def route_tokens(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], router [E, D] -> (weights [T, k] float, experts [T, k]); as transformers' Mixtral router."""
    logits = F.linear(x, router)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return top, idx


def expert_forward(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """x [t, D] -> [t, D]: down(silu(gate(x)) * up(x)) with int8 x int8 -> int32 products."""
    gu = int8_linear(x, w.gate_up, w.gate_up_scale, None, w.gate_up_static)  # [t, 2I]
    gate, up = gu.chunk(2, dim=-1)
    return int8_linear(F.silu(gate) * up, w.down, w.down_scale, None, w.down_static)


@dataclass(frozen=True)
class ExpertCost:
    """Measured on the node: moving a unit up vs running it where it lives."""

    move_bytes_per_s: float  # slow -> fast copy throughput
    fast_ms_per_token: float
    slow_ms_per_token: float
    slow_read: bool  # the slow tier is storage: running there reads the unit too


def move_on_miss(tokens: int, nbytes: int, cost: ExpertCost) -> bool:
    """Fiddler's rule with measured costs: move the unit up when that is cheaper than running it
    where it lives for these tokens (ties stay put: residency is the replacement policy's call)."""
    move_ms = nbytes / cost.move_bytes_per_s * 1e3
    here_ms = tokens * cost.slow_ms_per_token + (move_ms if cost.slow_read else 0.0)
    return move_ms + tokens * cost.fast_ms_per_token < here_ms - 1e-9


@dataclass(frozen=True)
class TierCounters:
    hits: int
    misses: int
    moves: int
    bytes_moved: int


class ExpertStore:
    """The expert units one worker holds, in its fast and slow tiers."""

    def __init__(self, checkpoint: str | Path, units: Sequence[tuple[int, int]], slots: int,
                 fast_device: torch.device | None = None) -> None:
        from quant.checkpoint import read_manifest

        self.root = Path(checkpoint)
        self._tensors = read_manifest(self.root).tensors
        self._files: dict[str, object] = {}
        self.units = frozenset(units)
        self.slots = slots
        self.device = fast_device or torch.device("cpu")
        self.fast: dict[tuple[int, int], ExpertWeights] = {}
        self.scores: dict[int, np.ndarray] = {}  # layer -> the latest prefetch scores (evictions on a miss)
        self.lock = threading.Lock()
        self.hits = self.misses = self.moves = self.bytes_moved = 0
        for layer in sorted({l for l, _ in self.units}):
            self.set_resident(layer, sorted(e for l, e in self.units if l == layer)[:slots], count=False)
        self.cost = self.calibrate() if self.units else None

    def read(self, layer: int, e: int) -> ExpertWeights:
        """The unit from the slow tier (the checkpoint file): only expert e's slices are read."""
        p = expert_tensor_prefix(layer)
        g, gs, d, ds = (self._slice(p + b)[e] for b in BANKS)
        statics = []
        for s in STATICS:
            statics.append(float(self._slice(p + s)[e]) if p + s in self._tensors else None)
        return ExpertWeights(g.contiguous(), gs.float(), d.contiguous(), ds.float(), statics[0], statics[1])

    def _slice(self, name: str):
        """A lazy view of one tensor in its layer's file (only the rows indexed are read)."""
        from safetensors import safe_open

        file = self._tensors[name].file
        if file not in self._files:
            self._files[file] = safe_open(str(self.root / file), framework="pt")
        return self._files[file].get_slice(name)  # type: ignore[attr-defined]

    def resident(self, layer: int) -> frozenset[int]:
        with self.lock:
            return frozenset(e for l, e in self.fast if l == layer)

    def set_resident(self, layer: int, experts: Sequence[int] | frozenset[int], count: bool = True) -> tuple[int, int]:
        """Makes `experts` (of the units held here) the fast set of `layer` -> (moved, bytes)."""
        want = [e for e in experts if (layer, e) in self.units][: self.slots]
        moved = nbytes = 0
        with self.lock:
            for key in [k for k in self.fast if k[0] == layer and k[1] not in want]:
                del self.fast[key]
            for e in want:
                if (layer, e) not in self.fast:
                    w = self.read(layer, e).to(self.device)
                    self.fast[(layer, e)] = w
                    moved, nbytes = moved + 1, nbytes + w.nbytes
            if count:
                self.moves, self.bytes_moved = self.moves + moved, self.bytes_moved + nbytes
        return moved, nbytes

    def weights(self, layer: int, e: int, tokens: int) -> ExpertWeights:
        """The unit to run for `tokens` tokens: fast tier, or moved up / read from the slow tier."""
        with self.lock:
            w = self.fast.get((layer, e))
            if w is not None:
                self.hits += 1
                return w
            self.misses += 1
        w = self.read(layer, e)
        if self.cost is not None and move_on_miss(tokens, w.nbytes, self.cost):
            self.set_resident(layer, admit_on_miss(self.resident(layer), e, self.slots, self.scores.get(layer)))
        return w

    def counters(self) -> TierCounters:
        with self.lock:
            return TierCounters(self.hits, self.misses, self.moves, self.bytes_moved)

    def calibrate(self, reps: int = 5) -> ExpertCost:
        """Measures moving a unit up and running it in each tier, on this node."""
        layer, e = min(self.units)
        t0 = time.perf_counter()
        for _ in range(reps):
            w = self.read(layer, e).to(self.device)
        move_s = (time.perf_counter() - t0) / reps
        x = torch.randn(8, w.down.shape[0])

        def per_token(weights: ExpertWeights, dev: torch.device) -> float:
            xx = x.to(dev)
            expert_forward(weights, xx)
            t = time.perf_counter()
            for _ in range(reps):
                expert_forward(weights, xx)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t) / reps / x.shape[0] * 1e3

        slow = self.read(layer, e)
        return ExpertCost(w.nbytes / max(move_s, 1e-9), per_token(w, self.device), per_token(slow, torch.device("cpu")),
                          slow_read=True)


RemoteFn = Callable[[int, int, torch.Tensor], "Callable[[], torch.Tensor]"]


def _const(y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: y


def moe_block(layer: int, x: torch.Tensor, router: torch.Tensor, k: int, store: ExpertStore,
              remote: Mapping[tuple[int, int], str], call_remote: RemoteFn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] normalized hidden states -> (output [T, D], experts [T, k]).

    Remote experts are called first (their RPCs overlap with local compute); outputs are summed
    in ascending expert order, as QuantExperts does."""
    weights, idx = route_tokens(x, router, k)
    groups = {e: torch.where(idx == e) for e in torch.unique(idx).tolist()}  # expert -> (tokens, slots)
    results: dict[int, Callable[[], torch.Tensor]] = {
        e: call_remote(layer, e, x[tok]) for e, (tok, _) in groups.items() if (layer, e) in remote}
    for e, (tok, _) in groups.items():
        if e not in results:
            w = store.weights(layer, e, len(tok))
            results[e] = _const(expert_forward(w, x[tok].to(w.gate_up.device)).to(x.device))
    out = torch.zeros_like(x)
    for e in sorted(groups):
        tok, slot = groups[e]
        out.index_add_(0, tok, (results[e]() * weights[tok, slot, None]).to(out.dtype))
    return out, idx


class MoERunner:
    """The worker's MoE state for one shard: expert store, remote experts, prefetch, statistics.

    begin_step() gives it each row's known routes (from the previous stage) and the previous token's
    route; hook() is LlamaStage's expert hook; end_step() returns each row's route for the next stage
    and records the counts (StatsRecorder, off the critical path)."""

    def __init__(self, store: ExpertStore, k: int, layers: range, n_layers: int, n_experts: int,
                 remote: Mapping[tuple[int, int], str], call_remote: RemoteFn, prefetch: bool, recorder=None,
                 weights=None) -> None:
        self.store, self.k, self.layers, self.n_layers = store, k, layers, n_layers
        self.remote, self.call_remote, self.prefetch = dict(remote), call_remote, prefetch
        self.recorder = recorder
        self.weights = weights or StatsWeights()
        self.n_experts = n_experts
        # what prefetch predicts from: the latest snapshot of Redis plus what this worker saw since
        self.stats = PathStats(n_layers, n_experts)
        self._rows: list[list[tuple[int, ...] | None]] = []
        self._prev: list[list[tuple[int, ...] | None] | None] = []

    def begin_step(self, known: list[dict[int, tuple[int, ...]]], prev: list[list[tuple[int, ...] | None] | None]) -> None:
        self._rows = [[r.get(l) for l in range(self.n_layers)] for r in known]
        self._prev = prev
        if self.prefetch and len(self.layers):
            self._prefetch(self.layers.start)

    def hook(self, layer: int, x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, idx = moe_block(layer, x, router, self.k, self.store, self.remote, self.call_remote)
        for r, row in enumerate(idx.tolist()):
            if r < len(self._rows):
                self._rows[r][layer] = tuple(row)
        if self.prefetch and layer + 1 in self.layers:
            self._prefetch(layer + 1)
        return out, idx

    def set_snapshot(self, stats) -> None:
        """The statistics read from Redis (they include this worker's flushed counts)."""
        self.stats = stats

    def _prefetch(self, layer: int) -> None:
        """Moves up the experts predicted for `layer` (held here), under hysteresis (workers/residency.py)."""
        held = [e for l, e in self.store.units if l == layer]
        if not held or not self._rows:
            return
        scores = prefetch_scores(self.stats, self.weights, layer, self._rows, self._prev)
        assert scores is not None
        self.store.scores[layer] = scores  # a miss at this layer evicts by the same scores
        new = choose_resident(scores, self.store.resident(layer), self.store.slots, self.weights.hysteresis, allowed=held)
        if new != self.store.resident(layer):
            self.store.set_resident(layer, sorted(new))

    def end_step(self) -> list[list[tuple[int, ...] | None]]:
        """Each row's route (all layers known so far); records the counts of this stage's layers."""
        for row, prev in zip(self._rows, self._prev):
            self.stats.observe(row, prev, self.layers)
            if self.recorder is not None:
                self.recorder.record(row, prev, self.layers)
        rows, self._rows = self._rows, []
        return rows

