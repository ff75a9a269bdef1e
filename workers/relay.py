"""Relayed steps' plumbing on a worker (the chain, docs/runtime.md "Hop pattern"): the stream a stage
passes steps on to the next stage over, and the front ends' Subscribe queues the last stage (or a
stage that refused a step) answers on. The servicer runs the steps; this module only carries them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, call_metadata, open_channel

__all__ = ["RelayOut", "Relays", "MAX_RELAY_ID", "MAX_SUBSCRIPTIONS", "RELAY_QUEUE", "RELAY_LIFETIME_S"]

log = logging.getLogger("edgeweave.worker")

MAX_SUBSCRIPTIONS = 4  # open Subscribe calls per worker; each holds one of the server's threads
MAX_RELAY_ID = 64
RELAY_QUEUE = 64  # events waiting for a subscriber (at most one step in flight per front end)
RELAY_LIFETIME_S = 3600.0  # the relay stream's own deadline; it is reopened before it runs out


class RelayOut:
    """The stream a stage passes relayed steps on to the next stage over. Relayed steps get no
    answer, so the stream only ever ends: a watcher notes why, and calls `on_end` with it (the stage
    then reports it to the front end); the next send reopens the stream."""

    def __init__(self, address: str, security: Security, on_end) -> None:
        self.address, self.on_end = address, on_end
        self.channel = open_channel(address, security)
        self.q: queue.Queue[pb.ForwardRequest | None] = queue.Queue()
        self.ended = ""
        self.closing = False  # closed here: its end is no failure to report
        self.sent: tuple[str, int] | None = None  # (relay id, seq) of the last step put on it
        self.opened = time.monotonic()
        self.call = pb_grpc.WorkerServiceStub(self.channel).ForwardStream(
            iter(self.q.get, None), timeout=RELAY_LIFETIME_S, metadata=call_metadata(security))
        threading.Thread(target=self._watch, name="edgeweave-relay-out", daemon=True).start()

    def _watch(self) -> None:
        try:
            for _ in self.call:  # a relayed step is never answered
                pass
            why = "the relay stream ended"
            code = grpc.StatusCode.UNAVAILABLE
        except grpc.RpcError as e:
            code = e.code() if e.code() not in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) \
                else grpc.StatusCode.UNAVAILABLE
            why = f"{e.code().name if e.code() else 'error'}: {e.details() or ''}"
        self.ended = why
        self.on_end(self, code, why)

    def usable(self) -> bool:
        return not self.ended and time.monotonic() - self.opened < RELAY_LIFETIME_S - 60.0

    def close(self) -> None:
        self.closing = True
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


class Relays:
    """The worker's relay state: the stream to the next stage and the Subscribe queues by relay id."""

    def __init__(self, security: Security) -> None:
        self.security = security
        self._subs: dict[str, queue.Queue[pb.RelayEvent | None]] = {}
        self._sub_slots = threading.BoundedSemaphore(MAX_SUBSCRIPTIONS)
        self._lock = threading.Lock()  # guards _subs and _out
        self._out: RelayOut | None = None

    def pass_on(self, address: str, rid: str, seq: int, req: pb.ForwardRequest) -> None:
        with self._lock:
            out = self._out
            if out is not None and (out.address != address or not out.usable()):
                self._out = None
                out.close()
                out = None
            if out is None:
                out = self._out = RelayOut(address, self.security, self._ended)
            out.sent = (rid, seq)
            out.q.put(req)

    def _ended(self, out: RelayOut, code: grpc.StatusCode, why: str) -> None:
        """The stream to the next stage ended: the front end waiting on the last step passed on hears
        it from here (the next stage may be gone and unable to say so itself)."""
        with self._lock:
            if self._out is out:
                self._out = None
            sent = None if out.closing else out.sent
        out.close()
        if sent is not None:
            self.deliver(sent[0], pb.RelayEvent(seq=sent[1], error_code=code.value[0],
                                                error=f"the next stage at {out.address}: {why}"))

    def deliver(self, rid: str, event: pb.RelayEvent, context=None,
                abort_with: tuple[grpc.StatusCode, str] | None = None) -> None:
        with self._lock:
            q = self._subs.get(rid)
        if q is None:
            if context is not None:
                context.abort(*(abort_with or (grpc.StatusCode.FAILED_PRECONDITION,
                                               f"no Subscribe call is open here for relay id {rid[:MAX_RELAY_ID]!r}")))
            return
        if q.qsize() >= RELAY_QUEUE:  # the subscriber stopped reading; it will fail its step by its deadline
            log.warning("relay %s: %d events unread, dropping one", rid, RELAY_QUEUE)
            return
        q.put(event)

    def end_all(self) -> None:
        """Ends every Subscribe call and the stream to the next stage (a new shard was loaded)."""
        with self._lock:
            subs, self._subs = list(self._subs.values()), {}
            out, self._out = self._out, None
        for q in subs:
            q.put(None)
        if out is not None:
            out.close()

    def subscribe(self, rid: str, ready: pb.RelayEvent, context):
        """Yields `ready`, then the events delivered for relay id `rid` until the call ends or end_all."""
        with self._lock:  # a front end subscribing again (after a failed step) replaces its call
            old = self._subs.pop(rid, None)
        if old is not None:
            old.put(None)  # that call ends and frees its slot at once
        if not self._sub_slots.acquire(timeout=2.0):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_SUBSCRIPTIONS} Subscribe calls are already open on this worker")
        q: queue.Queue[pb.RelayEvent | None] = queue.Queue()  # deliver() bounds it at RELAY_QUEUE events
        context.add_callback(lambda: q.put(None))  # the call ended (cancelled, deadline): stop waiting at once
        with self._lock:
            old, self._subs[rid] = self._subs.get(rid), q
        if old is not None:  # another call of the same id came in meanwhile
            old.put(None)
        try:
            yield ready
            while (event := q.get()) is not None:
                yield event
        finally:
            with self._lock:
                if self._subs.get(rid) is q:
                    del self._subs[rid]
            self._sub_slots.release()
