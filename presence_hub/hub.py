"""Who on this node watches whom, and the Redis side of the fan-out (the socket side
is ``delivery``).

The node listens on Redis only for the users that its own sockets watch (a
channel is subscribed with its first watcher and released with its last), and
hands each update to its watchers' connections.

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
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from presence_hub import codec
from presence_hub.delivery import STORM_RATE, Connection, Flusher, Update
from presence_hub.errors import StoreUnavailable
from presence_hub.ids import TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.rules import self_view
from presence_hub.store import PresenceStore, keys
from presence_hub.store.store import RedisClient

__all__ = ["Hub"]

log = logging.getLogger(__name__)

SUBSCRIBE_CHUNK: Final = 1000


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
