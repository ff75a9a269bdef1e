"""How the front end's steps reach the stages: one interface, three ways (docs/runtime.md).

  ChainTransport   relayed (2+ stages, streams): written to the first stage, each stage passes it
                   on, the last answers; up to `depth` steps in flight, answered later.
  SingleTransport  one stage over its stream: written now, answered later (one in flight).
  StarTransport    the front end calls each stage in turn (--star, --unary-steps): a step runs
                   to its end in send(); receive() hands back its results.

The engine only calls send(req, flight, key) -> key and receive(flights) -> (key, results), and
asks `answered_later`, `depth` and `expiring()`; what a stage answered is checked and its figures
recorded in one place (StepFigures), whichever way the step went.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from protos import edgeweave_v1_pb2 as pb
from workers.wire import next_stage_items

from .sessions import Session
from .streams import ChainFailed, RelayChain, StageStream, StepFailed

__all__ = ["StageError", "RECOVERABLE", "EngineStats", "Flight", "StepFigures", "Transport", "ChainTransport",
           "SingleTransport", "StarTransport"]


class StageError(RuntimeError):
    """A stage failed a step (dead node, deadline, refused input); the message names the stage."""

    def __init__(self, stage: int, address: str, code: grpc.StatusCode | None, details: str) -> None:
        where = f"stage {stage} at {address}" if stage >= 0 else "the relayed stages"  # -1: no stage said which
        super().__init__(f"{where}: {code.name if code else 'error'}: {details}")
        self.stage, self.address, self.code, self.details = stage, address, code, details

    @property
    def recoverable(self) -> bool:
        """A new placement (other nodes, reloaded shards, replayed caches) can mend this failure."""
        return self.code in RECOVERABLE


# Gone or stuck peer; a restarted worker without the shard, or without the session's cache.
RECOVERABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNKNOWN})


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    wire_bytes: int = 0
    # per stage, per decode step: the round trip ms minus the worker's compute ms (star: two one-way
    # messages); relayed: the step's ms minus every stage's compute ms, over the N + 1 one-way hops
    hop_overhead_ms: list[list[float]] = field(default_factory=list)
    relayed: bool = False  # the placement's steps are relayed (a chain)
    compute_ms: list[list[float]] = field(default_factory=list)
    overlapped_steps: int = 0  # steps sent while another was in flight (no hop figures of their own)
    recoveries: int = 0
    recovery_s: list[float] = field(default_factory=list)  # failure seen -> sessions caught up again
    replayed_tokens: int = 0


@dataclass
class Flight:
    """A step sent and not yet come back."""

    batch: list[Session]  # the sessions in this step, in item order
    fed: dict[str, list[int]]  # session id -> the chunk this step feeds it
    decode: bool  # every chunk is one token
    t0: float  # perf_counter when sent
    req_bytes: int = 0
    alone: bool = True  # no other step was in flight meanwhile, so its time is its own


class StepFigures:
    """Checks what the stages answered and records its figures (hop overhead, compute, wire bytes)."""

    def __init__(self, stats: EngineStats, addresses: list[str]) -> None:
        self.stats, self.addresses = stats, addresses

    def stage_answer(self, k: int, resp: pb.ForwardResponse, items: int, decode: bool, rtt_ms: float,
                     req_bytes: int) -> list[pb.StepResult]:
        """Stage k's answer to a step of `items` items."""
        if len(resp.results) != items:
            raise StageError(k, self.addresses[k], None, f"{len(resp.results)} results for {items} items")
        if decode:
            self.stats.hop_overhead_ms[k].append(rtt_ms - resp.compute_ms)
            self.stats.compute_ms[k].append(resp.compute_ms)
            self.stats.wire_bytes += req_bytes + resp.ByteSize()
        return list(resp.results)

    def relayed(self, flight: Flight, event: pb.RelayEvent) -> list[pb.StepResult]:
        """A relayed step's results (its hop overhead only when no other step was in flight meanwhile:
        queueing behind another step is no hop's cost)."""
        n = len(self.addresses)
        rtt = (time.perf_counter() - flight.t0) * 1e3
        results = list(event.result.results)
        if len(results) != len(flight.batch) or len(event.stage_ms) != n:
            raise StageError(n - 1, self.addresses[-1], None, f"{len(results)} results for {len(flight.batch)} "
                             f"items, compute of {len(event.stage_ms)} stages")
        if flight.decode:
            hop = (rtt - sum(event.stage_ms)) / (n + 1)
            for k in range(n):
                if flight.alone:
                    self.stats.hop_overhead_ms[k].append(hop)
                self.stats.compute_ms[k].append(event.stage_ms[k])
            self.stats.wire_bytes += flight.req_bytes + event.relay_bytes + event.ByteSize()
        return results


