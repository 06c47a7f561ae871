"""Who on this node watches whom, and the fan-out of updates from Redis to sockets.

The node listens on Redis only for the users that its own sockets watch (a
channel is subscribed with its first watcher and released with its last).
Each update is decoded once and framed at most once per frame format, then
handed to every local watcher without waiting for any socket: a socket keeps at
most one pending update per user (the newest ``ver`` wins), and the flusher
writes each socket's pending updates in one ``send()`` at the end of the pass.
A socket that cannot take them gets a writer task of its own that writes them
once it drains. A slow socket delays nobody else and its backlog is bounded by
its subscription count; one whose writes stall longer than ``send_timeout`` is
closed with 1013.

On a Redis Cluster the node listens with sharded pub/sub, one connection per
master that owns a watched user. When a listening connection drops, or a slot
moves to another shard, the node listens again wherever the channels now are
and re-reads the state of every watched user, so subscribers end with the truth
whatever was published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
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
from presence_hub.store.store import RedisClient

__all__ = ["Connection", "Hub"]

log = logging.getLogger(__name__)

#: Items per ``presences`` frame, so a coalesced backlog never makes one huge frame.
BATCH: Final = 500
SUBSCRIBE_CHUNK: Final = 1000
#: Updates per socket per flush, had no flush been held back, from which the node is
#: behind: its flushes are then spaced out.
BEHIND: Final = 2.0
#: Sockets opened per second from which the node is in a connect storm (the default of
#: ``--storm-rate``), counted over STORM_WINDOW seconds, and how long its flushes are then
#: spaced out. A short window: the storm's holds end soon after its last arrival.
STORM_RATE: Final = 300
STORM_WINDOW: Final = 0.25
STORM_HOLD: Final = 0.25
#: Looked up once: an enum member read through its class costs more than a write's checks.
_OPEN: Final = State.OPEN


class Update:
    """One published frame, encoded and framed at most once per format however many
    sockets get it: server frames are not masked, so the same bytes go to every socket."""

    __slots__ = ("_framed", "map", "origin", "raw", "ver")

    def __init__(self, raw: bytes, frame: dict[str, Any], origin: float | None = None) -> None:
        self.raw = raw
        self.map = frame
        self.ver: int = frame["ver"]
        #: When the input that caused it arrived (None for a resync).
        self.origin = origin
        self._framed: dict[Format, bytes] = {}

    @classmethod
    def published(cls, data: bytes) -> Update:
        origin, raw = codec.unsealed(data)
        return cls(raw, codec.unpack(raw), origin)

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


class Flusher:
    """Writes what one pass of the event loop handed each socket, in one ``send()``.

    The ``send()`` is the largest single cost of a delivery (``bench/bench.py floor``),
    so a socket given several updates in one pass (a busy node reads many published
    updates per pass) pays for one; an idle node adds one pass of delay. A node that
    falls behind spaces its flushes out, so that each ``send()`` carries more updates.
    So does a node in a connect storm (``storm_rate`` sockets opened per second, counted
    over ``STORM_WINDOW`` seconds; 0 for never): each arrival's presence goes to every
    watcher already connected, a ``send()`` each, and those sends slow the arrivals down.
    Held back ``storm_hold`` seconds, a socket's updates share one; presence moves up to
    about that much late while the storm lasts.
    """

    __slots__ = (
        "_coalesced",
        "_due",
        "_held",
        "_last_end",
        "_metrics",
        "_not_before",
        "_opened",
        "_origins",
        "_queued",
        "_storm_hold",
        "_storm_opens",
    )

    def __init__(
        self, metrics: Metrics, storm_rate: int = STORM_RATE, storm_hold: float = STORM_HOLD
    ) -> None:
        self._metrics = metrics
        #: Sockets opened within STORM_WINDOW seconds that make a storm; None: never.
        self._storm_opens = math.ceil(storm_rate * STORM_WINDOW) if storm_rate > 0 else None
        self._storm_hold = storm_hold
        #: Loop times of the sockets opened within the last STORM_WINDOW seconds.
        self._opened: deque[float] = deque()
        self._queued: list[Connection] = []
        #: When the inputs behind this pass's updates arrived, for the latency metric.
        self._origins: list[float] = []
        self._due = False
        #: Updates replaced by a newer one of the same user before their write.
        self._coalesced = 0
        #: Loop time before which the next flush does not run, how long that holds it
        #: back after the last one, and when the last one ended.
        self._not_before = 0.0
        self._held = 0.0
        self._last_end = 0.0

    def opened(self) -> None:
        """A socket was opened (counted towards a connect storm)."""
        now = asyncio.get_running_loop().time()
        self._opened.append(now)
        self._forget_opened_before(now - STORM_WINDOW)

    def _in_storm(self, now: float) -> bool:
        self._forget_opened_before(now - STORM_WINDOW)
        return self._storm_opens is not None and len(self._opened) >= self._storm_opens

    def _forget_opened_before(self, then: float) -> None:
        opened = self._opened
        while opened and opened[0] < then:
            opened.popleft()

    def add(self, conn: Connection) -> None:
        self._queued.append(conn)
        self._schedule()

    def arrived(self, origin: float) -> None:
        """An update whose input arrived at ``origin`` is being handed out in this pass."""
        self._origins.append(origin)
        self._schedule()

    def coalesce(self) -> None:
        """Count a coalesced update (one metric update per pass, not per update)."""
        self._coalesced += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._due:
            self._due = True
            loop = asyncio.get_running_loop()
            wait = self._not_before - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._due = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        queued, self._queued = self._queued, []
        origins, self._origins = self._origins, []
        written = writes = 0
        for conn in queued:
            try:
                count = conn.flush()
            except Exception:  # one broken socket must not hold up the others
                log.exception("writing to %s/%s failed", conn.tenant, conn.user)
                continue
            written += count
            writes += count > 0
        if written:
            self._metrics.deliveries.inc(written)
            self._metrics.update_writes.inc(writes)
            self._metrics.sent("presence").inc(written)
        if self._coalesced:
            self._metrics.coalesced.inc(self._coalesced)
            self._coalesced = 0
        # A node that is behind (its sockets get several updates between two flushes
        # even without holding any back) spaces its flushes out: the next waits three
        # times as long as this one took, so that each send() carries more updates and
        # taking changes in keeps three quarters of the time. Whether it is behind is
        # judged on the part of the interval that was not held back, so a node that
        # catches up stops waiting at once; one that keeps up never waits.
        finished = loop.time()
        interval = finished - self._last_end
        unheld = 1.0 - self._held / interval if interval > 0 else 1.0
        behind = bool(queued) and written / len(queued) * unheld >= BEHIND
        self._held = 3 * (finished - started) if behind else 0.0
        if self._in_storm(finished):
            self._held = max(self._held, self._storm_hold)
            self._metrics.storm_holds.inc()
        self._not_before = finished + self._held
        self._last_end = finished
        # One observation per update, not per socket: they were all written just now.
        now = time.time()
        for origin in origins:
            self._metrics.update_latency.observe(now - origin)


class Connection:
    """One client socket: who it is, what it watches, and what it has yet to receive.

    Updates wait in ``_pending``, one per watched user (a newer one replaces an older
    one), until the ``Flusher`` writes them all at the end of the pass, with no task
    switch. Only a socket whose transport is full gets a writer task, which sends
    its backlog as soon as the socket drains, or closes it if it never does.
    """

    # Tens of thousands of these live at once: no per-instance __dict__.
    __slots__ = (
        "_pending",
        "_pending_self",
        "_pump",
        "_scheduled",
        "coalesced",
        "device",
        "expiry",
        "flusher",
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
        flusher: Flusher,
    ) -> None:
        self.ws = ws
        self.metrics = metrics
        self.flusher = flusher
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
        #: Whether the flusher or the writer task will take ``_pending``.
        self._scheduled = False
        #: The writer of the backlog; it exists only while there is one.
        self._pump: asyncio.Task[None] | None = None
        #: Set once the welcome went out: nothing may be written before it.
        self.ready = False
        self.coalesced = 0
        #: Closes the socket with 1008 when the token expires; an ``auth`` frame moves it.
        self.expiry: asyncio.TimerHandle | None = None

    @staticmethod
    def offer(conns: Iterable[Connection], user: UserId, update: Update) -> None:
        """Hand each socket an update of a user it watches, unless it has a newer one.

        One call for all of a user's watchers, not one per socket: at saturation this
        loop runs 150,000 times a second and a call per socket was a tenth of it."""
        ver = update.ver
        for conn in conns:
            known = conn.watching.get(user)
            if known is None or ver <= known:
                continue
            conn.watching[user] = ver
            pending = conn._pending
            if user in pending:
                conn.coalesced += 1
                conn.flusher.coalesce()
            pending[user] = update
            if not conn._scheduled:
                conn._schedule()

    def offer_self(self, update: Update) -> None:
        if update.ver <= self.self_ver:
            return
        self.self_ver = update.ver
        self._pending_self = update
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        if self.ready:
            self._scheduled = True
            self.flusher.add(self)

    def flush(self) -> int:
        """Write everything pending in one go, unless the socket is full; returns the
        number of presence updates written."""
        ws = self.ws
        if ws.protocol.state is not _OPEN:
            return 0
        if ws.paused:
            self._pump = asyncio.get_running_loop().create_task(self._write_backlog())
            return 0
        self._scheduled = False
        own, self._pending_self = self._pending_self, None
        batch, self._pending = self._pending, {}
        fmt = self.fmt
        if own is None and len(batch) == 1:
            # The usual case below saturation: one update, no list to build.
            (update,) = batch.values()
            ws.transport.write(update.framed(fmt))
            return 1
        frames = [update.framed(fmt) for update in batch.values()]
        if own is not None:
            frames.append(own.framed(fmt))
            self.metrics.sent("self").inc()
        ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        return len(batch)

    def start(self, welcomed_ver: int) -> None:
        """The welcome is out, with the user's Self map at ``welcomed_ver``: updates may
        flow, except a Self update that the welcome already carried."""
        self.ready = True
        if self._pending_self is not None and self._pending_self.ver <= welcomed_ver:
            self._pending_self = None
        if self._pending or self._pending_self is not None:
            self._schedule()

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self.expiry is not None:
            self.expiry.cancel()

    async def send(self, frame: dict[str, Any]) -> None:
        """One frame, written straight to the socket; only a full socket goes through
        websockets' ``send()``, which waits for it to drain."""
        self.metrics.sent(frame["type"]).inc()
        ws = self.ws
        if ws.paused or ws.protocol.state is not _OPEN:
            await ws.send(codec.encode(frame, self.fmt))
        else:
            ws.transport.write(self._framed(frame))

    async def send_all(self, frames: list[dict[str, Any]]) -> None:
        """Several frames in one write, in order (a producer's replies to a batch of
        events: one ``send()`` instead of one per reply)."""
        if self.ws.protocol.state is not _OPEN:
            raise ConnectionClosed(None, None)
        self.ws.transport.write(b"".join([self._framed(f) for f in frames]))
        for frame in frames:
            self.metrics.sent(frame["type"]).inc()
        await asyncio.wait_for(self.ws.drain(), self.send_timeout)

    def _framed(self, frame: dict[str, Any]) -> bytes:
        if self.fmt == "msgpack":
            return _frame(Opcode.BINARY, codec.pack(frame))
        return _frame(Opcode.TEXT, str(codec.encode(frame, "json")).encode())

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
                        frame = codec.presences_frame([u.map for u in chunk])
                        await self.ws.send(codec.encode(frame, self.fmt))
                        self.metrics.sent("presences").inc()
                self._delivered(batch.values())
        except ConnectionClosed:
            pass
        except TimeoutError:
            await self.close_stalled()
        finally:
            self._pump = None
            self._scheduled = False

    async def close_stalled(self) -> None:
        """Close a socket whose peer stopped reading for ``send_timeout`` seconds."""
        log.info("closing %s/%s: fell too far behind", self.tenant, self.user)
        self.metrics.slow_consumer_closes.inc()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(1013, "fell too far behind"), 5)
        self.ws.transport.abort()

    async def _write(self, framed: bytes, kind: str) -> None:
        if self.ws.protocol.state is not _OPEN:
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


