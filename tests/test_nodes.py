"""Several hub processes on one Redis, and the faults a deployment meets: dead nodes,
stopped nodes and a restarted Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import msgpack
import psutil
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from presence_hub.store import EmbeddedRedis
from tests.conftest import StartNode, make_token, ws_url
from tests.processes import LEASE, HubProcess
from tests.utils import eventually, timeout
from tests.wsclient import Client, until_ok

pytestmark = pytest.mark.slow


@pytest.fixture
async def spawn_hub(
    redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> AsyncIterator[Callable[..., HubProcess]]:
    """Hub processes on the shared Redis, emptied (by the redis fixture) for each test."""
    hubs: list[HubProcess] = []

    def spawn(*extra: str) -> HubProcess:
        hub = HubProcess(redis_server.url, tmp_path, *extra)
        hubs.append(hub)
        return hub

    yield spawn
    await Client.close_all()
    for hub in hubs:
        hub.stop()


async def test_a_client_on_one_node_sees_changes_made_through_another(
    spawn_hub: Callable[..., HubProcess],
) -> None:
    node_a, node_b = spawn_hub(), spawn_hub()
    await asyncio.gather(node_a.ready(), node_b.ready())
    bob = await Client.connect(node_a.url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    alice = await Client.connect(node_b.url, make_token("alice"))
    await bob.presence("alice", status="available")
    await alice.request({"type": "set_status", "status": "busy"})
    await bob.presence("alice", status="busy")
    # And the user's own devices stay in sync across nodes.
    phone = await Client.connect(node_a.url, make_token("alice"), device="mobile")
    await alice.request({"type": "set_message", "text": "across nodes"})
    own = await phone.expect(lambda f: f["type"] == "self" and f["message"] == "across nodes")
    assert own["devices"] == ["desktop", "mobile"]


async def test_the_users_of_a_killed_node_go_offline_within_the_lease(
    spawn_hub: Callable[..., HubProcess],
) -> None:
    survivor, doomed = spawn_hub(), spawn_hub()
    await asyncio.gather(survivor.ready(), doomed.ready())
    bob = await Client.connect(survivor.url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    await Client.connect(doomed.url, make_token("alice"))
    await bob.presence("alice", status="available")

    killed_at = time.time()
    doomed.signal(signal.SIGKILL)
    offline = await bob.presence("alice", status="offline", wait=30)
    # The lease, plus the grace of the session the dead node could not end.
    assert offline["since"] - killed_at < LEASE + 2 + 1


async def test_a_stopped_node_hands_its_users_over_without_a_flap(
    spawn_hub: Callable[..., HubProcess],
) -> None:
    staying, leaving = spawn_hub(), spawn_hub()
    await asyncio.gather(staying.ready(), leaving.ready())
    bob = await Client.connect(staying.url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice", "carol"]})
    alice = await Client.connect(leaving.url, make_token("alice"))
    await bob.presence("alice", status="available")

    leaving.signal(signal.SIGTERM)
    await alice.ws.wait_closed()
    assert alice.ws.close_code in (1001, 1012)
    await Client.connect(staying.url, make_token("alice"))
    assert leaving.process.wait(timeout(15)) == 0
    await asyncio.sleep(3)  # past the grace of the old session
    carol = await Client.connect(staying.url, make_token("carol"))
    await bob.presence("carol", status="available")
    assert bob.updates_of("alice") == []
    await carol.close()


async def test_a_redis_restart_is_survived(
    own_redis_server: EmbeddedRedis, start_node: StartNode
) -> None:
    redis_server = own_redis_server
    node = await start_node(redis_server)
    url = ws_url(node)
    bob = await Client.connect(url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    token = make_token("alice")
    alice = await Client.connect(url, token)
    await alice.request({"type": "set_status", "status": "dnd"})
    await bob.presence("alice", status="dnd")

    redis_server.stop(kill=True)
    failed = await alice.request({"type": "set_status", "status": "busy"})
    assert (failed["type"], failed["code"]) == ("error", "unavailable")
    # A newcomer is told, and closed with 1011, rather than left hanging.
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        error = msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout(40)))
        assert error["code"] == "unavailable"
        await ws.wait_closed()
    assert ws.close_code == 1011
    redis_server.start()

    # Retry as a client would, until the hub has its Redis back.
    away = {"type": "set_status", "status": "away"}
    await until_ok(alice, away, "the hub never got its Redis back")
    await bob.presence("alice", status="away", wait=30)
    query = await bob.request({"type": "query", "users": ["alice"]})
    assert query["presences"][0]["status"] == "away"


async def test_workers_share_the_ports_and_the_state(
    spawn_hub: Callable[..., HubProcess],
) -> None:
    hub = spawn_hub("--workers", "2")
    await hub.ready()
    workers = [
        child
        for child in psutil.Process(hub.process.pid).children()
        if "spawn_main" in " ".join(child.cmdline())
    ]
    assert len(workers) == 2

    def listening(worker: psutil.Process) -> bool:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == hub.port
            for c in worker.net_connections()
        )

    # Both listen before anyone connects, so that the kernel spreads the sockets.
    await eventually(lambda: all(listening(w) for w in workers))
    clients = [await Client.connect(hub.url, make_token(f"u{n}")) for n in range(12)]
    await clients[0].request({"type": "subscribe", "users": [f"u{n}" for n in range(12)]})
    for n, client in enumerate(clients[1:], start=1):
        await client.request({"type": "set_message", "text": f"hello from {n}"})
    for n in range(1, 12):
        await clients[0].presence(f"u{n}", message=f"hello from {n}")

    # Every scrape reaches one worker, and every one counts the whole node: the 12
    # sockets, wherever the kernel put them, and the updates all workers delivered.
    async def scrape() -> dict[str, Metric]:
        async with aiohttp.ClientSession() as http, http.get(f"{hub.http_url}/metrics") as r:
            return {f.name: f for f in text_string_to_metric_families(await r.text())}

    for _ in range(6):
        families = await scrape()
        assert sum(s.value for s in families["presence_hub_connections"].samples) == 12
        assert families["presence_hub_deliveries"].samples[0].value >= 11
    # A worker that dies takes its sockets out of the count.
    dead, alive = workers
    served = [
        c
        for c in alive.net_connections()
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == hub.port
    ]
    dead.kill()
    async with asyncio.timeout(timeout(20)):
        while True:
            families = await scrape()
            if sum(s.value for s in families["presence_hub_connections"].samples) == len(served):
                break
            await asyncio.sleep(0.1)
    await Client.close_all()
    hub.signal(signal.SIGTERM)
    assert hub.process.wait(timeout(30)) == 0
