"""Quantized checkpoints: safetensors tensors + a JSON manifest with checksums.

Layout of a checkpoint directory:
  edgeweave.json          manifest (format version, model config, method config, modules,
                          per-tensor shape/dtype/scheme, sha256 + size of every other file)
  model.safetensors       int8 weights, scales, static activation scales, float norms/router
  tokenizer/...           the tokenizer, so the directory is self-contained
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import QuantConfig
from .manifest import Manifest, ManifestError
from .layerwise import QuantReport, set_module
from .qlinear import QuantEmbedding, QuantExperts, QuantLinear

__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "read_manifest", "verify_files", "CheckpointError", "WEIGHTS",
           "MANIFEST", "FORMAT_VERSION", "hf_config"]

MANIFEST = "edgeweave.json"
WEIGHTS = "model.safetensors"
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


def save_checkpoint(model, tokenizer, cfg: QuantConfig, report: QuantReport, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = {n: e for n, m in model.named_modules() if (e := _module_entry(m)) is not None}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)  # never leave a half-written weights file under the real name
    tokenizer.save_pretrained(out / "tokenizer")
    files = {str(p.relative_to(out)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "model_config": model.config.to_dict(),
        "method": (report.config or cfg).to_dict(),
        "modules": modules,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "scheme": _tensor_scheme(k), **_resident(k, modules)} for k, v in state.items()},
        "files": files,
        "choices": report.choices,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


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


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Every file listed must exist with its recorded size and sha256."""
    root = Path(path)
    for name, meta in manifest.files.items():
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
    try:
        state = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{root / WEIGHTS}: cannot read tensors: {e}") from e
    for name, meta in manifest.tensors.items():
        t = state.get(name)
        if t is None or tuple(t.shape) != meta.shape or str(t.dtype).removeprefix("torch.") != meta.dtype:
            raise CheckpointError(f"{root / WEIGHTS}: tensor {name} does not match the manifest")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS}: does not fit {manifest.model_type}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    return model, tokenizer, manifest
