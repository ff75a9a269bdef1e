"""Keeping the cores awake while steps arrive (workers/awake.py): what is held, that it is let go
after the idle time and on release, and that a worker holds it only when its shard says so."""

import os
import time

import grpc
import pytest
import torch

from workers.profile import NodeProfile
from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from tests.conftest import tiny_checkpoint
from workers.awake import PM_QOS_PATH, KeepAwake, current_latency_limit_us
from workers.server import start_worker_server
from workers.wire import GRPC_OPTIONS, encode_tensor

PM_QOS = os.access(PM_QOS_PATH, os.W_OK)


def _wait(cond, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_spinners_run_at_sched_idle_and_stop_after_the_idle_time():
    k = KeepAwake(mode="spinners", idle_s=0.3)
    k.touch()
    assert k.how == "spinners"
    assert len(k.threads) == len(os.sched_getaffinity(0))  # one per core this process may run on
    for t in k.threads:
        assert t.is_alive()
        assert os.sched_getscheduler(t.native_id) == os.SCHED_IDLE  # never takes time from work
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # steps keep arriving: still held
        k.touch()
        time.sleep(0.05)
    assert k.how == "spinners"
    threads = list(k.threads)
    assert _wait(lambda: k.how == "")  # no step for idle_s: let go
    assert not any(t.is_alive() for t in threads)
    k.touch()  # the next step holds it again
    assert k.how == "spinners"
    k.release()
    assert k.how == "" and not k.threads


@pytest.mark.skipif(not PM_QOS, reason=f"{PM_QOS_PATH} is not writable here")
def test_pm_qos_request_is_held_then_dropped():
    before = current_latency_limit_us()
    k = KeepAwake(mode="pm-qos", idle_s=0.3)
    k.touch()
    assert k.how == "pm-qos"
    assert current_latency_limit_us() == 0  # the kernel polls instead of halting
    assert _wait(lambda: k.how == "")
    assert current_latency_limit_us() == before


def test_auto_falls_back_to_spinners_when_pm_qos_is_refused(tmp_path):
    missing = tmp_path / "no-such-device"
    k = KeepAwake(idle_s=5.0, pm_qos_path=str(missing))
    k.touch()
    try:
        assert k.how == "spinners"
    finally:
        k.release()


def test_pm_qos_alone_says_why_it_cannot(tmp_path):
    k = KeepAwake(mode="pm-qos", pm_qos_path=str(tmp_path / "no-such-device"))
    k.touch()
    assert k.how == "" and "no-such-device" in k.unavailable


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mode"):
        KeepAwake(mode="always")
    with pytest.raises(ValueError, match="idle_s"):
        KeepAwake(idle_s=0)


@pytest.mark.parametrize("keep_awake", [True, False])
def test_worker_holds_it_only_when_the_shard_says_so(tmp_path, keep_awake):
    ckpt = tiny_checkpoint(tmp_path / "tiny", layers=2)
    server, port, servicer = start_worker_server(NodeProfile("n", "cpu", 10**9, 1.0))
    try:
        stub = pb_grpc.WorkerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS))
        spec = pb.ShardSpec(checkpoint=str(ckpt), first_layer=0, last_layer=2, embed=True, head=True,
                            placement_id="v1-a", kv_budget_bytes=10**8, max_context=32, keep_awake=keep_awake)
        stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=60)
        assert servicer.awake is None or servicer.awake.how == ""  # nothing held before a step
        stub.Forward(pb.ForwardRequest(placement_id="v1-a", items=[pb.StepItem(
            session_id="s", position=0, max_tokens=8, token_ids=encode_tensor(torch.tensor([1, 2])))]), timeout=30)
        if keep_awake:
            assert servicer.awake is not None and servicer.awake.how in ("pm-qos", "spinners")
            held = servicer.awake
            stub.LoadShard(pb.LoadShardRequest(shard=spec), timeout=60)  # a new shard lets the old hold go
            assert held.how == ""
        else:
            assert servicer.awake is None
    finally:
        server.stop(0)
