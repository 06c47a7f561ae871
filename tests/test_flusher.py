"""The flusher that writes each socket's pending updates at the end of a pass."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from presence_hub.hub import BEHIND, Connection, Flusher
from presence_hub.metrics import Metrics
from tests.utils import eventually


class BusySocket:
    """Stands in for a Connection: ``flush()`` is all the flusher calls. Each flush writes
    several updates and takes a while, as on a node that is behind."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> int:
        time.sleep(0.02)
        self.flushes += 1
        return int(BEHIND) + 1


async def test_a_node_that_is_behind_still_writes_every_pending_socket() -> None:
    metrics = Metrics()
    flusher = Flusher(metrics)
    first, second, third = BusySocket(), BusySocket(), BusySocket()
    flusher.add(cast(Connection, first))
    await eventually(lambda: first.flushes == 1)
    # The next flush is held back, and must still come, with everything added meanwhile.
    flusher.add(cast(Connection, second))
    flusher.add(cast(Connection, third))
    await eventually(lambda: second.flushes == 1 and third.flushes == 1)
    await asyncio.sleep(0.2)
    assert (first.flushes, second.flushes, third.flushes) == (1, 1, 1)
    assert metrics.registry.get_sample_value("presence_hub_deliveries_total") == 9
    # One send() per socket, three updates each.
    assert metrics.registry.get_sample_value("presence_hub_update_writes_total") == 3
