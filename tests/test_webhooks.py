"""Webhooks against a real receiver (aiohttp on loopback): every signature checked,
every change of the tenant delivered at least once and per user in ver order,
nothing of an invisible user, through failures of the receiver and the death of the
delivering node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from presence_hub.client import HubError, PresenceClient
from presence_hub.server import Node
from presence_hub.signature import HEADER, verify
from presence_hub.store import EmbeddedRedis
from presence_hub.webhooks import Plan, plan_claims
from tests.cluster import users_on_every_shard
from tests.conftest import StartNode, make_token, ws_url
from tests.processes import HubProcess
from tests.utils import eventually, timeout
from tests.wsclient import Client

SECRET = "webhook-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
PRODUCER = {"Authorization": f"Bearer {make_token('pbx', role='producer')}"}


class Receiver:
    """A backend's endpoint: checks each signature, collects each change, and answers
    500 to its first ``failures`` deliveries and after ``delay`` seconds. While ``hold``
    is set, it takes a batch in, then answers only once ``hold`` is cleared."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.cursors: list[str] = []
        self.hold = False
        self.holding = asyncio.Event()
        self.released = asyncio.Event()
        self.bad_signatures = 0
        self.failures = 0
        self.delay = 0.0
        self.deliveries = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET, request.headers.get(HEADER, ""), body):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.deliveries += 1
        await asyncio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500)
        payload = json.loads(body)
        assert payload["tenant"] == "acme"
        self.changes.extend(c["presence"] for c in payload["changes"])
        self.cursors.extend(c["cursor"] for c in payload["changes"])
        if self.hold:
            self.holding.set()
            await self.released.wait()
        return web.Response(status=204)

    def last_views(self) -> dict[str, dict[str, Any]]:
        last: dict[str, dict[str, Any]] = {}
        for p in self.changes:
            if p["user"] not in last or p["ver"] >= last[p["user"]]["ver"]:
                last[p["user"]] = p
        return last

    def in_ver_order(self) -> bool:
        seen: dict[str, int] = {}
        for p in self.changes:
            # At least once: a batch sent again repeats vers, never goes back past them.
            if p["ver"] < seen.get(p["user"], 0) and p["ver"] not in self._vers(p["user"]):
                return False
            seen[p["user"]] = max(seen.get(p["user"], 0), p["ver"])
        return True

    def _vers(self, user: str) -> set[int]:
        return {p["ver"] for p in self.changes if p["user"] == user}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    got = Receiver()
    app.router.add_post("/hook", got.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    got.url = f"http://127.0.0.1:{port}/hook"
    yield got
    await runner.cleanup()


def http_base(node: Node | HubProcess) -> str:
    return node.http_url if isinstance(node, HubProcess) else f"http://127.0.0.1:{node.http_port}"


async def register(
    node: Node | HubProcess, url: str, name: str = "crm", **extra: Any
) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{http_base(node)}/v1/webhooks/{name}",
            json={"url": url, "secret": SECRET, **extra},
            headers=ADMIN,
        ) as r,
    ):
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def register_on_each(receiver: Receiver, nodes: list[Node], count: int) -> list[str]:
    """``count`` webhooks to ``receiver``, registered on each node in turn: their names."""
    names = [f"crm-{n}" for n in range(count)]
    for n, name in enumerate(names):
        await register(nodes[n % len(nodes)], receiver.url, name=name)
    return names


async def truth(node: Node | HubProcess, users: list[str]) -> dict[str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{http_base(node)}/v1/presence", params={"users": ",".join(users)}, headers=PRODUCER
        ) as r,
    ):
        presences = (await r.json())["presences"]
    # What observers see: the Presence, less the call-routing answer.
    return {p["user"]: {k: v for k, v in p.items() if k != "accepts_calls"} for p in presences}


