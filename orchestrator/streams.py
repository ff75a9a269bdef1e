"""Forward steps over one long-lived bidirectional call per stage (WorkerService.ForwardStream).

A unary Forward pays gRPC's per-call set-up on every hop; on one stream a step is one message each
way (bench/hop.py measures both). The calls run on grpc.aio in a private event loop that the
engine's thread runs for the length of each step: the synchronous stream API would hand every
message to and from helper threads, which queue for the GIL behind the server threads streaming
tokens to clients. A step past its deadline cancels the stream and fails with DEADLINE_EXCEEDED as
a unary call would. Any failure drops the stream; the next step opens a new one. Workers without
ForwardStream (UNIMPLEMENTED) are served with unary Forward from then on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, call_metadata, open_aio_channel

__all__ = ["StepFailed", "StageStream", "RelayChain", "ChainFailed", "RelayUnsupported"]

STREAM_LIFETIME_S = 3600.0  # each stream's own deadline; it is reopened before it runs out


class StepFailed(Exception):
    """A step got no answer: `code` and `details` as a unary Forward would report them."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'error'}: {details}")
        self.code, self.details = code, details


async def _ended(call) -> StepFailed:
    """The failure of a stream that ended without answering a step, from the call's own status. A
    worker that died while the stream was idle leaves gRPC core's bare INTERNAL (or no status yet):
    that is a dead peer, UNAVAILABLE, which the engine recovers from."""
    try:
        code, details = await asyncio.wait_for(asyncio.gather(call.code(), call.details()), 1.0)
    except asyncio.TimeoutError:
        code, details = None, ""
    if code in (None, grpc.StatusCode.OK, grpc.StatusCode.INTERNAL):
        code = grpc.StatusCode.UNAVAILABLE
    return StepFailed(code, details or "the step stream to the worker ended")


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancels what is left on a private loop (gRPC's status watchers of cancelled calls), closes it."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


class StageStream:
    """One stage's steps, in order, over a ForwardStream call; or a unary Forward per step on `stub`
    (use_stream=False, or a worker without streams). Used by one thread at a time."""

    def __init__(self, stub: pb_grpc.WorkerServiceStub, address: str, security: Security | None = None,
                 use_stream: bool = True, lifetime_s: float = STREAM_LIFETIME_S) -> None:
        self.stub, self.address, self.security = stub, address, security
        self.use_stream, self.lifetime_s = use_stream, lifetime_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None  # the open grpc.aio stream-stream call
        self._opened = 0.0
        self._pending: tuple[pb.ForwardRequest, float, asyncio.TimerHandle | None] | None = None  # send()'s step

    def step(self, req: pb.ForwardRequest, timeout_s: float) -> pb.ForwardResponse:
        """-> the stage's response; raises StepFailed."""
        self.send(req, timeout_s)
        return self.receive()

    def _failed(self, e: grpc.RpcError | StepFailed) -> StepFailed | None:
        """Drops the stream after a failed write or read -> the failure to raise, or None for
        UNIMPLEMENTED (an older worker, whose status may end the call at the write or at the read):
        unary calls from now on."""
        self._drop()
        failed = e if isinstance(e, StepFailed) else StepFailed(e.code(), e.details() or "")
        if failed.code == grpc.StatusCode.UNIMPLEMENTED:
            self.use_stream = False
            return None
        return failed

    def send(self, req: pb.ForwardRequest, timeout_s: float) -> None:
        """Writes a step without waiting for its answer; receive() takes it. Only one step may be
        out at a time. Raises StepFailed (the step then never happened)."""
        if self._pending is not None:
            raise RuntimeError("a step is already out on this stream; receive() it first")
        if not self.use_stream:  # unary: the call runs in receive()
            self._pending = (req, timeout_s, None)
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        timer: asyncio.TimerHandle | None = None
        try:
            timer = self._loop.run_until_complete(self._write(req, timeout_s))
        except (grpc.RpcError, StepFailed) as e:
            failed = self._failed(e)
            if failed is not None:
                raise failed from (None if failed is e else e)
        self._pending = (req, timeout_s, timer)  # timer None: unary, in receive()

    def receive(self) -> pb.ForwardResponse:
        """-> the answer to the step send() wrote; raises StepFailed."""
        if self._pending is None:
            raise RuntimeError("no step is out on this stream")
        req, timeout_s, timer = self._pending
        self._pending = None
        if timer is not None:
            assert self._loop is not None
            try:
                return self._loop.run_until_complete(self._read(timeout_s, timer))
            except (grpc.RpcError, StepFailed) as e:
                failed = self._failed(e)
                if failed is not None:
                    raise failed from (None if failed is e else e)
        try:
            return self.stub.Forward(req, timeout=timeout_s)
        except grpc.RpcError as e:
            raise StepFailed(e.code(), e.details() or "") from e

    async def _write(self, req: pb.ForwardRequest, timeout_s: float) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._call is not None and now - self._opened > self.lifetime_s - timeout_s - 5.0:
            self._drop()  # would run out during this step
        if self._channel is None:
            self._channel = open_aio_channel(self.address, self.security)
        if self._call is None:
            stub = pb_grpc.WorkerServiceStub(self._channel)
            self._call = stub.ForwardStream(timeout=self.lifetime_s, metadata=call_metadata(self.security))
            self._opened = now
        call = self._call
        timer = loop.call_later(timeout_s, call.cancel)
        try:
            await call.write(req)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:  # the call ended between steps
            timer.cancel()
            raise await _ended(call) from e
        except asyncio.CancelledError as e:
            raise StepFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no answer within the step deadline of {timeout_s:g} s") from e
        return timer

    async def _read(self, timeout_s: float, timer: asyncio.TimerHandle) -> pb.ForwardResponse:
        call = self._call
        if call is None:
            timer.cancel()
            raise StepFailed(grpc.StatusCode.CANCELLED, "the stream was dropped while a step was out")
        try:
            resp = await call.read()
        except asyncio.CancelledError as e:  # the timer fired: this step ran past its deadline
            raise StepFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no answer within the step deadline of {timeout_s:g} s") from e
        finally:
            timer.cancel()
        if resp is grpc.aio.EOF:
            raise await _ended(call)
        return resp

    def drop(self) -> None:
        """Forgets the stream and any step out on it (the next send opens a new stream)."""
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].cancel()  # that step's deadline timer
        self._pending = None
        self._drop()

    def _drop(self) -> None:
        """Forgets the stream (cancelling it, so the worker frees its thread)."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Ends the stream and the channel; the object can step again afterwards (new ones)."""
        self._drop()
        channel, loop = self._channel, self._loop
        self._channel = self._loop = None
        if loop is not None:
            if channel is not None:
                loop.run_until_complete(channel.close())
            _close_loop(loop)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class ChainFailed(StepFailed):
    """A relayed step failed at `stage` (None: no stage said; the chain ran past the deadline)."""

    def __init__(self, stage: int | None, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(code, details)
        self.stage = stage


class RelayUnsupported(Exception):
    """The stages cannot relay steps as a chain in the front end's order (a worker without Subscribe,
    or loaded without next_stage, or pointing at another next stage); nothing was sent."""


class RelayChain:
    """Relayed steps over a placement's stages (a chain; docs/runtime.md, "Hop pattern"): the front
    end writes each step to the first stage's ForwardStream; every stage passes its output on to the
    next; the last stage sends the results back on a Subscribe call. N + 1 one-way messages per step
    for N stages, where calling each stage in turn (StageStream) takes 2N.

    A Subscribe call is open on every stage: each stage reports there what it refused or could not
    pass on, and a stage whose process dies ends its call, so a failure anywhere surfaces at once,
    not at the deadline. Any failure drops every call; the next step opens them again. Several steps
    may be in flight at once (send, then receive), so that the stages compute different sessions'
    steps at the same time. Used by one thread at a time."""

    def __init__(self, addresses: list[str], placement_id: str, security: Security | None = None,
                 lifetime_s: float = STREAM_LIFETIME_S) -> None:
        if len(addresses) < 2:
            raise ValueError("a relay chain needs at least 2 stages")
        self.addresses, self.placement_id, self.security = list(addresses), placement_id, security
        self.lifetime_s = lifetime_s
        self.relay_id = uuid.uuid4().hex
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list[Any] = []  # every Subscribe call, then the first stage's ForwardStream
        self._head: Any = None
        self._events: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._opened = 0.0
        self._seq = 0
        self._pending: dict[int, tuple[float, float]] = {}  # relay_seq in flight -> (deadline, its timeout)

    def step(self, req: pb.ForwardRequest, timeout_s: float) -> pb.RelayEvent:
        """req (without relay fields) -> the last stage's event: result, stage_ms, relay_bytes.
        One step at a time; raises ChainFailed."""
        if self._pending:
            raise RuntimeError("step() with steps in flight: use send() and receive()")
        self.send(req, timeout_s)
        return self.receive()[1]

    def send(self, req: pb.ForwardRequest, timeout_s: float) -> int:
        """Writes a step (without relay fields) to the first stage and returns its relay_seq, without
        waiting for it: several steps may be in flight, each stage computing a different one (their
        sessions must differ). Raises ChainFailed, or RelayUnsupported when the chain was not open and
        cannot be (nothing sent)."""
        return self._run(self._send(req, timeout_s))

    def receive(self) -> tuple[int, pb.RelayEvent]:
        """Waits for the next step in flight to come back: (its relay_seq, the last stage's event).
        Raises ChainFailed when any step in flight fails or runs past its deadline; every other step
        in flight is lost with it (the calls are dropped)."""
        return self._run(self._receive())

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def expiring(self, timeout_s: float) -> bool:
        """The open calls would run out during a step of timeout_s: they are renewed at the next send
        with no step in flight, so a caller pipelining steps should let those in flight come back
        first."""
        return self._head is not None and time.monotonic() - self._opened > self.lifetime_s - timeout_s - 5.0

    def _run(self, coro):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            return self._loop.run_until_complete(coro)
        except (ChainFailed, RelayUnsupported):
            self._loop.run_until_complete(self._drop())
            raise
        except grpc.RpcError as e:
            self._loop.run_until_complete(self._drop())
            raise ChainFailed(0, e.code(), e.details() or "") from e

    async def _open(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._opened = time.monotonic()
        md = call_metadata(self.security)
        for k, address in enumerate(self.addresses):
            channel = open_aio_channel(address, self.security)
            self._channels.append(channel)
            call = pb_grpc.WorkerServiceStub(channel).Subscribe(
                pb.SubscribeRequest(placement_id=self.placement_id, relay_id=self.relay_id),
                timeout=self.lifetime_s, metadata=md)
            self._calls.append(call)
            try:
                ready = await asyncio.wait_for(call.read(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError as e:
                raise ChainFailed(k, grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to Subscribe within the step deadline") from e
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise RelayUnsupported(f"stage {k} at {address} has no Subscribe") from e
                raise ChainFailed(k, e.code(), e.details() or "") from e
            if ready is grpc.aio.EOF:
                failed = await _ended(call)
                if failed.code == grpc.StatusCode.UNIMPLEMENTED:
                    raise RelayUnsupported(f"stage {k} at {address} has no Subscribe")
                raise ChainFailed(k, failed.code, failed.details)
            want = self.addresses[k + 1] if k + 1 < len(self.addresses) else ""
            if not ready.can_relay or ready.next_stage != want:
                raise RelayUnsupported(f"stage {k} at {address} passes steps on to {ready.next_stage or 'no stage'!r}"
                                       f", not {want or 'the front end'!r}")
            self._tasks.append(asyncio.ensure_future(self._pump(k, call)))
        self._head = pb_grpc.WorkerServiceStub(self._channels[0]).ForwardStream(timeout=self.lifetime_s, metadata=md)
        self._calls.append(self._head)
        self._tasks.append(asyncio.ensure_future(self._pump(0, self._head)))

    async def _pump(self, stage: int, call) -> None:
        """Moves one call's events to the queue; its end (any end: these calls stay open while the
        front end serves) is a failure of that stage."""
        assert self._events is not None
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                await self._events.put((stage, event))
        except grpc.RpcError:
            pass  # the call's status says why, as at its end
        await self._events.put((stage, await _ended(call)))

    async def _send(self, req: pb.ForwardRequest, timeout_s: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not self._pending and self.expiring(timeout_s):
            await self._drop()  # would run out during this step (renewed only with no step in flight)
        if self._head is None:
            await self._open(deadline)
        self._seq += 1
        req.relay_id, req.relay_seq = self.relay_id, self._seq
        try:
            await self._head.write(req)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:  # the call ended between steps
            failed = await _ended(self._head)
            raise ChainFailed(0, failed.code, failed.details) from e
        self._pending[self._seq] = (deadline, timeout_s)
        return self._seq

    async def _receive(self) -> tuple[int, pb.RelayEvent]:
        if not self._pending:
            raise RuntimeError("no relayed step is in flight")
        assert self._events is not None
        loop = asyncio.get_running_loop()
        while True:
            deadline, timeout_s = min(self._pending.values())
            try:
                stage, event = await asyncio.wait_for(self._events.get(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError as e:
                raise ChainFailed(None, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no result from the {len(self.addresses)} relayed stages within the step deadline "
                                  f"of {timeout_s:g} s") from e
            if isinstance(event, StepFailed):
                raise ChainFailed(stage, event.code, event.details)
            if event.seq not in self._pending:  # seq 0 (ready), or an event of a step given up on earlier
                continue
            if event.error_code:
                raise ChainFailed(stage, _CODES.get(event.error_code, grpc.StatusCode.UNKNOWN), event.error)
            if stage != len(self.addresses) - 1 or not event.HasField("result"):
                raise ChainFailed(stage, grpc.StatusCode.UNKNOWN, "an event with neither a result nor an error")
            del self._pending[event.seq]
            return event.seq, event

    async def _drop(self) -> None:
        """Cancels every call and its reader; the next step opens them again."""
        calls, self._calls, self._head = self._calls, [], None
        tasks, self._tasks = self._tasks, []
        self._pending.clear()  # those steps are lost: their results can no longer arrive
        channels, self._channels = self._channels, []
        for call in calls:
            call.cancel()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.run_until_complete(self._drop())
        _close_loop(loop)
