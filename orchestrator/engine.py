"""The front end's decode loop: batches the steps of concurrent sessions and drives the stages.

It composes: a Transport (transports.py: the chain, one stage, or the star) that carries each step,
each session's feed and replay state (sessions.py), and the controller's `recover` callback.

Hop pattern (docs/runtime.md): with 2+ stages the steps are relayed. The engine writes each step
to the first stage, every stage passes it on to the next, and the last stage answers the front end
(RelayChain): N + 1 one-way messages per step instead of the 2N of calling each stage in turn
(EngineOptions.relay=False, the star). The engine keeps every session's token chunks either way,
which is all a replay after a node failure needs.

The loop batches sessions' next inputs (a prompt chunk of at most prefill_chunk tokens, or the
last generated token) into one ForwardRequest per group of sessions, and hands each session its next
token when the step comes back. Relayed steps are pipelined: the active sessions go in groups, with
up to pipeline_depth steps in flight at once, so the stages compute different groups' steps at the
same time (docs/runtime.md, "Pipelined steps"); otherwise one step carries every active session.
Sessions beyond the placement's batch wait, so the workers' KV budgets (sized for context x batch)
always hold the admitted sessions.

Failures (docs/reliability.md): when a stage fails a step in a way a new placement can mend (the
peer is gone, too slow for the deadline, lost its shard or the session), the engine asks its
`recover` callback (the controller) for a new placement, switches to it between steps and replays
every admitted session's inputs so far, chunk by chunk exactly as they were first fed, to rebuild
the KV caches; then the sessions continue. Each chunk is computed exactly as before, so greedy and
seeded output is identical to an uninterrupted run. When no placement is possible the callback
raises Unavailable; admitted and new requests then fail fast until a later re-plan succeeds.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from protos import edgeweave_v1_pb2 as pb
from protos import edgeweave_v1_pb2_grpc as pb_grpc
from protos.security import Security, open_channel
from workers.wire import encode_ids

from .planner import Placement
from .sessions import GenerationRequest, Piece, Session
from .streams import RelayChain, RelayUnsupported, StageStream
from .transports import (RECOVERABLE, ChainTransport, EngineStats, Flight, SingleTransport, StageError, StarTransport,
                         StepFigures, Transport)

__all__ = ["auto_pipeline_depth", "EngineOptions", "GenerationRequest", "Piece", "Engine", "StageError", "EngineStats", "Unavailable",
           "Recover", "RECOVERABLE"]

log = logging.getLogger("edgeweave.engine")


class Unavailable(RuntimeError):
    """The model cannot be served now (nodes missing); the message says what is missing."""


# recover(the failure, or None for a requested re-plan) -> (new placement, its stage addresses).
Recover = Callable[[StageError | None], tuple[Placement, list[str]]]


@dataclass(frozen=True)
class EngineOptions:
    step_timeout_s: float = 30.0  # deadline of one stage's forward step
    prefill_chunk: int = 256  # prompt tokens per step and session
    quantize_wire: bool = False  # hidden states as per-token int8 between stages (not bit-exact)
    max_recoveries: int = 3  # re-plans in a row without a successful step before the requests fail
    replan_defer_s: float = 30.0  # a requested (not failure) re-plan waits this long for an idle moment
    stream_steps: bool = True  # steps over one ForwardStream per stage (False: a unary Forward per step)
    # with stream_steps and 2+ stages: each stage passes its output on to the next and the last one
    # answers the front end (a chain: N + 1 messages per step instead of 2N; docs/runtime.md)
    relay: bool = True
    # relayed steps in flight at once, each for a different group of sessions, so that the stages
    # compute different groups' steps at the same time (a pipeline); 0: auto_pipeline_depth (one per
    # stage, but no more than this machine's cores for the stages on it); 1: one step for every
    # session at a time. Only relayed steps overlap: the star and one stage step one at a time.
    pipeline_depth: int = 0

    def __post_init__(self) -> None:
        if self.pipeline_depth < 0:
            raise ValueError(f"pipeline_depth must be 0 (one per stage) or more, got {self.pipeline_depth}")


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def auto_pipeline_depth(addresses: list[str], local_cores: int) -> int:
    """Relayed steps worth having in flight: one per stage, except that the stages on this machine
    (loopback addresses: a local cluster) share its `local_cores` cores, so no more steps than that
    compute there at once. 3 local stages on 2 cores: 2 (measured best, docs/runtime.md)."""
    hosts = Counter(a.rsplit(":", 1)[0] for a in addresses)
    return max(1, sum(min(n, local_cores) if h in LOCAL_HOSTS else n for h, n in hosts.items()))


class Engine:
    def __init__(self, placement: Placement, addresses: list[str], eos_ids: set[int],
                 opts: EngineOptions = EngineOptions(), recover: Recover | None = None,
                 security: Security | None = None) -> None:
        self.eos, self.opts, self.recover, self.security = eos_ids, opts, recover, security or Security()
        self.stats = EngineStats()
        self.placement, self.addresses = placement, list(addresses)
        self.channels: list[grpc.Channel] = []
        self.stubs: list[pb_grpc.WorkerServiceStub] = []  # unary calls (Release) to each stage
        self.transport: Transport = Transport()  # how steps reach the stages (transports.py)
        self._switch(placement, addresses)
        self.waiting: deque[Session] = deque()
        self.active: list[Session] = []
        self.cv = threading.Condition()
        self.unavailable = ""  # why the model cannot be served now ("" when it can)
        self._replan = False
        self._replan_at = 0.0
        self._recovering = False  # recover() is running on the engine thread
        self._failures = 0  # recoveries since the last successful step
        self._recovery_t0: float | None = None  # when the failure being recovered from was seen
        self._stop = False
        self._ids = itertools.count()
        self._flights: dict[int, Flight] = {}  # key (relay_seq; negative: numbered here) -> step
        self._sync_keys = itertools.count(-1, -1)
        self._outbox: list[tuple[Session, Piece]] = []  # pieces of the last step, handed out after the next is sent
        self.thread = threading.Thread(target=self._loop, name="edgeweave-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, req: GenerationRequest) -> Iterator[Piece]:
        """Yields Pieces for one request until a finish Piece. Closing the iterator cancels it."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if req.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        total = len(req.prompt_ids) + req.max_tokens
        if total > self.placement.context:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total} "
                             f"is over the served context of {self.placement.context}")
        s = Session(f"s{next(self._ids)}-{uuid.uuid4().hex[:8]}", req, queue.Queue(), list(req.prompt_ids))
        with self.cv:
            if self._stop:
                raise Unavailable("the engine is shut down")
            if self.unavailable:
                raise Unavailable(self.unavailable)
            self.waiting.append(s)
            self.cv.notify()
        return self._drain(s)

    def _drain(self, s: Session) -> Iterator[Piece]:
        try:
            while True:
                p = s.out.get()
                yield p
                if p.finish:
                    return
        finally:
            s.cancelled = True  # no-op when finished; stops a session whose client went away

    def active_sessions(self) -> int:
        with self.cv:
            return len(self.active) + len(self.waiting)

    def request_replan(self) -> None:
        """Asks for a re-plan between steps (a node came back); the engine calls recover(None) when
        no session is running (a re-plan replays every running session), or after replan_defer_s,
        or at once while the model cannot be served."""
        with self.cv:
            if not self._replan:
                self._replan, self._replan_at = True, time.monotonic()
            self.cv.notify()

    @property
    def replanning(self) -> bool:
        """A re-plan is asked for and not done yet, or a recovery is loading a new placement."""
        with self.cv:
            return self._replan or self._recovering

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        self.thread.join(timeout=10)
        self.transport.close()
        for c in self.channels:
            c.close()

    def _switch(self, placement: Placement, addresses: list[str]) -> None:
        if len(addresses) != len(placement.stages):
            raise ValueError(f"{len(placement.stages)} stages but {len(addresses)} addresses")
        self.transport.close()
        for c in self.channels:
            c.close()
        self.placement, self.addresses = placement, list(addresses)
        self.channels = [open_channel(a, self.security) for a in addresses]
        self.stubs = [pb_grpc.WorkerServiceStub(c) for c in self.channels]
        self.stats.hop_overhead_ms = [[] for _ in addresses]  # per stage of this placement
        self.stats.compute_ms = [[] for _ in addresses]
        self.transport = self._transport()

    def _transport(self, relay: bool | None = None) -> Transport:
        """The way this placement's steps go: relayed down the chain (2+ stages, streams, relay on),
        one stage's stream, or the star. Worked out once per placement, not per step."""
        o, figures = self.opts, StepFigures(self.stats, self.addresses)
        if relay is None:
            relay = o.relay and o.stream_steps and len(self.addresses) > 1
        self.stats.relayed = relay
        if relay:
            depth = o.pipeline_depth or auto_pipeline_depth(self.addresses, os.cpu_count() or 1)
            return ChainTransport(RelayChain(self.addresses, self.placement.placement_id, self.security), figures,
                                  o.step_timeout_s, depth)
        streams = [StageStream(stub, a, self.security, o.stream_steps) for stub, a in zip(self.stubs, self.addresses)]
        if len(streams) == 1:
            return SingleTransport(streams[0], figures, o.step_timeout_s)
        return StarTransport(streams, figures, o.step_timeout_s, self._request)

    # ------------------------------------------------------------------ loop
    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.placement.batch:
            self.active.append(self.waiting.popleft())

    def _groups(self) -> list[list[Session]]:
        """The admitted sessions not in a step, split into the groups to send now: as many as the
        free pipeline slots allow, each of at most ceil(admitted / depth) sessions. Called under cv."""
        idle = [s for s in self.active if not s.flying]
        if self._flights and self.transport.expiring(self.opts.step_timeout_s):
            return []  # the chain's calls are renewed once the steps in flight are back
        depth = self.transport.depth  # steps that may be in flight at once: only relayed steps overlap
        free = depth - len(self._flights)
        if not idle or free <= 0:
            return []
        size = -(-len(self.active) // depth)
        groups = [idle[i:i + size] for i in range(0, len(idle), size)][:free]
        for g in groups:
            for s in g:
                s.flying = True
        return groups

    def _loop(self) -> None:
        while True:
            with self.cv:
                while (not self._stop and not self.waiting and not self.active and not self._replan
                       and not self._flights):
                    self.cv.wait()
                if self._stop:
                    self._flush()
                    for s in [*self.active, *self.waiting]:
                        s.out.put(Piece(finish="error", error="the server is shutting down"))
                    return
                replan = self._replan and (not self.active or bool(self.unavailable)
                                           or time.monotonic() - self._replan_at > self.opts.replan_defer_s)
                if replan and not self._flights:  # a re-plan waits for the steps in flight
                    self._replan, self._recovering = False, True
                gone = [s for s in self.active if s.cancelled and not s.flying]
                self.active = [s for s in self.active if s not in gone]
                if not self.unavailable:
                    self._admit()
                groups = [] if replan else self._groups()
            if gone:
                self._release(gone)
            if replan and not self._flights:
                self._flush()
                self._recover(None)
                continue
            if not groups and not self._flights:
                self._flush()
                continue
            try:
                if self._answered_later():
                    # the next steps go out first: handing out tokens wakes the threads streaming them
                    # to clients, which would hold the GIL while the steps are being built and written
                    for g in groups:
                        self._send(g)
                    self._flush()
                else:
                    self._flush()
                    for g in groups:
                        self._send(g)
                self._receive()
                self._failures = 0
            except StageError as e:
                self._flush()
                batch = self._abort_flights()
                if self.recover is not None and e.recoverable and self._failures < self.opts.max_recoveries:
                    log.warning("step failed, re-planning: %s", e)
                    self._failures += 1
                    self._recover(e)
                else:
                    log.warning("step failed: %s", e)
                    self._failures = 0
                    self._fail(batch, str(e))
            except Exception as e:  # a bug: fail these requests, keep serving the rest
                log.exception("step failed")
                self._flush()
                self._fail(self._abort_flights(), str(e))

    def _answered_later(self) -> bool:
        """Steps are written now and answered later (relayed, or a single stage's stream), so the
        last step's tokens can be handed out after the next step is sent; otherwise a step runs to
        its end in _send, and the tokens go out before it."""
        return self.transport.answered_later

    def _emit(self, s: Session, piece: Piece) -> None:
        self._outbox.append((s, piece))

    def _flush(self) -> None:
        """Hands out the pieces of the steps received so far, in order."""
        out, self._outbox = self._outbox, []
        for s, piece in out:
            s.out.put(piece)

    def _abort_flights(self) -> list[Session]:
        """Forgets every step in flight (a failure drops the chain's calls, so none of them can come
        back) -> their sessions, which hold what they held before those steps."""
        batch = [s for f in self._flights.values() for s in f.batch]
        self._flights.clear()
        self.transport.drop()  # a bug between send and receive: drop the calls the steps are on
        for s in batch:
            s.flying = False
        return batch

    def _fail(self, batch: list[Session], error: str) -> None:
        for s in batch:
            s.out.put(Piece(finish="error", error=error))
        with self.cv:
            self.active = [s for s in self.active if s not in batch]
        self._release(batch)

    def _recover(self, err: StageError | None) -> None:
        """Asks for a new placement; on success switches to it and queues every admitted session's
        replay. On Unavailable, fails the admitted and waiting requests fast."""
        assert self.recover is not None
        t0 = time.perf_counter()
        with self.cv:
            self._recovering = True
        try:
            self._recover_now(err, t0)
        finally:
            with self.cv:
                self._recovering = False

    def _recover_now(self, err: StageError | None, t0: float) -> None:
        assert self.recover is not None
        try:
            placement, addresses = self.recover(err)
        except Exception as e:  # Unavailable, or the controller itself failing: nothing can run now
            msg = str(e) if isinstance(e, Unavailable) else f"re-planning failed: {e}"
            log.warning("cannot serve: %s", msg)
            with self.cv:
                self.unavailable = msg
                failed, self.active = [*self.active, *self.waiting], []
                self.waiting.clear()
            self._failures = 0  # those requests are over; the next ones start afresh
            for s in failed:
                s.out.put(Piece(finish="error", error=msg))
            return
        old = self.placement.placement_id
        self._switch(placement, addresses)
        with self.cv:
            self.unavailable = ""
            sessions = list(self.active)
        for s in sessions:  # the new stages hold nothing: re-feed what the old ones held
            s.start_replay()
        self.stats.recoveries += 1
        log.info("switched from placement %s to %s (%s); replaying %d session(s)", old, placement.placement_id,
                 "after a failure" if err else "requested", len(sessions))
        self._recovery_t0 = (self._recovery_t0 or t0) if sessions else None

    def _items(self, batch: list[Session]) -> tuple[dict[str, list[int]], list[pb.StepItem]]:
        fed, items = {}, []
        for s in batch:
            chunk = s.next_chunk(self.opts.prefill_chunk)
            fed[s.sid] = chunk
            items.append(pb.StepItem(
                session_id=s.sid, position=s.pos, max_tokens=s.max_tokens,
                token_ids=encode_ids(chunk), step=s.generated,
                sampling=pb.SamplingParams(temperature=s.req.temperature, top_p=s.req.top_p, seed=s.req.seed)))
        return fed, items

    def _send(self, batch: list[Session]) -> None:
        """Sends one group's step: relayed, it is in flight until _receive; otherwise it runs now."""
        fed, items = self._items(batch)
        flight = Flight(batch, fed, all(len(c) == 1 for c in fed.values()), time.perf_counter(),
                        alone=not self._flights)
        if self._flights:
            for f in self._flights.values():
                f.alone = False
            self.stats.overlapped_steps += 1
        req = self._request(items)
        if flight.decode and self._answered_later():  # the star counts per stage, in its own send
            flight.req_bytes = req.ByteSize()  # for the wire-bytes figure, which decode steps feed
        key = next(self._sync_keys)
        try:
            try:
                key = self.transport.send(req, flight, key)
            except RelayUnsupported as e:  # nothing was sent: this step, and the placement's next, go the star's way
                log.warning("the stages cannot relay steps (%s); calling each stage in turn", e)
                self.transport.close()
                self.transport = self._transport(relay=False)
                key = self.transport.send(req, flight, key)
        except StageError:
            self._flights[key] = flight  # lost with the others
            raise
        self._flights[key] = flight

    def _request(self, items: list[pb.StepItem]) -> pb.ForwardRequest:
        return pb.ForwardRequest(placement_id=self.placement.placement_id, items=items,
                                 quantize_output=self.opts.quantize_wire)

    def _receive(self) -> None:
        """Takes the next step to come back and hands its sessions their tokens."""
        key, results = self.transport.receive(self._flights)
        flight = self._flights[key]
        self._finish(flight, results)
        del self._flights[key]
        for s in flight.batch:
            s.flying = False

    def _finish(self, flight: Flight, results: list[pb.StepResult]) -> None:
        fed, batch = flight.fed, flight.batch
        finished = []
        for s, r in zip(batch, results):
            done = s.advance(fed[s.sid], int(r.token), self.eos)
            self.stats.replayed_tokens += done.replayed
            if done.token is not None:
                self._emit(s, Piece(token=done.token))
                self.stats.tokens += 1
            if done.finish:
                self._emit(s, Piece(finish=done.finish))
                finished.append(s)
        self.stats.steps += 1
        if self._recovery_t0 is not None and not any(s.replay for s in self.active):
            self.stats.recovery_s.append(time.perf_counter() - self._recovery_t0)
            self._recovery_t0 = None
        if finished:
            self._flush()  # their last pieces go out now, not after the Release calls
            with self.cv:
                self.active = [s for s in self.active if s not in finished]
            self._release(finished)

    def _release(self, sessions: list[Session]) -> None:
        ids = [s.sid for s in sessions]
        for k, stub in enumerate(self.stubs):
            try:
                stub.Release(pb.ReleaseRequest(session_ids=ids), timeout=5.0)
            except grpc.RpcError as e:  # a dead stage holds no cache worth freeing
                log.warning("release on stage %d failed: %s", k, e.code())
