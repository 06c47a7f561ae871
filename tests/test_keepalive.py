"""Keepalive on real sockets: a pong read without websockets' parser only where that is
safe, pings taken along by writes of updates, and the close of a socket that stopped
answering."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Opcode

from presence_hub.delivery import Connection, Flusher, Update
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.keepalive import PING, HeardConnection, _between_frames, keep_alive
from presence_hub.metrics import Metrics
from tests.utils import eventually, timeout


class Pair:
    """A server of HeardConnections, with the messages its sockets received."""

    def __init__(self) -> None:
        self.sockets: list[HeardConnection] = []
        self.received: list[str | bytes] = []
        self.port = 0
        self.clients: list[ClientConnection] = []


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    found = Pair()

    async def handler(ws: ServerConnection) -> None:
        found.sockets.append(cast(HeardConnection, ws))
        with contextlib.suppress(Exception):
            async for message in ws:
                found.received.append(message)

    async with serve(
        handler, "127.0.0.1", 0, create_connection=HeardConnection, ping_interval=None
    ) as server:
        found.port = server.sockets[0].getsockname()[1]
        yield found
        for peer in found.clients:
            await peer.close()


async def client(pair: Pair, **options: Any) -> tuple[ClientConnection, HeardConnection]:
    """A websockets client, which answers pings, and its socket on the server."""
    before = len(pair.sockets)
    ws = await connect(f"ws://127.0.0.1:{pair.port}", ping_interval=None, **options)
    pair.clients.append(ws)
    await eventually(lambda: len(pair.sockets) > before)
    return ws, pair.sockets[before]


def masked_frame(opcode: int, masked_payload: bytes, mask: bytes) -> tuple[bytes, bytes]:
    """A client frame whose payload, masked, is ``masked_payload``: its header with the
    mask, and the bytes that follow; and what the server unmasks."""
    plain = bytes(b ^ mask[n % 4] for n, b in enumerate(masked_payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(masked_payload)) + mask, plain


async def test_a_pong_read_between_frames_is_counted_and_the_next_frame_still_parsed(
    pair: Pair,
) -> None:
    _, ws = await client(pair)
    assert _between_frames(ws.protocol)
    heard = ws.heard
    ws.data_received(b"\x8a\x80" + os.urandom(4))
    assert ws.heard == heard + 1
    assert _between_frames(ws.protocol)
    header, plain = masked_frame(Opcode.BINARY, b"after the pong", b"\x01\x02\x03\x04")
    ws.data_received(header + b"after the pong")
    await eventually(lambda: pair.received == [plain])


async def test_bytes_like_a_pong_inside_a_frame_go_to_the_parser(pair: Pair) -> None:
    _, ws = await client(pair)
    # A binary frame whose 6 bytes of payload, as read, are those of a bare pong.
    header, plain = masked_frame(Opcode.BINARY, b"\x8a\x80abcd", b"\x11\x22\x33\x44")
    heard = ws.heard
    ws.data_received(header)
    assert not _between_frames(ws.protocol)
    ws.data_received(b"\x8a\x80abcd")
    assert ws.heard == heard + 2
    await eventually(lambda: pair.received == [plain])
    assert _between_frames(ws.protocol)


class Writes:
    """A transport's writes, recorded on their way."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def recorded(ws: HeardConnection) -> Writes:
    writes = Writes(ws.transport)
    ws.transport = cast(asyncio.Transport, writes)
    return writes


def connection(ws: HeardConnection, metrics: Metrics) -> Connection:
    conn = Connection(
        ws,
        "json",
        tenant=TenantId("acme"),
        user=UserId("bob"),
        session=SessionId("s-bob"),
        device="desktop",
        send_timeout=5.0,
        metrics=metrics,
        flusher=Flusher(metrics),
    )
    conn.start(0)
    return conn


def update(ver: int) -> Update:
    frame = {"type": "presence", "user": "alice", "status": "busy", "ver": ver}
    return Update(b"", frame)


async def test_a_ping_due_goes_out_in_the_next_write_of_updates(pair: Pair) -> None:
    peer, ws = await client(pair)
    writes = recorded(ws)
    conn = connection(ws, Metrics())
    conn.watching[UserId("alice")] = watchers = {conn: -1}
    ws.ping_due = True
    heard = ws.heard
    Connection.offer(watchers, UserId("alice"), update(1))
    await eventually(lambda: len(writes.writes) == 1)
    assert writes.writes == [update(1).framed("json") + PING]
    assert not ws.ping_due
    # The client reads the update; its websockets answers the ping, which counts.
    assert "busy" in str(await asyncio.wait_for(peer.recv(), timeout(10)))
    await eventually(lambda: ws.heard > heard)


async def test_a_round_pings_each_socket_once_in_a_write_of_its_own_or_of_its_updates(
    pair: Pair,
) -> None:
    every = 2.0
    sockets = [await client(pair, max_queue=None) for _ in range(8)]  # they read on
    writes = [recorded(ws) for _, ws in sockets]
    metrics = Metrics()
    busy = connection(sockets[0][1], metrics)
    busy.watching[UserId("alice")] = watchers = {busy: -1}
    # Eight slices a round, one socket each: a ping is written on its own two slices
    # after it was asked for, unless a write of updates took it first.
    servers_side = [ws for _, ws in sockets]
    pinging = asyncio.create_task(keep_alive(lambda: servers_side, every, 1))
    try:
        ver = 0
        while not all(PING in b"".join(w.writes) for w in writes):
            ver += 1
            Connection.offer(watchers, UserId("alice"), update(ver))
            await asyncio.sleep(every / 40)
            assert ver < 400, "a round went by without pinging every socket"
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
    # The socket with updates got its pings along with them; the others on their own.
    assert PING not in writes[0].writes
    assert any(w.endswith(PING) for w in writes[0].writes)
    assert all(set(w.writes) == {PING} for w in writes[1:])
    assert all(ws.protocol.state.name == "OPEN" for _, ws in sockets)


async def silent(pair: Pair) -> tuple[asyncio.StreamWriter, HeardConnection]:
    """A peer that vanished: its TCP connection is up, and nothing answers a ping."""
    before = len(pair.sockets)
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    await eventually(lambda: len(pair.sockets) > before)
    return writer, pair.sockets[before]


async def test_a_socket_that_stops_answering_is_closed_and_the_others_are_not(
    pair: Pair,
) -> None:
    every = 0.5
    answering = [await client(pair) for _ in range(3)]
    writer, gone = await silent(pair)
    everyone = [ws for _, ws in answering] + [gone]
    pinging = asyncio.create_task(keep_alive(lambda: everyone, every, 1))
    try:
        await eventually(lambda: gone.transport.is_closing(), wait=timeout(10))
        # Three more rounds: the sockets that answer stay open.
        await asyncio.sleep(3 * every)
        assert all(not ws.transport.is_closing() for _, ws in answering)
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
        writer.close()
