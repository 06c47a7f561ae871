"""Lua scripts (store/lua/*.lua) run by their SHA, pipelined: a batch of calls in one
round trip, and the calls of one pass of the event loop sent together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from importlib import resources
from typing import Any, Final, TypeAlias, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, InvalidResponse, NoScriptError, RedisError

from presence_hub.store.clients import RedisClient

__all__ = [
    "HeldConnection",
    "PackedKeys",
    "ScriptBatcher",
    "ScriptCall",
    "lua_script",
    "register_script",
    "run_scripts",
]

#: A script, its keys and its arguments.
ScriptCall: TypeAlias = tuple[AsyncScript, Sequence[str], Sequence[Any]]


class PackedKeys(tuple[str, ...]):
    """Keys that a script is called with again and again, packed for the wire once.

    hiredis' packer costs about 1,400 instructions an argument (a ``sprintf`` and an
    allocation each), and the timer poll names all 256 buckets at least once a second
    (docs/PERFORMANCE.md). The held connection sends ``resp`` as it is; anywhere else
    these are keys like any others."""

    resp: bytes

    def __new__(cls, keys: Iterable[str]) -> PackedKeys:
        packed = super().__new__(cls, keys)
        packed.resp = _bulk_strings(packed)
        return packed


def _bulk_strings(args: Sequence[Any]) -> bytes:
    """``args`` as RESP bulk strings, without the array header that counts them."""
    return hiredis.pack_command(tuple(args)).partition(b"\r\n")[2] if args else b""


def _pack_call(connection: AbstractConnection, call: ScriptCall) -> bytes:
    script, script_keys, args = call
    if isinstance(script_keys, PackedKeys):
        head = _bulk_strings(("EVALSHA", script.sha, len(script_keys)))
        count = 3 + len(script_keys) + len(args)
        with contextlib.suppress(TypeError):  # packed again below, to name the argument
            return b"*%d\r\n%b%b%b" % (count, head, script_keys.resp, _bulk_strings(args))
    command = ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
    return b"".join(connection.pack_command(*command))


def lua_script(name: str) -> str:
    """The text of a Lua script of store/lua/."""
    return resources.files("presence_hub.store").joinpath("lua", name).read_text()


def register_script(redis: RedisClient, name: str) -> AsyncScript:
    """A script of store/lua/ run by its SHA, loaded again where Redis answers NOSCRIPT."""
    # redis-py's annotations name only Redis, but a RedisCluster serves it the same way
    # (EVALSHA goes to the shard of the keys, SCRIPT LOAD to every primary).
    return AsyncScript(cast("Redis", redis), lua_script(name))


async def run_scripts(redis: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Script calls in one pipelined round trip through the pool (one per shard on a
    cluster); each reply is a result or the error of that call. A server that answers
    NOSCRIPT (a restarted or new one: scripts are not persisted) is given the script,
    and the calls it refused are run again."""
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


