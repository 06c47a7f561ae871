"""Who on this node watches whom: the node listens on Redis (``store.pubsub``) only
for the users that its own sockets watch (a channel is subscribed with its first
watcher and released with its last), and hands each update to its watchers'
connections (``delivery``).

On a Redis Cluster the node listens with sharded pub/sub, one connection per
master that owns a watched user. When a listening connection drops, or a slot
moves to another shard, the node listens again wherever the channels now are
and re-reads the state of every watched user, so subscribers end with the truth
whatever was published meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis

from presence_hub import codec
from presence_hub.delivery import STORM_RATE, Connection, Flusher, Update, Watchers
from presence_hub.errors import StoreUnavailable
from presence_hub.ids import TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.model import View
from presence_hub.rules import self_view
from presence_hub.store import PresenceStore, keys
from presence_hub.store.clients import RedisClient
from presence_hub.store.pubsub import Listener

__all__ = ["Hub"]

log = logging.getLogger(__name__)


class Hub:
    def __init__(
        self,
        store: PresenceStore,
        listen_redis: RedisClient,
        metrics: Metrics,
        *,
        storm_rate: int = STORM_RATE,
        relays: Sequence[Redis] = (),
    ) -> None:
        """``relays``: the node's relays to listen to instead of Redis (``presence_hub.relay``)."""
        self.store = store
        self.metrics = metrics
        self.listener = Listener(listen_redis, self._deliver, self._relistened, relays=relays)
        #: presence channel -> the local watchers of that user
        self._watchers: dict[str, Watchers] = {}
        #: tenant -> watched user -> (the user id, interned; its channel; the same
        #: watchers as in ``_watchers``)
        self._watched: dict[TenantId, dict[UserId, tuple[UserId, str, Watchers]]] = {}
        #: self channel -> local connections of that user
        self._owners: dict[str, set[Connection]] = defaultdict(set)
        self.connections: set[Connection] = set()
        self.flusher = Flusher(metrics, storm_rate)

    @property
    def subscriptions(self) -> int:
        return len(self._watchers)

    async def run(self) -> None:
        """Listen on Redis until cancelled (see ``Listener.run``)."""
        await self.listener.run()

    async def wait_ready(self) -> None:
        await self.listener.wait_ready()

    # --- Who watches whom ------------------------------------------------------

    async def watch(self, conn: Connection, users: Iterable[UserId]) -> None:
        """Listen for ``users`` on conn's behalf; returns once Redis confirmed the subscription."""
        listener = self.listener
        listener.check_listening()
        watching = conn.watching
        watched = self._watched.setdefault(conn.tenant, {})
        new: list[str] = []
        waiting: list[str] = []
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
                watchers = {conn: -1}
                watched[user] = (user, channel, watchers)
                self._watchers[channel] = watchers
                new.append(channel)
            else:
                user, channel, watchers = entry
                # It may still wait for Redis' confirmation: the listener knows.
                waiting.append(channel)
                watchers.setdefault(conn, -1)
            watching[user] = watchers
        self.metrics.subscriptions.set(len(self._watchers))
        if new or waiting:
            await listener.subscribe(new, waiting)

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
            _, channel, watchers = entry
            watchers.pop(conn, None)
            if not watchers:
                del watched[user]
                del self._watchers[channel]
                gone.append(channel)
        if not watched:
            self._watched.pop(conn.tenant, None)
        self.metrics.subscriptions.set(len(self._watchers))
        self.listener.unsubscribe(gone)

    async def join(self, conn: Connection) -> None:
        """Register one of the user's own sessions, to receive their ``self`` updates."""
        self.listener.check_listening()
        self.connections.add(conn)
        channel = keys.self_channel(conn.tenant, conn.user)
        owners = self._owners[channel]
        first = not owners
        owners.add(conn)
        if first:
            await self.listener.subscribe([channel])
        else:
            await self.listener.subscribe([], [channel])

    def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.unwatch(conn, list(conn.watching))
        channel = keys.self_channel(conn.tenant, conn.user)
        owners = self._owners.get(channel)
        if owners is not None:
            owners.discard(conn)
            if not owners:
                del self._owners[channel]
                self.listener.unsubscribe([channel])

    # --- Updates ---------------------------------------------------------------------

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

    # --- What this node commits (store.LocalSessions) ---------------------------------

    def hand_self(
        self,
        tenant: TenantId,
        user: UserId,
        packed: bytes,
        frame: dict[str, Any],
        origin: float | None,
    ) -> None:
        """A Self frame the node just committed, for the user's sessions here (the
        published copy, when it comes, is stale by then and dropped)."""
        owners = self._owners.get(keys.self_channel(tenant, user))
        if owners:
            update = Update(packed, frame, origin)
            for conn in owners:
                conn.offer_self(update)

    def hand_presence(
        self,
        tenant: TenantId,
        user: UserId,
        packed: bytes,
        frame: dict[str, Any],
        origin: float | None,
    ) -> None:
        """A presence frame the node just committed, for the user's watchers here."""
        entry = self._watched.get(tenant, {}).get(user)
        if entry is not None:
            interned, _, watchers = entry
            Connection.offer(watchers, interned, Update(packed, frame, origin))
            if origin is not None:
                self.flusher.arrived(origin)

    def witness(self, tenant: TenantId, user: UserId) -> str:
        entry = self._watched.get(tenant, {}).get(user)
        return "" if entry is None else self.listener.witness(entry[1])

    def _relistened(self) -> None:
        log.info("listening again: resyncing %d users", len(self._watchers))
        asyncio.get_running_loop().create_task(self._resync()).add_done_callback(_log_failure)

    async def _resync(self) -> None:
        """Hand every watcher the current truth, after updates may have been missed."""
        try:
            for tenant, watched in list(self._watched.items()):
                entries = list(watched.values())
                stored = await self.store.frames(tenant, [user for user, _, _ in entries])
                for (user, _, watchers), raw in zip(entries, stored, strict=True):
                    # Forwarded as stored, as a published update is.
                    if raw is None:
                        frame = codec.presence_frame(user, View())
                        update = Update(codec.pack(frame), frame)
                    else:
                        update = Update(raw, codec.unpack(raw))
                    Connection.offer(watchers, user, update)
            for owners in list(self._owners.values()):
                if not owners:
                    continue
                some = next(iter(owners))
                state = await self.store.load(some.tenant, some.user)
                frame = codec.self_frame(self_view(state))
                update = Update(codec.pack(frame), frame)
                for conn in owners:
                    conn.offer_self(update)
        except StoreUnavailable as exc:
            log.warning("resync incomplete, Redis unavailable again: %s", exc)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background Redis call failed: %s", task.exception())
