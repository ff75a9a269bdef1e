"""A lean integer decoder for Llama-family checkpoints (Llama, Mistral): one stage of layers.

transformers' generic forward spends more time in Python than in the int8 kernels at decode
time (M = 1). This runs the same quantized weights with less overhead: q/k/v and gate/up fused
into one int8 GEMM each (they share an input, so the activation is quantized once), a
preallocated KV cache per session, and lm_head on the last position only. A stage covers a
contiguous range of decoder layers, which is what a worker hosts in a distributed placement.
Greedy output equals the transformers path on the same checkpoint (tests/workers).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quant.formats import RuntimeLinear, fused_linear
from quant.manifest import kv_bytes_per_token
from quant.native import EwLlamaDims, EwLlamaLayer, load_kernels
from quant.qlinear import QuantLinear

__all__ = ["LlamaDims", "KVCache", "LlamaStage", "LocalLlama", "Embedder", "Head", "supports", "supports_config",
           "layer_prefix"]


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float

    @classmethod
    def from_config(cls, cfg) -> "LlamaDims":
        heads = cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return cls(cfg.hidden_size, heads, cfg.num_key_value_heads or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.rms_norm_eps, float(theta))


def supports_config(cfg) -> bool:
    """Llama/Mistral/Mixtral with default RoPE, full attention and no attention/MLP bias (what this
    stage implements; Mixtral's experts run through the `moe` hook, workers/moe.py)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if cfg.model_type not in ("llama", "mistral", "mixtral") or rope.get("rope_type", "default") != "default":
        return False
    return not (getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_bias", False)
                or getattr(cfg, "mlp_bias", False))


def supports(model) -> bool:
    """A dense model LocalLlama runs in one process: supports_config, not MoE, every linear quantized."""
    return supports_config(model.config) and model.config.model_type != "mixtral" and all(
        isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))


@dataclass(frozen=True)
class LayerWeights:
    ln1: torch.Tensor  # [D]
    qkv: RuntimeLinear  # -> [(H + 2 KV) * hd]
    o: RuntimeLinear
    ln2: torch.Tensor
    gate_up: RuntimeLinear | None  # -> [2 I] (dense MLP)
    down: RuntimeLinear | None
    router: torch.Tensor | None = None  # [E, D] float (MoE layer: experts run through the stage's moe hook)


