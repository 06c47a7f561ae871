"""The hub's Redis clients: a bounded pool that makes callers wait their turn, commands
packed in C that still say which argument they cannot send, and Redis' errors turned
into StoreUnavailable in one place."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError

from presence_hub.errors import StoreUnavailable
from presence_hub.store import EmbeddedRedis
from presence_hub.store.clients import describe, is_cluster_url, open_redis, redis_errors


async def test_a_bounded_pool_makes_callers_wait_instead_of_failing(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    bounded = open_redis(redis_server.url, max_connections=2)
    await bounded.client_setname("bounded")

    # 40 blocking reads at once: each holds a connection until its key arrives.
    async def read(key: str) -> Any:
        return await bounded.blpop([key], timeout=30)

    readers = [asyncio.create_task(read(f"q{n}")) for n in range(40)]
    await asyncio.sleep(0.2)
    clients = await redis.client_list()
    assert sum(1 for c in clients if c["cmd"] == "blpop") == 2
    for n in range(40):
        await redis.rpush(f"q{n}", "x")
    assert [r[0] for r in await asyncio.gather(*readers)] == [f"q{n}".encode() for n in range(40)]
    await bounded.aclose()


async def test_a_read_waits_as_long_as_redis_takes(own_redis_server: EmbeddedRedis) -> None:
    """The hub's connections are not cut while Redis is quiet (the listener's may be for
    hours): redis-py 8 on its own would give up a read after 5 s."""
    client = open_redis(own_redis_server.url)
    assert await client.blpop(["nothing comes"], timeout=6) is None
    await client.aclose()


async def test_commands_packed_in_c_carry_any_bytes(redis_server: EmbeddedRedis) -> None:
    client = open_redis(redis_server.url)
    value = bytes(range(256)) * 4
    await client.set("blob with spaces", value)
    assert await client.get("blob with spaces") == value
    assert await client.execute_command("CLIENT SETNAME", "packer")
    assert await client.client_getname() == "packer"
    with pytest.raises(DataError, match="dict"):
        await client.set("bad", {"a": 1})  # type: ignore[arg-type]
    await client.aclose()


async def test_redis_errors_become_store_unavailable() -> None:
    nowhere = open_redis("redis://127.0.0.1:1", max_connections=1)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1"), redis_errors():
        await nowhere.ping()
    await nowhere.aclose()


def test_an_error_without_a_message_is_described_by_its_kind() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad reply")) == "bad reply"


def test_cluster_urls_are_told_apart() -> None:
    assert is_cluster_url("redis+cluster://127.0.0.1:7000")
    assert is_cluster_url("rediss+cluster://redis.example:7000")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert not is_cluster_url("unix:///run/redis.sock")
