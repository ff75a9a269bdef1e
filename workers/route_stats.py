"""Activation-path statistics in Redis: the key schema, the workers' batched writer, the reader.

Key schema, version 1 (docs/moe.md). {model} is the checkpoint's name, {w} a time window number
(unix time // window_s), {l} a layer:
  edgeweave:v1:{model}:meta            HASH  layers, experts, window_s, schema
  edgeweave:v1:{model}:windows         ZSET  window numbers that hold counts (score = window)
  edgeweave:v1:{model}:tokens:{w}      STRING tokens counted in window w (by the holder of layer 0)
  edgeweave:v1:{model}:act:{l}:{w}     HASH  expert -> tokens that took it at layer l
  edgeweave:v1:{model}:l1:{l}:{w}      HASH  "e,f" -> tokens with e at layer l-1 and f at layer l
  edgeweave:v1:{model}:l2:{l}:{w}      HASH  "e,f" -> tokens with e at layer l-2 and f at layer l
  edgeweave:v1:{model}:t1:{l}:{w}      HASH  "e,f" -> previous token e, this token f, at layer l
  edgeweave:v1:{model}:batch:{id}      STRING "1": a writer's batch {id} was applied (not a count)
Window keys expire after keep_windows windows; a reader weighs window w by decay ** (now - w),
which gives counts that are both time-windowed and decayed without read-modify-write.

Writers (workers) add counts to a local buffer on the token's path and a background thread
flushes it as one batch of HINCRBY/INCRBY every flush_interval_s, in a script that applies each
batch id once: a batch whose reply was lost (Redis applied it, then the connection dropped) is sent
again with the same id and not counted twice (the ids applied are kept as
`{schema}:{model}:batch:{id}` keys, which expire with the counts). If Redis is unreachable the counts stay buffered
(bounded: max_buffered_fields) and go out when it returns; what the bound drops is counted in
`lost`, never silently.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .residency import PathStats, transition_sources

__all__ = ["SCHEMA", "key", "model_key", "route_deltas", "StatsRecorder", "RecorderCounters", "read_stats",
           "connect"]

log = logging.getLogger("edgeweave.stats")

SCHEMA = "edgeweave:v1"


def model_key(name: str) -> str:
    """A model name safe inside a key (no colons, spaces or braces)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "model"


def key(model: str, *parts: object) -> str:
    return ":".join([SCHEMA, model_key(model), *map(str, parts)])


Deltas = dict[tuple[str, str | None], int]  # (key, hash field or None for a plain counter) -> count


def route_deltas(model: str, window: int, route: Sequence[tuple[int, ...] | None],
                 prev_token: Sequence[tuple[int, ...] | None] | None, layers: Sequence[int]) -> Deltas:
    """The counts one token adds at `layers` (pure). route[l]: its experts at layer l (None: not known
    here). The token itself is counted by the writer of layer 0 only."""
    d: Deltas = {(key(model, "tokens", window), None): 1} if 0 in layers else {}
    for l in layers:
        now = route[l]
        if now is None:
            continue
        for f in now:
            k = (key(model, "act", l, window), str(f))
            d[k] = d.get(k, 0) + 1
        for kind, src in transition_sources(route, prev_token, l):
            for e in src:
                for f in now:
                    k = (key(model, kind, l, window), f"{e},{f}")
                    d[k] = d.get(k, 0) + 1
    return d


def connect(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True)


@dataclass(frozen=True)
class RecorderCounters:
    recorded: int  # counts added by record()
    flushed: int  # counts Redis acknowledged
    buffered: int  # counts waiting in the buffer
    lost: int  # counts dropped because the buffer was full
    flush_errors: int
    redis_up: bool