class _Shard:
    """One connection to one Redis server, listening to the channels it serves.

    On a single Redis there is one, with SUBSCRIBE; on a cluster one per master that
    owns a watched user, with SSUBSCRIBE, so that each update crosses only its shard.
    A reader task reads replies and messages; (un)subscriptions are recorded at once
    and written by a writer task strictly in the order they were asked for, so that a
    channel dropped and watched again in quick succession ends subscribed."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        sharded: bool,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.connection = connection
        self.sharded = sharded
        self._on_error = on_error
        #: The channels subscribed on it, or to subscribe once it is connected.
        self.channels: set[str] = set()
        #: Unsubscriptions sent whose confirmations have not come back yet.
        self.leaving: Counter[str] = Counter()
        self.connected = False
        #: Set once connected and subscribed to the channels asked for so far.
        self.up = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self._outbox: deque[tuple[str, list[str]]] = deque()
        self._writer: asyncio.Task[None] | None = None

    def subscribe(self, channels: Iterable[str]) -> None:
        new = [c for c in channels if c not in self.channels]
        self.channels.update(new)
        self._queue("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", new)

    def unsubscribe(self, channels: Iterable[str]) -> None:
        gone = [c for c in channels if c in self.channels]
        self.channels.difference_update(gone)
        if self.connected:
            self.leaving.update(gone)
        self._queue("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", gone)

    def _queue(self, command: str, channels: list[str]) -> None:
        # Before it connects, the subscription made on connecting covers everything.
        if not channels or not self.connected:
            return
        self._outbox.append((command, channels))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._outbox:
                command, first = self._outbox.popleft()
                # Requests of one kind in a row go as one command: in a connect storm
                # every socket asks for its own user's channel, one request each.
                channels = list(first)
                while self._outbox and self._outbox[0][0] == command:
                    channels.extend(self._outbox.popleft()[1])
                for group in self._groups(channels):
                    await self.connection.send_command(command, *group)
        except (RedisError, OSError) as exc:
            self._on_error(exc)
        finally:
            self._writer = None

    def _groups(self, channels: list[str]) -> Iterable[list[str]]:
        if self.sharded:
            # One command's shard channels must share a slot: one command per partition.
            by_slot: dict[int, list[str]] = defaultdict(list)
            for channel in channels:
                by_slot[keys.key_slot(_tag(channel))].append(channel)
            return by_slot.values()
        return (channels[n : n + SUBSCRIBE_CHUNK] for n in range(0, len(channels), SUBSCRIBE_CHUNK))

    async def listen(self, dispatch: Callable[[bytes, str, Any], None]) -> None:
        """Connect, subscribe what was asked so far, then hand every reply to ``dispatch``
        until the connection fails."""
        await self.connection.connect()  # type: ignore[no-untyped-call]
        self.connected = True
        self._queue("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", list(self.channels))
        self.up.set()
        read = self.connection.read_response
        while True:
            kind, channel, data = await read()
            dispatch(kind, channel.decode(), data)

    async def close(self) -> None:
        self.connected = False
        for task in (self.reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self.connection.disconnect()


class Hub:
    def __init__(
        self,
        store: PresenceStore,
        listen_redis: RedisClient,
        metrics: Metrics,
        *,
        storm_rate: int = STORM_RATE,
    ) -> None:
        self.store = store
        self.metrics = metrics
        #: Where the listening connections come from: its pool's settings on a single
        #: Redis, its map of slots to servers on a cluster.
        self._redis = listen_redis
        self._sharded = isinstance(listen_redis, RedisCluster)
        #: presence channel -> local connections watching that user
        self._watchers: dict[str, set[Connection]] = {}
        #: tenant -> watched user -> (the user id, interned; its channel; the same set
        #: of connections as in ``_watchers``)
        self._watched: dict[TenantId, dict[UserId, tuple[UserId, str, set[Connection]]]] = {}
        #: self channel -> local connections of that user
        self._owners: dict[str, set[Connection]] = defaultdict(set)
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        #: Redis server name -> the connection listening there.
        self._shards: dict[str, _Shard] = {}
        #: Set when a listening connection fails or its slots move: listen anew.
        self._lost = asyncio.Event()
        self._ready = asyncio.Event()
        self.connections: set[Connection] = set()
        self.flusher = Flusher(metrics, storm_rate)

    @property
    def subscriptions(self) -> int:
        return len(self._watchers)

    # --- Who watches whom ------------------------------------------------------

    async def watch(self, conn: Connection, users: Iterable[UserId]) -> None:
        """Listen for ``users`` on conn's behalf; returns once Redis confirmed the subscription."""
        self._check_listening()
        watching, confirmed = conn.watching, self._confirmed
        watched = self._watched.setdefault(conn.tenant, {})
        new: list[str] = []
        waits: list[asyncio.Future[None]] = []
        # Fifty users per subscribing socket: a connect storm runs this loop half a
        # million times, mostly for users watched already, which cost one lookup.
        for user in users:
            entry = watched.get(user)
            if entry is None:
                # Interned, as are the user ids of published updates: the fan-out looks
                # each update's user up in every watcher's map, and equal ids that are
                # one object compare at once.
                user = UserId(sys.intern(user))
                channel = keys.presence_channel(conn.tenant, user)
                conns = {conn}
                watched[user] = (user, channel, conns)
                self._watchers[channel] = conns
                new.append(channel)
            else:
                user, channel, conns = entry
                if channel in confirmed:
                    waits.append(confirmed[channel])
                conns.add(conn)
            if user not in watching:
                watching[user] = -1
        self.metrics.subscriptions.set(len(self._watchers))
        if new or waits:
            await self._subscribe(new, waits)

    def unwatch(self, conn: Connection, users: Iterable[UserId]) -> None:
        watching = conn.watching
        watched = self._watched.get(conn.tenant, {})
        gone = []
        for user in users:
            if watching.pop(user, None) is None:
                continue
            entry = watched.get(user)
            if entry is None:
                continue
            _, channel, conns = entry
            conns.discard(conn)
            if not conns:
                del watched[user]
                del self._watchers[channel]
                gone.append(channel)
        if not watched:
            self._watched.pop(conn.tenant, None)
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
            if self._ready.is_set():
                # Should a connection fail first, listening anew subscribes everything.
                for shard, group in self._by_shard(channels).items():
                    shard.subscribe(group)
        if waits:
            # Not gather(): a confirmation is shared by every socket waiting for that
            # channel, and one waiter's timeout or cancellation must not cancel it.
            _, pending = await asyncio.wait(waits, timeout=30)
            if pending:
                raise TimeoutError("Redis did not confirm a subscription in 30 s")

    def _unsubscribe(self, channels: list[str]) -> None:
        if not channels or not self._ready.is_set():
            return
        for channel in channels:
            fut = self._confirmed.pop(channel, None)
            if fut is not None and not fut.done():
                fut.cancel()
        for shard, group in self._by_shard(channels).items():
            shard.unsubscribe(group)

    def _by_shard(self, channels: Iterable[str]) -> dict[_Shard, list[str]]:
        """Channels grouped by the server that serves them, starting a listening
        connection to any server this node does not listen to yet."""
        groups: dict[_Shard, list[str]] = defaultdict(list)
        for channel in channels:
            groups[self._shard_for(channel)].append(channel)
        return groups

    def _shard_for(self, channel: str | None) -> _Shard:
        # The flag set once, not isinstance() per channel: RedisCluster's metaclass is a
        # typing protocol's, whose check costs ten times a plain class's.
        if self._sharded:
            assert channel is not None
            nodes = cast(RedisCluster, self._redis).nodes_manager
            node = nodes.get_node_from_slot(keys.key_slot(_tag(channel)))
            name, settings = node.name, node.connection_kwargs
            kind: type[AbstractConnection] = node.connection_class
        else:
            pool = cast(Redis, self._redis).connection_pool
            name, kind, settings = "redis", pool.connection_class, pool.connection_kwargs
        shard = self._shards.get(name)
        if shard is None:
            # No timeouts: a listener waits for messages as long as there are none.
            settings = {**settings, "socket_timeout": None, "health_check_interval": 0}
            shard = self._shards[name] = _Shard(
                kind(**settings), sharded=self._sharded, on_error=self._listener_failed
            )
            shard.reader = asyncio.get_running_loop().create_task(self._listen(shard))
        return shard

    async def _listen(self, shard: _Shard) -> None:
        try:
            await shard.listen(self._dispatch_for(shard))
        except (RedisError, OSError, ValueError) as exc:
            self._listener_failed(exc)

    def _listener_failed(self, exc: BaseException) -> None:
        if self._ready.is_set():
            log.warning("lost Redis pub/sub (%s)", exc)
        self._lost.set()

    # --- Listening ---------------------------------------------------------------

    async def run(self) -> None:
        """Listen on Redis until cancelled, reconnecting and resyncing after any outage
        and, on a cluster, after slots move to another shard."""
        backoff = 0.1
        first = True
        try:
            while True:
                self._lost.clear()
                try:
                    await self._listen_everywhere()
                    if not first:
                        log.info("listening again: resyncing %d users", len(self._watchers))
                        asyncio.get_running_loop().create_task(self._resync()).add_done_callback(
                            _log_failure
                        )
                    first = False
                    backoff = 0.1
                    await self._lost.wait()
                except (RedisError, OSError) as exc:
                    log.warning("cannot listen on Redis (%s); retrying in %.1f s", exc, backoff)
                    backoff = min(backoff * 2, 2.0)
                self._ready.clear()
                await self._close_shards()
                await asyncio.sleep(backoff)
        finally:
            self._ready.clear()
            await self._close_shards()

    async def _listen_everywhere(self) -> None:
        """Connect to every server that serves a watched channel and subscribe there;
        then the node is ready."""
        if isinstance(self._redis, RedisCluster):
            # The client's own start (once), then a fresh map of slots to servers.
            await self._redis.initialize()
            await self._redis.nodes_manager.initialize()
        else:
            self._shard_for(None)  # a single Redis: listen even before anyone watches
        for shard, group in self._by_shard([*self._watchers, *self._owners]).items():
            shard.subscribe(group)
        shards = list(self._shards.values())

        async def all_up() -> None:
            for shard in shards:
                await shard.up.wait()

        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        # A task, not gather(): a gather cancelled here holds a CancelledError that
        # nobody retrieves, and asyncio logs it with a traceback at every retry.
        up: asyncio.Future[Any] = asyncio.ensure_future(all_up())
        try:
            await asyncio.wait([lost, up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            up.cancel()
        if self._lost.is_set():
            raise RedisConnectionError("a listening connection failed while connecting")
        self._ready.set()

    async def _close_shards(self) -> None:
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def _dispatch_for(self, shard: _Shard) -> Callable[[bytes, str, Any], None]:
        def dispatch(kind: bytes, channel: str, data: Any) -> None:
            if kind in (b"message", b"smessage"):
                self._deliver(channel, data)
            elif kind in (b"subscribe", b"ssubscribe"):
                fut = self._confirmed.pop(channel, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == b"sunsubscribe":
                expected = shard.leaving.pop(channel, 0)
                if expected > 1:
                    shard.leaving[channel] = expected - 1
                elif not expected:
                    # Redis unsubscribed us itself: the channel's slot moved to another shard.
                    log.info("slot of %s moved; listening again", channel)
                    self._lost.set()

        return dispatch

    def _deliver(self, channel: str, data: bytes) -> None:
        if channel.endswith(":p"):
            watchers = self._watchers.get(channel)
            if watchers:
                update = Update.published(data)
                user = UserId(sys.intern(update.map["user"]))
                Connection.offer(watchers, user, update)
                if update.origin is not None:
                    self.flusher.arrived(update.origin)
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
                    update = Update(codec.pack(frame), frame)
                    channel = keys.presence_channel(tenant, user)
                    Connection.offer(self._watchers.get(channel, ()), user, update)
            for channel, owners in list(self._owners.items()):
                tenant, user = keys.channel_member(channel)
                state = await self.store.load(tenant, user)
                frame = codec.self_frame(self_view(state))
                update = Update(codec.pack(frame), frame)
                for conn in owners:
                    conn.offer_self(update)
        except StoreUnavailable as exc:
            log.warning("resync incomplete, Redis unavailable again: %s", exc)


def _tag(channel: str) -> str:
    return channel[channel.index("{") + 1 : channel.index("}")]


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background Redis call failed: %s", task.exception())
