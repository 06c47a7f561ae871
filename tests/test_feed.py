"""The change feed (``GET /v1/changes``): every observer-visible change of a tenant, as
Server-Sent Events, in ver order per user, resumable from any event's id, and nothing
that observers would not see."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohappyeyeballs import AddrInfoType
from redis.asyncio import Redis

from presence_hub import codec
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.model import MessageSet, SessionOpened
from presence_hub.server import Node
from presence_hub.store import EmbeddedRedis, PresenceStore, keys
from presence_hub.store import feed as feed_module
from presence_hub.store.feed import Change, Cursor
from tests.cluster import users_on_every_shard
from tests.conftest import StartNode, make_token, ws_url
from tests.processes import HubProcess
from tests.utils import timeout
from tests.wsclient import Client

PRODUCER = {"Authorization": f"Bearer {make_token('crm', role='producer')}"}


def base(node: Node) -> str:
    return f"http://127.0.0.1:{node.http_port}"


class Stream:
    """A reader of an event stream: (id, Presence) pairs as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.comments = 0

    async def _next(self) -> tuple[str, dict[str, Any]]:
        fields: dict[str, str] = {}
        while True:
            line = (await self.response.content.readline()).decode()
            if line == "":
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith(":"):
                self.comments += 1
            elif line == "":
                if "data" in fields:
                    assert fields["event"] == "presence"
                    return fields["id"], json.loads(fields["data"])
            else:
                name, _, value = line.partition(": ")
                fields[name] = value

    async def until(self, done: Any, wait: float = 20) -> list[tuple[str, dict[str, Any]]]:
        """Read until ``done(presence)`` holds for an event; returns every event so far."""
        async with asyncio.timeout(wait):
            while True:
                event = await self._next()
                self.events.append(event)
                if done(event[1]):
                    return self.events


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


Follow = Callable[..., Awaitable[Stream]]


@pytest.fixture
async def follow(http: aiohttp.ClientSession) -> AsyncIterator[Follow]:
    """``await follow(node, query, **headers)`` opens a stream; each is closed after the test."""
    opened: list[Stream] = []

    async def open_stream(node: Node, query: str = "", **headers: str) -> Stream:
        url = f"{base(node)}/v1/changes{query}"
        response = await http.get(url, headers={**PRODUCER, **headers})
        opened.append(Stream(response))
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        return opened[-1]

    yield open_stream
    for stream in opened:
        stream.response.close()


async def test_every_visible_change_in_ver_order_and_nothing_invisible(
    start_node: StartNode, follow: Follow
) -> None:
    node = await start_node()
    stream = await follow(node)
    alice = await Client.connect(ws_url(node), make_token("alice"))
    bob = await Client.connect(ws_url(node), make_token("bob"))
    ghost = await Client.connect(ws_url(node), make_token("ghost"))
    other = await Client.connect(ws_url(node), make_token("alice", tenant="globex"))
    await ghost.request({"type": "set_status", "status": "invisible"})
    for n in range(5):
        await alice.request({"type": "set_message", "text": f"a{n}"})
        await bob.request({"type": "set_message", "text": f"b{n}"})
        await ghost.request({"type": "set_message", "text": f"secret {n}"})
        await other.request({"type": "set_message", "text": f"globex {n}"})
    await bob.request({"type": "set_status", "status": "dnd"})
    events = await stream.until(lambda p: p["user"] == "bob" and p["status"] == "dnd")

    by_user: dict[str, list[dict[str, Any]]] = {}
    for _, presence in events:
        by_user.setdefault(presence["user"], []).append(presence)
    assert [p["message"] for p in by_user["alice"]][-5:] == [f"a{n}" for n in range(5)]
    for changes in by_user.values():
        vers = [p["ver"] for p in changes]
        assert vers == sorted(vers)
        assert vers == list(range(vers[0], vers[0] + len(vers)))
    # The invisible user shows only as going offline; another tenant not at all.
    assert [p["status"] for p in by_user["ghost"]][-1] == "offline"
    assert all("secret" not in (p["message"] or "") for p in by_user["ghost"])
    assert all("globex" not in (p["message"] or "") for _, p in events)
    ids = [cursor for cursor, _ in events]
    assert len(set(ids)) == len(ids)


