"""Lua scripts by their SHA, pipelined: the calls of one pass of the event loop share
one round trip, each gets its own reply or error, and a Redis that lost its scripts
(restarted, or flushed) is given them again."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, DataError, ResponseError

from presence_hub.store.clients import RedisClient, open_redis
from presence_hub.store.scripts import (
    HeldConnection,
    PackedKeys,
    ScriptBatcher,
    ScriptCall,
    _Replies,
    lua_script,
    run_scripts,
)
from tests.utils import timeout

ECHO = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
redis.call('INCR', KEYS[1])
return ARGV[1]
"""


def echo(redis: RedisClient, word: str) -> ScriptCall:
    return (AsyncScript(cast("Redis", redis), ECHO), ["calls"], [word])


async def calls_made(redis: Redis) -> int:
    return int(await redis.get("calls") or 0)


async def test_each_call_gets_its_own_reply_or_error(redis: Redis) -> None:
    await redis.delete("calls")
    replies = await run_scripts(redis, [echo(redis, "a"), echo(redis, "fail"), echo(redis, "b")])
    assert replies[0] == b"a"
    assert isinstance(replies[1], ResponseError)
    assert "asked to fail" in str(replies[1])
    assert replies[2] == b"b"
    assert await calls_made(redis) == 2


async def test_a_redis_that_lost_its_scripts_is_given_them_again(redis: Redis) -> None:
    await redis.delete("calls")
    assert await run_scripts(redis, [echo(redis, "a")]) == [b"a"]
    await redis.script_flush()
    assert await run_scripts(redis, [echo(redis, "b"), echo(redis, "c")]) == [b"b", b"c"]
    # Each call ran once: the refused ones again, after the script was loaded.
    assert await calls_made(redis) == 3


async def test_the_batcher_gives_a_redis_that_lost_its_scripts_them_again(redis: Redis) -> None:
    await redis.delete("calls")
    batcher = ScriptBatcher(redis)
    assert await batcher(echo(redis, "a")) == b"a"
    await redis.script_flush()
    first, fails, second = (
        batcher(echo(redis, "b")),
        batcher(echo(redis, "fail")),
        batcher(echo(redis, "c")),
    )
    assert await first == b"b"
    with pytest.raises(ResponseError, match="asked to fail"):
        await fails
    assert await second == b"c"
    assert await calls_made(redis) == 3


KEYS_AND_ARGS = "return {KEYS, ARGV}"


async def test_keys_packed_once_reach_the_script_as_keys(redis: Redis) -> None:
    script = AsyncScript(redis, KEYS_AND_ARGS)
    names = ["k:1", "ключ:{2}", "k 3", ""]
    packed = PackedKeys(names)
    assert packed == tuple(names)
    batcher = ScriptBatcher(redis)
    with_args, plain, without_args = await asyncio.gather(
        batcher((script, packed, ["a", 2, 1.5])),
        batcher((script, names, ["b"])),
        batcher((script, PackedKeys(names), [])),
    )
    encoded = [name.encode() for name in names]
    assert with_args == [encoded, [b"a", b"2", b"1.5"]]
    assert plain == [encoded, [b"b"]]
    assert without_args == [encoded, []]
    # Through the pool they are keys like any others.
    assert await run_scripts(redis, [(script, packed, ["c"])]) == [[encoded, [b"c"]]]


