"""Reports every garbage collection that stalls a process for more than 20 ms.

Put this directory first on PYTHONPATH and every Python process started from there
(the hub, the load generator) prints its long pauses to stderr:

    PYTHONPATH=bench/gcprobe .venv/bin/python bench/bench.py latency 2>&1 | grep GCPAUSE

The pauses are wall-clock time, so on busy shared cores they include time the process
waited for a core.
"""

from __future__ import annotations

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
