"""Calibration: text in, token windows out, and per-group activation statistics from hooks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CalibConfig

__all__ = ["read_text", "default_calibration_path", "calibration_windows", "ActStats", "HESSIAN_F64_MAX_K", "hessian_dtype"]

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_calibration_path() -> Path:
    """The C4 sample beside the checkout (../shared/data/c4), the METHODS.md calibration set."""
    return SHARED_DATA / "c4" / "validation_2k.jsonl"


def read_text(path: str | Path, max_chars: int | None = None, from_end: bool = False) -> str:
    """Plain text, or JSONL with a "text" field per line (documents joined with blank lines).

    max_chars keeps the first (or, with from_end, the last) characters only."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {p} as UTF-8 text: {e}") from e
    if p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{p}:{n}: expected a JSON object with a 'text' field") from e
        raw = "\n\n".join(docs)
    if not raw.strip():
        raise ValueError(f"{p} contains no text")
    if not max_chars:
        return raw
    return raw[-max_chars:] if from_end else raw[:max_chars]


# Characters at the head of a calibration text never calibrated on (when the text is at least twice
# as long): the evaluation protocol scores a file's first windows (8 x 2048 tokens, ~70 k characters).
EVAL_HEAD_CHARS = 256_000


def calibration_windows(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """Random windows of cfg.seq_len tokens from the calibration text -> LongTensor [N, L]."""
    path = cfg.path or default_calibration_path()
    # ~4 characters per token: tokenize a margin more than needed, not the whole corpus. From the end
    # of the text, and never its first EVAL_HEAD_CHARS: the evaluation protocol scores the first windows.
    text = read_text(path)
    head = EVAL_HEAD_CHARS if len(text) >= 2 * EVAL_HEAD_CHARS else 0
    text = text[max(head, len(text) - cfg.samples * cfg.seq_len * 12):]
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    if ids.numel() < cfg.seq_len + 1:
        raise ValueError(f"{path} has {ids.numel()} tokens, fewer than one {cfg.seq_len}-token window")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.samples,), generator=g)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])  # [N, L]


HESSIAN_F64_MAX_K = 4096  # wider inputs keep X^T X (and GPTQ's work) in float32, as GPTQ itself does


def hessian_dtype(k: int) -> torch.dtype:
    """float64 for inputs of up to HESSIAN_F64_MAX_K channels; float32 beyond, where a float64 [K, K]
    would be the largest thing in memory (K = 11008, Llama-2-7B's down projection: 970 MB a copy)."""
    return torch.float64 if k <= HESSIAN_F64_MAX_K else torch.float32


@dataclass
class ActStats:
    """Running statistics of one activation [*, K]: channel max |x|, X^T X, and a token sample."""

    absmax: torch.Tensor | None = None  # [K]
    xtx: torch.Tensor | None = None  # [K, K] hessian_dtype(K)
    tokens: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    keep_per_batch: int = 256
    with_hessian: bool = True  # False: skip X^T X (callers that only need maxima and samples)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        amax = x.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.with_hessian:  # float32 products per batch, a float64 running sum, 1024 rows at a time
            k = x.shape[1]
            if self.xtx is None:
                self.xtx = torch.zeros((k, k), dtype=hessian_dtype(k))
            for r0 in range(0, k, 1024):
                self.xtx[r0:r0 + 1024] += (x[:, r0:r0 + 1024].t() @ x).to(self.xtx.dtype)
        self.tokens += x.shape[0]
        idx = torch.randperm(x.shape[0])[: self.keep_per_batch]
        self.sample.append(x[idx])

    def channel_max(self) -> torch.Tensor:
        """max |x| per channel over every recorded token  [K]."""
        assert self.absmax is not None, "no activations were recorded"
        return self.absmax

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / T  [K, K] (hessian_dtype(K)), a new tensor."""
        assert self.xtx is not None, "no activations were recorded"
        return self._scaled(self.xtx.clone())

    def take_hessian(self) -> torch.Tensor:
        """hessian(), made in the memory of X^T X, which these statistics no longer hold (at 7B the
        down projection's is 485 MB: no second copy)."""
        assert self.xtx is not None, "no activations were recorded"
        h, self.xtx = self.xtx, None
        return self._scaled(h)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:  # X^T X -> 2 X^T X / T, in place
        h *= 2.0
        h /= max(self.tokens, 1)
        return h

    def samples(self, limit: int) -> torch.Tensor:
        """Up to `limit` of the randomly kept tokens  [S, K]."""
        return torch.cat(self.sample)[:limit]
