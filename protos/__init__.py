"""protos: the wire, the bottom floor. edgeweave.v1's messages and services (generated from
edgeweave_v1.proto), the message limits (limits.py), transport security (security.py: TLS and the
shared token) and the gRPC server set-up every edgeweave server shares (serving.py). Imports nothing
else of edgeweave."""
