"""Listening on Redis: one connection per server that serves a listened channel (one
on a single Redis, with SUBSCRIBE; one per master on a cluster, with SSUBSCRIBE, so
that each update crosses only its shard), subscriptions confirmed before they count,
and listening again after any outage, or after a slot moved to another shard. It
knows nothing of sockets: it hands each message to ``on_message`` and, once it
listens again after missing some, calls ``on_relisten``.

On a single Redis each listening connection subscribes, with every channel and in the
same command, a witness of that channel that only this connection ever subscribes
(the channel's name and the connection's tag). Redis runs a command whole, so the
connection has the channel exactly when it has its witness: a commit that names the
witness lets Redis tell whether anyone but this node listens to the channel
(``store/lua/commit.lua``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

import msgpack
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from presence_hub.errors import StoreUnavailable
from presence_hub.store import keys
from presence_hub.store.clients import RedisClient

__all__ = ["RELAYED", "Listener"]

log = logging.getLogger(__name__)

#: Even: a channel and its witness stay in one command.
SUBSCRIBE_CHUNK: Final = 1000
#: How long a subscription may wait for Redis to confirm it.
CONFIRM_TIMEOUT: Final = 30.0
#: The channel of a relay's messages that carry several updates: their channels and
#: messages in turn, packed with msgpack (``presence_hub.relay``).
RELAYED: Final = "presence-hub:relayed"


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
        tag: str | None = None,
    ) -> None:
        self.connection = connection
        self.sharded = sharded
        self._on_error = on_error
        #: Set on a single Redis: each channel goes with its witness, ``channel:tag``.
        self.tag = tag
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

    def witness(self, channel: str) -> str:
        return f"{channel}:{self.tag}"

    def _queue(self, command: str, channels: list[str]) -> None:
        # Before it connects, the subscription made on connecting covers everything.
        if not channels or not self.connected:
            return
        if self.tag is not None:
            # Each channel and its witness side by side: chunks of an even size keep
            # the pair in one command.
            channels = [c for channel in channels for c in (channel, self.witness(channel))]
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


class Listener:
    """The channels this node listens to, on whichever servers serve them."""

    def __init__(
        self,
        redis: RedisClient,
        on_message: Callable[[str, bytes], None],
        on_relisten: Callable[[], None],
        *,
        relays: Sequence[Redis] = (),
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """``relays``, when given, are listened to instead of Redis, channels split
        between them by partition (``presence_hub.relay``). ``on_lost`` is called when
        a listening connection fails."""
        #: Where the listening connections come from: its pool's settings on a single
        #: Redis, its map of slots to servers on a cluster.
        self._redis = redis
        self._relays = relays
        self._sharded = isinstance(redis, RedisCluster) and not relays
        self._on_message = on_message
        self._on_relisten = on_relisten
        self._on_lost = on_lost
        #: Every channel listened to (subscribed again after an outage).
        self.channels: set[str] = set()
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        #: Redis server name -> the connection listening there.
        self._shards: dict[str, _Shard] = {}
        #: Set when a listening connection fails or its slots move: listen anew.
        self._lost = asyncio.Event()
        self._ready = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def check_listening(self) -> None:
        if not self._ready.is_set():
            raise StoreUnavailable("not listening on Redis; retry later")

    async def subscribe(self, new: list[str], waiting: Iterable[str] = ()) -> None:
        """Listen to the ``new`` channels; returns once Redis confirmed them, and those
        of the ``waiting`` ones, subscribed earlier, that are still unconfirmed."""
        confirmed = self._confirmed
        waits = [confirmed[c] for c in waiting if c in confirmed]
        if new:
            loop = asyncio.get_running_loop()
            self.channels.update(new)
            for channel in new:
                confirmed[channel] = loop.create_future()
            waits.extend(confirmed[c] for c in new)
            if self._ready.is_set():
                # Should a connection fail first, listening anew subscribes everything.
                for shard, group in self._by_shard(new).items():
                    shard.subscribe(group)
        if waits:
            # Not gather(): a confirmation is shared by every socket waiting for that
            # channel, and one waiter's timeout or cancellation must not cancel it.
            _, pending = await asyncio.wait(waits, timeout=CONFIRM_TIMEOUT)
            if pending:
                raise TimeoutError(f"Redis did not confirm a subscription in {CONFIRM_TIMEOUT} s")

    def witness(self, channel: str) -> str:
        """The witness of ``channel`` on the connection listening now: it has a
        subscriber exactly while that connection has the channel. "" where it cannot
        tell (on a cluster or on relays) or nothing listens yet."""
        shard = self._shards.get("redis")
        if shard is None or shard.tag is None:
            return ""
        return shard.witness(channel)

    def unsubscribe(self, channels: list[str]) -> None:
        self.channels.difference_update(channels)
        if not channels:
            return
        if not self._ready.is_set():
            # Listening again: the connections being set up must drop them too, or a
            # later subscription would find them there and ask Redis for nothing.
            for shard in self._shards.values():
                shard.unsubscribe(channels)
            return
        for channel in channels:
            fut = self._confirmed.pop(channel, None)
            if fut is not None and not fut.done():
                fut.cancel()
        for shard, group in self._by_shard(channels).items():
            shard.unsubscribe(group)

    async def run(self) -> None:
        """Listen until cancelled, listening again after any outage and, on a cluster,
        after slots move to another shard."""
        backoff = 0.1
        first = True
        try:
            while True:
                self._lost.clear()
                try:
                    await self._listen_everywhere()
                    if not first:
                        self._relistened()
                    first = False
                    backoff = 0.1
                    await self._lost.wait()
                except (RedisError, OSError) as exc:
                    log.warning("cannot listen on Redis (%s); retrying in %.1f s", exc, backoff)
                    backoff = min(backoff * 2, 2.0)
                self._ready.clear()
                await self._close_shards()
                if self._on_lost is not None:
                    self._on_lost()
                await asyncio.sleep(backoff)
        finally:
            self._ready.clear()
            await self._close_shards()

    def _relistened(self) -> None:
        # Subscriptions made while disconnected are confirmed by the resubscription.
        for fut in self._confirmed.values():
            if not fut.done():
                fut.set_result(None)
        self._confirmed.clear()
        log.info("listening again to %d channels", len(self.channels))
        self._on_relisten()

    async def _listen_everywhere(self) -> None:
        """Connect to every server that serves a channel and subscribe there; then the
        listener is ready."""
        if self._relays:
            for n in range(len(self._relays)):
                self._shard_for(None, n)  # listen even before anyone watches
        elif isinstance(self._redis, RedisCluster):
            # The client's own start (once), then a fresh map of slots to servers.
            await self._redis.initialize()
            await self._redis.nodes_manager.initialize()
        else:
            self._shard_for(None)  # a single Redis: listen even before anyone watches
        for shard, group in self._by_shard(self.channels).items():
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

    def _by_shard(self, channels: Iterable[str]) -> dict[_Shard, list[str]]:
        """Channels grouped by the server that serves them, starting a listening
        connection to any server not listened to yet."""
        groups: dict[_Shard, list[str]] = defaultdict(list)
        for channel in channels:
            groups[self._shard_for(channel)].append(channel)
        return groups

    def _shard_for(self, channel: str | None, relay: int = 0) -> _Shard:
        # The flag set once, not isinstance() per channel: RedisCluster's metaclass is a
        # typing protocol's, whose check costs ten times a plain class's.
        kind: type[AbstractConnection]
        if self._relays:
            if channel is not None:
                relay = keys.channel_partition(channel) % len(self._relays)
            pool = self._relays[relay].connection_pool
            name, kind, settings = f"relay{relay}", pool.connection_class, pool.connection_kwargs
        elif self._sharded:
            assert channel is not None
            nodes = cast(RedisCluster, self._redis).nodes_manager
            node = nodes.get_node_from_slot(keys.key_slot(_tag(channel)))
            name, kind, settings = node.name, node.connection_class, node.connection_kwargs
        else:
            pool = cast(Redis, self._redis).connection_pool
            name, kind, settings = "redis", pool.connection_class, pool.connection_kwargs
        shard = self._shards.get(name)
        if shard is None:
            # No timeouts: a listener waits for messages as long as there are none.
            settings = {**settings, "socket_timeout": None, "health_check_interval": 0}
            shard = self._shards[name] = _Shard(
                kind(**settings),
                sharded=self._sharded,
                on_error=self._listener_failed,
                tag=uuid.uuid4().hex if name == "redis" else None,
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

    def _dispatch_for(self, shard: _Shard) -> Callable[[bytes, str, Any], None]:
        on_message = self._on_message

        relayed = bool(self._relays)

        def dispatch(kind: bytes, channel: str, data: Any) -> None:
            if kind in (b"message", b"smessage"):
                if relayed and channel == RELAYED:
                    updates = msgpack.unpackb(data)
                    for n in range(0, len(updates), 2):
                        on_message(updates[n], updates[n + 1])
                else:
                    on_message(channel, data)
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


def _tag(channel: str) -> str:
    return channel[channel.index("{") + 1 : channel.index("}")]