async def test_a_reader_that_resumes_from_its_last_id_misses_nothing(
    start_node: StartNode, follow: Follow
) -> None:
    node = await start_node()
    stream = await follow(node, "?users=carol")
    carol = await Client.connect(ws_url(node), make_token("carol"))
    await carol.request({"type": "set_message", "text": "one"})
    seen = await stream.until(lambda p: p["message"] == "one")
    last_id = seen[-1][0]
    stream.response.close()
    for text in ("two", "three", "four"):
        await carol.request({"type": "set_message", "text": text})

    resumed = await follow(node, "?users=carol", **{"Last-Event-ID": last_id})
    after = await resumed.until(lambda p: p["message"] == "four")
    assert [p["message"] for _, p in after] == ["two", "three", "four"]
    assert after[0][1]["ver"] == seen[-1][1]["ver"] + 1
    # ?after= does the same.
    again = await follow(node, f"?users=carol&after={last_id}")
    assert [p["message"] for _, p in await again.until(lambda p: p["message"] == "four")] == [
        "two",
        "three",
        "four",
    ]


async def test_without_a_cursor_the_stream_starts_at_the_present(
    start_node: StartNode, follow: Follow
) -> None:
    node = await start_node()
    dave = await Client.connect(ws_url(node), make_token("dave"))
    await dave.request({"type": "set_message", "text": "before"})
    stream = await follow(node, "?users=dave")
    await dave.request({"type": "set_message", "text": "after"})
    events = await stream.until(lambda p: p["message"] == "after")
    assert [p["message"] for _, p in events] == ["after"]


async def test_bad_cursors_roles_and_a_feed_turned_off(
    start_node: StartNode, http: aiohttp.ClientSession
) -> None:
    node = await start_node()
    url = f"{base(node)}/v1/changes"
    old = f"{int((time.time() - 2 * 86400) * 1000)}-0-0"
    async with http.get(url, headers={**PRODUCER, "Last-Event-ID": old}) as r:
        assert (r.status, await r.json()) == (410, {"error": "cursor_expired"})
    for bad in ("yesterday", "1-2", "1-2-999", "-1-0-0"):
        async with http.get(url, params={"after": bad}, headers=PRODUCER) as r:
            assert r.status == 400, bad
    async with http.get(url, params={"users": "not a user"}, headers=PRODUCER) as r:
        assert r.status == 400
    too_many = ",".join(f"u{n}" for n in range(node.settings.max_users_per_request + 1))
    async with http.get(url, params={"users": too_many}, headers=PRODUCER) as r:
        assert (r.status, await r.json()) == (400, {"error": "at most 1000 users"})
    user = {"Authorization": f"Bearer {make_token('alice')}"}
    async with http.get(url, headers=user) as r:
        assert r.status == 403
    async with http.get(url) as r:
        assert r.status == 401
    off = await start_node(feed_retention=0.0)
    async with http.get(f"{base(off)}/v1/changes", headers=PRODUCER) as r:
        assert r.status == 404


async def test_on_a_cluster_the_feed_covers_users_on_every_shard(
    start_cluster_node: StartNode, follow: Follow
) -> None:
    node = await start_cluster_node()
    stream = await follow(node)
    users = users_on_every_shard()
    clients = [await Client.connect(ws_url(node), make_token(u)) for u in users]
    for client in clients:
        await client.request({"type": "set_message", "text": "hello"})
    seen: set[str] = set()

    def all_seen(p: dict[str, Any]) -> bool:
        if p["message"] == "hello":
            seen.add(p["user"])
        return seen == set(users)

    await stream.until(all_seen, wait=60)


