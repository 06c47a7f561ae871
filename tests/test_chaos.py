"""The short form of the chaos scenario (bench/chaos.py): Redis restarted and paused
and a node killed under load, and nothing acknowledged lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import timeout

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_short_chaos_scenario_loses_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--short"],
        capture_output=True,
        text=True,
        timeout=timeout(600),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "every check passed" in done.stdout