async def mixed_load(url: str, users: list[str], rounds: int = 5) -> None:
    """Statuses, messages and calls for ``users``, and an invisible user's messages."""
    clients = [await Client.connect(url, make_token(u)) for u in users]
    ghost = await Client.connect(url, make_token("ghost"))
    await ghost.request({"type": "set_status", "status": "invisible"})
    producer = await Client.connect(url, make_token("pbx", role="producer"))
    statuses = ["busy", "dnd", "away", "available"]
    for n in range(rounds):
        for k, client in enumerate(clients):
            await client.request({"type": "set_status", "status": statuses[(n + k) % 4]})
            await client.request({"type": "set_message", "text": f"round {n}"})
        await ghost.request({"type": "set_message", "text": f"secret {n}"})
        event = {"event_id": f"c{n}", "kind": "call_started", "user": users[0], "ref": f"c{n}"}
        await producer.request({"type": "event", "event": {**event, "at": time.time()}})
    await producer.request(
        {
            "type": "event",
            "event": {**event, "event_id": "end", "kind": "call_ended", "at": time.time()},
        }
    )


async def all_delivered(got: Receiver, expected: dict[str, dict[str, Any]], wait: float) -> None:
    try:
        await eventually(
            lambda: all(got.last_views().get(u) == p for u, p in expected.items()), wait
        )
    except TimeoutError:
        raise AssertionError(f"delivered {got.last_views()}, expected {expected}") from None


def assert_delivered(got: Receiver, expected: dict[str, dict[str, Any]]) -> None:
    last = got.last_views()
    for user, presence in expected.items():
        assert last.get(user) == presence, user
    assert got.in_ver_order()
    assert all("secret" not in (p["message"] or "") for p in got.changes)
    assert got.bad_signatures == 0


async def test_every_change_reaches_the_webhook_signed_and_in_order(
    start_node: StartNode, receiver: Receiver
) -> None:
    node = await start_node()
    hook = await register(node, receiver.url)
    assert hook == {"name": "crm", "url": receiver.url, "users": None}
    users = [f"u{n}" for n in range(6)]
    await mixed_load(ws_url(node), users)
    expected = await truth(node, users)
    await all_delivered(receiver, expected, wait=30)
    assert_delivered(receiver, expected)
    async with aiohttp.ClientSession() as http, http.get(f"{http_base(node)}/metrics") as r:
        metrics = await r.text()
    assert 'presence_hub_webhook_latency_seconds_count{webhook="acme/crm"}' in metrics


async def test_a_quiet_webhook_costs_redis_little_and_still_gets_the_next_change(
    start_node: StartNode, receiver: Receiver, redis_server: EmbeddedRedis
) -> None:
    """Following a quiet feed, a delivering node reads nothing of its webhook's cursor
    and saves it with its claim's renewal, not once a round (twenty a second); so a
    node that takes over starts near the present."""
    node = await start_node()
    await register(node, receiver.url)
    redis = Redis.from_url(redis_server.url)

    async def calls(command: str) -> int:
        stats = await redis.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    try:
        await asyncio.sleep(1.0)  # claimed, and following the feed
        gets, sets = await calls("get"), await calls("set")
        saved = await redis.get("ph:webhook:acme/crm:cursor")
        await asyncio.sleep(3.0)
        # The claim's renewal reads its owner once every CLAIM / 3 = 3.3 s.
        assert await calls("get") - gets <= 2
        assert await calls("set") - sets <= 2
        async with asyncio.timeout(timeout(15)):
            while await redis.get("ph:webhook:acme/crm:cursor") == saved:  # noqa: ASYNC110
                await asyncio.sleep(0.1)

        alice = await Client.connect(ws_url(node), make_token("alice"))
        await alice.request({"type": "set_message", "text": "back from quiet"})
        await eventually(
            lambda: any(p["message"] == "back from quiet" for p in receiver.changes), wait=20
        )
    finally:
        await Client.close_all()
        await redis.aclose()


async def test_a_receiver_that_fails_for_a_while_gets_everything(
    start_node: StartNode, receiver: Receiver
) -> None:
    receiver.failures = 4
    node = await start_node()
    await register(node, receiver.url, users=["u0", "u1"])
    await mixed_load(ws_url(node), ["u0", "u1", "u2"], rounds=3)
    expected = await truth(node, ["u0", "u1"])
    await all_delivered(receiver, expected, wait=60)
    assert_delivered(receiver, expected)
    assert {p["user"] for p in receiver.changes} <= {"u0", "u1"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{http_base(node)}/v1/webhooks", headers=ADMIN) as r,
    ):
        (listed,) = (await r.json())["webhooks"]
    assert "secret" not in listed
    assert listed["status"]["failures_in_a_row"] == 0
    assert listed["status"]["last_error"] == "HTTP 500"
    assert listed["status"]["delivered"] >= len(receiver.changes) - 0


