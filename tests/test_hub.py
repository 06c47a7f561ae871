"""Who on a node watches whom: sockets that watch the same user share one Redis
subscription and its confirmation, published updates reach exactly the watching
sockets, and after the listener listens again every watcher is handed the stored
truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.asyncio import Redis

from presence_hub import codec
from presence_hub.delivery import Connection
from presence_hub.hub import Hub
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.keepalive import HeardConnection
from presence_hub.metrics import Metrics
from presence_hub.model import ManualStatusSet, MessageSet, SessionOpened, View
from presence_hub.store import EmbeddedRedis, PresenceStore, keys
from presence_hub.store.clients import open_redis
from tests.utils import eventually, timeout

ACME = TenantId("acme")
ALICE, BOB, CAROL, DAVE = UserId("alice"), UserId("bob"), UserId("carol"), UserId("dave")


def watcher(hub: Hub, user: UserId) -> Connection:
    """A socket that has not had its welcome yet: what the hub hands it stays pending,
    where the test can read it."""
    return Connection(
        cast(HeardConnection, None),
        "json",
        tenant=ACME,
        user=user,
        session=SessionId(f"s-{user}"),
        device="desktop",
        send_timeout=1.0,
        metrics=hub.metrics,
        flusher=hub.flusher,
    )


@pytest.fixture
async def hub(redis: Redis, own_redis_server: EmbeddedRedis) -> AsyncIterator[Hub]:
    """A hub whose store writes to one Redis and whose listener listens on another
    (``own_redis_server``): it hears only what the test publishes there, so every
    commit of the store is an update it missed."""
    listen_redis = open_redis(own_redis_server.url, max_connections=4, listener=True)
    hub = Hub(PresenceStore(redis), listen_redis, Metrics())
    running = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.wait_ready(), timeout(10))
    yield hub
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await listen_redis.aclose()


async def publish(redis_server: EmbeddedRedis, user: UserId, view: View) -> dict[str, object]:
    frame = codec.presence_frame(user, view)
    publisher = Redis.from_url(redis_server.url)
    await publisher.publish(keys.presence_channel(ACME, user), codec.sealed(1.0, codec.pack(frame)))
    await publisher.aclose()
    return frame


async def test_an_update_reaches_the_watchers_of_its_user_only(
    hub: Hub, own_redis_server: EmbeddedRedis
) -> None:
    bob, carol = watcher(hub, BOB), watcher(hub, CAROL)
    await hub.watch(bob, [ALICE])
    await hub.watch(carol, [DAVE])
    frame = await publish(own_redis_server, ALICE, View(status="busy", ver=3))
    await eventually(lambda: ALICE in bob.pending())
    assert bob.pending()[ALICE].map == frame
    assert carol.pending() == {}


async def test_a_watcher_that_gives_up_does_not_cancel_the_others_wait(hub: Hub) -> None:
    first, second = watcher(hub, BOB), watcher(hub, CAROL)
    # The first subscribes; the second waits for the same confirmation. Then the first
    # is cancelled (its socket went away) before Redis answers.
    gives_up = asyncio.create_task(hub.watch(first, [ALICE, DAVE]))
    waits = asyncio.create_task(hub.watch(second, [ALICE, DAVE]))
    await asyncio.sleep(0)
    gives_up.cancel()
    await asyncio.wait_for(waits, timeout(10))
    assert {user: watchers[second] for user, watchers in second.watching.items()} == {
        ALICE: -1,
        DAVE: -1,
    }
    assert hub.subscriptions == 2


async def test_the_last_watcher_to_leave_releases_the_user(
    hub: Hub, own_redis_server: EmbeddedRedis
) -> None:
    bob, carol = watcher(hub, BOB), watcher(hub, CAROL)
    await hub.watch(bob, [ALICE, DAVE])
    await hub.watch(carol, [DAVE, DAVE])
    assert hub.subscriptions == 2
    hub.unwatch(bob, [ALICE, DAVE, UserId("erin")])
    assert (bob.watching, list(carol.watching)) == ({}, [DAVE])
    assert carol.watching[DAVE] == {carol: -1}
    assert hub.subscriptions == 1
    hub.leave(carol)
    assert hub.subscriptions == 0
    # Released: an update of theirs reaches nobody. Watched again: subscribed again.
    await asyncio.wait_for(hub.watch(bob, [UserId("erin")]), timeout(10))
    assert hub.subscriptions == 1
    await publish(own_redis_server, DAVE, View(status="busy", ver=3))
    erin = await publish(own_redis_server, UserId("erin"), View(status="dnd", ver=1))
    await eventually(lambda: UserId("erin") in bob.pending())
    assert bob.pending()[UserId("erin")].map == erin
    assert DAVE not in bob.pending()
    assert DAVE not in carol.pending()


async def test_listening_again_hands_every_watcher_the_stored_truth(
    hub: Hub, own_redis_server: EmbeddedRedis
) -> None:
    bob = watcher(hub, BOB)
    await hub.watch(bob, [ALICE, CAROL])
    await hub.join(bob)
    # Committed while the hub was not listening (here: on another Redis).
    await hub.store.apply(ACME, ALICE, SessionOpened(SessionId("s1"), "desktop", "elsewhere"))
    await hub.store.apply(ACME, ALICE, ManualStatusSet("busy"))
    await hub.store.apply(ACME, BOB, MessageSet("at lunch"))
    assert bob.pending() == {}
    listen_admin = Redis.from_url(own_redis_server.url)
    await listen_admin.client_kill_filter(_type="pubsub")
    await listen_admin.aclose()

    await eventually(lambda: len(bob.pending()) == 2 and bob._pending_self is not None, wait=30)
    (stored,) = await hub.store.frames(ACME, [ALICE])
    assert bob.pending()[ALICE].raw == stored
    assert bob.pending()[ALICE].map["status"] == "busy"
    # Never seen: offline at ver 0.
    assert bob.pending()[CAROL].map == codec.presence_frame(CAROL, View())
    assert bob._pending_self is not None
    assert bob._pending_self.map["message"] == "at lunch"
