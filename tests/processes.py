"""``presence-hub serve`` as a child process, as operators run it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from presence_hub.store.embedded import free_port
from tests.conftest import SECRET
from tests.utils import timeout, wait_for_port

LEASE = 3.0


class HubProcess:
    """``presence-hub serve`` in a child process."""

    def __init__(self, redis_url: str, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        self.log = tmp / f"hub-{self.port}.log"
        args = [
            sys.executable, "-m", "presence_hub", "serve",
            "--redis-url", redis_url, "--secret", SECRET,
            "--ws-port", str(self.port), "--http-port", str(self.http_port),
            "--lease", str(LEASE), "--grace", "2", *extra,
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        """Both ports accept connections (the HTTP one opens after the WebSocket one)."""
        await wait_for_port(self.port, self.process)
        await wait_for_port(self.http_port, self.process)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout(15))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
