"""A node's relays: with ``--workers N --relays L``, L processes listen on Redis, each
for a slice of the partitions, on behalf of every worker, and forward each update
to the workers that watch its user.

Without them every worker subscribes on Redis for its own sockets' contacts, and
with random contacts nearly every update reaches every worker: Redis sends it N
times and each worker parses it. A relay takes it in once and copies its bytes to
the workers that asked (docs/PERFORMANCE.md, "Many cores").

A relay speaks Redis' own pub/sub protocol on a Unix socket, so a worker listens
to it with the same ``store.pubsub.Listener`` it would point at Redis: SUBSCRIBE
is confirmed once the relay's own subscription on Redis is, and a relay that
loses Redis drops every worker's connection and refuses new ones until it listens
again, so that each worker, as after an outage of Redis itself, listens anew and
resyncs its watchers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import hiredis
import msgpack

from presence_hub.store.clients import RedisClient
from presence_hub.store.pubsub import RELAYED, Listener

__all__ = ["Relay"]

log = logging.getLogger(__name__)

#: A worker that lets this much pile up unread is dropped (it relistens and resyncs),
#: as Redis drops a subscriber past its output buffer limit.
MAX_BACKLOG: Final = 64 << 20


class Relay:
    """One relay process's work: the Unix socket at ``path``, and one Listener on Redis
    for the channels its workers ask for."""

    def __init__(self, redis: RedisClient, path: Path) -> None:
        self.path = path
        self.listener = Listener(redis, self._forward, self._listening, on_lost=self._lost)
        #: channel -> the worker links subscribed to it
        self._links: dict[str, set[_Link]] = {}
        self._all: set[_Link] = set()
        #: Links with frames to write at the end of this pass of the loop.
        self._pending: set[_Link] = set()

    async def run(self) -> None:
        """Serve workers until cancelled: the socket appears once the relay listens on
        Redis."""
        loop = asyncio.get_running_loop()
        listening = loop.create_task(self.listener.run())
        server: asyncio.Server | None = None
        try:
            await self.listener.wait_ready()
            self.path.unlink(missing_ok=True)
            server = await loop.create_unix_server(lambda: _Link(self), str(self.path))
            await listening
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            if server is not None:
                server.close()
            for link in list(self._all):
                link.close()
            self.path.unlink(missing_ok=True)

    # --- Workers' requests --------------------------------------------------------

    def joined(self, link: _Link) -> bool:
        if not self.listener.ready:
            return False
        self._all.add(link)
        return True

    def left(self, link: _Link) -> None:
        self._all.discard(link)
        self._pending.discard(link)
        self.unsubscribe(link, list(link.channels))

    async def subscribe(self, link: _Link, channels: list[str]) -> None:
        new, waiting = [], []
        for channel in channels:
            links = self._links.get(channel)
            if links is None:
                self._links[channel] = {link}
                new.append(channel)
            else:
                links.add(link)
                waiting.append(channel)
            link.channels.add(channel)
        await self.listener.subscribe(new, waiting)

    def unsubscribe(self, link: _Link, channels: Iterable[str]) -> None:
        gone = []
        for channel in channels:
            link.channels.discard(channel)
            links = self._links.get(channel)
            if links is None:
                continue
            links.discard(link)
            if not links:
                del self._links[channel]
                gone.append(channel)
        self.listener.unsubscribe(gone)

    # --- Redis' side ----------------------------------------------------------------

    def _forward(self, channel: str, data: bytes) -> None:
        links = self._links.get(channel)
        if not links:
            return
        for link in links:
            link.updates += (channel, data)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.update(links)

    def _flush(self) -> None:
        pending, self._pending = self._pending, set()
        for link in pending:
            link.flush()

    def _listening(self) -> None:
        log.info("relay %s listens on Redis again", self.path.name)

    def _lost(self) -> None:
        # Every worker listens anew once this relay does, and resyncs: drop them all.
        log.warning("relay %s lost Redis; dropping its %d workers", self.path.name, len(self._all))
        for link in list(self._all):
            link.close()


class _Link(asyncio.Protocol):
    """One worker's connection to the relay, in Redis' protocol (RESP2)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.channels: set[str] = set()
        #: The updates of this pass of the loop, channel and message in turn.
        self.updates: list[str | bytes] = []
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self.relay.joined(self):
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for task in self._tasks:
            task.cancel()
        self.relay.left(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (command := self._reader.gets()) is not False:
                self._command(command)
        except (hiredis.ProtocolError, AttributeError, TypeError, UnicodeDecodeError):
            log.warning("a worker spoke no Redis protocol to its relay; dropping it")
            self.close()

    def _command(self, command: Any) -> None:
        if not isinstance(command, list) or not command:
            self._write(b"-ERR expected a command\r\n")
            return
        name = command[0].upper()
        channels = [c.decode() for c in command[1:]]
        if name == b"SUBSCRIBE":
            task = asyncio.get_running_loop().create_task(self._subscribe(channels))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif name == b"UNSUBSCRIBE":
            self.relay.unsubscribe(self, channels)
            for channel in channels:
                self._reply(b"unsubscribe", channel, len(self.channels))
        elif name == b"PING":
            self._write(b"+PONG\r\n")
        else:
            # What redis-py sends on connecting (CLIENT SETINFO, SELECT): accepted.
            self._write(b"+OK\r\n")

    async def _subscribe(self, channels: list[str]) -> None:
        try:
            await self.relay.subscribe(self, channels)
        except Exception as exc:  # the relay's Redis is gone: the worker listens anew
            log.warning("relay could not subscribe for a worker: %s", exc)
            self.close()
            return
        for channel in channels:
            if channel in self.channels:  # not dropped in the meantime
                self._reply(b"subscribe", channel, len(self.channels))

    def _reply(self, kind: bytes, channel: str, count: int) -> None:
        self._write(b"*3\r\n" + _array(kind, channel)[4:] + b":%d\r\n" % count)

    def _write(self, data: bytes) -> None:
        self.flush()  # what came before it first
        if self._transport is not None:
            self._transport.write(data)

    def flush(self) -> None:
        """Write this pass's updates as one message: a worker then reads, parses and
        dispatches one message a pass rather than one an update."""
        transport, updates = self._transport, self.updates
        if not updates:
            return
        self.updates = []
        if transport is None:
            return
        transport.write(_array(b"message", RELAYED, msgpack.packb(updates)))
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            log.warning("a worker fell %d MiB behind its relay; dropping it", MAX_BACKLOG >> 20)
            transport.abort()


def _array(*parts: Any) -> bytes:
    """A RESP array of bulk strings: a command's form, and a pub/sub message's."""
    packed: bytes = hiredis.pack_command(parts)
    return packed
