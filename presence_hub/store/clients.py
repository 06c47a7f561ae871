"""Redis clients for the hub: a bounded pool on a single Redis, a cluster client that
waits for a turn instead of failing when its pools are used up, commands packed in
C, and the one translation of Redis' errors into ``StoreUnavailable``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, TypeAlias, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from presence_hub.errors import StoreUnavailable

__all__ = [
    "CLUSTER_SCHEMES",
    "BoundedRedisCluster",
    "RedisClient",
    "describe",
    "is_cluster_url",
    "open_redis",
    "redis_errors",
]

#: A single Redis (or a replica set behind one address) or a Redis Cluster.
RedisClient: TypeAlias = Redis | RedisCluster

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


#: What every client of the hub speaks, whatever redis-py's defaults: RESP2, whose
#: replies and pub/sub messages the hub parses itself (``store.scripts``,
#: ``store.pubsub``), and reads that wait as long as Redis takes (the listener's
#: connection is quiet for as long as nothing changes). redis-py 8 defaults to RESP3
#: and to 5-second reads.
_WIRE: Final[dict[str, Any]] = {
    "protocol": 2,
    "socket_timeout": None,
    "socket_connect_timeout": None,
}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def open_redis(url: str, *, max_connections: int = 128, listener: bool = False) -> RedisClient:
    """A client for the hub: a bounded pool (thousands of sockets ending at once wait for
    a connection instead of opening thousands), and for the pub/sub ``listener`` no
    silent retries, so that every disconnect is seen and followed by a resync.

    ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node of a Redis
    Cluster; the client learns the others and which slots each serves from it."""
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return BoundedRedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}://{rest}", max_connections=max_connections, **_WIRE
        )
    options: dict[str, object] = {"max_connections": max_connections, "timeout": 30, **_WIRE}
    if listener:
        options["retry"] = Retry(NoBackoff(), 0)
    pool = BlockingConnectionPool.from_url(url, **options)
    pool.connection_class = _packing_in_c(pool.connection_class)
    return Redis.from_pool(pool)


class _PacksInC(AbstractConnection):
    """Packs commands with hiredis' C packer, as redis-py's synchronous client does;
    its asyncio client packs them in Python, at several microseconds a command."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            # redis-py's own packer names the argument it cannot send (a DataError).
            return super().pack_command(*args)


class _PackingConnection(_PacksInC, Connection):
    pass


class _PackingUnixConnection(_PacksInC, UnixDomainSocketConnection):
    pass


class _PackingSSLConnection(_PacksInC, SSLConnection):
    pass


_PACKING: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: _PackingConnection,
    UnixDomainSocketConnection: _PackingUnixConnection,
    SSLConnection: _PackingSSLConnection,
}


def _packing_in_c(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    return _PACKING.get(cls, cls)


#: Set while a task holds one of a BoundedRedisCluster's turns (a pipeline that
#: retries a redirected command through the client must not wait for a second one).
_holding_turn: ContextVar[bool] = ContextVar("holding_turn", default=False)


class BoundedRedisCluster(RedisCluster):
    """redis-py's cluster client fails a command with MaxConnectionsError when a
    server's pool is used up, where BlockingConnectionPool would wait. Here at most
    ``max_connections`` commands or pipelines run at once (each holds at most one
    connection per server) and the others wait their turn, so that thousands of
    sockets closing at once queue up instead of failing."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("max_connections", 128)
        super().__init__(**options)
        self._turns = asyncio.Semaphore(options["max_connections"])
        # The nodes learnt later are made from these arguments (the dict is shared with
        # the nodes manager); the startup nodes exist already.
        kwargs = self.connection_kwargs
        kwargs["connection_class"] = _packing_in_c(kwargs["connection_class"])
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = cast("type[Connection]", _packing_in_c(node.connection_class))

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _holding_turn.get():
            yield
            return
        async with self._turns:
            token = _holding_turn.set(True)
            try:
                yield
            finally:
                _holding_turn.reset(token)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise ValueError("shard_hint is not supported on a cluster")
        # Abstract only in redis-py's annotations, as its own ClusterPipeline is.
        return _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]


class _BoundedClusterPipeline(ClusterPipeline):
    cluster_client: BoundedRedisCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        async with self.cluster_client.turn():
            return await super().execute(raise_on_error, allow_redirections)


class redis_errors:  # lower case: used as the function it was, ``with redis_errors():``
    """Turn Redis' errors into StoreUnavailable, the one the layers above handle: the
    one translation of Redis' errors in the store. A class, not a generator-based
    context manager: every commit goes through it, and this costs a fraction."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, RedisError):
            raise StoreUnavailable(describe(exc)) from exc


def describe(exc: Exception) -> str:
    """The error's message, or its kind when it has none (some of redis-py's have none)."""
    return str(exc) or type(exc).__name__
