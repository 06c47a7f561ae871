"""Lua scripts (store/lua/*.lua) run by their SHA, pipelined: a batch of calls in one
round trip, and the calls of one pass of the event loop sent together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any, TypeAlias, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from presence_hub.store.clients import RedisClient

__all__ = ["ScriptBatcher", "ScriptCall", "lua_script", "register_script", "run_scripts"]

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


async def run_scripts(redis: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Script calls in one pipelined round trip (one per shard on a cluster); each
    reply is a result or the error of that call. A server that answers NOSCRIPT (a
    restarted or new one: scripts are not persisted) is given the script, and the
    calls it refused are run again."""
    replies = await _evalsha_pipeline(redis, calls)
    refused = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if refused:
        for script in {calls[n][0] for n in refused}:
            await redis.script_load(script.script)
        again = await _evalsha_pipeline(redis, [calls[n] for n in refused])
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


class ScriptBatcher:
    """Script calls (commits, snapshot reads) made in one pass of the event loop, sent
    as one pipeline.

    Under load many sockets commit or subscribe at once; batched, they share one
    connection checkout, one write and one read instead of paying redis-py's
    per-command overhead each. Alone, a call waits one pass of the loop.
    """

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._queued: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, call: ScriptCall) -> asyncio.Future[Any]:
        """The call's reply, or its error, once the batch it joined is answered."""
        loop = asyncio.get_running_loop()
        if not self._queued:
            # A new task first runs in the next pass: every call of this pass joins it.
            task = loop.create_task(self._send_batch())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((call, future))
        return future

    async def _send_batch(self) -> None:
        queued, self._queued = self._queued, []
        try:
            replies = await run_scripts(self._redis, [call for call, _ in queued])
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
