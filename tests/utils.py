"""Helpers shared by the tests."""

from __future__ import annotations

import os
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
