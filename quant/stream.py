"""Quantization in bounded memory: the layer-wise methods (rtn, haq, tender, W4A8) run on a model
whose float weights are never all in memory at once.

The module tree is built on the meta device (no storage). The embedding is materialized to compute
the calibration activations entering layer 0, then each decoder layer in turn is materialized from
the WeightSource (quant/sources.py), quantized with the same steps as the in-memory pipeline
(quant/pipeline.quantize_layer), run to carry the activations to the next layer, written to its own
checkpoint file and dropped. The final norm and lm_head come last. Peak memory is about one float
layer, the calibration activations (two copies: a layer's input and output) and the rounding
Hessians of one layer; on a small model the checkpoint is byte for byte the in-memory one (tests).
"""

from __future__ import annotations

import ctypes
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_spec
from .checkpoint import CheckpointWriter
from .config import QuantConfig
from .layerwise import QuantReport, capture_first_layer_inputs, lm_head_group, run_layer
from .pipeline import HANDLERS, layer_search_tokens, quantize_layer
from .sources import SourceError, WeightSource

__all__ = ["StreamResult", "quantize_streaming", "whole_model_reason", "peak_rss_bytes"]


@dataclass(frozen=True)
class StreamResult:
    path: Path
    peak_rss_bytes: int  # this process's peak resident memory so far (ru_maxrss)
    seconds: float
    layers: int


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def whole_model_reason(cfg: QuantConfig) -> str | None:
    """Why a method needs every float weight in memory at once, or None when it runs layer by layer."""
    if cfg.method in HANDLERS:
        return f"{cfg.method} is trained end to end over the whole model"
    if cfg.kd_steps:
        return "--kd-steps distills the whole model against its float copy"
    if cfg.rotate_residual:
        return "--rotate-residual rotates every weight of the model together"
    if cfg.traits.per_layer_policy and not cfg.layer_policy:
        return "luc measures every layer's sensitivity on the whole model before choosing bits"
    return None


def _trim() -> None:
    """Hand the freed heap back to the system (glibc keeps large freed blocks otherwise, and a process
    that frees a float layer per layer would look, and be, a model's size)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load(module: nn.Module, prefix: str, source: WeightSource) -> None:
    """Meta module -> real float32 module with the source's weights for every parameter and buffer."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
            w = source.get(prefix + name)
            if tuple(w.shape) != tuple(t.shape):
                raise SourceError(f"{source.src.directory}: tensor {prefix + name} is {tuple(w.shape)}, the config "
                                  f"needs {tuple(t.shape)}")
            t.copy_(w)


def _rest(module: nn.Module, path: str, layers_path: str, source: WeightSource) -> None:
    """Everything outside the decoder layers (embedding, final norm, lm_head, rotary tables) made real."""
    for name, child in module.named_children():
        p = path + name
        if p == layers_path:
            continue
        if layers_path.startswith(p + "."):
            _rest(child, p + ".", layers_path, source)
        elif any(n not in child.state_dict() for n, _ in child.named_buffers()):
            # computed buffers (RoPE's inverse frequencies) are in no file: build the module for real
            with torch.device("cpu"):
                setattr(module, name, type(child)(config=module.config))
        elif p != "lm_head":  # lm_head is read once, for its own step after the layers (_reload_head)
            _load(child, p + ".", source)


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _tie(model) -> None:  # a transformers PreTrainedModel
    if _tied(model):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _reload_head(model, embed_path: str, source: WeightSource) -> None:
    """lm_head, dropped while the layers ran, read again for its step (a tied one: the embedding; an
    untied embedding is read only after lm_head is quantized, so the two are never in float together)."""
    if _tied(model):
        _load(model.get_submodule(embed_path), embed_path + ".", source)
        _tie(model)
    else:
        _load(model.get_output_embeddings(), "lm_head.", source)


def quantize_streaming(source: WeightSource, cfg: QuantConfig, calib_ids: torch.Tensor, out_dir: str | Path,
                       progress: bool = True) -> StreamResult:
    """Quantize `source` layer by layer into the checkpoint `out_dir` (a layer-wise method only)."""
    from transformers import AutoModelForCausalLM

    if (why := whole_model_reason(cfg)) is not None:
        raise ValueError(f"{why}; it cannot run layer by layer")
    t0 = time.time()
    config = source.config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    spec = arch_spec(model)
    source.check_complete(k for k in model.state_dict() if not (k == "lm_head.weight" and config.tie_word_embeddings))
    writer = CheckpointWriter(out_dir)
    _rest(model, "", spec.layers_path, source)
    layers = model.get_submodule(spec.layers_path)
    torch.manual_seed(cfg.calib.seed)
    with torch.no_grad():
        batches = capture_first_layer_inputs(model, layers, calib_ids)
        model.get_submodule(spec.embed_path).to("meta")  # back for lm_head's step, after the layers
        report = QuantReport(config=cfg)
        keep = layer_search_tokens(cfg, batches)
        bits = "per-layer bits" if cfg.layer_policy else f"W{cfg.w_bits}A{cfg.a_bits}"
        for i in tqdm(range(len(layers)), desc=f"quantize {cfg.method} {bits}-{cfg.act_scheme}", unit="layer",
                      disable=not progress):
            prefix = f"{spec.layers_path}.{i}."
            layer = layers[i]
            _load(layer, prefix, source)
            quantize_layer(i, layer, spec, batches, keep, cfg, report)
            batches = run_layer(layer, batches)
            writer.add_modules(layer, prefix)
            writer.write({prefix + k: v for k, v in layer.state_dict().items()})
            layers[i] = layer.to("meta")  # this layer's memory goes back before the next is read
            del layer
            source.release()
            _trim()
        _reload_head(model, spec.embed_path, source)
        if cfg.quantize_lm_head:
            lm_head_group(model, spec, batches, cfg, keep, report,
                          embed_weight=lambda: source.get(spec.embed_path + ".weight"))
        else:
            _load(model.get_submodule(spec.embed_path), spec.embed_path + ".", source)
    inside = spec.layers_path + "."
    writer.add_modules(model, skip=inside)
    writer.write({k: v for k, v in model.state_dict().items() if not k.startswith(inside)})
    path = writer.finish(config, report.config or cfg, report.choices, source.tokenizer())
    return StreamResult(path, peak_rss_bytes(), time.time() - t0, len(layers))
