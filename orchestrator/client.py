"""A small InferenceService client: stream a generation from a server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from workers.wire import GRPC_OPTIONS

__all__ = ["stream_generate", "server_health"]


def stream_generate(address: str, prompt: str, max_tokens: int = 64, stop: tuple[str, ...] = (),
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    timeout_s: float = 300.0) -> Iterator[pb.GenerateResponse]:
    """Yields the server's pieces; the whole stream has a deadline of timeout_s."""
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, stop=list(stop),
                                 sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
        yield from pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=timeout_s)


def server_health(address: str, timeout_s: float = 5.0) -> pb.InferenceHealthResponse:
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        return pb_grpc.InferenceServiceStub(ch).Health(pb.InferenceHealthRequest(), timeout=timeout_s)
