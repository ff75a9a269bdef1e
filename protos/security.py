"""Transport security, configured in one place: optional TLS (mutual between the controller and the
workers) and a shared token that every RPC must carry.

`Security` is plain data. `Security.from_env()` reads it from the environment, which is how a node
started by `ray start` (cluster.yaml) and a user's shell configure it:

    EDGEWEAVE_TOKEN       shared secret; every RPC must send `authorization: Bearer <token>`
    EDGEWEAVE_TOKEN_FILE  the same, read from a file (preferred: not visible in `ps`)
    EDGEWEAVE_TLS_CERT    PEM certificate of this process's servers (and its client certificate)
    EDGEWEAVE_TLS_KEY     PEM private key for it
    EDGEWEAVE_TLS_CA      PEM CA bundle that signed the servers' (and, with mutual TLS, clients') certificates
    EDGEWEAVE_TLS_MUTUAL  "1": worker servers accept only clients with a certificate signed by the CA

Health checks (grpc.health.v1) are answered without the token so that load balancers and probes
work; they reveal only SERVING / NOT_SERVING. Everything else is refused with UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from .limits import GRPC_OPTIONS

__all__ = ["Security", "SecurityError", "open_channel", "open_aio_channel", "call_metadata", "server_credentials", "TokenInterceptor", "HEALTH_PREFIX"]

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class SecurityError(ValueError):
    """A security setting that cannot be used (missing file, key without certificate...)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{what}: cannot read {path}: {e.strerror or e}") from e


@dataclass(frozen=True)
class Security:
    token: str = ""
    tls_cert: str = ""  # paths to PEM files
    tls_key: str = ""
    tls_ca: str = ""
    mutual: bool = False  # workers require client certificates signed by tls_ca
    server_name: str = ""  # the name checked in servers' certificates when it is not the address's host

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("TLS needs both a certificate (EDGEWEAVE_TLS_CERT) and its key (EDGEWEAVE_TLS_KEY)")
        if self.mutual and not (self.tls_cert and self.tls_ca):
            raise SecurityError("mutual TLS needs a certificate, its key and the CA (EDGEWEAVE_TLS_CA)")
        if self.token and (len(self.token) < 16 or any(c.isspace() for c in self.token)):
            raise SecurityError("the shared token must be at least 16 characters without spaces")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert) or bool(self.tls_ca)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Security":
        e = os.environ if env is None else env
        token = e.get("EDGEWEAVE_TOKEN", "")
        if not token and e.get("EDGEWEAVE_TOKEN_FILE"):
            token = _read(e["EDGEWEAVE_TOKEN_FILE"], "EDGEWEAVE_TOKEN_FILE").decode().strip()
        return cls(token, e.get("EDGEWEAVE_TLS_CERT", ""), e.get("EDGEWEAVE_TLS_KEY", ""), e.get("EDGEWEAVE_TLS_CA", ""),
                   e.get("EDGEWEAVE_TLS_MUTUAL", "") in ("1", "true", "yes"), e.get("EDGEWEAVE_TLS_SERVER_NAME", ""))

    def to_env(self) -> dict[str, str]:
        """The environment that makes from_env() return this (for processes started by Ray)."""
        out = {"EDGEWEAVE_TOKEN": self.token, "EDGEWEAVE_TLS_CERT": self.tls_cert, "EDGEWEAVE_TLS_KEY": self.tls_key,
               "EDGEWEAVE_TLS_CA": self.tls_ca, "EDGEWEAVE_TLS_MUTUAL": "1" if self.mutual else "",
               "EDGEWEAVE_TLS_SERVER_NAME": self.server_name}
        return {k: v for k, v in out.items() if v}


def server_credentials(sec: Security, mutual: bool) -> grpc.ServerCredentials | None:
    """None: plain TCP. mutual: also require a client certificate signed by the CA."""
    if not sec.tls_cert:
        return None
    pair = (_read(sec.tls_key, "EDGEWEAVE_TLS_KEY"), _read(sec.tls_cert, "EDGEWEAVE_TLS_CERT"))
    if mutual and sec.mutual:
        return grpc.ssl_server_credentials([pair], root_certificates=_read(sec.tls_ca, "EDGEWEAVE_TLS_CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but health checks unless it carries `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send 'authorization: Bearer <token>' (EDGEWEAVE_TOKEN)")
        self._deny = deny

    def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        got = next((v for k, v in details.invocation_metadata if k == "authorization"), "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._deny, handler.request_deserializer)
        return grpc.unary_unary_rpc_method_handler(self._deny, handler.request_deserializer)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with(self, d) -> _Details:
        return _Details(d.method, d.timeout, [*(d.metadata or ()), self.header], d.credentials,
                        d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Callable, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Callable, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation: Callable, details, request_iterator):
        return continuation(self._with(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, details, request_iterator):
        return continuation(self._with(details), request_iterator)


def open_channel(address: str, sec: Security | None = None, options: list | None = None) -> grpc.Channel:
    """A channel to an edgeweave server: TLS when a CA or certificate is configured (presenting this
    process's certificate, for mutual TLS), and the token on every call when one is set."""
    sec = sec or Security()
    creds, opts = _channel_setup(sec, options)
    ch = grpc.secure_channel(address, creds, options=opts) if creds else grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(ch, _AddToken(sec.token)) if sec.token else ch


def open_aio_channel(address: str, sec: Security | None = None, options: list | None = None) -> grpc.aio.Channel:
    """open_channel for asyncio code (create it inside the loop that uses it). The token is not added
    here: send call_metadata(sec) with each call."""
    creds, opts = _channel_setup(sec or Security(), options)
    return grpc.aio.secure_channel(address, creds, options=opts) if creds else grpc.aio.insecure_channel(address, options=opts)


def call_metadata(sec: Security | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call must carry under `sec` (the token), for channels without _AddToken."""
    return (("authorization", f"Bearer {sec.token}"),) if sec is not None and sec.token else ()


def _channel_setup(sec: Security, options: list | None) -> tuple[grpc.ChannelCredentials | None, list]:
    """-> (TLS credentials or None, channel options) for a channel to an edgeweave server."""
    opts = list(options if options is not None else GRPC_OPTIONS)
    if not sec.tls:
        return None, opts
    if sec.server_name:
        opts.append(("grpc.ssl_target_name_override", sec.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(sec.tls_ca, "EDGEWEAVE_TLS_CA") if sec.tls_ca else None,
        private_key=_read(sec.tls_key, "EDGEWEAVE_TLS_KEY") if sec.tls_cert else None,
        certificate_chain=_read(sec.tls_cert, "EDGEWEAVE_TLS_CERT") if sec.tls_cert else None)
    return creds, opts
