"""A node refuses a Redis that would evict users' data, and says so of one that
persists nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from presence_hub.errors import UnsafeRedis
from presence_hub.store import EmbeddedRedis
from presence_hub.store.embedded import free_port
from tests.conftest import StartNode, node_starter
from tests.utils import timeout


def redis_with(tmp_path: Path, *args: str) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), extra_args=args)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    yield from redis_with(tmp_path, "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")


@pytest.fixture
def forgetful_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    yield from redis_with(tmp_path, "--appendonly", "no", "--save", "")


async def readiness(port: int) -> tuple[int, dict[str, object]]:
    async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status, await r.json()


async def test_an_evicting_redis_is_refused_unless_accepted(
    evicting_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async with node_starter(evicting_redis.url) as start:
        with pytest.raises(UnsafeRedis, match="allkeys-lru"):
            await start()
        node = await start(allow_evicting_redis=True)
        status, body = await readiness(node.http_port)
    assert status == 200
    assert "allkeys-lru" in str(body["warnings"])
    assert any("allkeys-lru" in r.getMessage() for r in caplog.records)


async def test_a_redis_without_persistence_is_flagged(
    forgetful_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async with node_starter(forgetful_redis.url) as start:
        node = await start()
        status, body = await readiness(node.http_port)
    assert status == 200
    assert "neither AOF nor RDB" in str(body["warnings"])
    assert any("neither AOF nor RDB" in r.getMessage() for r in caplog.records)


async def test_a_safe_redis_gives_no_warning(start_node: StartNode) -> None:
    node = await start_node()
    assert await readiness(node.http_port) == (200, {"status": "ready"})


def test_serve_stops_with_a_clear_message_on_an_evicting_redis(
    evicting_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    serve = [sys.executable, "-m", "presence_hub", "serve", "--redis-url", evicting_redis.url]
    ports = ["--ws-port", str(free_port()), "--http-port", str(free_port())]
    done = subprocess.run(
        [*serve, *ports, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert done.returncode == 2
    assert "maxmemory-policy is allkeys-lru" in done.stderr
    assert "--allow-evicting-redis" in done.stderr
