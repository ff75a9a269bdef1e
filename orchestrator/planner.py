"""Placement of a quantized model's layers onto nodes: a pure function of plain data.

plan(manifest, profiles, options) -> Placement. Each stage is one node holding a contiguous range
of decoder layers (the first stage also the embedding, the last the final norm and lm_head).
Memory counted per stage: the shard's weight bytes (from the manifest), the KV cache for
options.context x options.batch tokens, and activation headroom for a prefill chunk. No stage
exceeds its node's budget.

Objective: the estimated time per token, i.e. the sum over stages of the stage's int8 work divided
by its node's measured throughput, plus one hop per stage. Because the stages of one token run one
after another, a slow node only lengthens the pipeline: it gets layers only when the faster nodes
cannot hold them, and nodes too small for any layer get none. Exact search over (layers placed,
nodes used), which is small for edge clusters (a handful of nodes, tens of layers).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from quant.manifest import Manifest, ShardRange, expert_unit_bytes, is_expert_tensor, layer_of, shard_weight_bytes
from workers.profile import NodeProfile

__all__ = ["PlanOptions", "Stage", "ExpertHost", "Placement", "PlacementError", "plan", "activation_bytes", "format_placement"]

MAX_SEARCH_NODES = 10


class PlacementError(ValueError):
    """The model cannot be placed; the message says how many bytes are missing."""


@dataclass(frozen=True)
class PlanOptions:
    context: int = 2048  # most tokens per session (prompt + generated)
    batch: int = 4  # concurrent sessions whose KV cache is reserved
    prefill_chunk: int = 256  # most prompt tokens a stage processes in one step
    hop_ms: float = 1.0  # cost of one more stage per token (loopback gRPC round trip + (de)serialization)
    version: int = 1
    fast_slots: int = 0  # MoE: experts per layer in a node's fast tier (0: half of them)
    remote_experts: int = 0  # MoE: experts per layer placed on another node (served by ExpertForward)

    def __post_init__(self) -> None:
        if self.context < 1 or self.batch < 1 or self.prefill_chunk < 1 or self.hop_ms < 0:
            raise ValueError("context, batch and prefill_chunk must be >= 1 and hop_ms >= 0")
        if self.fast_slots < 0 or self.remote_experts < 0:
            raise ValueError("fast_slots and remote_experts must be >= 0")

    def slots(self, experts: int) -> int:
        return min(self.fast_slots or max(experts // 2, 1), experts)


@dataclass(frozen=True)
class Stage:
    node_id: str
    tier: str
    first: int
    last: int
    embed: bool
    head: bool
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    budget_bytes: int
    est_ms_per_token: float

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def range(self) -> ShardRange:
        return ShardRange(self.first, self.last, self.embed, self.head)


@dataclass(frozen=True)
class ExpertHost:
    """MoE expert units held by a node for layers another node runs (all in its fast tier)."""

    node_id: str
    units: tuple[tuple[int, int], ...]  # (layer, expert)
    bytes: int


@dataclass(frozen=True)
class Placement:
    version: int
    placement_id: str  # content hash + version: a shard loaded for one placement never serves another
    model: str
    layers: int
    context: int
    batch: int
    stages: tuple[Stage, ...]
    est_ms_per_token: float
    fast_slots: int = 0  # MoE: experts per layer in each fast tier
    expert_hosts: tuple[ExpertHost, ...] = ()  # MoE: experts living on another node than their layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        hosts = tuple(ExpertHost(h["node_id"], tuple(tuple(u) for u in h["units"]), h["bytes"])
                      for h in d.get("expert_hosts", ()))
        return cls(**{**d, "stages": tuple(Stage(**s) for s in d["stages"]), "expert_hosts": hosts})

    def remote_units(self) -> dict[tuple[int, int], str]:
        """(layer, expert) -> node id, for experts living away from their layer's stage."""
        return {u: h.node_id for h in self.expert_hosts for u in h.units}


