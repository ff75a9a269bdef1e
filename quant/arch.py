"""Architecture adapters: where the decoder layers are, and which linears share an input.

A smoothing group is a set of weights that read the same activation, plus the module whose
output channels produce that activation (a norm, or a linear for the v->o and up->down pairs),
into which the inverse smoothing scale is folded. Everything is addressed by module path
relative to one decoder layer, so the quantization pipeline stays architecture-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

__all__ = ["Group", "ArchSpec", "arch_spec", "SUPPORTED_ARCHS"]

SUPPORTED_ARCHS = ("llama", "mistral", "mixtral", "opt")


@dataclass(frozen=True)
class Group:
    name: str
    input_of: str  # module whose first input is the group's activation (a forward pre-hook reads it)
    prev: str | None  # norm or linear whose output channels absorb 1/s; None: no smoothing
    linears: tuple[str, ...] = ()  # nn.Linear modules reading the activation
    experts: str | None = None  # Mixtral expert bank whose gate_up reads the activation
    float_readers: tuple[str, ...] = ()  # float linears reading it too (the router): W *= s
    heads_per_kv: int = 1  # v->o under GQA: one scale per kv channel, repeated over its heads
    head_dim: int = 0


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers_path: str  # ModuleList of decoder layers, from the CausalLM root
    final_norm_path: str
    embed_path: str
    groups: tuple[Group, ...]


def _attention_groups(cfg, q: str, k: str, v: str, o: str, norm: str) -> tuple[Group, Group]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qkv = Group("qkv", input_of=q, prev=norm, linears=(q, k, v))
    vo = Group("o", input_of=o, prev=v, linears=(o,), heads_per_kv=heads // kv, head_dim=head_dim)
    return qkv, vo


def arch_spec(model: Any) -> ArchSpec:
    """The adapter for a transformers CausalLM; a clear error for anything else."""
    cfg = model.config
    t: str = cfg.model_type
    if t in ("llama", "mistral"):
        qkv, vo = _attention_groups(cfg, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "input_layernorm")
        mlp = Group("gate_up", input_of="mlp.gate_proj", prev="post_attention_layernorm",
                    linears=("mlp.gate_proj", "mlp.up_proj"))
        down = Group("down", input_of="mlp.down_proj", prev="mlp.up_proj", linears=("mlp.down_proj",))
        return ArchSpec(t, "model.layers", "model.norm", "model.embed_tokens", (qkv, vo, mlp, down))
    if t == "mixtral":
        qkv, vo = _attention_groups(cfg, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "input_layernorm")
        moe = Group("experts", input_of="mlp.gate", prev="post_attention_layernorm",
                    experts="mlp.experts", float_readers=("mlp.gate",))
        return ArchSpec(t, "model.layers", "model.norm", "model.embed_tokens", (qkv, vo, moe))
    if t == "opt":
        if not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size:
            raise ValueError("OPT variants with post-LayerNorm or a projected embedding (OPT-350M) are not supported")
        qkv, vo = _attention_groups(cfg, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.out_proj", "self_attn_layer_norm")
        fc1 = Group("fc1", input_of="fc1", prev="final_layer_norm", linears=("fc1",))
        # ReLU is positively homogeneous (relu(x / s) = relu(x) / s for s > 0): fc1 -> fc2 folds.
        fc2 = Group("fc2", input_of="fc2", prev="fc1", linears=("fc2",))
        return ArchSpec(t, "model.decoder.layers", "model.decoder.final_layer_norm",
                        "model.decoder.embed_tokens", (qkv, vo, fc1, fc2))
    raise ValueError(
        f"model type {t!r} is not supported; edgeweave quantizes {', '.join(SUPPORTED_ARCHS)}"
    )
