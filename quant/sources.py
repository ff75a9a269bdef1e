"""Float weights read tensor by tensor: a Hugging Face directory (one or several safetensors shards,
bf16/fp16/fp32) or a GGUF file, never the whole model at once.

open_source checks what it can before any work starts: the index names shards that exist, every
tensor the index names is in its shard, and every dtype is one it can read; each problem is a
SourceError naming the file or tensor. get(name) returns one float32 tensor; release() closes the
open files (and so their mapped pages) between decoder layers, which keeps a 7B model's reads to
about one layer of resident memory.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .models import ModelSource, resolve_model

__all__ = ["SourceError", "WeightSource", "SafetensorsSource", "GGUFSource", "open_source", "INDEX"]

INDEX = "model.safetensors.index.json"
_READABLE = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtypes a source converts to float32


class SourceError(ValueError):
    """The model's files are missing, inconsistent or unreadable (the message names the file or tensor)."""


class WeightSource:
    """The float weights of one model, by transformers parameter name."""

    src: ModelSource

    def config(self):
        raise NotImplementedError

    def tokenizer(self):
        raise NotImplementedError

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """One tensor as float32 (a fresh copy the caller owns)."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of the weights as stored (bf16: 2 per parameter)."""
        raise NotImplementedError

    def parameters(self) -> int:
        """Numbers stored (float32 bytes = 4 x this)."""
        raise NotImplementedError

    def release(self) -> None:
        """Close the files opened so far (get reopens them)."""

    def check_complete(self, wanted: Iterable[str]) -> None:
        """SourceError naming the tensors a model of this config needs that no file holds."""
        missing = sorted(set(wanted) - self.names())
        if missing:
            raise SourceError(f"{self.src.directory}: {len(missing)} tensors the model needs are in no file, e.g. "
                              f"{', '.join(missing[:3])}")


class SafetensorsSource(WeightSource):
    """A Hugging Face directory: config.json, tokenizer files, model.safetensors or shards + index."""

    def __init__(self, src: ModelSource) -> None:
        from safetensors import SafetensorError, safe_open

        self.src, root = src, src.directory
        index = root / INDEX
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SourceError(f"{index}: not a usable safetensors index ({e})") from e
        elif (root / "model.safetensors").is_file():
            weight_map = {}
        else:
            raise SourceError(f"{root}: no model.safetensors and no {INDEX}; pass a Hugging Face model directory")
        files = sorted(set(weight_map.values())) or ["model.safetensors"]
        self._where: dict[str, str] = {}
        self._dtypes: dict[str, tuple[str, int]] = {}
        for name in files:
            path = root / name
            if not path.is_file():
                raise SourceError(f"{path}: shard named in {INDEX} is missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        numel = 1
                        for n in sl.get_shape():
                            numel *= int(n)
                        self._where[k], self._dtypes[k] = name, (sl.get_dtype(), numel)
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{path}: cannot read safetensors header: {e}") from e
        for k, name in weight_map.items():
            if self._where.get(k) != name:
                raise SourceError(f"{index}: tensor {k} is listed in {name} but that shard does not hold it")
        for k, (dtype, _) in self._dtypes.items():
            if dtype not in _READABLE:
                raise SourceError(f"{root / self._where[k]}: tensor {k} is {dtype}; edgeweave reads "
                                  f"{', '.join(_READABLE)} weights")
        self._merged = _mixtral_banks(self._where)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.src.directory)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.src.directory)

    def names(self) -> set[str]:
        return set(self._where) | set(self._merged)

    def stored_bytes(self) -> int:
        return sum(_READABLE[d] * n for d, n in self._dtypes.values())

    def parameters(self) -> int:
        return sum(n for _, n in self._dtypes.values())

    def get(self, name: str) -> torch.Tensor:
        merged = self._merged.get(name)
        if merged is not None:  # Mixtral's per-expert w1/w3/w2 files -> transformers' stacked banks
            if isinstance(merged, str):
                return self._read(merged)
            return torch.stack([torch.cat([self._read(n) for n in per_expert]) for per_expert in merged])
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        file = self._where.get(name)
        if file is None:
            raise SourceError(f"{self.src.directory}: no file holds tensor {name}")
        try:  # opened per tensor: a closed file's mapped pages leave this process's memory
            with safe_open(str(self.src.directory / file), framework="pt") as f:
                t = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{self.src.directory / file}: cannot read tensor {name}: {e}") from e
        return t.float() if t.dtype != torch.float32 else t.clone()