async def test_the_admin_api_checks_what_it_stores(start_node: StartNode) -> None:
    node = await start_node()
    url = f"{http_base(node)}/v1/webhooks/crm"
    async with aiohttp.ClientSession() as http:
        for body in (
            {"url": "ftp://x", "secret": SECRET},
            {"url": "http://127.0.0.1:9/hook", "secret": "short"},
            {"url": "http://127.0.0.1:9/hook", "secret": SECRET, "users": ["not a user"]},
            {"url": "http://127.0.0.1:9/hook", "secret": SECRET, "users": []},
            ["not", "a", "map"],
        ):
            async with http.put(url, json=body, headers=ADMIN) as r:
                assert r.status == 400, body
        async with http.put(
            url, json={"url": "http://127.0.0.1:9/h", "secret": SECRET}, headers=PRODUCER
        ) as r:
            assert r.status == 403
        async with http.put(
            url, json={"url": "http://127.0.0.1:9/h", "secret": SECRET}, headers=ADMIN
        ) as r:
            assert r.status == 200
        other = {"Authorization": f"Bearer {make_token('ops', tenant='globex', role='admin')}"}
        async with http.get(f"{http_base(node)}/v1/webhooks", headers=other) as r:
            assert (await r.json())["webhooks"] == []
        async with http.delete(url, headers=other) as r:
            assert r.status == 404
        async with http.delete(url, headers=ADMIN) as r:
            assert r.status == 200
        async with http.delete(url, headers=ADMIN) as r:
            assert r.status == 404


@pytest.mark.slow
async def test_when_the_delivering_node_dies_mid_batch_another_takes_over(
    redis_server: EmbeddedRedis, receiver: Receiver, tmp_path: Path, redis: Any
) -> None:
    first = HubProcess(redis_server.url, tmp_path)
    second = HubProcess(redis_server.url, tmp_path)
    try:
        await asyncio.gather(first.ready(), second.ready())
        await register(first, receiver.url)
        async with asyncio.timeout(30):
            while (claim := await redis.get("ph:webhook:acme/crm:owner")) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        receiver.hold = True
        starter = await Client.connect(first.url, make_token("starter"))
        await starter.request({"type": "set_message", "text": "first change"})
        async with asyncio.timeout(30):
            await receiver.holding.wait()
        held = list(receiver.cursors)
        # The node that posted the held batch owns the webhook now (a slow start may
        # have let the first claim lapse to the other node); it names itself in its log.
        claim = await redis.get("ph:webhook:acme/crm:owner")
        assert claim is not None
        owner = claim.decode()
        dying = first if f"node {owner} " in first.log.read_text() else second
        survivor = second if dying is first else first
        users = [f"k{n}" for n in range(4)]
        # The load goes on through the death, on the node that lives.
        load = asyncio.create_task(mixed_load(survivor.url, users, rounds=8))
        dying.signal(signal.SIGKILL)
        dying.process.wait()
        receiver.hold = False
        receiver.released.set()
        await load

        expected = await truth(survivor, users)
        await all_delivered(receiver, expected, wait=60)
        assert_delivered(receiver, expected)
        # The batch taken in but not acknowledged came again, from the survivor.
        assert [receiver.cursors.count(c) for c in held] == [2] * len(held)
        taken_over = await redis.get("ph:webhook:acme/crm:owner")
        assert taken_over is not None
        assert taken_over.decode() != owner
    finally:
        await Client.close_all()
        first.stop()
        second.stop()


