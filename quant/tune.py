"""Edge-LLM's adaptive layer tuning (METHODS.md section 3) on a quantized checkpoint.

The integer weights stay as they are; what is tuned is every float parameter of a window of
decoder layers: each quantized linear's per-output-channel weight scales (trained through the int8
kernel, quant/qlinear._TrainableScales) and the layers' norm weights. One window of `window`
layers is tuned at a time, bottom to top. The window's input comes from the layers below without
gradients, and its output goes straight to the final norm and lm_head (an early exit) for the
next-token loss, so back-propagation never goes deeper than the window: activation memory and
optimizer state scale with the window, not with the model. The last window exits through the
real head. Intermediate exits trained this way are what voting (quant/voting.py) can combine.

Memory is counted exactly: the bytes of the tensors autograd saves for backward (the
activations) plus gradients and Adam's two moments of the trainable parameters, for the windowed
run and for one step of tuning the whole model at once (same parameters, full depth).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_spec
from .evaluate import mean_window_loss
from .qlinear import QuantLinear

__all__ = ["TuneConfig", "TuneReport", "tune", "exit_logits"]


@dataclass(frozen=True)
class TuneConfig:
    window: int = 2  # decoder layers tuned together (the back-propagation depth)
    steps: int = 16  # optimizer steps per window
    batch: int = 2  # text windows per step
    lr: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class TuneReport:
    windows: int
    trainable_params: int  # all windows together
    loss_before: float  # held-out loss at the final exit
    loss_after: float
    peak_window_bytes: int  # activations + grads + Adam state, the largest window
    full_model_bytes: int  # the same for one step of tuning every layer at once
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class _SavedBytes:
    """Counts the bytes autograd saves for backward (the activation memory of a step)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def __enter__(self):
        def pack(t: torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _inputs(model, layers, ids: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments entering layer 0, per batch of windows."""
    from .layerwise import capture_first_layer_inputs

    out = []
    for b in ids.split(batch):
        out.extend(capture_first_layer_inputs(model, layers, b))  # one entry: batch <= CALIB_BATCH
    return out


def exit_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Hidden states after any layer -> logits through the final norm and lm_head (an exit)."""
    spec = arch_spec(model)
    return model.get_output_embeddings()(model.get_submodule(spec.final_norm_path)(h))


def _loss(model, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = exit_logits(model, h)[:, :-1]  # [B, L-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _params(layers: list[nn.Module]) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                if not m.trainable():
                    raise ValueError("tune trains per-output-channel weight scales; this checkpoint has group-wise "
                                     "or Tender weights. Tune a per-channel checkpoint (haq, rtn, mobilequant, luc "
                                     "with --w-group 0)")
                out.append(m.w_scale)
                if m.bias is not None:
                    out.append(m.bias)
        out.extend(p for n, p in layer.named_parameters() if "norm" in n)
    return out


def _step_bytes(model, run_layers, params, h_in, kwargs, ids) -> int:
    """Activations saved by one forward of `run_layers` with grad, plus grads and Adam's moments."""
    for p in params:
        p.requires_grad_(True)
    with _SavedBytes() as saved:
        h = h_in
        for layer in run_layers:
            h = _layer(layer, h, kwargs)
        loss = _loss(model, h, ids)
    loss.backward()
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return saved.total + 3 * sum(p.numel() * p.element_size() for p in params)


def _layer(layer, h, kwargs):
    y = layer(h, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def tune(model, train_ids: torch.Tensor, eval_ids: torch.Tensor, cfg: TuneConfig, progress: bool = True) -> TuneReport:
    """Tune a loaded quantized model in place, window by window, on train_ids [N, L] -> report."""
    t0 = time.time()
    spec = arch_spec(model)
    layers = list(model.get_submodule(spec.layers_path))
    from .layerwise import CALIB_BATCH

    if cfg.window < 1 or cfg.steps < 0 or not 1 <= cfg.batch <= CALIB_BATCH:
        raise ValueError(f"tune needs --window >= 1, --steps >= 0 and a batch in [1, {CALIB_BATCH}], got {cfg}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.w_scale.requires_grad_(False)
    loss_before = mean_window_loss(model, eval_ids)
    with torch.no_grad():
        batches = _inputs(model, model.get_submodule(spec.layers_path), train_ids, cfg.batch)  # [(h, kwargs)]
    id_batches = list(train_ids.split(cfg.batch))
    # Full-depth reference: one real step with every layer's parameters trainable (nothing updated).
    all_params = _params(layers)
    full_bytes = _step_bytes(model, layers, all_params, batches[0][0], batches[0][1], id_batches[0])
    starts = list(range(0, len(layers), cfg.window))
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=len(starts) * cfg.steps, desc=f"tune window={cfg.window}", disable=not progress)
    peak = 0
    for s in starts:
        win = layers[s:s + cfg.window]
        params = _params(win)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        for step in range(cfg.steps):
            k = int(torch.randint(len(batches), (1,), generator=g))
            h, kwargs = batches[k]
            saved = _SavedBytes()
            with saved if step == 0 else contextlib.nullcontext():  # the window's activation memory, first step
                for layer in win:
                    h = _layer(layer, h, kwargs)
                loss = _loss(model, h, id_batches[k])
            if step == 0:
                peak = max(peak, saved.total + 3 * sum(p.numel() * p.element_size() for p in params))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(layers=f"{s}-{s + len(win) - 1}", loss=f"{loss.item():.3f}")
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        with torch.no_grad():  # the next window reads this window's tuned output
            new = []
            for h, kwargs in batches:
                for layer in win:
                    h = _layer(layer, h, kwargs)
                new.append((h, kwargs))
            batches = new
    bar.close()
    return TuneReport(len(starts), sum(p.numel() for p in all_params), loss_before, mean_window_loss(model, eval_ids), peak,
                      full_bytes, round(time.time() - t0, 1))
