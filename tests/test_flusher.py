"""The flusher that writes each socket's pending updates at the end of a pass."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from presence_hub.delivery import BEHIND, STORM_WINDOW, Connection, Flusher
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


class PendingSocket:
    """Stands in for a Connection that is handed updates: each ``flush()`` writes all it
    holds in one ``send()``. Like a Connection, it asks the flusher once until written."""

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.pending = 0
        self.sends: list[int] = []

    def hand(self) -> None:
        if not self.pending:
            self.flusher.add(cast(Connection, self))
        self.pending += 1

    def flush(self) -> int:
        written, self.pending = self.pending, 0
        self.sends.append(written)
        return written


async def hand_three_a_pass_apart(socket: PendingSocket) -> None:
    """One update, then two more, each after the flusher has had a pass to write."""
    socket.hand()
    await eventually(lambda: socket.sends == [1])
    socket.hand()
    # Not a wait for time: a flush that is due runs before this sleep's timer fires.
    await asyncio.sleep(0.01)
    socket.hand()
    await eventually(lambda: sum(socket.sends) == 3)


async def test_a_node_keeping_up_writes_each_update_at_once() -> None:
    # A storm is 3 sockets opened within STORM_WINDOW seconds.
    flusher = Flusher(Metrics(), storm_rate=round(3 / STORM_WINDOW), storm_hold=5.0)
    socket = PendingSocket(flusher)
    flusher.opened()  # a socket opened, as ever; not a storm
    await hand_three_a_pass_apart(socket)
    assert socket.sends == [1, 1, 1]


async def test_in_a_connect_storm_a_sockets_updates_go_out_together() -> None:
    metrics = Metrics()
    flusher = Flusher(metrics, storm_rate=round(3 / STORM_WINDOW), storm_hold=5.0)
    socket = PendingSocket(flusher)
    for _ in range(3):
        flusher.opened()
    await hand_three_a_pass_apart(socket)
    # The first went out at once; the next two waited for the storm's hold, together.
    assert socket.sends == [1, 2]
    assert metrics.registry.get_sample_value("presence_hub_update_writes_total") == 2
    assert metrics.registry.get_sample_value("presence_hub_deliveries_total") == 3
    assert metrics.registry.get_sample_value("presence_hub_storm_held_flushes_total") == 1


async def test_once_the_storm_is_over_updates_go_out_at_once_again() -> None:
    flusher = Flusher(Metrics(), storm_rate=round(3 / STORM_WINDOW), storm_hold=0.2)
    socket = PendingSocket(flusher)
    for _ in range(3):
        flusher.opened()
    # The storm counts the sockets opened within the last STORM_WINDOW seconds.
    await asyncio.sleep(STORM_WINDOW + 0.5)
    await hand_three_a_pass_apart(socket)
    assert socket.sends == [1, 1, 1]