#: A call and its caller's future.
Pending: TypeAlias = tuple[ScriptCall, "asyncio.Future[Any]"]
#: What hiredis' reader gives while a reply is still incomplete.
_INCOMPLETE: Final = object()


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _spawn(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class ScriptBatcher:
    """Script calls (commits, snapshot reads) sent together: those of one pass of the
    event loop, and those made while the previous batch was being answered.

    Under load many sockets commit or subscribe at once; batched, they share one
    write and one read instead of paying redis-py's per-command overhead each. One
    batch is in flight at a time: on a single Redis on a connection held for it
    (``HeldConnection``), on a cluster through the cluster client's pipeline. Alone,
    a call waits one pass of the loop.
    """

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._held = None if isinstance(redis, RedisCluster) else HeldConnection(redis)
        self._queued: list[Pending] = []
        #: A batch is in flight, or about to be sent.
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, call: ScriptCall) -> asyncio.Future[Any]:
        """The call's reply, or its error, once the batch it joined is answered."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((call, future))
        if not self._busy:
            self._busy = True
            # Sent in the next pass: every call of this pass joins it.
            loop.call_soon(self._next)
        return future

    def _next(self) -> None:
        """Send the calls queued so far as one batch; once it is answered, again."""
        if not self._queued:
            self._busy = False
            return
        batch, self._queued = self._queued, []
        if self._held is not None:
            self._held.send(batch, self._next)
        else:
            _spawn(self._tasks, self._pipeline(batch))

    async def _pipeline(self, batch: list[Pending]) -> None:
        try:
            replies = await run_scripts(self._redis, [call for call, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            _settle(future, reply)
        self._next()


class _Round:
    """One batch on the held connection: its calls, their callers' futures, and how
    far Redis has answered it."""

    __slots__ = ("answered", "calls", "futures", "refused", "reloaded", "tries")

    def __init__(
        self,
        calls: list[ScriptCall],
        futures: list[asyncio.Future[Any]],
        *,
        reloaded: bool = False,
    ) -> None:
        self.calls = calls
        self.futures = futures
        self.answered = 0
        #: The calls answered NOSCRIPT, to run again once their scripts are loaded.
        self.refused: list[int] = []
        #: Its calls were refused once already: a second NOSCRIPT is their error.
        self.reloaded = reloaded
        #: Connections it was sent on, or failed to open for it.
        self.tries = 0

    def fail(self, error: BaseException) -> None:
        """Every call not answered yet gets ``error``."""
        for n in (*self.refused, *range(self.answered, len(self.calls))):
            _settle(self.futures[n], error)


class _Replies(asyncio.Protocol):
    """A held connection's reading side, in place of redis-py's once redis-py has opened
    it (TLS, AUTH, SELECT and all): hiredis parses what arrives, and each reply goes
    to its caller in the pass that read it."""

    def __init__(self, held: HeldConnection, connection: AbstractConnection) -> None:
        self._held = held
        self.connection = connection
        options: dict[str, Any] = {
            "protocolError": InvalidResponse,
            "replyError": BaseParser.parse_error,
            "notEnoughData": _INCOMPLETE,
        }
        if connection.encoder.decode_responses:
            options["encoding"] = connection.encoder.encoding
            options["errors"] = connection.encoder.encoding_errors
        self._reader = hiredis.Reader(**options)
        # redis-py keeps its stream writer, which closes the connection (disconnect())
        # and waits for its own protocol to hear that it closed.
        self.transport = cast(asyncio.Transport, connection._writer.transport)  # type: ignore[union-attr]
        self._stream = self.transport.get_protocol()
        self.closed = False
        self.transport.set_protocol(self)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not _INCOMPLETE:
                self._held.replied(self, reply)
        except InvalidResponse:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stream.connection_lost(exc)
        self._held.lost(self)


class HeldConnection:
    """One connection of a single Redis's pool, held for the batcher's script calls.

    Through the pool, a pipeline of one script call costs about three times the call
    itself (a checkout that probes the socket, deprecation wrappers, the pipeline's
    own bookkeeping), and redis-py reads each reply with a coroutine of its own, a
    pass of the event loop later; here hiredis reads them as they arrive and hands
    each to its caller (``bench/bench.py micro``). One round is in flight at a time.
    A connection that fails before any reply of a round is dropped and the round
    tried once more on a new one (a connection held through a Redis restart fails at
    its first use); once Redis answered some call of a round, nothing of it is sent
    again: that call ran.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._link: _Replies | None = None
        self._round: _Round | None = None
        #: Called once the round sent is answered or failed.
        self._then: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, batch: list[Pending], then: Callable[[], None]) -> None:
        """Send ``batch`` as one round; ``then`` is called once each of its calls has its
        reply or error."""
        self._then = then
        self._start(_Round([call for call, _ in batch], [future for _, future in batch]))

    def _start(self, round_: _Round) -> None:
        link = self._link
        if link is not None and not link.closed:
            self._write(link, round_)
        else:
            _spawn(self._tasks, self._connect_and_write(round_))

    def _write(self, link: _Replies, round_: _Round) -> None:
        packed: list[bytes] = []
        calls: list[ScriptCall] = []
        futures: list[asyncio.Future[Any]] = []
        for call, future in zip(round_.calls, round_.futures, strict=True):
            try:
                packed.append(_pack_call(link.connection, call))
            except RedisError as exc:
                # An argument Redis cannot take (a DataError) fails its own call only.
                _settle(future, exc)
                continue
            calls.append(call)
            futures.append(future)
        if not calls:
            self._then()
            return
        round_.calls, round_.futures = calls, futures
        self._round = round_
        round_.tries += 1
        link.write(b"".join(packed))

    async def _connect_and_write(self, round_: _Round) -> None:
        pool = self._redis.connection_pool
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            for future in round_.futures:
                future.cancel()
            raise
        except (RedisError, OSError) as exc:
            round_.tries += 1
            self._unanswered(round_, exc)
            return
        self._link = _Replies(self, connection)
        self._write(self._link, round_)

    def _unanswered(self, round_: _Round, error: BaseException) -> None:
        """Nothing of the round was answered: try it once more, or fail it."""
        if round_.tries < 2:
            _spawn(self._tasks, self._connect_and_write(round_))
        else:
            round_.fail(error)
            self._then()

    def replied(self, link: _Replies, reply: Any) -> None:
        round_ = self._round
        if round_ is None or link is not self._link:
            link.transport.abort()  # a reply nobody asked for: the stream is out of step
            return
        n = round_.answered
        round_.answered = n + 1
        if isinstance(reply, NoScriptError) and not round_.reloaded:
            round_.refused.append(n)
        else:
            _settle(round_.futures[n], reply)
        if round_.answered == len(round_.calls):
            self._round = None
            if round_.refused:
                _spawn(self._tasks, self._reload(round_))
            else:
                self._then()

    async def _reload(self, round_: _Round) -> None:
        """A server that answered NOSCRIPT (a restarted or new one: scripts are not
        persisted) is given the scripts, and the calls it refused are sent again."""
        calls = [round_.calls[n] for n in round_.refused]
        again = _Round(calls, [round_.futures[n] for n in round_.refused], reloaded=True)
        try:
            for script in {call[0] for call in calls}:
                await self._redis.script_load(script.script)
        except asyncio.CancelledError:
            for future in again.futures:
                future.cancel()
            raise
        except (RedisError, OSError) as exc:
            again.fail(exc)
            self._then()
            return
        self._start(again)

    def lost(self, link: _Replies) -> None:
        if link is not self._link:
            return
        self._link = None
        _spawn(self._tasks, self._release(link.connection))
        round_, self._round = self._round, None
        if round_ is None:
            return
        error = ConnectionError("the Redis connection closed before it answered")
        if round_.answered == 0:
            self._unanswered(round_, error)
        else:
            round_.fail(error)
            self._then()

    async def _release(self, connection: AbstractConnection) -> None:
        await connection.disconnect()
        await self._redis.connection_pool.release(connection)
