"""A bare test client for the wire protocol: frames as dicts, replies matched by id."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode
from websockets.typing import Subprotocol

from tests.utils import timeout

SUBPROTOCOLS = {"json": "presence.v1.json", "msgpack": "presence.v1.msgpack"}
Frame = dict[str, Any]


class Client:
    #: Every client not yet closed, for the fixtures to close after each test.
    open: ClassVar[set[Client]] = set()

    def __init__(self, ws: ClientConnection, fmt: str) -> None:
        self.ws = ws
        self.fmt = fmt
        self.inbox: list[Frame] = []
        self.welcome: Frame = {}
        self._ids = itertools.count(1)

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str,
        *,
        fmt: str = "json",
        device: str = "desktop",
        offer: list[str] | None = None,
        **kwargs: Any,
    ) -> Client:
        subprotocols = [SUBPROTOCOLS[fmt]] if offer is None else offer
        ws = await connect(
            f"{url}?device={device}",
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[Subprotocol(s) for s in subprotocols] or None,
            open_timeout=timeout(10),
            **kwargs,
        )
        client = cls(ws, fmt)
        cls.open.add(client)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        return client

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame) if self.fmt == "json" else msgpack.packb(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, wait: float = 10) -> Frame:
        data = await asyncio.wait_for(self.ws.recv(), timeout(wait))
        if self.fmt == "json":
            assert isinstance(data, str), "json frames must be text"
            frame: Frame = json.loads(data)
        else:
            assert isinstance(data, bytes), "msgpack frames must be binary"
            frame = msgpack.unpackb(data)
        return frame

    async def request(self, frame: Frame, wait: float = 10) -> Frame:
        """Send a request with a fresh id and return the frame that answers it."""
        rid = next(self._ids)
        await self.send({**frame, "id": rid})
        return await self.expect(lambda f: f.get("id") == rid, wait)

    async def expect(self, match: Callable[[Frame], bool], wait: float = 10) -> Frame:
        """The first frame, kept or new, that matches; the others stay in the inbox."""
        for n, frame in enumerate(self.inbox):
            if match(frame):
                del self.inbox[n]
                return frame
        async with asyncio.timeout(timeout(wait)):
            while True:
                frame = await self.recv(wait)
                if match(frame):
                    return frame
                self.inbox.append(frame)

    async def presence(self, user: str, wait: float = 10, **fields: Any) -> Frame:
        """The next update of ``user`` (alone or in a ``presences`` batch) with ``fields``."""

        def matches(p: Frame) -> bool:
            return p.get("user") == user and all(p.get(k) == v for k, v in fields.items())

        def match(frame: Frame) -> bool:
            if frame["type"] == "presence":
                return matches(frame)
            if frame["type"] == "presences":
                return any(matches(p) for p in frame["items"])
            return False

        frame = await self.expect(match, wait)
        if frame["type"] == "presences":
            return next(p for p in frame["items"] if matches(p))
        return frame

    def updates_of(self, user: str) -> list[Frame]:
        """Updates of ``user`` received so far and kept in the inbox."""
        found = []
        for frame in self.inbox:
            if frame["type"] == "presence" and frame["user"] == user:
                found.append(frame)
            elif frame["type"] == "presences":
                found.extend(p for p in frame["items"] if p["user"] == user)
        return found

    async def close(self, code: int = 1000) -> None:
        Client.open.discard(self)
        await self.ws.close(code)

    @classmethod
    async def close_all(cls) -> None:
        clients, cls.open = list(cls.open), set()
        for client in clients:
            client.ws.transport.abort()
            await client.ws.wait_closed()


async def stalled_client(
    url: str, token: str, users: list[str] | None = None
) -> asyncio.StreamWriter:
    """A client that subscribes to ``users`` (if any) and then never reads another byte;
    it can still write frames with ``send_masked``."""
    host, _, port = url.removeprefix("ws://").split("/")[0].partition(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1024)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/ws HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: presence.v1.json\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    if users is not None:
        send_masked(writer, {"type": "subscribe", "id": 1, "users": users})
    await writer.drain()
    return writer


def send_masked(writer: asyncio.StreamWriter, frame: dict[str, Any]) -> None:
    """A client's JSON frame, masked as the protocol wants, on a raw socket."""
    writer.write(WireFrame(Opcode.TEXT, json.dumps(frame).encode()).serialize(mask=True))


async def until_ok(client: Client, frame: dict[str, Any], failure: str) -> None:
    """Send ``frame`` until the hub accepts it, as a client retries while the hub's
    Redis (or one of its shards) comes back; ``failure`` if it never does."""
    for _ in range(150):
        if (await client.request(frame))["type"] == "ok":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(failure)
