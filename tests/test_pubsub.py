"""The Redis listener on its own: messages of the channels it listens to, confirmed
subscriptions, and listening again (with a call to say so) after Redis restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from presence_hub.errors import StoreUnavailable
from presence_hub.store import EmbeddedRedis
from presence_hub.store.clients import open_redis
from presence_hub.store.pubsub import Listener
from tests.utils import eventually, timeout


class Heard:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.relistens = 0

    def message(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))

    def relisten(self) -> None:
        self.relistens += 1


@pytest.fixture
async def listening(
    own_redis_server: EmbeddedRedis,
) -> AsyncIterator[tuple[Listener, Heard, Redis]]:
    heard = Heard()
    listen_redis = open_redis(own_redis_server.url, max_connections=4, listener=True)
    listener = Listener(listen_redis, heard.message, heard.relisten)
    running = asyncio.create_task(listener.run())
    publisher = Redis.from_url(own_redis_server.url)
    await asyncio.wait_for(listener.wait_ready(), timeout(10))
    yield listener, heard, publisher
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await publisher.aclose()
    await listen_redis.aclose()


async def test_it_hears_what_it_listens_to_and_nothing_else(
    listening: tuple[Listener, Heard, Redis],
) -> None:
    listener, heard, publisher = listening
    await listener.subscribe(["a", "b"])
    await publisher.publish("a", b"1")
    await publisher.publish("c", b"2")
    await publisher.publish("b", b"3")
    await eventually(lambda: len(heard.messages) == 2)
    assert heard.messages == [("a", b"1"), ("b", b"3")]
    listener.unsubscribe(["a"])
    await publisher.publish("a", b"4")
    await publisher.publish("b", b"5")
    await eventually(lambda: len(heard.messages) == 3)
    assert heard.messages[-1] == ("b", b"5")
    assert listener.channels == {"b"}


async def test_it_listens_again_after_redis_restarts(
    listening: tuple[Listener, Heard, Redis], own_redis_server: EmbeddedRedis
) -> None:
    listener, heard, publisher = listening
    await listener.subscribe(["a"])
    own_redis_server.stop(kill=True)
    await eventually(lambda: not listener.ready)
    with pytest.raises(StoreUnavailable):
        listener.check_listening()
    own_redis_server.start()
    await eventually(lambda: heard.relistens == 1, wait=30)
    await publisher.publish("a", b"after")
    await eventually(lambda: ("a", b"after") in heard.messages)


async def test_a_channel_and_its_witness_are_subscribed_and_dropped_together(
    listening: tuple[Listener, Heard, Redis],
) -> None:
    """The witness has a subscriber exactly while the listening connection has the
    channel, whatever the node believed when it named the witness."""
    listener, _, publisher = listening

    async def subscribers(*channels: str) -> list[int]:
        return [n for _, n in await publisher.pubsub_numsub(*channels)]

    async def until(*channels: str, are: list[int]) -> None:
        async with asyncio.timeout(timeout(10)):
            while await subscribers(*channels) != are:  # noqa: ASYNC110 (Redis announces nothing)
                await asyncio.sleep(0.02)

    await listener.subscribe(["a"])
    witness = listener.witness("a")
    assert witness.startswith("a:")
    assert await subscribers("a", witness) == [1, 1]

    # Named while the channel was held, then dropped: Redis drops both in one command.
    listener.unsubscribe(["a"])
    await until("a", are=[0])
    assert await subscribers(witness) == [0]

    # A connection gone takes both; the new connection has witnesses of its own.
    await listener.subscribe(["a"])
    await publisher.client_kill_filter(_type="pubsub")
    await eventually(lambda: listener.ready and listener.witness("a") != witness)
    await until("a", listener.witness("a"), are=[1, 1])
    assert await subscribers(witness) == [0]


BUSY = """
local started = redis.call('TIME')
repeat
    local now = redis.call('TIME')
until (now[1] - started[1]) * 1000000 + (now[2] - started[2]) >= 1000000
return 1
"""


async def test_a_channel_dropped_while_it_listens_again_can_be_listened_to_once_more(
    listening: tuple[Listener, Heard, Redis], own_redis_server: EmbeddedRedis
) -> None:
    listener, heard, publisher = listening
    await listener.subscribe(["a"])
    busy = Redis.from_url(own_redis_server.url)
    await publisher.client_kill_filter(_type="pubsub")
    await eventually(lambda: not listener.ready)
    # Redis is busy for a second, while the listener connects again and subscribes.
    holding = asyncio.ensure_future(busy.eval(BUSY, 0))
    await eventually(lambda: "redis" in listener._shards)
    listener.unsubscribe(["a"])  # its last watcher left meanwhile
    await asyncio.wait_for(holding, timeout(10))
    await busy.aclose()
    await eventually(lambda: listener.ready)
    # Watched again: Redis confirms it at once, and its messages arrive.
    await asyncio.wait_for(listener.subscribe(["a"]), timeout(5))
    await publisher.publish("a", b"again")
    await eventually(lambda: ("a", b"again") in heard.messages)
