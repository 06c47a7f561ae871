"""Relays: processes that listen on Redis for a node's workers. Every watcher gets its
updates as without them, Redis sends each update to the node once, and a relay that
dies or loses Redis leaves every watcher with the truth once it is back."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
from redis.asyncio import Redis

from presence_hub.relay import Relay
from presence_hub.server import Node
from presence_hub.store import EmbeddedRedis, keys
from presence_hub.store.clients import open_redis
from tests.cluster import LocalCluster
from tests.conftest import StartNode, make_token, ws_url
from tests.processes import HubProcess
from tests.utils import eventually, timeout
from tests.wsclient import Client, until_ok


@asynccontextmanager
async def running_relay(url: str, path: Path) -> AsyncIterator[Relay]:
    """A relay on ``path``, in this test's event loop."""
    redis = open_redis(url, max_connections=4, listener=True)
    relay = Relay(redis, path)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(relay.listener.wait_ready(), timeout(10))
        await eventually(path.exists)
        yield relay
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()


@asynccontextmanager
async def relay_clients(*paths: Path) -> AsyncIterator[list[Redis]]:
    clients = [open_redis(f"unix://{p}", max_connections=4, listener=True) for p in paths]
    try:
        yield clients  # type: ignore[misc]
    finally:
        for client in clients:
            await client.aclose()


async def subscribers(redis: Redis, user: str) -> int:
    channel = keys.presence_channel("acme", user)
    [(_, count)] = await redis.pubsub_numsub(channel)
    return int(count)


