"""A shard of a quantized checkpoint: layers [first, last), plus the embedding and/or the head.

The size and tensor list of a shard come from the manifest alone (pure; the planner uses them),
and a worker reads only its shard's tensors from the safetensors file, so no node ever has to
hold the whole model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant.checkpoint import WEIGHTS, CheckpointError, read_manifest, verify_files

from .llama_stage import Embedder, Head, LlamaDims, LlamaStage, MoEHook, supports_config
from .moe import expert_tensor_prefix, is_expert_tensor

__all__ = ["ShardRange", "shard_tensor_names", "shard_weight_bytes", "layer_count", "kv_bytes_per_token",
           "LoadedShard", "load_shard", "model_config", "check_servable", "moe_shape", "expert_unit_bytes"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


@dataclass(frozen=True)
class ShardRange:
    first: int  # first decoder layer (inclusive)
    last: int  # last decoder layer (exclusive)
    embed: bool  # token embedding (first stage)
    head: bool  # final norm + lm_head (last stage)

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"bad layer range [{self.first}, {self.last})")


def model_config(manifest: dict):
    from transformers import AutoConfig

    cfg = dict(manifest["model_config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def check_servable(manifest: dict) -> None:
    """The distributed runtime serves Llama/Mistral/Mixtral checkpoints (full attention, default RoPE)."""
    cfg = model_config(manifest)
    if not supports_config(cfg):
        raise ValueError(f"the runtime serves Llama/Mistral/Mixtral checkpoints with default RoPE and full attention; "
                         f"this one is {manifest['model_type']!r} (use `edgeweave generate DIR` for a single process)")


def moe_shape(manifest: dict) -> tuple[int, int] | None:
    """(experts per layer, experts per token) of an MoE checkpoint, None for a dense one."""
    c = manifest["model_config"]
    if not c.get("num_local_experts"):
        return None
    return int(c["num_local_experts"]), int(c["num_experts_per_tok"])


def expert_unit_bytes(manifest: dict, layer: int) -> int:
    """Bytes of one expert unit of `layer` (its slice of every expert bank)."""
    t, (n, _) = manifest["tensors"], moe_shape(manifest) or (1, 1)
    p = expert_tensor_prefix(layer)
    return sum(math.prod(t[k]["shape"]) * _DTYPE_BYTES[t[k]["dtype"]] for k in t if k.startswith(p)) // n


def layer_count(manifest: dict) -> int:
    return int(manifest["model_config"]["num_hidden_layers"])


def shard_tensor_names(manifest: dict, r: ShardRange) -> list[str]:
    names = []
    tied = "model.embed_tokens.qweight" not in manifest["tensors"]
    for name in manifest["tensors"]:
        m = _LAYER.match(name)
        if is_expert_tensor(name):
            keep = False  # expert units: loaded one by one into the worker's tiers (workers/moe.py)
        elif m:
            keep = r.first <= int(m.group(1)) < r.last
        elif name.startswith("model.embed_tokens."):
            keep = r.embed
        elif name.startswith("lm_head."):
            keep = r.head or (r.embed and tied)  # a tied embedding reads lm_head's int8 rows
        elif name.startswith("model.norm."):
            keep = r.head
        else:
            keep = False
        if keep:
            names.append(name)
    return names


def shard_weight_bytes(manifest: dict, r: ShardRange) -> int:
    """Bytes the shard's weights take in memory (sparse weights are decoded to dense at load)."""
    t = manifest["tensors"]
    return sum(t[n].get("resident_bytes", math.prod(t[n]["shape"]) * _DTYPE_BYTES[t[n]["dtype"]])
               for n in shard_tensor_names(manifest, r))


def kv_bytes_per_token(manifest: dict, layers: int) -> int:
    """float32 keys and values of `layers` layers for one token."""
    c = manifest["model_config"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * layers * (c.get("num_key_value_heads") or heads) * head_dim * 4


@dataclass(frozen=True)
class LoadedShard:
    range: ShardRange
    dims: LlamaDims
    stage: LlamaStage
    embed: Embedder | None
    head: Head | None
    weight_bytes: int
    vocab: int


def load_shard(path: str | Path, r: ShardRange, max_positions: int, verify: bool = True,
               moe: MoEHook | None = None) -> LoadedShard:
    """Reads only the shard's tensors (checksums of the files verified first); MoE experts run
    through `moe` (workers/moe.py), which loads them unit by unit."""
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    check_servable(manifest)
    if r.last > layer_count(manifest):
        raise ValueError(f"layers [{r.first}, {r.last}) are outside the model's {layer_count(manifest)} layers")
    names = shard_tensor_names(manifest, r)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(root / WEIGHTS), framework="pt") as f:
            for n in names:
                tensors[n] = f.get_tensor(n)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{root / WEIGHTS}: cannot read tensors: {e}") from e
    for n in names:
        meta = manifest["tensors"][n]
        if list(tensors[n].shape) != meta["shape"] or str(tensors[n].dtype).removeprefix("torch.") != meta["dtype"]:
            raise CheckpointError(f"{root / WEIGHTS}: tensor {n} does not match the manifest")
    cfg = model_config(manifest)
    dims = LlamaDims.from_config(cfg)
    stage = LlamaStage(dims, tensors, r.first, r.last, max_positions, moe)
    return LoadedShard(r, dims, stage, Embedder(tensors) if r.embed else None,
                       Head(tensors, dims.eps) if r.head else None,
                       sum(t.numel() * t.element_size() for t in tensors.values()), int(cfg.vocab_size))
