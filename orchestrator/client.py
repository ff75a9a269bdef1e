"""A small InferenceService client: stream a generation from a server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, open_channel

__all__ = ["stream_generate", "server_health"]


def stream_generate(address: str, prompt: str, max_tokens: int = 64, stop: tuple[str, ...] = (),
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    timeout_s: float = 300.0, security: Security | None = None) -> Iterator[pb.GenerateResponse]:
    """Yields the server's pieces; the whole stream has a deadline of timeout_s. security: TLS and
    token (default: from the environment, see protos/security.py)."""
    with open_channel(address, security or Security.from_env()) as ch:
        req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, stop=list(stop),
                                 sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
        yield from pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=timeout_s)


def server_health(address: str, timeout_s: float = 5.0, security: Security | None = None) -> pb.InferenceHealthResponse:
    with open_channel(address, security or Security.from_env()) as ch:
        return pb_grpc.InferenceServiceStub(ch).Health(pb.InferenceHealthRequest(), timeout=timeout_s)
