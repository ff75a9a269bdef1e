"""A session's feed and replay state in the front end (pure: no I/O, no threads).

A session feeds its prompt in chunks of at most `prefill_chunk` tokens, then one generated token per
step. Every chunk fed is kept, in order: after a re-plan the new stages hold nothing, and the session
re-feeds exactly those chunks (a replay) before it goes on, so each chunk is computed as it was first
and greedy or seeded output is identical to an uninterrupted run.
"""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass, field

__all__ = ["GenerationRequest", "Piece", "Session", "Advance"]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Piece:
    """What the engine hands a session: a token, or the end (reason) or an error."""

    token: int | None = None
    finish: str = ""  # "length", "eos", "cancelled", "error"
    error: str = ""


@dataclass(frozen=True)
class Advance:
    """What one step did for a session."""

    replayed: int = 0  # tokens re-fed to rebuild a cache (nothing to hand out)
    token: int | None = None  # a new output token
    finish: str = ""  # "eos" or "length": the session is done


@dataclass
class Session:
    sid: str
    req: GenerationRequest
    out: "queue.Queue[Piece]"
    pending: list[int]  # inputs not yet fed
    pos: int = 0  # tokens the stages hold
    generated: int = 0
    cancelled: bool = False
    flying: bool = False  # in a step that has not come back yet
    fed: list[list[int]] = field(default_factory=list)  # every chunk fed so far, in order (for a replay)
    replay: deque[list[int]] = field(default_factory=deque)  # chunks still to re-feed after a re-plan

    @property
    def max_tokens(self) -> int:
        """Positions the session may take on the stages (prompt + generated)."""
        return len(self.req.prompt_ids) + self.req.max_tokens

    def next_chunk(self, prefill_chunk: int) -> list[int]:
        """The inputs of the session's next step: the next chunk to replay, else what is pending."""
        return self.replay[0] if self.replay else self.pending[:prefill_chunk]

    def advance(self, chunk: list[int], token: int, eos: set[int] | frozenset[int]) -> Advance:
        """The step that fed `chunk` came back with `token` (the next token after it)."""
        self.pos += len(chunk)
        if self.replay:  # rebuilding the cache after a re-plan: this token was already handed out
            self.replay.popleft()
            return Advance(replayed=len(chunk))
        self.fed.append(chunk)
        del self.pending[: len(chunk)]
        if self.pending:  # more of the prompt to feed; this step's token is not an output
            return Advance()
        self.generated += 1
        reason = "eos" if token in eos else "length" if self.generated >= self.req.max_tokens else ""
        if not reason:
            self.pending = [token]
        return Advance(token=token, finish=reason)

    def start_replay(self) -> None:
        """The stages were replaced: feed every chunk again from position 0."""
        self.replay = deque(self.fed)
        self.pos = 0
