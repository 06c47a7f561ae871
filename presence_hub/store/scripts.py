"""Lua scripts (store/lua/*.lua) run by their SHA, pipelined: a batch of calls in one
round trip, and the calls of one pass of the event loop sent together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any, TypeAlias, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

from presence_hub.store.clients import RedisClient

__all__ = [
    "HeldConnection",
    "ScriptBatcher",
    "ScriptCall",
    "lua_script",
    "register_script",
    "run_scripts",
]

#: A script, its keys and its arguments.
ScriptCall: TypeAlias = tuple[AsyncScript, list[str], list[Any]]


def lua_script(name: str) -> str:
    """The text of a Lua script of store/lua/."""
    return resources.files("presence_hub.store").joinpath("lua", name).read_text()


def register_script(redis: RedisClient, name: str) -> AsyncScript:
    """A script of store/lua/ run by its SHA, loaded again where Redis answers NOSCRIPT."""
    # redis-py's annotations name only Redis, but a RedisCluster serves it the same way
    # (EVALSHA goes to the shard of the keys, SCRIPT LOAD to every primary).
    return AsyncScript(cast("Redis", redis), lua_script(name))


async def run_scripts(
    redis: RedisClient, calls: Sequence[ScriptCall], held: HeldConnection | None = None
) -> list[Any]:
    """Script calls in one pipelined round trip (one per shard on a cluster), through
    the pool or on a ``held`` connection; each reply is a result or the error of that
    call. A server that answers NOSCRIPT (a restarted or new one: scripts are not
    persisted) is given the script, and the calls it refused are run again."""
    send = _evalsha_pipeline if held is None else held.evalsha
    replies = await send(redis, calls)
    refused = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if refused:
        for script in {calls[n][0] for n in refused}:
            await redis.script_load(script.script)
        again = await send(redis, [calls[n] for n in refused])
        for n, reply in zip(refused, again, strict=True):
            replies[n] = reply
    return replies


async def _evalsha_pipeline(redis: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    pipe: Pipeline | ClusterPipeline
    async with redis.pipeline(transaction=False) as pipe:
        for script, script_keys, args in calls:
            # Not pipe.evalsha(), which redis-py refuses in a cluster pipeline; the
            # command itself is routed by its keys like any other.
            pipe.execute_command("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


class HeldConnection:
    """One connection of a single Redis's pool, held for pipelines of script calls.

    Through the pool, a pipeline of one script call costs about three times the call
    itself (a checkout that probes the socket, deprecation wrappers, the pipeline's
    own bookkeeping: ``bench/bench.py micro``), and every commit pays it. A connection
    that failed before any reply is dropped and the round tried once more on a new
    one: a connection held through a Redis restart fails at its first use.
    """

    def __init__(self) -> None:
        self._connection: AbstractConnection | None = None

    async def evalsha(self, redis: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
        commands = [
            ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
            for script, script_keys, args in calls
        ]
        for attempt in (1, 2):
            connection = self._connection
            if connection is None:
                pool = cast(Redis, redis).connection_pool
                connection = self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            replies: list[Any] = []
            try:
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
                for _ in commands:
                    replies.append(await _reply(connection))
                return replies
            except (ConnectionError, OSError):
                self._connection = None
                await connection.disconnect()
                await cast(Redis, redis).connection_pool.release(connection)
                # Again only if Redis answered none of them: a call that was answered
                # ran, and must not run twice.
                if attempt == 2 or replies:
                    raise
        raise AssertionError("unreachable")


async def _reply(connection: AbstractConnection) -> Any:
    try:
        return await connection.read_response()
    except ResponseError as exc:
        return exc


class ScriptBatcher:
    """Script calls (commits, snapshot reads) sent together: those of one pass of the
    event loop, and those made while the previous batch was being answered.

    Under load many sockets commit or subscribe at once; batched, they share one
    write and one read instead of paying redis-py's per-command overhead each. One
    batch is in flight at a time, on a single Redis on a connection of its own.
    Alone, a call waits one pass of the loop.
    """

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._held = None if isinstance(redis, RedisCluster) else HeldConnection()
        self._queued: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def __call__(self, call: ScriptCall) -> asyncio.Future[Any]:
        """The call's reply, or its error, once the batch it joined is answered."""
        loop = asyncio.get_running_loop()
        if self._sender is None:
            # A new task first runs in the next pass: every call of this pass joins it.
            self._sender = loop.create_task(self._send())
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((call, future))
        return future

    async def _send(self) -> None:
        try:
            while self._queued:
                queued, self._queued = self._queued, []
                await self._send_batch(queued)
        finally:
            self._sender = None
            for _, future in self._queued:
                future.cancel()
            self._queued = []

    async def _send_batch(self, queued: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        try:
            replies = await run_scripts(self._redis, [call for call, _ in queued], self._held)
        except asyncio.CancelledError:
            for _, future in queued:
                future.cancel()
            raise
        except Exception as exc:
            replies = [exc] * len(queued)
        for (_, future), reply in zip(queued, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
