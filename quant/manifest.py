"""The typed manifest of a quantized checkpoint, and all of edgeweave's byte math (pure).

`Manifest` is what `edgeweave.json` says, read once and checked: the model's dimensions, its MoE
shape, the tensor table (shape, dtype, bytes resident in memory), the files and their checksums,
the method's config and the modules. Every size the product counts is worked out here, from the
manifest alone, so the planner (where a layer goes), the shard loader (what a worker reads) and the
KV cache (what a session reserves) count the same bytes:

  tensor bytes        TensorMeta.nbytes: resident bytes in memory (sparse weights decoded to dense)
  shard bytes         shard_weight_bytes(manifest, ShardRange)
  expert unit bytes   expert_unit_bytes(manifest, layer): one expert's slice of a layer's banks
  KV bytes            kv_bytes_per_token(layers, kv_heads, head_dim): float32 keys and values
  sizes typed by users  parse_bytes("300MB")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Manifest", "ManifestError", "TensorMeta", "FileMeta", "ModelDims", "MoEShape", "ShardRange", "DTYPE_BYTES",
           "shard_tensor_names", "shard_weight_bytes", "expert_unit_bytes", "kv_bytes_per_token", "parse_bytes",
           "expert_tensor_prefix", "is_expert_tensor", "layer_of", "weights_file", "WEIGHTS_FILE", "expert_bytes", "fast_tier_fraction"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}
KV_BYTES = 4  # keys and values are kept in float32
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ManifestError(ValueError):
    """A manifest whose content cannot be used (the message says which field)."""


def parse_bytes(text: str | int) -> int:
    """'300MB' -> 300_000_000; '1.5GiB' -> 1610612736; plain integers are bytes (units any case)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?", text.strip().upper())
    if m is None:
        raise ValueError(f"cannot read {text!r} as a size (examples: 300MB, 1.5GiB, 1048576)")
    num, unit = m.group(1), m.group(2) or ""
    return int(float(num) * _UNITS[unit])


def expert_tensor_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts."


def is_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


WEIGHTS_FILE = "model.safetensors"  # the embedding, final norm and lm_head (and every tensor of older checkpoints)
_ANY_LAYER = re.compile(r"^(?:.+\.)?layers\.(\d+)\.")


def weights_file(name: str) -> str:
    """The file a checkpoint stores tensor `name` in: one per decoder layer, so a quantizer can write
    layer by layer and a worker opens only its layers' files."""
    m = _ANY_LAYER.match(name)
    return f"layers/{int(m.group(1)):05d}.safetensors" if m else WEIGHTS_FILE


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, None for the embedding, the final norm and lm_head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int) -> int:
    """float32 keys and values of `layers` layers for one token (what a KV cache reserves per position)."""
    return 2 * layers * kv_heads * head_dim * KV_BYTES


def expert_bytes(hidden: int, inter: int, weight_bytes: float = 1.0, scale_bytes: int = 4) -> int:
    """One SwiGLU expert (gate and up [I, D], down [D, I]); int8 adds a float scale per output row."""
    params = 3 * hidden * inter
    scales = (2 * inter + hidden) * scale_bytes if weight_bytes == 1.0 else 0
    return int(params * weight_bytes) + scales


def fast_tier_fraction(hidden: int, inter: int, experts: int, slots: int) -> float:
    """Fast-tier bytes (slots int8 experts per layer) / float16 bytes of all experts."""
    return slots * expert_bytes(hidden, inter) / (experts * expert_bytes(hidden, inter, weight_bytes=2.0))


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # "int8", "float32", ... (torch's name without "torch.")
    scheme: str = "float32"  # what the values mean (quant.checkpoint writes it)
    resident_bytes: int | None = None  # bytes in memory where they differ from the file (sparse weights)
    file: str = WEIGHTS_FILE  # the safetensors file holding it, relative to the checkpoint

    def __post_init__(self) -> None:
        parts = self.file.split("/")
        if not self.file.endswith(".safetensors") or any(p in ("", ".", "..") for p in parts) or "\\" in self.file:
            raise ManifestError(f"tensor file {self.file!r} is not a .safetensors path inside the checkpoint")

    @property
    def file_bytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in a worker's memory."""
        return self.file_bytes if self.resident_bytes is None else self.resident_bytes

    def to_dict(self) -> dict:
        d: dict = {"shape": list(self.shape), "dtype": self.dtype, "scheme": self.scheme, "file": self.file}
        return d if self.resident_bytes is None else d | {"resident_bytes": self.resident_bytes}


