"""gRPC server set-up shared by WorkerService and InferenceService: message limits, standard
health checking (grpc.health.v1) and reflection, so generic gRPC tools can see every server."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc

from . import edgeweave_v1_pb2 as pb
from .limits import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from .security import Security, TokenInterceptor, server_credentials

__all__ = ["MAX_MESSAGE_BYTES", "GRPC_OPTIONS", "start_server"]


class StrictParsing(grpc.ServerInterceptor):
    """Parses requests inside the handler, so a malformed or truncated message (bad wire format,
    invalid UTF-8 in a string field) gets INVALID_ARGUMENT with the reason, not gRPC's INTERNAL
    "Exception deserializing request!"."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not handler.response_streaming:
            return handler  # no client-streaming-only RPCs here
        parse, method = handler.request_deserializer, details.method

        def parsed(raw: bytes, context):
            try:
                return parse(raw)
            except Exception as e:  # google.protobuf.message.DecodeError, UnicodeDecodeError
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{method}: the request is not a valid message ({type(e).__name__}: {e})")

        def wrap(behavior):
            def run(raw: bytes, context):
                return behavior(parsed(raw, context), context)
            return run

        if handler.request_streaming:  # each message of the stream parsed as it is read
            behavior = handler.stream_stream

            def run_stream(raws, context):
                return behavior((parsed(raw, context) for raw in raws), context)
            return grpc.stream_stream_rpc_method_handler(run_stream, None, handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), None,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), None, handler.response_serializer)


def start_server(add_servicer: Callable, servicer, service: str, host: str, port: int,
                 max_workers: int, security: Security | None = None, mutual: bool = False):
    """Serves `servicer` (added with its generated add_*_to_server) as edgeweave.v1.{service}, plus
    health (SERVING for "" and the service) and reflection, on host:port (0: any free port).
    security: TLS (client certificates required when mutual and security.mutual) and the token.
    -> (server, bound port, the health servicer, so the caller can report NOT_SERVING)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    sec = security or Security()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS,
                         interceptors=[*([TokenInterceptor(sec.token)] if sec.token else []), StrictParsing()],
                         maximum_concurrent_rpcs=4 * max_workers)
    add_servicer(servicer, server)
    name = pb.DESCRIPTOR.services_by_name[service].full_name
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for n in ("", name):
        hs.set(n, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = server_credentials(sec, mutual)
    bound = server.add_secure_port(f"{host}:{port}", creds) if creds else server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {service} to {host}:{port} (address in use, or not this machine's)")
    server.start()
    return server, bound, hs