def activation_bytes(manifest: Manifest, opts: PlanOptions, head: bool) -> int:
    """Headroom for one step of a prefill chunk: float32 activations, int8 copies, attention scores."""
    dims = manifest.dims
    d, i, h = dims.hidden, dims.intermediate, dims.heads
    t = opts.prefill_chunk
    rows = t * (4 * d + 3 * i) * 4 + t * (d + i)  # residual, qkv, o, gate/up, silu product + int8 copies
    scores = h * t * opts.context * 4  # [H, T, S] float32
    logits = opts.batch * dims.vocab * 4 if head else 0
    return rows + scores + logits


def _int8_macs(manifest: Manifest, r: ShardRange) -> int:
    """int8 multiply-accumulates per token of a shard: its int8 weights, less a tied embedding's gather
    (MoE: k of E experts run per token)."""
    t = manifest.tensors
    names = [n for n in t if t[n].dtype == "int8" and n.endswith("qweight")]
    e, k = (manifest.moe.experts, manifest.moe.top_k) if manifest.moe else (1, 1)
    total = 0
    for n in names:
        li = layer_of(n)
        if li is not None:
            macs = math.prod(t[n].shape) * k // e if is_expert_tensor(n) else math.prod(t[n].shape)
            total += macs if r.first <= li < r.last else 0
        elif n.startswith("lm_head.") and r.head:
            total += math.prod(t[n].shape)
    return total


class _Sizes:
    """Per-layer weight bytes and int8 MACs, precomputed once from the manifest."""

    def __init__(self, manifest: Manifest, opts: PlanOptions) -> None:
        n = manifest.n_layers
        self.layer_bytes = [shard_weight_bytes(manifest, ShardRange(i, i + 1, False, False)) for i in range(n)]
        moe = manifest.moe
        self.unit_bytes = [expert_unit_bytes(manifest, i) for i in range(n)] if moe else [0] * n
        if moe:  # the fast tier of the experts that stay with their layer; the slow tier is the checkpoint file
            local = min(opts.slots(moe.experts), moe.experts - opts.remote_experts)
            self.layer_bytes = [b + local * u for b, u in zip(self.layer_bytes, self.unit_bytes)]
        self.prefix = [0]
        for b in self.layer_bytes:
            self.prefix.append(self.prefix[-1] + b)
        self.extra = {(e, h): shard_weight_bytes(manifest, ShardRange(0, 0, e, h)) for e in (False, True) for h in (False, True)}
        macs = [_int8_macs(manifest, ShardRange(i, i + 1, False, False)) for i in range(n)]
        self.mac_prefix = [0]
        for m in macs:
            self.mac_prefix.append(self.mac_prefix[-1] + m)
        self.head_macs = _int8_macs(manifest, ShardRange(0, 0, False, True))

    def weights(self, r: ShardRange) -> int:
        return self.prefix[r.last] - self.prefix[r.first] + self.extra[(r.embed, r.head)]

    def macs(self, r: ShardRange) -> int:
        return self.mac_prefix[r.last] - self.mac_prefix[r.first] + (self.head_macs if r.head else 0)