class Transport:
    """send() a step, receive() the next one to come back. Failures raise StageError."""

    answered_later = False  # written now, answered in receive(): the last tokens may go out after the next send
    depth = 1  # steps in flight at once

    def send(self, req: pb.ForwardRequest, flight: Flight, key: int) -> int:
        """Sends one step -> its key (`key`, unless the transport numbers its steps itself)."""
        raise NotImplementedError

    def receive(self, flights: Mapping[int, Flight]) -> tuple[int, list[pb.StepResult]]:
        raise NotImplementedError

    def expiring(self, timeout_s: float) -> bool:
        """The transport's calls must be renewed before more steps go out."""
        return False

    def drop(self) -> None:
        """Forgets every step in flight (after a failure none of them can come back)."""

    def close(self) -> None:
        pass


class ChainTransport(Transport):
    answered_later = True

    def __init__(self, chain: RelayChain, figures: StepFigures, step_timeout_s: float, depth: int) -> None:
        self.chain, self.figures, self.timeout_s, self.depth = chain, figures, step_timeout_s, depth

    def _error(self, e: ChainFailed) -> StageError:
        k = -1 if e.stage is None else e.stage
        return StageError(k, self.figures.addresses[k] if k >= 0 else "", e.code, e.details)

    def send(self, req: pb.ForwardRequest, flight: Flight, key: int) -> int:
        """RelayUnsupported (nothing was sent) passes through: the caller steps another way."""
        try:
            return self.chain.send(req, self.timeout_s)
        except ChainFailed as e:
            raise self._error(e) from e

    def receive(self, flights: Mapping[int, Flight]) -> tuple[int, list[pb.StepResult]]:
        try:
            key, event = self.chain.receive()
        except ChainFailed as e:
            raise self._error(e) from e
        return key, self.figures.relayed(flights[key], event)  # a bad answer raises with the step still in flight

    def expiring(self, timeout_s: float) -> bool:
        return self.chain.expiring(timeout_s)

    def drop(self) -> None:
        if self.chain.in_flight:
            self.chain.close()  # drop the calls the steps are on; the next send opens new ones

    def close(self) -> None:
        self.chain.close()


class SingleTransport(Transport):
    answered_later = True

    def __init__(self, stream: StageStream, figures: StepFigures, step_timeout_s: float) -> None:
        self.stream, self.figures, self.timeout_s = stream, figures, step_timeout_s
        self.pending: int | None = None  # the key of the step written and not yet answered

    def send(self, req: pb.ForwardRequest, flight: Flight, key: int) -> int:
        try:
            self.stream.send(req, self.timeout_s)
        except StepFailed as e:
            raise StageError(0, self.figures.addresses[0], e.code, e.details) from e
        self.pending = key
        return key

    def receive(self, flights: Mapping[int, Flight]) -> tuple[int, list[pb.StepResult]]:
        assert self.pending is not None
        key, self.pending = self.pending, None
        flight = flights[key]
        try:
            resp = self.stream.receive()
        except StepFailed as e:
            raise StageError(0, self.figures.addresses[0], e.code, e.details) from e
        rtt = (time.perf_counter() - flight.t0) * 1e3
        return key, self.figures.stage_answer(0, resp, len(flight.batch), flight.decode, rtt, flight.req_bytes)

    def drop(self) -> None:
        if self.pending is not None:
            self.stream.drop()
            self.pending = None

    def close(self) -> None:
        self.stream.close()


class StarTransport(Transport):
    def __init__(self, streams: list[StageStream], figures: StepFigures, step_timeout_s: float,
                 request: Callable[[list[pb.StepItem]], pb.ForwardRequest]) -> None:
        self.streams, self.figures, self.timeout_s, self.request = streams, figures, step_timeout_s, request
        self.done: deque[tuple[int, list[pb.StepResult]]] = deque()

    def send(self, req: pb.ForwardRequest, flight: Flight, key: int) -> int:
        """One step through every stage in turn: req is the first stage's request."""
        results: list[pb.StepResult] = []
        for k, stream in enumerate(self.streams):
            if k:  # hidden states (and, for MoE, the tokens' last experts) of the previous stage
                req = self.request(next_stage_items(req.items, results))
            t0 = time.perf_counter()
            try:
                resp = stream.step(req, self.timeout_s)
            except StepFailed as e:
                raise StageError(k, self.figures.addresses[k], e.code, e.details) from e
            rtt = (time.perf_counter() - t0) * 1e3
            results = self.figures.stage_answer(k, resp, len(req.items), flight.decode, rtt,
                                                req.ByteSize() if flight.decode else 0)
        self.done.append((key, results))
        return key

    def receive(self, flights: Mapping[int, Flight]) -> tuple[int, list[pb.StepResult]]:
        return self.done.popleft()

    def drop(self) -> None:
        self.done.clear()

    def close(self) -> None:
        for st in self.streams:
            st.close()
