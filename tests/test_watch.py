"""Who on a node watches whom: sockets that watch the same user share one Redis
subscription and its confirmation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest

from presence_hub.delivery import Connection
from presence_hub.hub import Hub
from presence_hub.ids import TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.store import EmbeddedRedis, PresenceStore
from presence_hub.store.clients import open_redis
from tests.utils import timeout


class Watcher:
    """Stands in for a Connection: ``watch`` and ``unwatch`` use only these two."""

    def __init__(self) -> None:
        self.tenant = TenantId("acme")
        self.watching: dict[UserId, int] = {}


@pytest.fixture
async def hub(redis_server: EmbeddedRedis) -> AsyncIterator[Hub]:
    redis = open_redis(redis_server.url)
    listener = open_redis(redis_server.url, max_connections=4, listener=True)
    hub = Hub(PresenceStore(redis), listener, Metrics())
    running = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.wait_ready(), timeout(10))
    yield hub
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await redis.aclose()
    await listener.aclose()


async def test_a_watcher_that_gives_up_does_not_cancel_the_others_wait(hub: Hub) -> None:
    first, second = Watcher(), Watcher()
    users = [UserId("alice"), UserId("bob")]
    # The first subscribes; the second waits for the same confirmation. Then the first
    # is cancelled (its socket went away) before Redis answers.
    gives_up = asyncio.create_task(hub.watch(cast(Connection, first), users))
    waits = asyncio.create_task(hub.watch(cast(Connection, second), users))
    await asyncio.sleep(0)
    gives_up.cancel()
    await asyncio.wait_for(waits, timeout(10))
    assert second.watching == {"alice": -1, "bob": -1}
    assert hub.subscriptions == 2


async def test_the_last_watcher_to_leave_releases_the_user(hub: Hub) -> None:
    first, second = Watcher(), Watcher()
    await hub.watch(cast(Connection, first), [UserId("alice"), UserId("bob")])
    await hub.watch(cast(Connection, second), [UserId("bob"), UserId("bob")])
    assert hub.subscriptions == 2
    hub.unwatch(cast(Connection, first), [UserId("alice"), UserId("bob"), UserId("carol")])
    assert (first.watching, second.watching) == ({}, {"bob": -1})
    assert hub.subscriptions == 1
    hub.unwatch(cast(Connection, second), [UserId("bob")])
    assert hub.subscriptions == 0
    # Watching again after the release subscribes again.
    await asyncio.wait_for(hub.watch(cast(Connection, first), [UserId("bob")]), timeout(10))
    assert hub.subscriptions == 1