async def test_a_slow_webhook_delays_neither_another_nor_the_clients(
    start_node: StartNode, receiver: Receiver
) -> None:
    # The slow endpoint takes its connections and never answers.
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    stuck = await asyncio.start_server(hang, "127.0.0.1", 0)
    stuck_url = f"http://127.0.0.1:{stuck.sockets[0].getsockname()[1]}/hook"
    try:
        node = await start_node()
        async with aiohttp.ClientSession() as http:
            for name, url in (("slow", stuck_url), ("crm", receiver.url)):
                async with http.put(
                    f"{http_base(node)}/v1/webhooks/{name}",
                    json={"url": url, "secret": SECRET},
                    headers=ADMIN,
                ) as r:
                    assert r.status == 200
        watcher = await Client.connect(ws_url(node), make_token("watcher"))
        await watcher.request({"type": "subscribe", "users": ["v0"]})
        await mixed_load(ws_url(node), ["v0"], rounds=3)
        await watcher.presence("v0", message="round 2")
        await all_delivered(receiver, await truth(node, ["v0"]), wait=30)
    finally:
        stuck.close()
        for writer in held:
            writer.close()


async def test_on_a_cluster_a_webhook_covers_users_on_every_shard(
    start_cluster_node: StartNode, receiver: Receiver
) -> None:
    node = await start_cluster_node()
    await register(node, receiver.url)
    users = users_on_every_shard()
    clients = [await Client.connect(ws_url(node), make_token(u)) for u in users]
    for client in clients:
        await client.request({"type": "set_message", "text": "hello"})
    await all_delivered(receiver, await truth(node, users), wait=60)


async def test_deliveries_go_on_through_a_redis_restart_under_load(
    own_redis_server: EmbeddedRedis, start_node: StartNode, receiver: Receiver
) -> None:
    node = await start_node(own_redis_server)
    await register(node, receiver.url)
    users = [f"r{n}" for n in range(4)]
    load = asyncio.create_task(mixed_load(ws_url(node), users, rounds=30))
    await eventually(lambda: len(receiver.changes) > 10, wait=30)
    # Requests fail while Redis is away (the load takes no notice); the rest commit.
    own_redis_server.stop()
    own_redis_server.start()
    await load
    # Once the hub has its Redis back, what the load committed, and what a client sets
    # then (the client library retries until the hub can take it), reaches the hook.
    async with PresenceClient(ws_url(node), make_token("alice"), backoff_base=0.2) as alice:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(HubError):
                    await alice.set_message("after")
                    break
                await asyncio.sleep(0.5)
    expected = await truth(node, [*users, "alice"])
    await all_delivered(receiver, expected, wait=60)
    assert_delivered(receiver, expected)


async def test_two_nodes_never_both_deliver_a_webhook(
    start_node: StartNode, receiver: Receiver, redis: Any
) -> None:
    first, second = await start_node(), await start_node()
    await register(first, receiver.url)
    users = [f"w{n}" for n in range(4)]
    # Load through both nodes: each node's dispatcher sees the webhook and the changes.
    await asyncio.gather(
        mixed_load(ws_url(first), users[:2], rounds=4),
        mixed_load(ws_url(second), users[2:], rounds=4),
    )
    expected = await truth(first, users)
    await all_delivered(receiver, expected, wait=30)
    assert_delivered(receiver, expected)
    # One claim, so every change went out once: no cursor came twice.
    assert len(receiver.cursors) == len(set(receiver.cursors))
    owner = await redis.get("ph:webhook:acme/crm:owner")
    assert owner is not None
    assert owner.decode() in (first.id, second.id)


async def test_many_webhooks_are_each_delivered_by_one_node(
    start_node: StartNode, receiver: Receiver, redis: Any
) -> None:
    first, second = await start_node(), await start_node()
    names = await register_on_each(receiver, [first, second], 40)
    alice = await Client.connect(ws_url(second), make_token("alice"))
    await alice.request({"type": "set_message", "text": "to every webhook"})

    def messages() -> int:
        return sum(p["message"] == "to every webhook" for p in receiver.changes)

    await eventually(lambda: messages() >= len(names), 30)
    # Once to each webhook: each is delivered by one node.
    assert messages() == len(names)
    owners = await redis.mget([f"ph:webhook:acme/{name}:owner" for name in names])
    assert set(owners) <= {first.id.encode(), second.id.encode()}


