"""Quantized checkpoints: safetensors tensors + a JSON manifest with checksums.

Layout of a checkpoint directory:
  edgeweave.json          manifest (format version, model config, method config, modules,
                          per-tensor shape/dtype/scheme, sha256 + size of every other file)
  model.safetensors       the embedding, final norm and lm_head
  layers/00000.safetensors  decoder layer 0's int8 weights, scales, static activation scales,
                          float norms and router (one file per layer, written as it is quantized)
  tokenizer/...           the tokenizer, so the directory is self-contained
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import QuantConfig
from .manifest import WEIGHTS_FILE, Manifest, ManifestError, weights_file
from .layerwise import QuantReport, set_module
from .qlinear import QuantEmbedding, QuantExperts, QuantLinear

__all__ = ["CheckpointWriter", "save_checkpoint", "read_tensors", "check_tensor", "load_checkpoint", "is_checkpoint", "read_manifest", "verify_files", "CheckpointError", "WEIGHTS",
           "MANIFEST", "FORMAT_VERSION", "hf_config"]

MANIFEST = "edgeweave.json"
WEIGHTS = WEIGHTS_FILE  # the embedding, final norm and lm_head; each decoder layer has a file in layers/
FORMAT = "edgeweave-quantized"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match its manifest (the message names it)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_entry(mod) -> dict | None:
    if isinstance(mod, QuantLinear):
        return {"kind": "linear", "act_scheme": mod.act_scheme, "in": mod.in_features,
                "out": mod.out_features, "bias": mod.bias is not None, "groups": mod.groups, "w_bits": mod.w_bits,
                "w_group": mod.group_size, "offset": mod.input_offset is not None, "nnz": mod.sparse_nnz,
                "w_zero": mod.w_zero is not None, "rotate": mod.rotate_block}
    if isinstance(mod, QuantExperts):
        e, two_i, d = mod.gate_up_qweight.shape
        return {"kind": "experts", "act_scheme": mod.act_scheme, "experts": e, "hidden": d, "inter": two_i // 2}
    if isinstance(mod, QuantEmbedding):
        q, _ = mod._rows()
        return {"kind": "embedding", "vocab": q.shape[0], "hidden": q.shape[1],
                "padding_idx": mod.padding_idx, "tied_to": "lm_head" if mod._tied else None}
    return None


_SCHEMES = (  # tensor-name suffix -> what the manifest says of it; first match wins
    ("wmask", "uint8 bitmask of the nonzero weights, [N, ceil(K / 8)] (bit j % 8 of byte j // 8)"),
    ("wvals", "nonzero weights in row-major order: int8, or int4 packed two per byte"),
    ("qweight4", "int4 packed two per byte (low nibble: even column): signed [-7, 7], w = q * w_scale; or, "
                 "when the module has w_zero, unsigned [0, 15], w = (u - w_zero) * w_scale"),
    ("w_zero", "uint8 int4 zero points in [0, 15], shaped like w_scale"),
    ("w_group", "int64: input columns per weight-scale group (w_scale is [N, groups])"),
    ("rotate", "int64: Hadamard block of the online input rotation; the weights are stored as W H"),
    ("qweight", "int8 symmetric per output channel"),
    ("input_offset", "float32 static per-tensor activation offset (x - offset is quantized)"),
    ("input_scale", "float32 static per-tensor activation scale"),
    ("_scale", "float32 weight scale per output channel (or per output channel and column group)"),
)


def _tensor_scheme(name: str) -> str:
    return next((text for suffix, text in _SCHEMES if name.endswith(suffix)), "float32")


def _resident(name: str, modules: dict) -> dict:
    """Sparse weights are decoded to their dense form when loaded: {"resident_bytes": ...} for the
    planner, which counts memory, not file bytes (empty for every other tensor)."""
    prefix, _, leaf = name.rpartition(".")
    entry = modules.get(prefix)
    if leaf not in ("wmask", "wvals") or entry is None:
        return {}
    dense = entry["out"] * (entry["in"] if entry["w_bits"] == 8 else (entry["in"] + 1) // 2)
    return {"resident_bytes": dense if leaf == "wmask" else 0}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CheckpointWriter:
    """Writes a checkpoint file by file into a temporary directory beside `out`, which replaces `out`
    only when finish() has written the manifest: a run that dies leaves no half-written checkpoint."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not is_checkpoint(self.out) and any(self.out.iterdir()):
            raise CheckpointError(f"{self.out}: exists and is not an edgeweave checkpoint; choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # a run that died before finishing
        self.tmp.mkdir()
        self.modules: dict[str, dict] = {}
        self.tensors: dict[str, dict] = {}

    def add_modules(self, root, prefix: str = "", skip: str | None = None) -> None:
        """The manifest entries of the quantized modules under `root` (named from `prefix`; none under `skip`)."""
        self.modules |= {prefix + n: e for n, m in root.named_modules()
                         if not (skip and n.startswith(skip)) and (e := _module_entry(m)) is not None}

    def write(self, state: Mapping[str, torch.Tensor]) -> None:
        """Tensors by full name; each goes to its file (quant.manifest.weights_file), which must be new."""
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            by_file.setdefault(weights_file(k), {})[k] = v.contiguous()
        for file, part in by_file.items():
            path = self.tmp / file
            if path.exists():
                raise CheckpointError(f"{path}: written twice")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(part, str(path), metadata={"format": FORMAT})
            self.tensors |= {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                 "scheme": _tensor_scheme(k), "file": file} for k, v in part.items()}

    def finish(self, config, method: QuantConfig, choices: dict, tokenizer) -> Path:
        tokenizer.save_pretrained(self.tmp / "tokenizer")
        files = {str(p.relative_to(self.tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(self.tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": config.model_type,
            "model_config": config.to_dict(),
            "method": method.to_dict(),
            "modules": self.modules,
            "tensors": {k: v | _resident(k, self.modules) for k, v in self.tensors.items()},
            "files": files,
            "choices": choices,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():
            self.out.replace(old)
        self.tmp.replace(self.out)
        if old.exists():
            shutil.rmtree(old)
        return self.out


def save_checkpoint(model, tokenizer, cfg: QuantConfig, report: QuantReport, out_dir: str | Path) -> Path:
    """A quantized model held in memory -> a checkpoint directory (the layout quant.stream writes too)."""
    w = CheckpointWriter(out_dir)
    w.add_modules(model)
    w.write(model.state_dict())
    return w.finish(model.config, report.config or cfg, report.choices, tokenizer)


def read_tensors(root: Path, manifest: Manifest, names) -> dict[str, torch.Tensor]:
    """The named tensors, each from its file, checked against the manifest's shape and dtype."""
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(manifest.tensors[n].file, []).append(n)
    out: dict[str, torch.Tensor] = {}
    for file, group in by_file.items():
        try:
            with safe_open(str(root / file), framework="pt") as f:
                for n in group:
                    out[n] = check_tensor(root / file, n, f.get_tensor(n), manifest)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{root / file}: cannot read tensors: {e}") from e
    return out


def check_tensor(path: Path, name: str, t: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    meta = manifest.tensors[name]
    if tuple(t.shape) != meta.shape or str(t.dtype).removeprefix("torch.") != meta.dtype:
        raise CheckpointError(f"{path}: tensor {name} does not match the manifest")
    return t


def read_manifest(path: str | Path) -> Manifest:
    """The checkpoint's manifest, read and checked once (format, version, the fields edgeweave uses)."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{p}: not an edgeweave checkpoint (no manifest)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: manifest is unreadable: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
                              f"is not {FORMAT} v{FORMAT_VERSION}; re-run edgeweave quantize")
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise CheckpointError(f"{p}: {e}; re-run edgeweave quantize") from e


def hf_config(manifest: Manifest):
    """The transformers config the checkpoint was made from."""
    from transformers import AutoConfig

    cfg = dict(manifest.model_config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def verify_files(path: str | Path, manifest: Manifest, only: set[str] | None = None) -> None:
    """Every file listed (or only those named) must exist with its recorded size and sha256."""
    root = Path(path)
    if only is not None and (unlisted := sorted(only - set(manifest.files))):
        raise CheckpointError(f"{root / unlisted[0]}: not in the manifest's files table; re-run edgeweave quantize")
    for name, meta in manifest.files.items():
        if only is not None and name not in only:
            continue
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != meta.bytes or _sha256(f) != meta.sha256:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt or modified); re-run edgeweave quantize")


def _build_module(entry: Mapping, skeleton, model):
    kind = entry["kind"]
    if kind == "linear":
        return QuantLinear(entry["in"], entry["out"], entry["bias"], entry["act_scheme"], entry.get("groups", 4),
                           entry.get("w_bits", 8), entry.get("w_group", 0), entry.get("offset", False),
                           entry.get("nnz"), entry.get("w_zero", False), entry.get("rotate", 0))
    if kind == "experts":
        return QuantExperts(entry["experts"], entry["hidden"], entry["inter"], skeleton.act_fn, entry["act_scheme"])
    tied = model.get_submodule(entry["tied_to"]) if entry["tied_to"] else None
    return QuantEmbedding(entry["vocab"], entry["hidden"], entry["padding_idx"], tied)


def load_checkpoint(path: str | Path, verify: bool = True):
    """-> (quantized model, tokenizer, Manifest). No calibration is re-run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    model = AutoModelForCausalLM.from_config(hf_config(manifest), dtype=torch.float32).eval()
    # Embeddings last: a tied embedding points at the already-swapped lm_head.
    entries = sorted(manifest.modules.items(), key=lambda kv: kv[1]["kind"] == "embedding")
    for name, entry in entries:
        set_module(model, name, _build_module(entry, model.get_submodule(name), model))
    state = read_tensors(root, manifest, manifest.tensors)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{root}: does not fit {manifest.model_type}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    return model, tokenizer, manifest
