"""The socket side of the fan-out: the flusher that writes each socket's pending
updates at the end of a pass, and, end to end, slow and stalled readers, coalescing
backlogs and a connect storm."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from presence_hub.delivery import (
    BEHIND,
    STORM_WINDOW,
    Connection,
    Flusher,
    Update,
    Watchers,
    _frame,
)
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.keepalive import HeardConnection
from presence_hub.metrics import Metrics
from tests.conftest import StartNode, make_token, ws_url
from tests.utils import eventually
from tests.wsclient import Client, send_masked, stalled_client


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


FORMATS = ["json", "msgpack"]


async def test_a_stalled_reader_is_cut_off_and_slows_nobody(start_node: StartNode) -> None:
    node = await start_node(send_timeout=1.0, rate_limit=1e6, rate_burst=10**6)
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    # A reader that keeps up: it buffers whatever arrives (no flow control).
    fast = await Client.connect(url, make_token("fast"), max_queue=None)
    await fast.request({"type": "subscribe", "users": ["alice"]})
    # A reader that never reads: its client buffers at most one frame, then TCP fills up.
    stalled = await stalled_client(url, make_token("slow"), ["alice"])

    last = 0
    for n in range(5000):
        await alice.send({"type": "set_message", "text": f"{n:04d}" + "x" * 270})
        last = n
        if not any(c.user == "slow" for c in node.hub.connections):
            break
    # The query waits behind up to 5,000 commits (slow under a coverage tracer).
    await alice.request({"type": "query", "users": []}, wait=60)
    final = await fast.presence("alice", message=f"{last:04d}" + "x" * 270, wait=30)
    assert final["ver"] == last + 2

    await eventually(lambda: all(c.user != "slow" for c in node.hub.connections), wait=30)
    stalled.transport.abort()


async def test_the_stalled_reader_backlog_is_one_update_per_user(start_node: StartNode) -> None:
    node = await start_node(send_timeout=60.0, rate_limit=1e6, rate_burst=10**6)
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    stalled = await stalled_client(url, make_token("slow"), ["alice"])
    await alice.request({"type": "query", "users": []})
    conn = next(c for c in node.hub.connections if c.user == "slow")
    await eventually(lambda: "alice" in conn.watching)
    for n in range(2000):
        await alice.request({"type": "set_message", "text": f"{n}" + "y" * 270})
    assert len(conn.pending()) <= 1
    assert conn.coalesced > 1000
    stalled.transport.abort()


async def test_a_producer_that_stops_reading_its_replies_is_cut_off(
    start_node: StartNode,
) -> None:
    node = await start_node(send_timeout=1.0, rate_limit=1e6, rate_burst=10**6)
    producer = await stalled_client(ws_url(node), make_token("calls", role="producer"))
    bob = await Client.connect(ws_url(node), make_token("bob"))
    for n in range(50_000):
        event = {"event_id": f"e{n}", "kind": "call_started", "user": f"u{n % 50}", "ref": f"c{n}"}
        send_masked(producer, {"type": "event", "id": n, "event": event})
        if n % 500 == 0:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(producer.drain(), 5)
            if all(c.user != "calls" for c in node.hub.connections):
                break
    await eventually(lambda: all(c.user != "calls" for c in node.hub.connections), wait=30)
    # Nobody else noticed.
    assert (await bob.request({"type": "query", "users": ["u1"]}))["type"] == "snapshot"
    producer.transport.abort()


@pytest.mark.parametrize(("storm_rate", "held"), [(4, True), (0, False)])
async def test_a_connect_storm_holds_back_the_nodes_writes_unless_turned_off(
    start_node: StartNode, storm_rate: int, held: bool
) -> None:
    # At 4 a second, any socket opened within the last quarter of a second makes a storm.
    node = await start_node(storm_rate=storm_rate)
    users = [f"arriving{n}" for n in range(5)]
    watcher = await Client.connect(ws_url(node), make_token("watcher"))
    await watcher.request({"type": "subscribe", "users": users})
    for user in users:
        await Client.connect(ws_url(node), make_token(user))
    # Held back or not, every arrival reaches the watcher.
    for user in users:
        await watcher.presence(user, status="available")
    holds = node.metrics.registry.get_sample_value("presence_hub_storm_held_flushes_total")
    assert (holds is not None and holds > 0) is held


@settings(max_examples=200)
@given(
    opcode=st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
    length=st.one_of(
        st.integers(0, 300), st.sampled_from([65535, 65536, 70000]), st.integers(0, 1 << 17)
    ),
)
def test_frames_are_framed_exactly_as_websockets_frames_them(opcode: Opcode, length: int) -> None:
    payload = bytes(n % 251 for n in range(length))
    assert _frame(opcode, payload) == Frame(opcode, payload).serialize(mask=False)


def unwelcomed(n: int, metrics: Metrics) -> Connection:
    """A socket before its welcome: what it is handed stays pending, to be read."""
    return Connection(
        cast(HeardConnection, None),
        "json",
        tenant=TenantId("acme"),
        user=UserId(f"watcher-{n}"),
        session=SessionId(f"s-{n}"),
        device="desktop",
        send_timeout=1.0,
        metrics=metrics,
        flusher=Flusher(metrics),
    )


@settings(max_examples=300)
@given(
    watched=st.lists(st.sets(st.sampled_from("abcd")), min_size=1, max_size=4),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("offer"), st.sampled_from("abcd"), st.integers(0, 12)),
            st.tuples(st.just("write"), st.integers(0, 3), st.just(0)),
        ),
        max_size=40,
    ),
)
def test_each_socket_keeps_the_newest_update_of_each_user_in_the_order_they_came(
    watched: list[set[str]], steps: list[tuple[str, Any, int]]
) -> None:
    """Offered updates, in any order of users and vers, with writes in between: each
    socket waits with, per user it watches, the newest update above what it was handed,
    in the order the users first came since its last write; a replaced one counts as
    coalesced. As a plain map per socket would keep them."""

    async def offer_and_write() -> None:  # the flusher schedules on a loop
        metrics = Metrics()
        conns = [unwelcomed(n, metrics) for n in range(len(watched))]
        watchers: dict[UserId, Watchers] = {UserId(u): {} for u in "abcd"}
        for conn, users in zip(conns, watched, strict=True):
            for u in users:
                watchers[UserId(u)][conn] = -1
                conn.watching[UserId(u)] = watchers[UserId(u)]
        handed = {conn: dict.fromkeys(conn.watching, -1) for conn in conns}
        waiting: dict[Connection, dict[UserId, Update]] = {conn: {} for conn in conns}
        coalesced = dict.fromkeys(conns, 0)
        for kind, which, ver in steps:
            if kind == "offer":
                user = UserId(which)
                update = Update(b"", {"user": user, "ver": ver})
                Connection.offer(watchers[user], user, update)
                for conn in conns:
                    if user in handed[conn] and ver > handed[conn][user]:
                        handed[conn][user] = ver
                        coalesced[conn] += user in waiting[conn]
                        waiting[conn][user] = update
            elif which < len(conns):
                conn = conns[which]
                assert conn._take_pending() == list(waiting[conn].values())
                waiting[conn] = {}
        for conn in conns:
            assert conn.pending() == waiting[conn]
            assert list(conn.pending()) == list(waiting[conn])
            assert conn.coalesced == coalesced[conn]
            assert {u: w[conn] for u, w in conn.watching.items()} == handed[conn]

    asyncio.run(offer_and_write())
