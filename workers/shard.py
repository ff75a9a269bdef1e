"""A worker's shard of a quantized checkpoint: layers [first, last), plus the embedding and/or the head.

Which tensors a shard holds and their bytes come from the manifest alone (quant.manifest, pure; the
planner counts the same bytes); a worker reads only its shard's tensors from the safetensors file, so
no node ever has to hold the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant.checkpoint import WEIGHTS, CheckpointError, hf_config, read_manifest, verify_files
from quant.manifest import Manifest, ShardRange, shard_tensor_names

from .llama_stage import Embedder, Head, LlamaDims, LlamaStage, MoEHook, supports_config

__all__ = ["LoadedShard", "load_shard", "check_servable"]


def check_servable(manifest: Manifest) -> None:
    """The distributed runtime serves Llama/Mistral/Mixtral checkpoints (full attention, default RoPE)."""
    if not supports_config(hf_config(manifest)):
        raise ValueError(f"the runtime serves Llama/Mistral/Mixtral checkpoints with default RoPE and full attention; "
                         f"this one is {manifest.model_type!r} (use `edgeweave generate DIR` for a single process)")


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
               moe: MoEHook | None = None, manifest: Manifest | None = None) -> LoadedShard:
    """Reads only the shard's tensors (checksums of the files verified first); MoE experts run
    through `moe` (workers/moe.py), which loads them unit by unit. manifest: the checkpoint's, when
    the caller has read it already."""
    root = Path(path)
    manifest = manifest or read_manifest(root)
    if verify:
        verify_files(root, manifest)
    check_servable(manifest)
    if r.last > manifest.n_layers:
        raise ValueError(f"layers [{r.first}, {r.last}) are outside the model's {manifest.n_layers} layers")
    names = shard_tensor_names(manifest, r)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(root / WEIGHTS), framework="pt") as f:
            for n in names:
                tensors[n] = f.get_tensor(n)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{root / WEIGHTS}: cannot read tensors: {e}") from e
    for n in names:
        meta = manifest.tensors[n]
        if tuple(tensors[n].shape) != meta.shape or str(tensors[n].dtype).removeprefix("torch.") != meta.dtype:
            raise CheckpointError(f"{root / WEIGHTS}: tensor {n} does not match the manifest")
    cfg = hf_config(manifest)
    dims = LlamaDims.from_config(cfg)
    stage = LlamaStage(dims, tensors, r.first, r.last, max_positions, moe)
    return LoadedShard(r, dims, stage, Embedder(tensors) if r.embed else None,
                       Head(tensors, dims.eps) if r.head else None,
                       sum(t.numel() * t.element_size() for t in tensors.values()), int(cfg.vocab_size))