async def test_webhooks_spread_over_the_nodes_and_some_move_to_one_that_joins(
    start_node: StartNode, receiver: Receiver, redis: Any
) -> None:
    first = await start_node()
    names = [f"crm-{n}" for n in range(12)]
    for name in names:
        await register(first, receiver.url, name=name)
    owners = [f"ph:webhook:acme/{name}:owner" for name in names]

    async def held_by_each() -> dict[bytes | None, int]:
        held: dict[bytes | None, int] = {}
        for owner in await redis.mget(owners):
            held[owner] = held.get(owner, 0) + 1
        return held

    async with asyncio.timeout(timeout(30)):  # the only node takes them all
        while await held_by_each() != {first.id.encode(): len(names)}:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    second = await start_node()
    # Half each, give or take one: the first hands back what the second takes.
    async with asyncio.timeout(timeout(30)):
        while (await held_by_each()).get(second.id.encode(), 0) < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert await held_by_each() in (
        {first.id.encode(): 6, second.id.encode(): 6},
        {first.id.encode(): 7, second.id.encode(): 5},
    )
    alice = await Client.connect(ws_url(second), make_token("alice"))
    await alice.request({"type": "set_message", "text": "spread"})
    await eventually(
        lambda: sum(p["message"] == "spread" for p in receiver.changes) >= len(names), 30
    )


async def test_a_webhook_left_unclaimed_for_a_round_is_taken_beyond_the_share(
    start_node: StartNode, receiver: Receiver, redis: Any
) -> None:
    # A node counted among those that deliver but gone (its entry lasts a claim).
    await redis.zadd("ph:webhook-nodes", {"gone": time.time() + 600})
    node = await start_node()
    names = [f"crm-{n}" for n in range(4)]
    for name in names:
        await register(node, receiver.url, name=name)
    owners = [f"ph:webhook:acme/{name}:owner" for name in names]
    try:
        async with asyncio.timeout(timeout(30)):
            while await redis.mget(owners) != [node.id.encode()] * len(names):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await redis.zrem("ph:webhook-nodes", "gone")


async def test_a_node_that_stops_hands_its_webhooks_to_the_others_at_once(
    start_node: StartNode, receiver: Receiver, redis: Any
) -> None:
    first, second = await start_node(), await start_node()
    names = await register_on_each(receiver, [first, second], 4)
    owners = [f"ph:webhook:acme/{name}:owner" for name in names]
    async with asyncio.timeout(timeout(30)):
        while None in await redis.mget(owners):  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    await first.stop()
    # Nothing of it left to wait out: the claims it held are free for the second.
    assert first.id.encode() not in await redis.mget(owners)
    async with asyncio.timeout(timeout(30)):
        while await redis.mget(owners) != [second.id.encode()] * len(names):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    alice = await Client.connect(ws_url(second), make_token("alice"))
    await alice.request({"type": "set_message", "text": "after the stop"})
    await eventually(
        lambda: sum(p["message"] == "after the stop" for p in receiver.changes) >= len(names), 30
    )


def test_a_node_claims_its_share_and_hands_back_what_lies_beyond_it() -> None:
    a, b = b"a", b"b"
    # Six webhooks, two nodes: a holds five, so it keeps its share and one, and hands
    # one back; it takes no lapsed one, its share being full.
    holders = {"w0": a, "w1": a, "w2": a, "w3": a, "w4": a, "w5": None}
    assert plan_claims(holders, a, 2, set()) == Plan(["w0", "w1", "w2", "w3"], ["w4"], [], {"w5"})
    # b, with one of three, takes the lapsed up to its share; one left a round before
    # is taken anyway.
    holders = {"w0": a, "w1": a, "w2": b, "w3": None, "w4": None, "w5": None}
    assert plan_claims(holders, b, 2, set()) == Plan(["w2"], [], ["w3", "w4"], {"w5"})
    assert plan_claims(holders, a, 2, {"w5"}) == Plan(["w0", "w1"], [], ["w3", "w5"], {"w4"})
    # Alone, or before any node counted itself: every webhook is its share.
    assert plan_claims({"w0": None, "w1": b}, a, 0, set()) == Plan([], [], ["w0"], set())
