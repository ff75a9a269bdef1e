"""Tokens -> text pieces for streaming, with stop strings (pure: a tokenizer in, strings out).

A piece is emitted only when it is final: never half a UTF-8 character (a decode ending in U+FFFD
waits for the next token) and never text that could still turn out to be the start of a stop
string. The stop string itself is not emitted.
"""

from __future__ import annotations

__all__ = ["TextStreamer"]


class TextStreamer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Adds a token; returns the new final text (maybe ""). Sets .stopped on a stop string."""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, max(self.sent - len(s) + 1, 0)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text, cut)
        if text.endswith("\ufffd"):
            return ""
        hold = 0  # keep back a suffix that is a prefix of some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._emit(text, len(text) - hold)

    def finish(self) -> str:
        """At the end of generation: whatever was held back (no stop string completed)."""
        if self.stopped:
            return ""
        text = self._text()
        return self._emit(text, len(text.rstrip("\ufffd")))

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent:upto], upto
        return piece