async def test_the_log_keeps_changes_for_the_retention_only(
    start_node: StartNode, redis: Any
) -> None:
    node = await start_node(feed_retention=2.0)
    frank = await Client.connect(ws_url(node), make_token("frank"))
    log = keys.changes_log(TenantId("acme"), UserId("frank"))
    for n in range(250):
        await frank.request({"type": "set_message", "text": f"old {n}"})
    await asyncio.sleep(2.5)  # past the retention of all of them
    for n in range(100):
        await frank.request({"type": "set_message", "text": f"new {n}"})
    # Trimmed as it grew, a whole node of entries (100) at a time: of the 351 written,
    # the new ones and at most one node of old ones are left.
    assert await redis.xlen(log) <= 201
    ((_, newest),) = await redis.xrevrange(log, count=1)
    assert b"new 99" in newest[b"f"]


async def calls(
    http: aiohttp.ClientSession, url: str, tenant: str, users: list[str], posts: int
) -> int:
    """A call started or ended on each of ``users`` a request: the changes made (a
    request's events for one user commit as one change)."""
    producer = {"Authorization": f"Bearer {make_token('pbx', tenant=tenant, role='producer')}"}
    run = time.time_ns()  # event ids are kept for a day: fresh ones on a shared Redis
    for n in range(posts):
        kind = "call_ended" if n % 2 else "call_started"
        events = [
            {
                "event_id": f"{run}-{n}-{u}",
                "kind": kind,
                "user": u,
                "ref": f"{run}-{n // 2}",
                "at": time.time(),
            }
            for u in users
        ]
        async with http.post(f"{url}/v1/events", json={"events": events}, headers=producer) as r:
            results = (await r.json())["results"]
        assert [x["result"] for x in results] == ["applied"] * len(events), results[:3]
    return posts * len(users)


def small_receive_buffer(address: AddrInfoType) -> socket.socket:
    family, kind, proto, _, _ = address
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    return sock


@pytest.mark.slow
async def test_a_reader_that_stops_reading_costs_the_hub_one_round_then_gets_everything(
    own_redis_server: EmbeddedRedis, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # The hub's own backpressure, the same on any Redis: one version's server will do.
    redis = Redis.from_url(own_redis_server.url)
    rates = ("--rate-limit", "10000000", "--rate-burst", "10000000")
    hub = HubProcess(own_redis_server.url, tmp_path, *rates)
    small_buffered = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer),
        timeout=aiohttp.ClientTimeout(total=None),
    )

    async def log_reads() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_xread", {}).get("calls", 0))

    try:
        await hub.ready()
        users = [f"s{n}" for n in range(200)]
        # An offline user's calls change nothing that observers see. Each client reads
        # on (no flow control), so that it answers the hub's pings however long its
        # own updates go unread, and stays online. The longest message makes each
        # event over 3 KB (JSON escapes each of these characters in 12 bytes).
        for user in users:
            client = await Client.connect(hub.url, make_token(user, tenant="stall"), max_queue=None)
            await client.request({"type": "set_message", "text": "\N{HEADPHONE}" * 280})
        producer = {"Authorization": f"Bearer {make_token('crm', tenant='stall', role='producer')}"}
        # aiohttp stops reading a response nobody reads once its buffer is full, then the
        # sockets' buffers fill (the receiver's kept small here; the hub's may grow to 4
        # MB): 9 MB of events leave the hub's writes to it blocked.
        stalled = await small_buffered.get(f"{hub.http_url}/v1/changes", headers=producer)
        made = await calls(http, hub.http_url, "stall", users, posts=14)
        # Its only reader stalled, the node's tail stops reading (TAIL_IDLE).
        async with asyncio.timeout(timeout(30)):
            while True:
                before = await log_reads()
                await asyncio.sleep(0.5)
                if await log_reads() == before:
                    break
        # 9 MB more: a hub that read on to buffer them would read the log every round.
        made += await calls(http, hub.http_url, "stall", users, posts=14)
        assert await log_reads() - before <= 1

        # Read at last, the stalled reader gets every change, each user's in ver order.
        caught_up = Stream(stalled)
        await caught_up.until(lambda p: len(caught_up.events) >= made, wait=120)
        vers: dict[str, list[int]] = {}
        for _, presence in caught_up.events:
            vers.setdefault(presence["user"], []).append(presence["ver"])
        assert sorted(vers) == sorted(users)
        for seen in vers.values():
            assert seen == list(range(seen[0], seen[0] + len(seen)))
        assert len(caught_up.events) == made
        stalled.close()
    finally:
        await small_buffered.close()
        await Client.close_all()
        hub.stop()
        await redis.aclose()


