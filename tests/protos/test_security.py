"""Transport security over real gRPC on 127.0.0.1: the shared token, TLS, mutual TLS between the
controller and a worker, and settings that cannot work refused with a clear message."""

import grpc
import pytest
import trustme

from workers.profile import NodeProfile
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, SecurityError, open_channel
from workers.server import start_worker_server

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a certificate for 127.0.0.1 (the worker), and a client certificate (the controller)."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, ident in (("server", "127.0.0.1"), ("client", "controller.edgeweave")):
        cert = ca.issue_cert(ident)
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    other = trustme.CA().issue_cert("intruder")  # signed by a CA the worker does not trust
    other.cert_chain_pems[0].write_to_path(str(d / "intruder.pem"))
    other.private_key_pem.write_to_path(str(d / "intruder.key"))
    return d


def _worker(sec: Security):
    return start_worker_server(NodeProfile("n", "cpu", 10**9, 1.0), security=sec)


def _health(address: str, sec: Security) -> pb.WorkerHealthResponse:
    with open_channel(address, sec) as ch:
        return pb_grpc.WorkerServiceStub(ch).Health(pb.WorkerHealthRequest(), timeout=5)


def test_token_required_on_every_rpc_but_standard_health_checks():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port, _ = _worker(Security(token=TOKEN))
    addr = f"127.0.0.1:{port}"
    try:
        for wrong in (Security(), Security(token="another-token-0123456789")):
            with pytest.raises(grpc.RpcError) as e:
                _health(addr, wrong)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "EDGEWEAVE_TOKEN" in e.value.details()
        assert _health(addr, Security(token=TOKEN)).placement_id == ""
        with open_channel(addr) as ch:  # probes work without the token and learn only SERVING
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_tls_and_mutual_tls(pki):
    d = pki
    worker_sec = Security(token=TOKEN, tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                          tls_ca=str(d / "ca.pem"), mutual=True)
    server, port, _ = _worker(worker_sec)
    addr = f"127.0.0.1:{port}"
    try:
        controller = Security(token=TOKEN, tls_cert=str(d / "client.pem"), tls_key=str(d / "client.key"),
                              tls_ca=str(d / "ca.pem"), mutual=True)
        assert _health(addr, controller).sessions == 0
        refused = [
            Security(token=TOKEN),  # plain TCP to a TLS port
            Security(token=TOKEN, tls_ca=str(d / "ca.pem")),  # TLS but no client certificate
            Security(token=TOKEN, tls_cert=str(d / "intruder.pem"), tls_key=str(d / "intruder.key"),
                     tls_ca=str(d / "ca.pem")),  # a certificate from another CA
        ]
        for sec in refused:
            with pytest.raises(grpc.RpcError) as e:
                _health(addr, sec)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_settings_that_cannot_work_are_refused_clearly(tmp_path):
    with pytest.raises(SecurityError, match="both a certificate"):
        Security(tls_cert="a.pem")
    with pytest.raises(SecurityError, match="16 characters"):
        Security(token="short")
    with pytest.raises(SecurityError, match="mutual TLS needs"):
        Security(mutual=True)
    with pytest.raises(SecurityError, match="cannot read"):
        Security.from_env({"EDGEWEAVE_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "tok").write_text(TOKEN + "\n")
    env = {"EDGEWEAVE_TOKEN_FILE": str(tmp_path / "tok"), "EDGEWEAVE_TLS_MUTUAL": "0"}
    assert Security.from_env(env) == Security(token=TOKEN)
    assert Security.from_env(Security(token=TOKEN).to_env()) == Security(token=TOKEN)