class StatsRecorder:
    """Buffers counts and flushes them to Redis in batches, off the caller's path."""

    def __init__(self, url: str, model: str, layers: int, experts: int, window_s: float = 60.0,
                 keep_windows: int = 60, flush_interval_s: float = 0.5, max_buffered_fields: int = 1_000_000) -> None:
        self.url, self.model, self.layers, self.experts = url, model, layers, experts
        self.window_s, self.keep_windows, self.flush_interval_s = window_s, keep_windows, flush_interval_s
        self.max_buffered_fields = max_buffered_fields
        self._buf: Deltas = {}
        self._windows: set[int] = set()
        # the batch being sent, kept whole with its id until Redis has it: a retry after a lost reply
        # sends the same id, and the script applies a batch id once (exactly once, not at least once)
        self._inflight: tuple[str, Deltas, set[int]] | None = None
        self._lock = threading.Lock()
        self._recorded = self._flushed = self._lost = self._errors = 0
        self._up = False
        self._client = connect(url)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeweave-stats-flush", daemon=True)
        self._thread.start()

    def window(self, t: float | None = None) -> int:
        return int((time.time() if t is None else t) // self.window_s)

    def record(self, route: Sequence[tuple[int, ...] | None], prev_token: Sequence[tuple[int, ...] | None] | None,
               layers: Sequence[int]) -> None:
        """One token's experts at `layers` (cheap: a few dict updates)."""
        w = self.window()
        d = route_deltas(self.model, w, route, prev_token, layers)
        n = sum(d.values())
        with self._lock:
            self._windows.add(w)
            self._recorded += n
            for k, v in d.items():
                if k in self._buf or len(self._buf) < self.max_buffered_fields:
                    self._buf[k] = self._buf.get(k, 0) + v
                else:
                    self._lost += v

    def counters(self) -> RecorderCounters:
        with self._lock:
            inflight = sum(self._inflight[1].values()) if self._inflight else 0
            return RecorderCounters(self._recorded, self._flushed, sum(self._buf.values()) + inflight, self._lost,
                                    self._errors, self._up)

    def flush(self) -> bool:
        """One batch to Redis now -> whether nothing is left to send afterwards. A batch whose send
        failed is sent again, with its id, before any newer counts."""
        with self._lock:
            if self._inflight is None:
                if not self._buf:
                    return True
                self._inflight = (uuid.uuid4().hex, self._buf, self._windows)
                self._buf, self._windows = {}, set()
            batch_id, buf, windows = self._inflight
        ttl = int(self.window_s * self.keep_windows) + 1
        args: list = [ttl, self.layers, self.experts, self.window_s, SCHEMA, len(windows), *sorted(windows)]
        for (name, f), v in buf.items():
            args += [name, "" if f is None else f, v]
        try:
            self._client.eval(_APPLY_BATCH, 3, key(self.model, "batch", batch_id), key(self.model, "meta"),
                              key(self.model, "windows"), *args)
        except Exception as e:  # redis.ConnectionError, TimeoutError, ...: keep the batch, retry later
            with self._lock:
                if self._up or not self._errors:
                    log.warning("Redis at %s unreachable (%s); keeping %d counts until it returns",
                                self.url, type(e).__name__, sum(self._buf.values()) + sum(buf.values()))
                self._errors += 1
                self._up = False
            return False
        with self._lock:
            self._inflight = None
            self._flushed += sum(buf.values())
            if not self._up:
                log.info("Redis at %s: flushed %d counts", self.url, sum(buf.values()))
            self._up = True
            return not self._buf

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the thread after a last flush attempt (bounded by timeout_s)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.time() + timeout_s
        while not self.flush() and time.time() < deadline:
            time.sleep(0.2)
        self._client.close()


# One batch of counts, applied at most once per batch id (KEYS[1], kept for the statistics' lifetime):
# ARGV = ttl, layers, experts, window_s, schema, n windows, the windows, then (key, field or "", delta)
# triples. A retry of a batch whose reply was lost finds its id and changes nothing.
_APPLY_BATCH = """
local ttl = tonumber(ARGV[1])
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl) then return 0 end
redis.call('HSET', KEYS[2], 'layers', ARGV[2], 'experts', ARGV[3], 'window_s', ARGV[4], 'schema', ARGV[5])
local nw = tonumber(ARGV[6])
for i = 7, 6 + nw do redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i]) end
for i = 7 + nw, #ARGV, 3 do
  if ARGV[i + 1] == '' then redis.call('INCRBY', ARGV[i], ARGV[i + 2])
  else redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
  redis.call('EXPIRE', ARGV[i], ttl)
end
return 1
"""


def read_stats(client, model: str, layers: int, experts: int, windows: int = 60, decay: float = 0.9,
               now_window: int | None = None) -> PathStats:
    """The statistics of the last `windows` windows, window w weighted by decay ** (newest - w)."""
    st = PathStats(layers, experts)
    ws = [int(w) for w in client.zrange(key(model, "windows"), -windows, -1)]
    if not ws:
        return st
    newest = max(ws) if now_window is None else now_window
    p = client.pipeline(transaction=False)
    order = []
    for w in ws:
        for l in range(layers):
            for kind in ("act", *PathStats.KINDS):
                p.hgetall(key(model, kind, l, w))
                order.append((w, l, kind))
    for (w, l, kind), h in zip(order, p.execute()):
        wt = decay ** max(newest - w, 0)
        for field, v in h.items():
            if kind == "act":
                f = int(field)
                if 0 <= f < experts:
                    st.act[l, f] += wt * int(v)
            else:
                e, f = (int(x) for x in field.split(","))
                if 0 <= e < experts and 0 <= f < experts:
                    st.trans[kind][l, e, f] += wt * int(v)
    return st
