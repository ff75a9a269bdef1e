"""The gRPC InferenceService: validates requests, runs them on the engine, streams text back."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security
from protos.serving import start_server
from quant.textstream import TextStreamer

from .engine import Engine, GenerationRequest

__all__ = ["InferenceServicer", "start_inference_server", "MAX_PROMPT_CHARS", "MAX_STOP_STRINGS"]

log = logging.getLogger("edgeweave.service")

MAX_PROMPT_CHARS = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine_of: Callable[[], Engine], tokenizer, model: str) -> None:
        self.engine_of, self.tok, self.model = engine_of, tokenizer, model

    def _request(self, r: pb.GenerateRequest, context) -> tuple[GenerationRequest, tuple[str, ...]]:
        def bad(msg: str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)

        if not r.prompt:
            bad("prompt is empty")
        if len(r.prompt) > MAX_PROMPT_CHARS:
            bad(f"prompt is {len(r.prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        if r.max_tokens < 1:
            bad("max_tokens must be at least 1")
        if len(r.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in r.stop):
            bad(f"stop: at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_CHARS} characters")
        sp = r.sampling
        if not sp.temperature >= 0 or not 0 <= sp.top_p <= 1:  # also rejects NaN
            bad("sampling: temperature must be >= 0 and top_p in (0, 1]")
        ids = self.tok(r.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            bad("prompt has no tokens")
        return GenerationRequest(tuple(ids), int(r.max_tokens), float(sp.temperature), float(sp.top_p) or 1.0,
                                 int(sp.seed)), tuple(r.stop)

    def Generate(self, request: pb.GenerateRequest, context):
        req, stop = self._request(request, context)
        engine = self.engine_of()
        try:
            pieces = engine.submit(req)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        streamer = TextStreamer(self.tok, stop)
        n = len(req.prompt_ids)
        generated = 0
        toks: list[int] = []
        try:
            for p in pieces:
                if p.error:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"generation failed: {p.error}")
                if p.finish:
                    yield pb.GenerateResponse(text=streamer.finish(), token_ids=toks, finish_reason=p.finish,
                                              prompt_tokens=n, generated_tokens=generated)
                    return
                assert p.token is not None
                generated += 1
                if p.token in engine.eos:
                    continue
                toks.append(p.token)
                text = streamer.push(p.token)
                if streamer.stopped:
                    yield pb.GenerateResponse(text=text, token_ids=toks, finish_reason="stop", prompt_tokens=n,
                                              generated_tokens=generated)
                    return
                if text:
                    yield pb.GenerateResponse(text=text, token_ids=toks, prompt_tokens=n, generated_tokens=generated)
                    toks = []
                if not context.is_active():
                    return
        finally:
            pieces.close()  # type: ignore[attr-defined]  # cancels the session if it is still running

    def Health(self, request, context):
        engine = self.engine_of()
        return pb.InferenceHealthResponse(placement_id=engine.placement.placement_id, stages=len(engine.placement.stages),
                                          active_sessions=engine.active_sessions(), model=self.model,
                                          unavailable=engine.unavailable, recoveries=engine.stats.recoveries)


def start_inference_server(servicer: InferenceServicer, host: str = "127.0.0.1", port: int = 0,
                           max_workers: int = 64, security: Security | None = None):
    """-> (server, port, health servicer). Clients are users: TLS without client certificates."""
    return start_server(pb_grpc.add_InferenceServiceServicer_to_server, servicer, "InferenceService", host, port,
                        max_workers, security, mutual=False)