async def test_the_followers_of_a_node_share_one_read_of_the_log(
    redis_server: EmbeddedRedis, start_node: StartNode, follow: Follow
) -> None:
    """Eight streams at the live edge cost Redis about what one does, and each gets
    every change."""
    node = await start_node()
    redis = Redis.from_url(redis_server.url)

    async def reads_in(seconds: float) -> int:
        stats = await redis.info("commandstats")
        before = int(stats.get("cmdstat_xread", {}).get("calls", 0))
        await asyncio.sleep(seconds)
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_xread", {}).get("calls", 0)) - before

    try:
        first = await follow(node)
        one = await reads_in(2.0)
        streams = [first, *[await follow(node) for _ in range(7)]]
        eight = await reads_in(2.0)
        assert one > 0
        assert eight < 2 * one, (one, eight)

        alice = await Client.connect(ws_url(node), make_token("alice"))
        for n in range(3):
            await alice.request({"type": "set_message", "text": f"m{n}"})
        for stream in streams:
            events = await stream.until(lambda p: p["message"] == "m2")
            assert [p["message"] for _, p in events if p["user"] == "alice"][-3:] == [
                "m0",
                "m1",
                "m2",
            ]
    finally:
        await Client.close_all()
        await redis.aclose()


async def test_a_reader_behind_the_tail_reads_redis_then_joins_it_without_a_gap(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "TAIL_SPAN", 2.0)
    redis = Redis.from_url(redis_server.url)
    store = PresenceStore(redis)
    feed = store.feed
    acme, globex = TenantId("acme"), TenantId("globex")
    users = [UserId(f"u{n}") for n in range(4)]
    for tenant in (acme, globex):
        for user in users:
            await store.apply(tenant, user, SessionOpened(SessionId(f"s-{user}"), "desktop", "n"))

    async def change(count: int, tag: str) -> None:
        for n in range(count):
            for tenant in (acme, globex):
                await store.apply(tenant, users[n % 4], MessageSet(f"{tag}{n}"))

    async def read_all(
        read: Any, after: Cursor, wanted: list[UserId] | None = None
    ) -> list[Change]:
        got: list[Change] = []
        async with asyncio.timeout(timeout(30)):
            while True:
                changes, after, caught_up = await read(acme, after, wanted)
                got += changes
                if caught_up:
                    return got

    try:
        # A reader at the live edge starts the node's tail before the early changes; the
        # tail forgets them once they are older than its span, and holds the late ones.
        start = await feed.present()
        _, live, _ = await feed.read(acme, start)
        await change(10, "early")
        for _ in range(40):
            _, live, _ = await feed.read(acme, live)
            await asyncio.sleep(0.1)
        await change(10, "late")
        await asyncio.sleep(0.05)  # past the watermark: every change can be read
        await read_all(feed.read, live)

        from_redis = await read_all(feed.read_redis, start)
        assert len(from_redis) == 20
        tail = feed._tail
        assert tail is not None
        assert tail.start < from_redis[0].cursor
        # The tail answers for what it has read, a round behind Redis at most.
        async with asyncio.timeout(timeout(30)):
            while tail.position < from_redis[-1].cursor:
                await feed.wait(acme, tail.position)
        # The case this test is about: the tail holds the late changes only.
        assert tail.read(acme, from_redis[5].cursor, None) is None
        assert tail.read(acme, from_redis[15].cursor, None) is not None
        assert await read_all(feed.read, start) == from_redis
        # From an event's own cursor (a stream's Last-Event-ID), what follows it.
        assert await read_all(feed.read, from_redis[5].cursor) == from_redis[6:]
        assert await read_all(feed.read, from_redis[15].cursor) == from_redis[16:]
        assert await read_all(feed.read, start, [users[1]]) == [
            c for c in from_redis if c.user == users[1]
        ]
    finally:
        await store.stop()
        await redis.aclose()


