"""When a node's timer poll next looks for due timers: at the earliest due time it
knows of, and at least every ``MAX_POLL`` seconds.

A poll's claim returns the earliest due time left in the buckets, and each commit of
the node tells the due time it set; so the poll sleeps until the first of those
instead of waking five times a second to find nothing. An idle node then wakes once
a ``MAX_POLL`` for its timers. What it cannot know, a due time another node set after
this node's last poll, that node fires itself; the poll every ``MAX_POLL`` is for the
timers of a node that stopped before their time. It also catches, on a Redis Cluster,
a commit of this node's that reached its shard after a poll that began later had read
it (on a single Redis both go through the batcher, in order).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_POLL", "Alarm"]

#: Seconds between two polls at most.
MAX_POLL: Final = 1.0
#: A poll starts this much after the due time, so that the node's clock has passed it.
_MARGIN: Final = 0.001


class Alarm:
    def __init__(self, clock: Callable[[], float], most: float = MAX_POLL) -> None:
        self._clock = clock
        self._most = most
        #: The earliest due time heard of since the last poll began (clock time).
        self._at = math.inf
        self._sleeping: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def due(self, at: float) -> None:
        """A timer is due at ``at``: the poll wakes by then."""
        if at < self._at:
            self._at = at
            if self._sleeping is not None:
                self._arm()

    def polling(self) -> None:
        """A poll begins: due times told from now on are those it may not see."""
        self._at = math.inf

    async def sleep(self) -> None:
        """Until the earliest due time told since the poll began (the poll's own
        among them), or ``MAX_POLL`` from now."""
        self._at = min(self._at, self._clock() + self._most)
        self._sleeping = asyncio.get_running_loop().create_future()
        self._arm()
        try:
            await self._sleeping
        finally:
            self._sleeping = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self._at - self._clock()) + _MARGIN, self._ring)

    def _ring(self) -> None:
        if self._sleeping is not None and not self._sleeping.done():
            self._sleeping.set_result(None)