async def test_workers_on_one_relay_get_every_update_and_redis_sends_each_once(
    start_node: StartNode, redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    path = tmp_path / "relay-0.sock"
    async with running_relay(redis_server.url, path), relay_clients(path, path) as (r1, r2):
        first: Node = await start_node(relays=[r1])
        second: Node = await start_node(relays=[r2])
        alice = await Client.connect(ws_url(first), make_token("alice"))
        bob = await Client.connect(ws_url(second), make_token("bob"))
        carol = await Client.connect(ws_url(first), make_token("carol"))
        for watcher in (bob, carol):
            await watcher.request({"type": "subscribe", "users": ["alice"]})
        # Two nodes watch alice; Redis has one subscriber to her channel, the relay.
        assert await subscribers(redis, "alice") == 1
        await alice.request({"type": "set_message", "text": "through the relay"})
        for watcher in (bob, carol):
            await watcher.presence("alice", message="through the relay")
        # The last watcher gone, the relay stops listening for her.
        await bob.request({"type": "unsubscribe", "users": ["alice"]})
        assert await subscribers(redis, "alice") == 1
        await carol.request({"type": "unsubscribe", "users": ["alice"]})
        for _ in range(200):
            if not await subscribers(redis, "alice"):
                break
            await asyncio.sleep(0.05)
        assert not await subscribers(redis, "alice")


async def test_relays_split_the_users_between_them(
    start_node: StartNode, redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    paths = [tmp_path / "relay-0.sock", tmp_path / "relay-1.sock"]
    async with (
        running_relay(redis_server.url, paths[0]) as zero,
        running_relay(redis_server.url, paths[1]) as one,
        relay_clients(*paths) as clients,
    ):
        node = await start_node(relays=clients)
        users = [f"u{n}" for n in range(40)]
        watcher = await Client.connect(ws_url(node), make_token("watcher"))
        await watcher.request({"type": "subscribe", "users": users})
        for relay, n in ((zero, 0), (one, 1)):
            mine = {c for c in relay.listener.channels if c.endswith(":p")}
            expected = {
                keys.presence_channel("acme", u)
                for u in users
                if keys.partition("acme", u) % 2 == n  # type: ignore[arg-type]
            }
            assert mine
            assert mine == expected
        changers = [await Client.connect(ws_url(node), make_token(u)) for u in users[:6]]
        for n, changer in enumerate(changers):
            await changer.request({"type": "set_message", "text": f"m{n}"})
        for n, user in enumerate(users[:6]):
            await watcher.presence(user, message=f"m{n}")


async def test_a_relay_that_comes_back_leaves_watchers_with_the_truth(
    start_node: StartNode, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    path = tmp_path / "relay-0.sock"
    async with relay_clients(path) as [client]:
        async with running_relay(redis_server.url, path):
            node = await start_node(relays=[client])
            alice = await Client.connect(ws_url(node), make_token("alice"))
            bob = await Client.connect(ws_url(node), make_token("bob"))
            await bob.request({"type": "subscribe", "users": ["alice"]})
        # The relay is gone: alice's change commits, and reaches nobody for now.
        await eventually(lambda: not node.hub.listener.ready, wait=timeout(10))
        await alice.request({"type": "set_message", "text": "while the relay was away"})
        async with running_relay(redis_server.url, path):
            # Her watcher gets it once the node listens again, and the live updates after.
            await bob.presence("alice", message="while the relay was away", wait=timeout(20))
            await alice.request({"type": "set_message", "text": "after"})
            await bob.presence("alice", message="after")


async def test_a_relay_that_lost_redis_hands_its_workers_the_truth_once_back(
    own_redis_server: EmbeddedRedis, start_node: StartNode, tmp_path: Path
) -> None:
    path = tmp_path / "relay-0.sock"
    async with (
        running_relay(own_redis_server.url, path) as relay,
        relay_clients(path) as [client],
    ):
        node = await start_node(own_redis_server, relays=[client])
        alice = await Client.connect(ws_url(node), make_token("alice"))
        bob = await Client.connect(ws_url(node), make_token("bob"))
        await bob.request({"type": "subscribe", "users": ["alice"]})
        own_redis_server.stop()
        await eventually(lambda: not relay.listener.ready, wait=timeout(10))
        own_redis_server.start()
        back = {"type": "set_message", "text": "back"}
        await until_ok(alice, back, "the hub never got its Redis back")
        await bob.presence("alice", message="back", wait=timeout(30))
        await eventually(lambda: node.hub.listener.ready, wait=timeout(20))
        await alice.request({"type": "set_message", "text": "live again"})
        await bob.presence("alice", message="live again", wait=timeout(20))


async def test_a_worker_speaking_nonsense_to_its_relay_is_dropped_alone(
    start_node: StartNode, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    path = tmp_path / "relay-0.sock"
    async with running_relay(redis_server.url, path), relay_clients(path) as [client]:
        node = await start_node(relays=[client])
        alice = await Client.connect(ws_url(node), make_token("alice"))
        bob = await Client.connect(ws_url(node), make_token("bob"))
        await bob.request({"type": "subscribe", "users": ["alice"]})
        for nonsense in (
            b"\x00nonsense\r\n*x\r\n",
            b"*2\r\n:1\r\n:2\r\n",
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\n\xff\r\n",
        ):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(nonsense)
            assert await asyncio.wait_for(reader.read(), timeout(10)) == b""
            writer.close()
        await alice.request({"type": "set_message", "text": "unaffected"})
        await bob.presence("alice", message="unaffected")


def relay_processes(hub: HubProcess) -> list[psutil.Process]:
    """The hub's children that listen on a relay's socket (one that is exiting is not)."""
    relays = []
    for child in psutil.Process(hub.process.pid).children():
        try:
            sockets = child.net_connections(kind="unix")
        except psutil.NoSuchProcess:  # it exited between the listing and now
            continue
        if any(c.laddr.endswith(".sock") for c in sockets):
            relays.append(child)
    return relays


async def test_a_node_with_workers_and_relays_restarts_a_relay_that_dies(
    redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    hub = HubProcess(redis_server.url, tmp_path, "--workers", "2", "--relays", "2")
    try:
        await hub.ready()
        await eventually(lambda: len(relay_processes(hub)) == 2, wait=timeout(20))
        users = [f"u{n}" for n in range(10)]
        clients = [await Client.connect(hub.url, make_token(u)) for u in users]
        watchers = [await Client.connect(hub.url, make_token(f"w{n}")) for n in range(4)]
        for watcher in watchers:
            await watcher.request({"type": "subscribe", "users": users})
        for n, client in enumerate(clients):
            await client.request({"type": "set_message", "text": f"first {n}"})
        for watcher in watchers:
            for n, user in enumerate(users):
                await watcher.presence(user, message=f"first {n}")
        # Redis has each user's channel once for the node, however many workers watch.
        for user in users:
            assert await subscribers(redis, user) == 1

        dead = relay_processes(hub)[0]
        dead.kill()
        await eventually(
            lambda: len(relay_processes(hub)) == 2 and dead not in relay_processes(hub),
            wait=timeout(30),
        )
        for n, client in enumerate(clients):
            second = {"type": "set_message", "text": f"second {n}"}
            await until_ok(client, second, "the node never listened again")
        for watcher in watchers:
            for n, user in enumerate(users):
                await watcher.presence(user, message=f"second {n}", wait=timeout(30))
        await Client.close_all()
        hub.signal(signal.SIGTERM)
        assert hub.process.wait(timeout(30)) == 0
    finally:
        await Client.close_all()
        hub.stop()


async def test_a_relay_on_a_redis_cluster_forwards_each_shards_updates(
    start_cluster_node: StartNode, redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    path = tmp_path / "relay-0.sock"
    async with running_relay(redis_cluster.url, path), relay_clients(path) as [client]:
        node = await start_cluster_node(relays=[client])
        users = [f"u{n}" for n in range(12)]  # spread over the three shards
        watcher = await Client.connect(ws_url(node), make_token("watcher"))
        await watcher.request({"type": "subscribe", "users": users})
        for n, user in enumerate(users):
            changer = await Client.connect(ws_url(node), make_token(user))
            await changer.request({"type": "set_message", "text": f"m{n}"})
        for n, user in enumerate(users):
            await watcher.presence(user, message=f"m{n}")