@pytest.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[PresenceStore]:
    redis = Redis.from_url(redis_server.url)
    store = PresenceStore(redis)
    yield store
    await store.stop()
    await redis.aclose()


async def at_the_live_edge(store: PresenceStore, reader: TenantId, other: TenantId) -> Cursor:
    """alice online in both tenants, and a reader of ``reader`` at the feed's live edge,
    where the node's tail reads for it: its cursor."""
    for tenant in (reader, other):
        await store.apply(tenant, UserId("alice"), SessionOpened(SessionId("s"), "desktop", "n"))
    async with asyncio.timeout(timeout(30)):
        caught_up = False
        after = await store.feed.present()
        while not caught_up:
            _, after, caught_up = await store.feed.read(reader, after)
    return after


async def test_a_reader_waits_for_its_own_tenants_changes_only(
    store: PresenceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers of a quiet tenant sleep through the other tenants' changes: a node with a
    thousand quiet webhooks is not woken a thousand times a round."""
    monkeypatch.setattr(feed_module, "QUIET_WAIT", 600.0)
    feed = store.feed
    acme, globex = TenantId("acme"), TenantId("globex")
    alice = UserId("alice")
    after = await at_the_live_edge(store, acme, globex)
    waiting = asyncio.create_task(feed.wait(acme, after))
    await store.apply(globex, alice, MessageSet("elsewhere"))
    async with asyncio.timeout(timeout(30)):
        while not (await feed.read(globex, after)).changes:
            await feed.wait(globex, after)
    await asyncio.sleep(10 * feed_module.POLL)  # rounds after it, all quiet
    assert not waiting.done()
    await store.apply(acme, alice, MessageSet("here"))
    await asyncio.wait_for(waiting, timeout(30))
    changes, _, _ = await feed.read(acme, after)
    assert [codec.unpack(c.frame)["message"] for c in changes] == ["here"]


async def test_a_quiet_tenants_reader_reads_on_from_the_tail_however_long_it_waited(
    store: PresenceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail forgets what is older than its span tenant by tenant: a reader whose
    tenant did not change meanwhile still reads at the tail, one whose tenant's
    changes were forgotten reads Redis."""
    monkeypatch.setattr(feed_module, "TAIL_SPAN", 1.0)
    feed = store.feed
    acme, globex = TenantId("acme"), TenantId("globex")
    alice = UserId("alice")
    quiet = await at_the_live_edge(store, acme, globex)
    await store.apply(globex, alice, MessageSet("soon forgotten"))
    tail = feed._tail
    assert tail is not None
    # globex's change falls out of the tail's span (a reader of globex from the same
    # cursor must now read Redis), while another reader keeps the tail going.
    async with asyncio.timeout(timeout(30)):
        while tail.read(globex, quiet, None) is not None:
            await feed.read(globex, await feed.present())
            await asyncio.sleep(0.1)
    assert tail.running
    assert tail.read(acme, quiet, None) is not None
    await store.apply(acme, alice, MessageSet("after a long quiet"))
    async with asyncio.timeout(timeout(30)):
        while not (found := await feed.read(acme, quiet)).changes:
            await feed.wait(acme, quiet)
    assert [codec.unpack(c.frame)["message"] for c in found.changes] == ["after a long quiet"]