_EXPERT = re.compile(r"^(.+)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")


def _mixtral_banks(stored) -> dict[str, str | list[list[str]]]:
    """Names transformers gives Mixtral's expert banks -> the stored names they are built from:
    gate_up_proj [E, 2I, D] is cat(w1, w3) per expert, down_proj [E, D, I] is w2 (as transformers loads them),
    and block_sparse_moe.gate is mlp.gate."""
    banks: dict[str, dict[int, dict[str, str]]] = {}
    out: dict[str, str | list[list[str]]] = {}
    for k in stored:
        if (m := _EXPERT.match(k)) is not None:
            banks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = k
        elif k.endswith(".block_sparse_moe.gate.weight"):
            out[k.replace(".block_sparse_moe.", ".mlp.")] = k
    for layer, experts in banks.items():
        order = [experts[e] for e in sorted(experts)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = [[w["1"], w["3"]] for w in order]
        out[f"{layer}.mlp.experts.down_proj"] = [[w["2"]] for w in order]
    return out


class GGUFSource(WeightSource):
    """A GGUF file, dequantized tensor by tensor (names mapped to transformers' as transformers maps them)."""

    def __init__(self, src: ModelSource) -> None:
        from transformers import AutoConfig

        self.src = src
        self.path = src.directory / str(src.gguf_file)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            self._config = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file)
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"{self.path}: cannot read the GGUF metadata: {e}") from e
        self._reader = None
        self._index: dict | None = None
        self._map = self._name_map()

    def _name_map(self) -> dict[str, str]:
        """transformers name -> GGUF tensor name (tied heads: lm_head reads the embedding)."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self._config)
        proc = TENSOR_PROCESSORS.get(self._config.model_type, TensorProcessor)(config=self._config.to_dict())
        self._proc = proc
        hf_by_gguf = get_gguf_hf_weights_map(skeleton, proc)
        out = {hf: g for g, hf in hf_by_gguf.items()}
        present = {t.name for t in self._tensors()}
        out = {hf: g for hf, g in out.items() if g in present}
        if getattr(self._config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in out:
            out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
        return out

    def _tensors(self):
        from gguf import GGUFReader

        if self._reader is None:
            try:
                self._reader = GGUFReader(str(self.path))
            except (OSError, ValueError) as e:
                raise SourceError(f"{self.path}: cannot read GGUF tensors: {e}") from e
        return self._reader.tensors

    def config(self):
        return self._config

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.src.directory, gguf_file=self.src.gguf_file)

    def names(self) -> set[str]:
        return set(self._map)

    def stored_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self._tensors())

    def parameters(self) -> int:
        return sum(int(t.n_elements) for t in self._tensors())

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        g = self._map.get(name)
        if g is None:
            raise SourceError(f"{self.path}: no GGUF tensor holds {name}")
        t = self._by_name()[g]
        w = self._proc.process(weights=dequantize(t.data, t.tensor_type), name=g).weights
        return torch.from_numpy(w.copy()).float()

    def _by_name(self) -> dict:
        if self._index is None:
            self._index = {t.name: t for t in self._tensors()}
        return self._index

    def release(self) -> None:
        """Drop the pages read so far from this process's memory (the file stays mapped; they come back
        from the page cache if read again)."""
        mm = getattr(getattr(self._reader, "data", None), "_mmap", None)
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)


def open_source(name_or_path: str) -> WeightSource:
    """A model name, HF directory or .gguf file -> its WeightSource (SourceError when unreadable)."""
    src = resolve_model(name_or_path)
    return GGUFSource(src) if src.gguf_file else SafetensorsSource(src)