def plan(manifest: Manifest, profiles: list[NodeProfile], opts: PlanOptions = PlanOptions(), model: str = "") -> Placement:
    if not profiles:
        raise PlacementError("no nodes to place on")
    ids = [p.node_id for p in profiles]
    if len(set(ids)) != len(ids):
        raise PlacementError(f"node ids must be distinct: {ids}")
    moe = manifest.moe
    if moe and opts.remote_experts >= moe.experts:
        raise PlacementError(f"--remote-experts {opts.remote_experts} must leave at least one of the {moe.experts} experts "
                             f"per layer with its layer")
    sizes = _Sizes(manifest, opts)
    found = _search(manifest, sizes, profiles, opts)
    if found is None:
        raise PlacementError(_missing_message(manifest, sizes, profiles, opts))
    n_layers, kv_tok = manifest.n_layers, manifest.kv_bytes_per_token(1) * opts.context * opts.batch
    stages, start = [], 0
    for p, end in found[1]:
        r = ShardRange(start, end, start == 0, end == n_layers)
        stages.append(Stage(p.node_id, p.tier, r.first, r.last, r.embed, r.head, sizes.weights(r),
                            kv_tok * (end - start), activation_bytes(manifest, opts, r.head), p.budget_bytes,
                            round(sizes.macs(r) / (p.int8_gops * 1e9) * 1e3 + opts.hop_ms, 3)))
        start = end
    hosts = _place_remote_experts(manifest, sizes, profiles, stages, opts) if moe else ()
    slots = opts.slots(moe.experts) if moe else 0
    body = json.dumps({"files": manifest.files_table(), "stages": [asdict(s) for s in stages],
                       "hosts": [asdict(h) for h in hosts], "slots": slots,
                       "context": opts.context, "batch": opts.batch}, sort_keys=True)
    pid = f"v{opts.version}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"
    return Placement(opts.version, pid, model, n_layers, opts.context, opts.batch, tuple(stages), round(found[0], 3),
                     slots, hosts)


def _place_remote_experts(manifest: Manifest, sizes: _Sizes, profiles: list[NodeProfile], stages: list[Stage],
                          opts: PlanOptions) -> tuple[ExpertHost, ...]:
    """The last `remote_experts` experts of each layer go to other nodes, each to the node (not the
    layer's own) with the most budget left; they are resident there."""
    if not opts.remote_experts:
        return ()
    n_experts = manifest.moe.experts if manifest.moe else 0
    free = {p.node_id: p.budget_bytes for p in profiles}
    for s in stages:
        free[s.node_id] -= s.used_bytes
    units: dict[str, list[tuple[int, int]]] = {}
    for s in stages:
        for layer in range(s.first, s.last):
            for e in range(n_experts - opts.remote_experts, n_experts):
                need = sizes.unit_bytes[layer]
                cands = [n for n in free if n != s.node_id and free[n] >= need]
                if not cands:
                    short = need - max((v for n, v in free.items() if n != s.node_id), default=0)
                    raise PlacementError(f"expert {e} of layer {layer} ({need:,} bytes) fits on no node other than "
                                         f"{s.node_id}: {short:,} bytes are missing. Lower --remote-experts or add memory")
                best = max(cands, key=lambda n: (free[n], n))
                free[best] -= need
                units.setdefault(best, []).append((layer, e))
    return tuple(ExpertHost(n, tuple(u), sum(sizes.unit_bytes[l] for l, _ in u)) for n, u in sorted(units.items()))