async def test_a_call_with_an_argument_redis_cannot_take_fails_alone(redis: Redis) -> None:
    await redis.delete("calls")
    batcher = ScriptBatcher(redis)
    bad_with_packed_keys = (AsyncScript(redis, ECHO), PackedKeys(["calls"]), [object()])
    # Each call is answered, not left waiting: a hang here is the failure.
    async with asyncio.timeout(timeout(10)):
        before, bad, also_bad, after = (
            batcher(echo(redis, "before")),
            batcher((AsyncScript(redis, ECHO), ["calls"], [object()])),
            batcher(bad_with_packed_keys),
            batcher(echo(redis, "after")),
        )
        assert await before == b"before"
        with pytest.raises(DataError):
            await bad
        with pytest.raises(DataError):
            await also_bad
        assert await after == b"after"
        # A round of nothing but such calls ends too, and the batcher goes on.
        with pytest.raises(DataError):
            await batcher((AsyncScript(redis, ECHO), ["calls"], [object()]))
        assert await batcher(echo(redis, "later")) == b"later"
    assert await calls_made(redis) == 3


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry for each write to the batcher's held connection (a round trip's
    requests); a test clears it once set up."""
    written: list[None] = []
    write = _Replies.write

    def counted(self: _Replies, data: bytes) -> None:
        written.append(None)
        write(self, data)

    monkeypatch.setattr(_Replies, "write", counted)
    return written


async def test_the_calls_of_one_pass_share_one_round_trip(redis: Redis, writes: list[None]) -> None:
    await redis.delete("calls")
    await redis.script_load(ECHO)
    writes.clear()
    batcher = ScriptBatcher(redis)
    futures = [batcher(echo(redis, f"w{n}")) for n in range(50)]
    assert await asyncio.gather(*futures) == [f"w{n}".encode() for n in range(50)]
    assert len(writes) == 1
    # A call of a later pass goes in a round trip of its own.
    assert await batcher(echo(redis, "later")) == b"later"
    assert len(writes) == 2
    assert await calls_made(redis) == 51


BUSY = """
local started = redis.call('TIME')
repeat
    local now = redis.call('TIME')
until (now[1] - started[1]) * 1000000 + (now[2] - started[2]) >= 300000
return 'slow'
"""


async def test_calls_made_while_a_batch_is_answered_go_together_in_the_next(
    redis: Redis, writes: list[None]
) -> None:
    await redis.delete("calls")
    for script in (BUSY, ECHO):
        await redis.script_load(script)
    writes.clear()
    batcher = ScriptBatcher(redis)
    # Redis takes 0.3 s over the first call, while calls of twenty later passes arrive.
    slow = batcher((AsyncScript(redis, BUSY), [], []))
    later = []
    for n in range(20):
        await asyncio.sleep(0)
        later.append(batcher(echo(redis, f"l{n}")))
    assert await slow == b"slow"
    assert await asyncio.gather(*later) == [f"l{n}".encode() for n in range(20)]
    assert len(writes) == 2
    assert await calls_made(redis) == 20


async def test_a_held_connection_that_redis_dropped_is_replaced(redis: Redis) -> None:
    await redis.delete("calls")
    batcher = ScriptBatcher(redis)
    assert await batcher(echo(redis, "before")) == b"before"
    # Redis closes every client's connection, as a restart does.
    await redis.client_kill_filter(_type="normal", skipme=True)
    assert await batcher(echo(redis, "after")) == b"after"
    assert await calls_made(redis) == 2


async def test_an_error_of_one_call_reaches_its_caller_only(redis: Redis) -> None:
    batcher = ScriptBatcher(redis)
    good, bad = batcher(echo(redis, "ok")), batcher(echo(redis, "fail"))
    cancelled = batcher(echo(redis, "gone"))
    cancelled.cancel()
    assert await good == b"ok"
    with pytest.raises(ResponseError, match="asked to fail"):
        await bad


async def test_an_unreachable_redis_fails_every_call_of_the_batch() -> None:
    nowhere = open_redis("redis://127.0.0.1:1", max_connections=2)
    batcher = ScriptBatcher(nowhere)
    futures = [batcher(echo(nowhere, "a")), batcher(echo(nowhere, "b"))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results), results
    await nowhere.aclose()


def test_the_scripts_ship_with_the_package() -> None:
    for name in ("commit.lua", "read.lua", "views.lua", "claim_timers.lua"):
        assert "redis.call" in lua_script(name)


async def test_a_round_cut_after_some_replies_runs_nothing_twice(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await redis.delete("calls")
    await redis.script_load(ECHO)
    replied = HeldConnection.replied
    replies = 0

    def cut_after_one(self: HeldConnection, link: _Replies, reply: Any) -> None:
        nonlocal replies
        replies += 1
        if replies == 2:
            link.transport.abort()  # the second reply never arrives
            return
        replied(self, link, reply)

    batcher = ScriptBatcher(redis)
    monkeypatch.setattr(HeldConnection, "replied", cut_after_one)
    futures = [batcher(echo(redis, "a")), batcher(echo(redis, "b"))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    monkeypatch.undo()
    assert results[0] == b"a"
    assert isinstance(results[1], ConnectionError), results
    # Both calls had been sent and ran once; none was sent again.
    assert await calls_made(redis) == 2
    # The next round goes on a new connection.
    assert await batcher(echo(redis, "after")) == b"after"
