"""Single-process decoding: the lean integer decoder where the architecture allows it, and text streaming.

`edgeweave generate DIR` and the tests' references run here: the same LlamaStage a worker runs, with
every layer, the embedding and the head in one process (quant.generate's HFDecoder otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator

from quant.generate import HFDecoder, SamplingConfig, generate_tokens
from quant.textstream import TextStreamer

from .llama_stage import LocalLlama, supports

__all__ = ["make_decoder", "stream_text"]


def make_decoder(model):
    """The lean integer decoder where the architecture allows it, else transformers' forward."""
    return LocalLlama(model) if supports(model) else HFDecoder(model)


def stream_text(model, tokenizer, prompt: str, cfg: SamplingConfig) -> Iterator[str]:
    """Yields decoded text pieces (never half a UTF-8 character; see quant.textstream)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    streamer = TextStreamer(tokenizer)
    for tok in generate_tokens(make_decoder(model), ids, cfg, eos):
        if tok in eos:
            break
        if piece := streamer.push(tok):
            yield piece
    if rest := streamer.finish():
        yield rest
