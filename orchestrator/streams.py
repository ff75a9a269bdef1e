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
from typing import Any

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, call_metadata, open_aio_channel

__all__ = ["StepFailed", "StageStream"]

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

    def step(self, req: pb.ForwardRequest, timeout_s: float) -> pb.ForwardResponse:
        """-> the stage's response; raises StepFailed."""
        if self.use_stream:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            try:
                return self._loop.run_until_complete(self._step(req, timeout_s))
            except (grpc.RpcError, StepFailed) as e:
                self._drop()
                failed = e if isinstance(e, StepFailed) else StepFailed(e.code(), e.details() or "")
                # UNIMPLEMENTED: an older worker (its status may end the call at the write or at the
                # read); unary from now on
                if failed.code != grpc.StatusCode.UNIMPLEMENTED:
                    if failed is e:
                        raise
                    raise failed from e
                self.use_stream = False
        try:
            return self.stub.Forward(req, timeout=timeout_s)
        except grpc.RpcError as e:
            raise StepFailed(e.code(), e.details() or "") from e

    async def _step(self, req: pb.ForwardRequest, timeout_s: float) -> pb.ForwardResponse:
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
            try:
                await call.write(req)
            except (grpc.RpcError, asyncio.InvalidStateError) as e:  # the call ended between steps
                raise await _ended(call) from e
            resp = await call.read()
        except asyncio.CancelledError as e:  # the timer fired: this step ran past its deadline
            raise StepFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no answer within the step deadline of {timeout_s:g} s") from e
        finally:
            timer.cancel()
        if resp is grpc.aio.EOF:
            raise await _ended(call)
        return resp

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
            pending = asyncio.all_tasks(loop)  # gRPC's status watchers of the cancelled calls
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