@dataclass(frozen=True)
class FileMeta:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, c: Mapping) -> "ModelDims":
        heads = int(c["num_attention_heads"])
        return cls(int(c["num_hidden_layers"]), int(c["hidden_size"]),
                   int(c.get("intermediate_size") or c.get("ffn_dim") or 0), heads,
                   int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or c["hidden_size"] // heads),
                   int(c["vocab_size"]))


@dataclass(frozen=True)
class MoEShape:
    experts: int  # experts per layer
    top_k: int  # experts per token


@dataclass(frozen=True)
class ShardRange:
    first: int  # first decoder layer (inclusive)
    last: int  # last decoder layer (exclusive)
    embed: bool  # token embedding (first stage)
    head: bool  # final norm + lm_head (last stage)

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"bad layer range [{self.first}, {self.last})")


@dataclass(frozen=True)
class Manifest:
    model_type: str
    model_config: Mapping  # transformers' config.to_dict(), as saved
    method: Mapping  # quant.config.QuantConfig.to_dict() of the run
    modules: Mapping[str, Mapping]  # module path -> what quant.checkpoint rebuilds it from
    tensors: Mapping[str, TensorMeta]
    files: Mapping[str, FileMeta]
    choices: Mapping  # what the pipeline chose, per layer and group
    dims: ModelDims = field(init=False)
    moe: MoEShape | None = field(init=False)

    def __post_init__(self) -> None:
        c = self.model_config
        try:
            object.__setattr__(self, "dims", ModelDims.from_config(c))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"model_config lacks a dimension ({e})") from e
        moe = MoEShape(int(c["num_local_experts"]), int(c["num_experts_per_tok"])) if c.get("num_local_experts") else None
        object.__setattr__(self, "moe", moe)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Manifest":
        try:
            tensors = {k: TensorMeta(tuple(int(x) for x in v["shape"]), str(v["dtype"]), v.get("scheme", "float32"),
                                     v.get("resident_bytes"), str(v.get("file", WEIGHTS_FILE)))
                       for k, v in d["tensors"].items()}
            files = {k: FileMeta(str(v["sha256"]), int(v["bytes"])) for k, v in d.get("files", {}).items()}
            return cls(str(d["model_type"]), dict(d["model_config"]), dict(d.get("method", {})),
                       dict(d.get("modules", {})), tensors, files, dict(d.get("choices", {})))
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"not a usable manifest: {type(e).__name__}: {e}") from e

    @property
    def n_layers(self) -> int:
        return self.dims.layers

    @property
    def tied_embedding(self) -> bool:
        """The embedding reads lm_head's int8 rows (no tensor of its own)."""
        return "model.embed_tokens.qweight" not in self.tensors

    def kv_bytes_per_token(self, layers: int) -> int:
        return kv_bytes_per_token(layers, self.dims.kv_heads, self.dims.head_dim)

    def files_table(self) -> dict:
        """The files table as plain data (the placement id hashes it)."""
        return {k: {"sha256": f.sha256, "bytes": f.bytes} for k, f in self.files.items()}


def shard_tensor_names(m: Manifest, r: ShardRange) -> list[str]:
    """The tensors a shard's worker reads (expert units are loaded one by one into its tiers instead)."""
    names = []
    for name in m.tensors:
        layer = layer_of(name)
        if is_expert_tensor(name):
            keep = False
        elif layer is not None:
            keep = r.first <= layer < r.last
        elif name.startswith("model.embed_tokens."):
            keep = r.embed
        elif name.startswith("lm_head."):
            keep = r.head or (r.embed and m.tied_embedding)  # a tied embedding reads lm_head's int8 rows
        elif name.startswith("model.norm."):
            keep = r.head
        else:
            keep = False
        if keep:
            names.append(name)
    return names


def shard_weight_bytes(m: Manifest, r: ShardRange) -> int:
    """Bytes the shard's weights take in memory (sparse weights are decoded to dense at load)."""
    return sum(m.tensors[n].nbytes for n in shard_tensor_names(m, r))


def expert_unit_bytes(m: Manifest, layer: int) -> int:
    """Bytes of one expert unit of `layer` (its slice of every expert bank)."""
    n = m.moe.experts if m.moe else 1
    p = expert_tensor_prefix(layer)
    return sum(t.file_bytes for k, t in m.tensors.items() if k.startswith(p)) // n