def _search(manifest: Manifest, sizes: _Sizes, profiles: list[NodeProfile], opts: PlanOptions):
    """-> (estimated ms per token, ((profile, end layer), ...)) or None when nothing fits."""
    n_layers = manifest.n_layers
    kv_tok = manifest.kv_bytes_per_token(1) * opts.context * opts.batch  # one layer
    act = {h: activation_bytes(manifest, opts, h) for h in (False, True)}

    def need(r: ShardRange) -> int:
        return sizes.weights(r) + kv_tok * (r.last - r.first) + act[r.head]

    # Nodes that can hold at least one layer; beyond MAX_SEARCH_NODES keep the fastest.
    useful = [p for p in profiles if any(need(ShardRange(0, 1, e, h)) <= p.budget_bytes
                                         for e in (False, True) for h in (False, True))]
    useful = sorted(useful, key=lambda p: -p.int8_gops)[:MAX_SEARCH_NODES]

    @lru_cache(maxsize=None)
    def best(i: int, used: int) -> tuple[float, float, tuple[tuple[int, int], ...]] | None:
        """Cheapest way to place layers [i, L) on nodes not in `used`
        -> (ms, least free fraction of a budget, ((node index, end layer), ...))."""
        if i == n_layers:
            return 0.0, 1.0, ()
        out = None
        for k, p in enumerate(useful):
            if used >> k & 1:
                continue
            for j in range(i + 1, n_layers + 1):
                r = ShardRange(i, j, i == 0, j == n_layers)
                if need(r) > p.budget_bytes:
                    if j < n_layers:
                        continue  # the head may not fit, a shorter range without it may
                    break
                rest = best(j, used | 1 << k)
                if rest is None:
                    continue
                cost = sizes.macs(r) / (p.int8_gops * 1e9) * 1e3 + opts.hop_ms + rest[0]
                slack = min(1 - need(r) / max(p.budget_bytes, 1), rest[1])
                # least time first; among equal times, the most headroom on the fullest node
                if out is None or cost < out[0] - 1e-9 or (cost < out[0] + 1e-9 and slack > out[1]):
                    out = (cost, slack, ((k, j),) + rest[2])
        return out

    found = best(0, 0)
    return None if found is None else (found[0], tuple((useful[k], j) for k, j in found[2]))


def _missing_message(manifest: Manifest, sizes: _Sizes, profiles: list[NodeProfile], opts: PlanOptions) -> str:
    """Says how many bytes are missing: the least extra budget on the largest node that makes it fit."""
    n = manifest.n_layers
    weights = sizes.weights(ShardRange(0, n, True, True))
    kv = manifest.kv_bytes_per_token(n) * opts.context * opts.batch
    act = activation_bytes(manifest, opts, True)
    have = sum(p.budget_bytes for p in profiles)
    big = max(range(len(profiles)), key=lambda k: profiles[k].budget_bytes)

    def fits(extra: int) -> bool:
        grown = [NodeProfile(**{**p.to_dict(), "budget_bytes": p.budget_bytes + extra}) if k == big else p
                 for k, p in enumerate(profiles)]
        return _search(manifest, sizes, grown, opts) is not None

    lo, hi = 0, weights + kv + act  # with hi extra the largest node holds everything
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return (f"the model does not fit: it needs {weights:,} bytes of weights + {kv:,} of KV cache "
            f"({opts.context} tokens x {opts.batch} sessions) + {act:,} of activation headroom per stage, and the "
            f"{len(profiles)} node(s) offer {have:,} in total; {hi:,} bytes are missing (on node "
            f"{profiles[big].node_id}, the largest). Add a node or memory, or lower --context/--batch")


def format_placement(p: Placement) -> str:
    rows = [("node", "tier", "layers", "embed/head", "bytes used / budget", "est ms/token")]
    for s in p.stages:
        eh = "/".join(x for x, on in (("embed", s.embed), ("head", s.head)) if on) or "-"
        rows.append((s.node_id if len(s.node_id) <= 16 else s.node_id[:12] + "...", s.tier, f"{s.first}-{s.last - 1}", eh,
                     f"{s.used_bytes:,} / {s.budget_bytes:,} ({100 * s.used_bytes / max(s.budget_bytes, 1):.0f}%)",
                     f"{s.est_ms_per_token:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for h in p.expert_hosts:
        lines.append(f"node {h.node_id[:12]} also holds {len(h.units)} expert(s) of other stages' layers "
                     f"({h.bytes:,} bytes): " + ", ".join(f"L{l}E{e}" for l, e in h.units[:12])
                     + (" ..." if len(h.units) > 12 else ""))
    if p.fast_slots:
        lines.append(f"MoE: {p.fast_slots} experts per layer in each fast tier; the others read from the checkpoint")
    lines.append(f"placement {p.placement_id}: {len(p.stages)} stage(s), {p.layers} layers, context {p.context} x "
                 f"batch {p.batch}, estimated {p.est_ms_per_token:.2f} ms per token")
    return "\n".join(lines)
