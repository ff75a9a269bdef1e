"""A lean integer decoder for Llama-family checkpoints (Llama, Mistral): one stage of layers.

transformers' generic forward spends more time in Python than in the int8 kernels at decode
time (M = 1). This runs the same quantized weights with less overhead: q/k/v and gate/up fused
into one int8 GEMM each (they share an input, so the activation is quantized once), a
preallocated KV cache per session, and lm_head on the last position only. A stage covers a
contiguous range of decoder layers, which is what a worker hosts in a distributed placement.
Greedy output equals the transformers path on the same checkpoint (tests/workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.kernels import int8_linear
from quant.qlinear import QuantEmbedding, QuantLinear

__all__ = ["LlamaDims", "KVCache", "LlamaStage", "LocalLlama", "supports"]


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


def supports(model) -> bool:
    """Llama/Mistral with default RoPE, no attention/MLP bias, every linear quantized."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    if cfg.model_type not in ("llama", "mistral") or rope.get("rope_type", "default") != "default":
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False
    return all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))


@dataclass(frozen=True)
class FusedLinear:
    """Several QuantLinears that read one input, rows concatenated: one activation quantization."""

    qweight: torch.Tensor  # [sum N, K] int8
    w_scale: torch.Tensor  # [sum N]
    static: float | None

    @classmethod
    def of(cls, *mods: QuantLinear) -> "FusedLinear":
        statics = {m.static_scale() for m in mods}
        assert len(statics) == 1, "fused linears must share their activation scale"
        return cls(torch.cat([m.qweight for m in mods]).contiguous(), torch.cat([m.w_scale for m in mods]), statics.pop())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.w_scale, None, self.static)


@dataclass(frozen=True)
class LayerWeights:
    ln1: torch.Tensor  # [D]
    qkv: FusedLinear  # -> [(H + 2 KV) * hd]
    o: FusedLinear
    ln2: torch.Tensor
    gate_up: FusedLinear  # -> [2 I]
    down: FusedLinear


class KVCache:
    """Keys and values of one session for the layers of one stage: [layers, KV, max_len, hd] each."""

    def __init__(self, layers: int, dims: LlamaDims, max_len: int) -> None:
        shape = (layers, dims.kv_heads, max_len, dims.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.length, self.max_len = 0, max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaStage:
    """Decoder layers [first, last) of a quantized Llama-family model, run on hidden states."""

    def __init__(self, model, first: int = 0, last: int | None = None, max_positions: int = 8192) -> None:
        if not supports(model):
            raise ValueError("LlamaStage needs a quantized Llama/Mistral checkpoint with default RoPE")
        self.dims = d = LlamaDims.from_config(model.config)
        layers = model.model.layers
        last = len(layers) if last is None else last
        self.first, self.last = first, last
        self.layers = [self._extract(layers[i]) for i in range(first, last)]
        inv_freq = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float) / d.head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]  # [P, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        self.cos, self.sin = emb.cos(), emb.sin()

    @staticmethod
    def _extract(layer) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        return LayerWeights(layer.input_layernorm.weight.data, FusedLinear.of(a.q_proj, a.k_proj, a.v_proj),
                            FusedLinear.of(a.o_proj), layer.post_attention_layernorm.weight.data,
                            FusedLinear.of(m.gate_proj, m.up_proj), FusedLinear.of(m.down_proj))

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(len(self.layers), self.dims, max_len)

    def _attention(self, i: int, lw: LayerWeights, h: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        d, t = self.dims, h.shape[0]
        qkv = lw.qkv(_rms_norm(h, lw.ln1, d.eps))  # [T, (H + 2KV) hd]
        q, k, v = qkv.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], dim=-1)
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
        return lw.o(out[0].transpose(0, 1).reshape(t, d.heads * d.head_dim))  # [T, D]

    def forward(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [T, D] hidden states at positions cache.length .. +T -> [T, D]; appends to the cache."""
        pos, t = cache.length, h.shape[0]
        if pos + t > cache.max_len:
            raise ValueError(f"session would reach {pos + t} tokens, over its cache of {cache.max_len}")
        for i, lw in enumerate(self.layers):
            h = h + self._attention(i, lw, h, cache, pos)
            gate, up = lw.gate_up(_rms_norm(h, lw.ln2, self.dims.eps)).chunk(2, dim=-1)  # [T, I] each
            h = h + lw.down(F.silu(gate) * up)
        cache.length = pos + t
        return h


class LocalLlama:
    """Embedding + one stage holding every layer + final norm + lm_head: single-process decoding."""

    def __init__(self, model, max_positions: int = 8192) -> None:
        self.stage = LlamaStage(model, max_positions=max_positions)
        emb = model.model.embed_tokens
        assert isinstance(emb, QuantEmbedding), "the checkpoint's embedding must be quantized"
        self.embed, self.norm_w, self.eps = emb, model.model.norm.weight.data, self.stage.dims.eps
        head = model.lm_head
        self.head = FusedLinear.of(head)
        self.max_positions = max_positions

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return self.stage.new_cache(max_len or self.max_positions)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [T] -> logits [V] of the last position."""
        h = self.stage.forward(self.embed(ids), cache)  # [T, D]
        return self.head(_rms_norm(h[-1:], self.norm_w, self.eps))[0]
