"""Reports every garbage collection that stalls a process for more than 20 ms, and
every stall of an asyncio event loop longer than 8 ms.

Put this directory first on PYTHONPATH and every Python process started from there
(the hub, the load generator) prints its long pauses to stderr:

    PYTHONPATH=bench/gcprobe .venv/bin/python bench/bench.py latency 2>&1 | grep GCPAUSE
    PYTHONPATH=bench/gcprobe .venv/bin/python bench/bench.py latency 2>&1 | grep LOOPLAG

A loop stall is measured by a task that sleeps 5 ms and notes how late it wakes. The
pauses are wall-clock time, so on busy shared cores they include time the process
waited for a core.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from typing import Any

_started = [0.0]


def _report(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _started[0]
    if pause > 0.02:
        program = " ".join(sys.argv[:2])[-40:]
        sys.stderr.write(
            f"GCPAUSE pid={os.getpid()} generation={info['generation']} {pause * 1000:.0f} ms "
            f"collected={info['collected']} at={time.strftime('%H:%M:%S')} {program}\n"
        )


gc.callbacks.append(_report)


async def _watch_loop() -> None:
    while True:
        started = time.perf_counter()
        await asyncio.sleep(0.005)
        late = time.perf_counter() - started - 0.005
        if late > 0.008:
            program = " ".join(sys.argv[:2])[-40:]
            sys.stderr.write(
                f"LOOPLAG pid={os.getpid()} {late * 1000:.0f} ms "
                f"at={time.strftime('%H:%M:%S')} {program}\n"
            )


_run_forever = asyncio.BaseEventLoop.run_forever


def _run_forever_watched(self: asyncio.BaseEventLoop) -> None:
    self.create_task(_watch_loop())
    _run_forever(self)


asyncio.BaseEventLoop.run_forever = _run_forever_watched  # type: ignore[method-assign]
