"""The flusher that writes each socket's pending updates at the end of a pass."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from presence_hub.hub import SATURATED_FLUSH, Connection, Flusher
from presence_hub.metrics import Metrics
from tests.utils import eventually


class SlowSocket:
    """Stands in for a Connection: ``flush()`` is all the flusher calls. Each flush takes
    as long as writing to thousands of sockets, as on a saturated node."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> int:
        time.sleep(SATURATED_FLUSH * 2)
        self.flushes += 1
        return 1


async def test_a_saturated_node_still_writes_every_pending_socket() -> None:
    metrics = Metrics()
    flusher = Flusher(metrics)
    first, second, third = SlowSocket(), SlowSocket(), SlowSocket()
    flusher.add(cast(Connection, first))
    await eventually(lambda: first.flushes == 1)
    # The flush took long: the next is spaced out, and must still come, with
    # everything added meanwhile.
    flusher.add(cast(Connection, second))
    flusher.add(cast(Connection, third))
    await eventually(lambda: second.flushes == 1 and third.flushes == 1)
    await asyncio.sleep(SATURATED_FLUSH * 10)
    assert (first.flushes, second.flushes, third.flushes) == (1, 1, 1)
    assert metrics.registry.get_sample_value("presence_hub_deliveries_total") == 3
