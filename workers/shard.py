"""A worker's shard of a quantized checkpoint: layers [first, last), plus the embedding and/or the head.

Which tensors a shard holds and their bytes come from the manifest alone (quant.manifest, pure; the
planner counts the same bytes); a worker reads only its shard's tensors from the safetensors file, so
no node ever has to hold the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant.checkpoint import CheckpointError, check_tensor, hf_config, read_manifest, verify_files
from quant.manifest import WEIGHTS_FILE, Manifest, ShardRange, shard_tensor_names

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
               moe: MoEHook | None = None, manifest: Manifest | None = None, progress: bool = False) -> LoadedShard:
    """Reads only the shard's tensors (checksums of the files verified first); MoE experts run
    through `moe` (workers/moe.py), which loads them unit by unit. manifest: the checkpoint's, when
    the caller has read it already. progress: a line on stderr per layer loaded."""
    root = Path(path)
    manifest = manifest or read_manifest(root)
    check_servable(manifest)
    if r.last > manifest.n_layers:
        raise ValueError(f"layers [{r.first}, {r.last}) are outside the model's {manifest.n_layers} layers")
    names = shard_tensor_names(manifest, r)
    if verify:  # the files this shard reads, not the whole model's
        verify_files(root, manifest, {manifest.tensors[n].file for n in names})
    tensors = ShardTensors(root, manifest, names)
    cfg = hf_config(manifest)
    dims = LlamaDims.from_config(cfg)
    stage = LlamaStage(dims, tensors, r.first, r.last, max_positions, moe, progress=progress)
    embed = Embedder(tensors) if r.embed else None
    head = Head(tensors, dims.eps) if r.head else None
    return LoadedShard(r, dims, stage, embed, head, sum(manifest.tensors[n].file_bytes for n in names),
                       int(cfg.vocab_size))


class ShardTensors(Mapping[str, torch.Tensor]):
    """A shard's tensors, each read from its file when first asked for and not kept here: the stage
    fuses and keeps what it needs, so loading holds the shard plus the tensors of one layer in flight."""

    def __init__(self, root: Path, manifest: Manifest, names: list[str]) -> None:
        self.root, self.manifest, self.names = root, manifest, frozenset(names)
        self._files: dict[str, object] = {}
        self._kept: dict[str, torch.Tensor] = {}  # embedding/head tensors, which a tied model reads twice

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        if name in self._kept:
            return self._kept[name]
        file = self.manifest.tensors[name].file
        try:
            if file not in self._files:  # each file holds one layer: closed once the next opens
                self._files = {file: safe_open(str(self.root / file), framework="pt")}
            # a copy: the file's tensors point into its mapping, which would stay mapped (and resident)
            # as long as any of them lives (a float32 scale the stage keeps as is, say)
            t = self._files[file].get_tensor(name).clone()  # type: ignore[attr-defined]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.root / file}: cannot read tensor {name}: {e}") from e
        check_tensor(self.root / file, name, t, self.manifest)
        if file == WEIGHTS_FILE:
            self._kept[name] = t
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names
