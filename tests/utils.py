"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from typing import Final

#: Scales every timeout of the suite: raise it on a slow or busy machine.
TIMEOUT_FACTOR: Final = float(os.environ.get("PRESENCE_HUB_TEST_TIMEOUT_FACTOR", "1"))

T0: Final = 1_700_000_000.0


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(condition: Callable[[], bool], wait: float = 10) -> None:
    """Wait until ``condition()`` holds: for state that no event announces."""
    async with asyncio.timeout(timeout(wait)):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def wait_for_port(port: int, process: subprocess.Popen[bytes], wait: float = 30) -> None:
    """Wait until ``process`` accepts TCP connections on ``port``; fail if it exits."""
    async with asyncio.timeout(timeout(wait)):
        while True:
            assert process.poll() is None, "the process exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
