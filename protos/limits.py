"""Message limits every edgeweave server and channel sets explicitly (gRPC's default receive limit is
4 MiB). The bottom of protos/: the server set-up (serving.py) and the channels (security.py) both read it."""

from __future__ import annotations

__all__ = ["MAX_MESSAGE_BYTES", "GRPC_OPTIONS"]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
