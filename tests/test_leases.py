"""Node leases under load: a busy node must not take itself for dead."""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis

from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.model import SessionOpened
from presence_hub.store import EmbeddedRedis, PresenceStore
from presence_hub.store.nodes import NodeRegistry

ACME = TenantId("acme")
ALICE = UserId("alice")


async def test_a_node_whose_own_lease_lapsed_does_not_reap_itself(redis: Redis) -> None:
    now = [1000.0]
    registry = NodeRegistry(redis, "busy", 30.0, clock=lambda: now[0])
    store = PresenceStore(redis, clock=lambda: now[0])
    await registry.register()
    await store.apply(ACME, ALICE, SessionOpened(SessionId("s1"), "desktop", "busy"))
    await registry.add_session(SessionId("s1"), ACME, ALICE)
    now[0] += 30  # it held its lease a whole lease, then its renewals came late

    assert await registry.reap(store) == 0
    assert await registry.renew()
    state = await store.load(ACME, ALICE)
    assert list(state.sessions) == ["s1"]


async def test_renewals_do_not_wait_for_a_busy_pool(redis_server: EmbeddedRedis) -> None:
    busy = Redis.from_pool(BlockingConnectionPool.from_url(redis_server.url, max_connections=1))
    lease = Redis.from_url(redis_server.url)
    registry = NodeRegistry(busy, "node-a", 30.0, lease_redis=lease)
    held = await busy.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await asyncio.wait_for(registry.register(), 10)
        assert await asyncio.wait_for(registry.renew(), 10)
    finally:
        await busy.connection_pool.release(held)
        await busy.aclose()
        await lease.aclose()
