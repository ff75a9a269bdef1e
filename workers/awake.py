"""Keeping a node's cores awake while its worker serves steps (docs/runtime.md, "Idle cores").

A pipeline stage spends most of a token waiting for the other stages. A core with nothing to run
halts, and waking it costs: on a virtual machine a halted vCPU needs a VM exit and an interrupt
from the host to run again, and it comes back with cold caches. Measured on the 2-core VM of the
benchmarks (a worker hosting 10 SmolLM2 layers, a step every 6 ms): a step's compute took 2.75 ms
instead of 2.29 ms back to back, and its round trip 4.25 ms instead of 3.10 ms. With the cores
kept awake: 2.25 ms and 3.18 ms.

Two ways, tried in order:

- a PM QoS request: a CPU wake-up latency of 0 microseconds written to /dev/cpu_dma_latency and held
  as long as the file stays open. The kernel's idle loop then polls instead of halting. It needs
  write permission on that file (root, or a udev rule); the kernel drops the request when the file
  is closed, also when the process dies, so nothing is left behind.
- otherwise, spinner threads, one per core this process may run on, each at SCHED_IDLE (it runs
  only when no other thread wants the core, so it takes no time from any work) and spinning in C
  (quant/csrc/spin.c), so it never holds the GIL. They stop when released.

Either way the cores burn power while held, so a worker holds it only while steps arrive
(workers/server.py): one second after the last step, and on a server with nothing to do, the
cores halt as usual. `edgeweave up/serve --no-keep-awake` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time

__all__ = ["KeepAwake", "PM_QOS_PATH", "current_latency_limit_us"]

log = logging.getLogger("edgeweave.awake")

PM_QOS_PATH = "/dev/cpu_dma_latency"


def current_latency_limit_us(path: str = PM_QOS_PATH) -> int | None:
    """The system's current CPU wake-up latency limit in microseconds (the least of every request
    held), or None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return struct.unpack("<i", f.read(4))[0]
    except (OSError, struct.error):
        return None


class KeepAwake:
    """touch() on every step keeps the cores awake until `idle_s` pass without one (so a front end
    that stops sending, or dies, lets them halt again); release() lets them halt now. Thread-safe.
    `how` says what is held: "pm-qos", "spinners" or "" (nothing)."""

    def __init__(self, mode: str = "auto", idle_s: float = 1.0, pm_qos_path: str = PM_QOS_PATH) -> None:
        if mode not in ("auto", "pm-qos", "spinners"):
            raise ValueError(f"mode must be auto, pm-qos or spinners, got {mode!r}")
        if not idle_s > 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s}")
        self.mode, self.idle_s, self.path = mode, idle_s, pm_qos_path
        self.how = ""
        self.unavailable = ""  # why neither way works here (then touch() does nothing)
        self.last = 0.0  # time.monotonic() of the last touch
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._stop: ctypes.c_int32 | None = None
        self.threads: list[threading.Thread] = []
        self._released = threading.Event()

    def touch(self) -> None:
        self.last = time.monotonic()
        if self.how or self.unavailable:  # the common case: no lock
            return
        with self._lock:
            if self.how or self.unavailable:
                return
            if self.mode in ("auto", "pm-qos") and self._hold_pm_qos():
                self.how = "pm-qos"
            elif self.mode in ("auto", "spinners") and self._hold_spinners():
                self.how = "spinners"
            else:
                log.info("cores may halt between steps: %s", self.unavailable)
                return
            self._released = threading.Event()
            threading.Thread(target=self._watch, args=(self._released,), name="edgeweave-awake-watch",
                             daemon=True).start()

    def release(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        self._released.set()
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops the request with the file
            self._fd = None
        if self._stop is not None:
            self._stop.value = 1
            for t in self.threads:
                t.join(timeout=1.0)
            self._stop, self.threads = None, []
        self.how = ""

    def _watch(self, released: threading.Event) -> None:
        """Releases once idle_s pass without a touch."""
        while not released.wait(max(self.last + self.idle_s - time.monotonic(), 0.01)):
            with self._lock:
                if released.is_set():
                    return
                if time.monotonic() - self.last >= self.idle_s:
                    self._release()
                    return

    def _hold_pm_qos(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError as e:
            self.unavailable = f"cannot open {self.path} ({e.strerror})"
            return False
        try:
            os.write(fd, struct.pack("<i", 0))
        except OSError as e:
            os.close(fd)
            self.unavailable = f"cannot write {self.path} ({e.strerror})"
            return False
        self._fd = fd
        self.unavailable = ""
        return True

    def _why(self, reason: str) -> None:
        self.unavailable = f"{self.unavailable}; {reason}" if self.unavailable else reason

    def _hold_spinners(self) -> bool:
        if not hasattr(os, "SCHED_IDLE"):  # a spinner at normal priority would steal the core
            self._why("this system has no SCHED_IDLE for spinner threads")
            return False
        from quant.native import load_kernels

        spin = load_kernels().ew_idle_spin
        stop = ctypes.c_int32(0)
        started = threading.Barrier(len(os.sched_getaffinity(0)) + 1)
        ok: list[bool] = []

        def run() -> None:
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
            except OSError:
                ok.append(False)
                started.wait()
                return
            ok.append(True)
            started.wait()
            spin(ctypes.byref(stop))  # ctypes releases the GIL for the call

        self.threads = [threading.Thread(target=run, name=f"edgeweave-awake-{i}", daemon=True)
                        for i in range(started.parties - 1)]
        for t in self.threads:
            t.start()
        started.wait()
        self._stop = stop
        if not all(ok):
            self._release()
            self._why("cannot put a thread at SCHED_IDLE")
            return False
        self.unavailable = ""
        return True
