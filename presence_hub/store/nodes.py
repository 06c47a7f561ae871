"""Node leases: a node that stops renewing its lease is dead, and its sessions expire.

Each node keeps its lease in the sorted set ``ph:nodes`` (node id -> expiry)
and the sessions it holds in ``ph:node:ID:sessions`` (session id -> tenant:user).
Any live node reaps a dead one: it claims the dead node like a due timer, ends
each of its sessions with ``SessionExpired``, then forgets the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, cast

from presence_hub.errors import StoreUnavailable
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.model import SessionExpired
from presence_hub.store import keys
from presence_hub.store.clients import RedisClient, redis_errors
from presence_hub.store.scripts import ScriptBatcher, register_script
from presence_hub.store.store import PresenceStore

__all__ = ["NODES_KEY", "NodeRegistry"]

NODES_KEY: Final = "ph:nodes"


def _sessions_key(node: str) -> str:
    return f"ph:node:{node}:sessions"


class NodeRegistry:
    def __init__(
        self,
        redis: RedisClient,
        node: str,
        lease: float,
        *,
        lease_redis: RedisClient | None = None,
        batcher: ScriptBatcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``batcher``, when given, carries the session index's script calls (the
        store's, so that a pass of the event loop sends one pipeline)."""
        self.redis = redis
        #: Renewals go through their own connections when given: under overload they
        #: must not queue behind thousands of commits and arrive after the lease ran out.
        self._lease_redis = lease_redis or redis
        self.node = node
        self.lease = lease
        self._clock = clock
        self._claim = register_script(redis, "claim_timers.lua")
        self._index = register_script(redis, "session_index.lua")
        #: Sessions open and close by the thousand in a connect storm or a mass
        #: disconnect: those of one pass of the event loop share one pipeline.
        self._batched = batcher or ScriptBatcher(redis)
        #: Since when this node's renewals have all succeeded (None after a failure).
        self._holding_since: float | None = None

    @property
    def renew_every(self) -> float:
        return self.lease / 6

    def _expiry(self) -> float:
        # Dead for 2/3 of the lease, plus a reaper's round, is still within the lease.
        return self._clock() + self.lease * 2 / 3

    async def register(self) -> None:
        with redis_errors():
            await self._lease_redis.zadd(NODES_KEY, {self.node: self._expiry()})
        self._holding_since = self._clock()

    async def renew(self) -> bool:
        """False when another node already declared this one dead."""
        try:
            with redis_errors():
                changed = await self._lease_redis.zadd(
                    NODES_KEY, {self.node: self._expiry()}, xx=True, ch=True
                )
        except StoreUnavailable:
            self._holding_since = None
            raise
        if self._holding_since is None:
            self._holding_since = self._clock()
        return bool(changed)

    async def deregister(self) -> None:
        await self._forget(self.node)

    async def add_session(self, session: SessionId, tenant: TenantId, user: UserId) -> None:
        with redis_errors():
            member = keys.member(tenant, user)
            await self._batched((self._index, [_sessions_key(self.node)], [session, member]))

    async def remove_session(self, session: SessionId) -> None:
        with redis_errors():
            await self._batched((self._index, [_sessions_key(self.node)], [session, ""]))

    async def reap(self, store: PresenceStore) -> int:
        """End the sessions of every dead node this node can claim; returns how many.

        Only a node that has held its own lease for a whole lease judges the others:
        after a Redis outage every lease has lapsed, and each live node must get the
        time to renew its own before anyone takes it for dead."""
        now = self._clock()
        if self._holding_since is None or now - self._holding_since < self.lease:
            return 0
        expired = 0
        with redis_errors():
            dead = cast(
                "list[bytes]",
                await self._claim(keys=[NODES_KEY], args=[now, 10, now + self.lease]),
            )
            for raw in dead:
                node = raw.decode()
                if node == self.node:
                    # Its own lease lapsed (a renewal late under load) and nobody took
                    # it: the claim has just renewed it, and it is alive.
                    continue
                index = _sessions_key(node)
                sessions = cast("dict[bytes, bytes]", await self.redis.hgetall(index))
                for raw_session, member in sessions.items():
                    session = raw_session.decode()
                    tenant, user = keys.parse_member(member.decode())
                    await store.apply(tenant, user, SessionExpired(SessionId(session)))
                    await self.redis.hdel(index, session)
                    expired += 1
                await self._forget(node)
        return expired

    async def _forget(self, node: str) -> None:
        # The index first: should this stop half-way, the next reap finds the node
        # again, with nothing left to expire. (Two slots on a cluster: no transaction.)
        with redis_errors():
            await self.redis.delete(_sessions_key(node))
            await self.redis.zrem(NODES_KEY, node)
