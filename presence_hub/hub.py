"""Who on this node watches whom, and the fan-out of updates from Redis to sockets.

The node listens on Redis only for the users that its own sockets watch (a
channel is subscribed with its first watcher and released with its last).
Each update is decoded once and framed at most once per frame format, then
handed to every local watcher without waiting for any socket: the frame goes
straight to each idle socket's transport, and a socket that cannot take it
keeps at most one pending update per user (the newest ``ver`` wins), written by
a task of its own once the socket drains. A slow socket delays nobody else and
its backlog is bounded by its subscription count; one whose writes stall longer
than ``send_timeout`` is closed with 1013.

When the Redis connection drops, the node reconnects, listens again and
re-reads the state of every watched user, so subscribers end with the truth
whatever was published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final

import msgpack
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from presence_hub import codec
from presence_hub.codec import Format
from presence_hub.errors import StoreUnavailable
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.rules import Device, self_view
from presence_hub.store import PresenceStore, keys

__all__ = ["Connection", "Hub"]

log = logging.getLogger(__name__)

#: Items per ``presences`` frame, so a coalesced backlog never makes one huge frame.
BATCH: Final = 500
SUBSCRIBE_CHUNK: Final = 1000


class Update:
    """One published frame, encoded and framed at most once per format however many
    sockets get it: server frames are not masked, so the same bytes go to every socket."""

    __slots__ = ("_framed", "map", "origin", "raw")

    def __init__(self, raw: bytes, frame: dict[str, Any], origin: float | None = None) -> None:
        self.raw = raw
        self.map = frame
        #: When the input that caused it arrived (None for a resync).
        self.origin = origin
        self._framed: dict[Format, bytes] = {}

    @classmethod
    def published(cls, data: bytes) -> Update:
        origin, raw = msgpack.unpackb(data)
        return cls(raw, msgpack.unpackb(raw), origin)

    def framed(self, fmt: Format) -> bytes:
        """The whole WebSocket frame: binary for msgpack, text for json."""
        framed = self._framed.get(fmt)
        if framed is None:
            if fmt == "msgpack":
                framed = _frame(Opcode.BINARY, self.raw)
            else:
                framed = _frame(Opcode.TEXT, str(codec.encode(self.map, "json")).encode())
            self._framed[fmt] = framed
        return framed


def _frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=False)


class Connection:
    """One client socket: who it is, what it watches, and what it has yet to receive.

    An update for an idle socket is written at once, with no task switch; only a
    socket whose transport is full gets a backlog, of one update per user, which
    its writer task sends as soon as the socket drains.
    """

    # Tens of thousands of these live at once: no per-instance __dict__.
    __slots__ = (
        "_pending",
        "_pending_self",
        "_pump",
        "coalesced",
        "device",
        "expiry",
        "fmt",
        "metrics",
        "ready",
        "self_ver",
        "send_timeout",
        "session",
        "tenant",
        "user",
        "watching",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        fmt: Format,
        *,
        tenant: TenantId,
        user: UserId,
        session: SessionId,
        device: Device,
        send_timeout: float,
        metrics: Metrics,
    ) -> None:
        self.ws = ws
        self.metrics = metrics
        self.fmt: Format = fmt
        self.tenant = tenant
        self.user = user
        self.session = session
        self.device = device
        self.send_timeout = send_timeout
        #: Watched user -> highest ver handed to this socket.
        self.watching: dict[UserId, int] = {}
        self._pending: dict[UserId, Update] = {}
        self._pending_self: Update | None = None
        #: The ver of the last Self map this socket was given.
        self.self_ver = -1
        #: The writer of the backlog; it exists only while there is one.
        self._pump: asyncio.Task[None] | None = None
        #: Set once the welcome went out: nothing may be written before it.
        self.ready = False
        self.coalesced = 0
        #: Closes the socket with 1008 when the token expires; an ``auth`` frame moves it.
        self.expiry: asyncio.TimerHandle | None = None

    def _writable(self) -> bool:
        """Whether a frame can go straight to the transport, in order."""
        ws = self.ws
        return (
            self.ready
            and not self._pending
            and self._pending_self is None
            and not ws.paused
            and ws.protocol.state is State.OPEN
        )

    def offer(self, user: UserId, update: Update) -> bool:
        """Hand the socket an update; True when it was written at once."""
        ver = update.map["ver"]
        known = self.watching.get(user)
        if known is None or ver <= known:
            return False
        self.watching[user] = ver
        if self._writable():
            self.ws.transport.write(update.framed(self.fmt))
            return True
        if user in self._pending:
            self.coalesced += 1
            self.metrics.coalesced.inc()
        self._pending[user] = update
        self._start_pump()
        return False

    def offer_self(self, update: Update) -> None:
        ver = update.map["ver"]
        if ver <= self.self_ver:
            return
        self.self_ver = ver
        if self._writable():
            self.ws.transport.write(update.framed(self.fmt))
            self.metrics.sent("self").inc()
            return
        self._pending_self = update
        self._start_pump()

    def start(self) -> None:
        """The welcome is out: updates may flow."""
        self.ready = True
        if self._pending or self._pending_self is not None:
            self._start_pump()

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self.expiry is not None:
            self.expiry.cancel()

    def _start_pump(self) -> None:
        if self.ready and self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._write_backlog())

    async def send(self, frame: dict[str, Any]) -> None:
        self.metrics.sent(frame["type"]).inc()
        await self.ws.send(codec.encode(frame, self.fmt))

    async def _write_backlog(self) -> None:
        """Write the backlog as the socket drains; close the socket if it stalls."""
        try:
            while self._pending or self._pending_self is not None:
                await asyncio.wait_for(self.ws.drain(), self.send_timeout)
                own, self._pending_self = self._pending_self, None
                batch, self._pending = self._pending, {}
                if own is not None:
                    await self._write(own.framed(self.fmt), "self")
                if len(batch) == 1:
                    (update,) = batch.values()
                    await self._write(update.framed(self.fmt), "presence")
                elif batch:
                    updates = list(batch.values())
                    for start in range(0, len(updates), BATCH):
                        chunk = updates[start : start + BATCH]
                        items = [{k: v for k, v in u.map.items() if k != "type"} for u in chunk]
                        frame = {"type": "presences", "items": items}
                        await self.ws.send(codec.encode(frame, self.fmt))
                        self.metrics.sent("presences").inc()
                self._delivered(batch.values())
        except ConnectionClosed:
            pass
        except TimeoutError:
            log.info("closing %s/%s: fell too far behind", self.tenant, self.user)
            self.metrics.slow_consumer_closes.inc()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(1013, "fell too far behind"), 5)
            self.ws.transport.abort()
        finally:
            self._pump = None

    async def _write(self, framed: bytes, kind: str) -> None:
        if self.ws.protocol.state is not State.OPEN:
            raise ConnectionClosed(None, None)
        self.ws.transport.write(framed)
        self.metrics.sent(kind).inc()
        await asyncio.wait_for(self.ws.drain(), self.send_timeout)

    def _delivered(self, updates: Iterable[Update]) -> None:
        now = time.time()
        count = 0
        for update in updates:
            count += 1
            if update.origin is not None:
                self.metrics.update_latency.observe(now - update.origin)
        self.metrics.deliveries.inc(count)


class Hub:
    def __init__(
        self, store: PresenceStore, pubsub_redis: Redis, node_channel: str, metrics: Metrics
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._redis = pubsub_redis
        self._node_channel = node_channel
        #: presence channel -> local connections watching that user
        self._watchers: dict[str, set[Connection]] = defaultdict(set)
        #: self channel -> local connections of that user
        self._owners: dict[str, set[Connection]] = defaultdict(set)
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._ready = asyncio.Event()
        self.connections: set[Connection] = set()

    @property
    def subscriptions(self) -> int:
        return len(self._watchers)

    # --- Who watches whom ------------------------------------------------------

    async def watch(self, conn: Connection, users: Iterable[UserId]) -> None:
        """Listen for ``users`` on conn's behalf; returns once Redis confirmed the subscription."""
        self._check_listening()
        new, waits = [], []
        for user in users:
            conn.watching.setdefault(user, -1)
            channel = keys.presence_channel(conn.tenant, user)
            watchers = self._watchers[channel]
            if not watchers:
                new.append(channel)
            elif channel in self._confirmed:
                waits.append(self._confirmed[channel])
            watchers.add(conn)
        self.metrics.subscriptions.set(len(self._watchers))
        await self._subscribe(new, waits)

    def unwatch(self, conn: Connection, users: Iterable[UserId]) -> None:
        gone = []
        for user in users:
            if conn.watching.pop(user, None) is None:
                continue
            channel = keys.presence_channel(conn.tenant, user)
            watchers = self._watchers.get(channel)
            if watchers is None:
                continue
            watchers.discard(conn)
            if not watchers:
                del self._watchers[channel]
                gone.append(channel)
        self.metrics.subscriptions.set(len(self._watchers))
        self._unsubscribe(gone)

    async def join(self, conn: Connection) -> None:
        """Register one of the user's own sessions, to receive their ``self`` updates."""
        self._check_listening()
        self.connections.add(conn)
        channel = keys.self_channel(conn.tenant, conn.user)
        owners = self._owners[channel]
        first = not owners
        owners.add(conn)
        if first:
            await self._subscribe([channel], [])
        elif channel in self._confirmed:
            await self._confirmed[channel]

    def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.unwatch(conn, list(conn.watching))
        channel = keys.self_channel(conn.tenant, conn.user)
        owners = self._owners.get(channel)
        if owners is not None:
            owners.discard(conn)
            if not owners:
                del self._owners[channel]
                self._unsubscribe([channel])

    def _check_listening(self) -> None:
        if not self._ready.is_set():
            raise StoreUnavailable("not listening on Redis; retry later")

    async def _subscribe(self, channels: list[str], waits: list[asyncio.Future[None]]) -> None:
        if channels:
            loop = asyncio.get_running_loop()
            for channel in channels:
                self._confirmed[channel] = loop.create_future()
            waits = waits + [self._confirmed[c] for c in channels]
            pubsub = self._pubsub
            if pubsub is not None and self._ready.is_set():
                try:
                    await pubsub.subscribe(*channels)
                except RedisError as exc:
                    # The listener resubscribes everything once it reconnects.
                    log.warning("subscribe deferred: %s", exc)
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), 30)

    def _unsubscribe(self, channels: list[str]) -> None:
        pubsub = self._pubsub
        if not channels or pubsub is None or not self._ready.is_set():
            return
        for channel in channels:
            fut = self._confirmed.pop(channel, None)
            if fut is not None and not fut.done():
                fut.cancel()
        task = asyncio.ensure_future(pubsub.unsubscribe(*channels))
        task.add_done_callback(_log_failure)

    # --- Listening ---------------------------------------------------------------

    async def run(self) -> None:
        """Listen on Redis until cancelled, reconnecting and resyncing after any outage."""
        backoff = 0.1
        first = True
        while True:
            pubsub = self._redis.pubsub()
            try:
                channels = [self._node_channel, *self._watchers, *self._owners]
                for start in range(0, len(channels), SUBSCRIBE_CHUNK):
                    await pubsub.subscribe(*channels[start : start + SUBSCRIBE_CHUNK])
                self._pubsub = pubsub
                self._ready.set()
                if not first:
                    log.info("listening on Redis again: resyncing %d users", len(self._watchers))
                    asyncio.get_running_loop().create_task(self._resync()).add_done_callback(
                        _log_failure
                    )
                first = False
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        self._dispatch(message)
            except (RedisError, OSError) as exc:
                self._ready.clear()
                self._pubsub = None
                log.warning("lost Redis pub/sub (%s); reconnecting in %.1f s", exc, backoff)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"].decode()
        if kind == "subscribe":
            fut = self._confirmed.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind != "message":
            return
        data: bytes = message["data"]
        if channel.endswith(":p"):
            watchers = self._watchers.get(channel)
            if watchers:
                update = Update.published(data)
                user = UserId(update.map["user"])
                written = 0
                for conn in watchers:
                    written += conn.offer(user, update)
                if written:
                    # Written to every idle socket at once: one observation for them all.
                    self.metrics.deliveries.inc(written)
                    self.metrics.sent("presence").inc(written)
                    if update.origin is not None:
                        self.metrics.update_latency.observe(time.time() - update.origin)
        elif channel.endswith(":s"):
            owners = self._owners.get(channel)
            if owners:
                update = Update.published(data)
                for conn in owners:
                    conn.offer_self(update)

    async def _resync(self) -> None:
        """Hand every watcher the current truth, after updates may have been missed."""
        # Subscriptions made while disconnected are confirmed by the resubscription.
        for channel, fut in list(self._confirmed.items()):
            if not fut.done():
                fut.set_result(None)
            self._confirmed.pop(channel, None)
        by_tenant: dict[TenantId, list[UserId]] = defaultdict(list)
        for channel in list(self._watchers):
            tenant, user = keys.channel_member(channel)
            by_tenant[tenant].append(user)
        try:
            for tenant, users in by_tenant.items():
                views = await self.store.views(tenant, users)
                for user, view in zip(users, views, strict=True):
                    frame = codec.presence_frame(user, view)
                    update = Update(msgpack.packb(frame), frame)
                    for conn in self._watchers.get(keys.presence_channel(tenant, user), ()):
                        conn.offer(user, update)
            for channel, owners in list(self._owners.items()):
                tenant, user = keys.channel_member(channel)
                state = await self.store.load(tenant, user)
                frame = codec.self_frame(self_view(state))
                update = Update(msgpack.packb(frame), frame)
                for conn in owners:
                    conn.offer_self(update)
        except StoreUnavailable as exc:
            log.warning("resync incomplete, Redis unavailable again: %s", exc)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background Redis call failed: %s", task.exception())