# (global layer, normalized hidden [T, D], router [E, D]) -> (output [T, D], experts [T, k])
MoEHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVCache:
    """Keys and values of one session for the layers of one stage: [layers, KV, max_len, hd] each."""

    def __init__(self, layers: int, dims: LlamaDims, max_len: int) -> None:
        shape = (layers, dims.kv_heads, max_len, dims.head_dim)
        # never read past `length` (attention reads positions [0, length + T)), so left uninitialized
        self.k, self.v = torch.empty(shape), torch.empty(shape)
        self.length, self.max_len = 0, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def size_bytes(layers: int, dims: LlamaDims, max_len: int) -> int:
        """nbytes of a cache not yet allocated (the planner budgets the same bytes: quant.manifest)."""
        return kv_bytes_per_token(layers, dims.kv_heads, dims.head_dim) * max_len


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class LlamaStage:
    """Decoder layers [first, last) of a quantized Llama-family checkpoint, run on hidden states.

    tensors: checkpoint tensor names -> tensors; only the layers in range are read, so a worker
    can hold just its shard (workers/shard.py).
    native: run dense stages in one C call per step (quant/csrc/llama_stage.c) instead of torch ops;
    stages it cannot run (MoE layers, Tender) use torch ops either way (see `native_ready`)."""

    def __init__(self, dims: LlamaDims, tensors: Mapping[str, torch.Tensor], first: int, last: int,
                 max_positions: int = 8192, moe: MoEHook | None = None, native: bool = True,
                 progress: bool = False) -> None:
        self.dims = d = dims
        self.first, self.last = first, last
        span = range(first, last)
        self.layers = [self._extract(tensors, layer_prefix(i)) for i in
                       (tqdm(span, desc=f"load layers {first}-{last - 1}", unit="layer") if progress else span)]
        if moe is None and any(lw.router is not None for lw in self.layers):
            raise ValueError("MoE layers need an expert hook (workers/moe.py)")
        self.moe = moe
        self.routes: dict[int, torch.Tensor] = {}  # MoE: layer -> experts [sum T, k] of the last step
        inv_freq = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float) / d.head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]  # [P, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        self.cos, self.sin = emb.cos().contiguous(), emb.sin().contiguous()
        self.max_positions = max_positions
        self._keep: list[torch.Tensor] = []  # tensors the C structs point into
        self._native = self._native_layers() if native else None
        self._native_dims = None if self._native is None else EwLlamaDims(
            d.hidden, d.heads, d.kv_heads, d.head_dim, self._down_in(self.layers[0]), d.eps)

    @property
    def native_ready(self) -> bool:
        """Whether steps run in the C stage."""
        return self._native is not None

    def _native_layers(self):
        """ctypes array of the layers' C structs, or None if a layer is MoE or has a linear without a C kernel."""
        d = self.dims
        layers = []
        if any(lw.gate_up is None or lw.down is None for lw in self.layers):
            return None
        inter = self._down_in(self.layers[0]) if self.layers else 0
        for lw in self.layers:
            ln = [lw.ln1.float().contiguous(), lw.ln2.float().contiguous()]
            self._keep.extend(ln)
            widths = ((lw.qkv, d.hidden, (d.heads + 2 * d.kv_heads) * d.head_dim),
                      (lw.o, d.heads * d.head_dim, d.hidden), (lw.gate_up, d.hidden, 2 * inter),
                      (lw.down, inter, d.hidden))
            lins = [f.native(k, self._keep) for f, k, _ in widths]
            if any(x is None for x in lins):
                return None
            for (f, k, n), name in zip(widths, ("qkv", "o", "gate_up", "down")):
                if f.qweight.shape[0] != n:
                    raise ValueError(f"layer {self.first + len(layers)}: {name} has {f.qweight.shape[0]} outputs where "
                                     f"the model config needs {n}; the checkpoint does not match its config")
            layers.append(EwLlamaLayer(ln[0].data_ptr(), ln[1].data_ptr(), *lins))
        return (EwLlamaLayer * len(layers))(*layers) if layers else None

    @staticmethod
    def _down_in(lw: LayerWeights) -> int:
        """down_proj's input width I (gate_up's rows are gate | up)."""
        assert lw.gate_up is not None
        return lw.gate_up.qweight.shape[0] // 2

    @classmethod
    def of_model(cls, model, first: int = 0, last: int | None = None, max_positions: int = 8192,
                 native: bool = True) -> "LlamaStage":
        if not supports(model):
            raise ValueError("LlamaStage needs a quantized Llama/Mistral checkpoint with default RoPE")
        last = model.config.num_hidden_layers if last is None else last
        return cls(LlamaDims.from_config(model.config), model.state_dict(), first, last, max_positions, native=native)

    @staticmethod
    def _extract(t: Mapping[str, torch.Tensor], p: str) -> LayerWeights:
        a, m = p + "self_attn.", p + "mlp."
        attn = (t[p + "input_layernorm.weight"].float(), fused_linear(t, a + "q_proj", a + "k_proj", a + "v_proj"),
                fused_linear(t, a + "o_proj"), t[p + "post_attention_layernorm.weight"].float())
        if m + "gate.weight" in t:  # Mixtral: router here, experts through the hook
            return LayerWeights(*attn, None, None, t[m + "gate.weight"].float())
        return LayerWeights(*attn, fused_linear(t, m + "gate_proj", m + "up_proj"), fused_linear(t, m + "down_proj"))

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(len(self.layers), self.dims, max_len)

    def _attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """q [T, H hd], k/v [T, KV hd] of one session at positions cache.length.. -> [T, H hd]."""
        d, t, pos = self.dims, q.shape[0], cache.length
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]  # [T, hd]
        q = _rotate(q.view(t, d.heads, d.head_dim).transpose(0, 1), cos, sin)  # [H, T, hd]
        k = _rotate(k.view(t, d.kv_heads, d.head_dim).transpose(0, 1), cos, sin)  # [KV, T, hd]
        cache.k[i, :, pos:pos + t] = k
        cache.v[i, :, pos:pos + t] = v.view(t, d.kv_heads, d.head_dim).transpose(0, 1)
        keys, values = cache.k[i, :, : pos + t], cache.v[i, :, : pos + t]  # [KV, S, hd]
        mask = None
        if t > 1:  # prefill: token j sees cache positions <= pos + j
            mask = torch.ones(t, pos + t, dtype=torch.bool).tril(diagonal=pos)
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(t, d.heads * d.head_dim)

    def forward_batch(self, hs: list[torch.Tensor], caches: list[KVCache]) -> list[torch.Tensor]:
        """Several sessions in one step: hs[j] [T_j, D] at positions caches[j].length.. -> [T_j, D] each.

        The linears run once on all rows stacked (activation scales are per row, int32 accumulation
        is exact, so a row's result does not depend on its batch); attention runs per session."""
        for h, c in zip(hs, caches, strict=True):
            if c.length + h.shape[0] > c.max_len:
                raise ValueError(f"session would reach {c.length + h.shape[0]} tokens, over its cache of {c.max_len}")
            if c.length + h.shape[0] > self.max_positions:
                raise ValueError(f"session would reach {c.length + h.shape[0]} tokens, over the {self.max_positions} positions served")
        d = self.dims
        rows = [h.shape[0] for h in hs]
        if self._native is not None and all(h.device.type == "cpu" for h in hs):
            return self._forward_native(hs, caches, rows)
        h = torch.cat(hs) if len(hs) > 1 else hs[0]  # [sum T, D]
        for i, lw in enumerate(self.layers):
            qkv = lw.qkv(_rms_norm(h, lw.ln1, d.eps))  # [sum T, (H + 2KV) hd]
            q, k, v = qkv.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], dim=-1)
            parts = [self._attention(i, qj, kj, vj, c) for qj, kj, vj, c in
                     zip(q.split(rows), k.split(rows), v.split(rows), caches)]
            h = h + lw.o(torch.cat(parts) if len(parts) > 1 else parts[0])
            x = _rms_norm(h, lw.ln2, d.eps)
            if lw.router is not None:
                assert self.moe is not None
                out, self.routes[self.first + i] = self.moe(self.first + i, x, lw.router)
                h = h + out
            else:
                assert lw.gate_up is not None and lw.down is not None
                gate, up = lw.gate_up(x).chunk(2, dim=-1)  # [sum T, I] each
                h = h + lw.down(F.silu(gate) * up)
        for c, t in zip(caches, rows):
            c.length += t
        return list(h.split(rows))

    def _forward_native(self, hs: list[torch.Tensor], caches: list[KVCache], rows: list[int]) -> list[torch.Tensor]:
        """forward_batch in one C call: every row's norms, linears, RoPE, cache append and attention."""
        h = torch.cat(hs).float().contiguous() if len(hs) > 1 else hs[0].float().clone().contiguous()  # [R, D]
        kp: list[int] = []
        vp: list[int] = []
        ml: list[int] = []
        pos: list[int] = []
        for c, t in zip(caches, rows):
            kp += [c.k.data_ptr()] * t
            vp += [c.v.data_ptr()] * t
            ml += [c.max_len] * t
            pos += range(c.length, c.length + t)
        meta = torch.tensor([kp, vp, ml, pos], dtype=torch.int64)  # [4, R]
        r = h.shape[0]
        assert self._native_dims is not None
        rc = load_kernels().ew_llama_stage_forward(
            ctypes.byref(self._native_dims), len(self.layers), self._native, r, h.data_ptr(),
            meta[0].data_ptr(), meta[1].data_ptr(), meta[2].data_ptr(), meta[3].data_ptr(),
            self.cos.data_ptr(), self.sin.data_ptr())
        if rc != 0:
            raise MemoryError(f"the C stage could not allocate scratch memory for {r} rows")
        for c, t in zip(caches, rows):
            c.length += t
        return list(h.split(rows))

    def forward(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [T, D] hidden states at positions cache.length .. +T -> [T, D]; appends to the cache."""
        return self.forward_batch([h], [cache])[0]


class Embedder:
    """Token ids -> hidden states from int8 rows: the embedding, or lm_head's rows when tied."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "model.embed_tokens.qweight" in tensors:
            self.q, self.s = tensors["model.embed_tokens.qweight"], tensors["model.embed_tokens.w_scale"].float()
        else:  # tied: lm_head's rows carry its smoothing (W * s); col_scale is 1 / s
            self.q, self.s = tensors["lm_head.qweight"], tensors["lm_head.w_scale"].float()
            perm = tensors.get("lm_head.perm")  # Tender stores lm_head's columns reordered
            if perm is not None:
                self.q = self.q[:, torch.argsort(perm.long())].contiguous()
        col = tensors.get("model.embed_tokens.col_scale")
        self.col = None if col is None else col.float()
        self.vocab = self.q.shape[0]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, D]"""
        rows = self.q[ids].float() * self.s[ids].unsqueeze(-1)
        return rows if self.col is None else rows * self.col


class Head:
    """Final norm + int8 lm_head on the last position of each session."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], eps: float) -> None:
        self.norm_w, self.eps = tensors["model.norm.weight"].float(), eps
        self.lin = fused_linear(tensors, "lm_head")

    def __call__(self, last: torch.Tensor) -> torch.Tensor:
        """last [B, D] hidden states of each session's last position -> logits [B, V]"""
        return self.lin(_rms_norm(last, self.norm_w, self.eps))


class LocalLlama:
    """Embedding + one stage holding every layer + final norm + lm_head: single-process decoding."""

    def __init__(self, model, max_positions: int = 8192, native: bool = True) -> None:
        self.stage = LlamaStage.of_model(model, max_positions=max_positions, native=native)
        tensors = model.state_dict()
        self.embed, self.head = Embedder(tensors), Head(tensors, self.stage.dims.eps)
        self.max_positions = max_positions

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return self.stage.new_cache(max_len or self.max_positions)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [T] -> logits [V] of the last position."""
        h = self.stage.forward(self.embed(ids), cache)  # [T, D]
        return self.head(h[-1:])[0]
