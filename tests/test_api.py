"""The HTTP API end to end: real HTTP, a real hub node, real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest
from aiohttp import ClientSession
from redis.asyncio import Redis

from presence_hub.server import Node
from presence_hub.store import EmbeddedRedis
from tests.conftest import StartNode, make_token, ws_url
from tests.utils import eventually, timeout
from tests.wsclient import Client

PRODUCER = make_token("pbx", role="producer")
ADMIN = make_token("ops", role="admin")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def event(event_id: str, kind: str, user: str, ref: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "kind": kind,
        "user": user,
        "ref": ref,
        "at": time.time(),
        **extra,
    }


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


def base(node: Node) -> str:
    return f"http://127.0.0.1:{node.http_port}"


async def post_events(
    http: ClientSession, node: Node, events: list[Any], token: str = PRODUCER
) -> list[dict[str, Any]]:
    async with http.post(
        f"{base(node)}/v1/events", json={"events": events}, headers=auth(token)
    ) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    return cast("list[dict[str, Any]]", body["results"])


async def stored_keys(redis: Redis) -> set[bytes]:
    return set(cast("list[bytes]", await redis.keys("*")))


async def test_events_apply_in_order_with_a_result_each(
    start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node()
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    alice = await Client.connect(ws_url(node), make_token("alice"))
    await bob.presence("alice", status="available")

    results = await post_events(
        http,
        node,
        [
            event("e1", "call_started", "alice", "c1"),
            event("e2", "call_ended", "alice", "c1"),
            event("e3", "meeting_started", "alice", "m1"),
            event("e4", "call_started", "alice", "c1"),
            {"event_id": "e5", "kind": "call_started", "user": "alice"},
            event("e6", "call_started", "bad user", "c2"),
            "not an event",
        ],
    )
    assert [r["result"] for r in results] == [
        "applied",
        "applied",
        "applied",
        "stale",
        "rejected",
        "rejected",
        "rejected",
    ]
    assert [r["event_id"] for r in results] == ["e1", "e2", "e3", "e4", "e5", "e6", None]
    assert "ref" in results[4]["error"]
    assert "user" in results[5]["error"]
    await bob.presence("alice", status="busy")
    own = await alice.expect(lambda f: f["type"] == "self" and f["meetings"] == 1)
    assert own["calls"] == 0


async def test_msgpack_bodies_are_accepted(start_node: StartNode, http: ClientSession) -> None:
    node = await start_node()
    body = msgpack.packb({"events": [event("e1", "meeting_started", "alice", "m1")]})
    async with http.post(
        f"{base(node)}/v1/events",
        data=body,
        headers={**auth(PRODUCER), "Content-Type": "application/msgpack"},
    ) as r:
        assert r.status == 200
        assert (await r.json())["results"] == [{"event_id": "e1", "result": "applied"}]


async def test_a_repeated_batch_is_all_duplicate_and_publishes_nothing(
    start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node()
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice", "carol"]})
    await Client.connect(ws_url(node), make_token("alice"))
    await bob.presence("alice", status="available")
    batch = [event("e1", "call_started", "alice", "c1"), event("e2", "call_ended", "alice", "c1")]
    assert [r["result"] for r in await post_events(http, node, batch)] == ["applied", "applied"]
    await bob.presence("alice", status="available", ver=3)
    bob.inbox.clear()
    assert [r["result"] for r in await post_events(http, node, batch)] == ["duplicate"] * 2
    await Client.connect(ws_url(node), make_token("carol"))
    await bob.presence("carol", status="available")
    assert [p["ver"] for p in bob.updates_of("alice")] == []


async def test_a_call_that_started_before_login_shows_at_login(
    start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node()
    await post_events(http, node, [event("e1", "call_started", "alice", "c1")])
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    alice = await Client.connect(ws_url(node), make_token("alice"))
    assert alice.welcome["self"]["effective"] == "on_call"
    await bob.presence("alice", status="on_call")


async def test_max_duration_ends_a_call_whose_end_never_comes(
    start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node()
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    await Client.connect(ws_url(node), make_token("alice"))
    await post_events(http, node, [event("e1", "call_started", "alice", "c1", max_duration=1)])
    await bob.presence("alice", status="on_call", ver=2)
    await bob.presence("alice", status="available", ver=3)
    late_end = await post_events(http, node, [event("e2", "call_ended", "alice", "c1")])
    assert late_end[0]["result"] == "stale"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b'{"events": "all of them"}', "application/json"),
        (b'{"nothing": []}', "application/json"),
        (b"\xc1\xc1", "application/msgpack"),
        (msgpack.packb([1]), "application/msgpack"),
    ],
    ids=["not-json", "not-a-map", "events-not-a-list", "no-events", "bad-msgpack", "msgpack-list"],
)
async def test_a_malformed_body_is_400_and_applies_nothing(
    start_node: StartNode, http: ClientSession, redis: Redis, body: bytes, content_type: str
) -> None:
    node = await start_node()
    before = await stored_keys(redis)
    async with http.post(
        f"{base(node)}/v1/events",
        data=body,
        headers={**auth(PRODUCER), "Content-Type": content_type},
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]
    assert await stored_keys(redis) == before


async def test_auth_roles_and_sizes(
    start_node: StartNode, http: ClientSession, redis: Redis
) -> None:
    node = await start_node()
    url = f"{base(node)}/v1/events"
    one = {"events": [event("e1", "call_started", "alice", "c1")]}
    before = await stored_keys(redis)
    expired = make_token("pbx", role="producer", ttl=-5)
    for headers, status in [
        ({}, 401),
        (auth("garbage"), 401),
        (auth(expired), 401),
        (auth(make_token("alice")), 403),
    ]:
        async with http.post(url, json=one, headers=headers) as r:
            assert r.status == status
    too_many = {"events": [event(f"e{n}", "call_started", "alice", f"c{n}") for n in range(1001)]}
    async with http.post(url, json=too_many, headers=auth(PRODUCER)) as r:
        assert r.status == 413
    huge = b'{"events": ["' + b"x" * (3 * 1024 * 1024) + b'"]}'
    async with http.post(url, data=io.BytesIO(huge), headers=auth(PRODUCER)) as r:
        assert r.status == 413
    assert await stored_keys(redis) == before
    async with http.get(f"{base(node)}/v1/presence?users=a", headers=auth(make_token("a"))) as r:
        assert r.status == 403


async def test_a_producer_cannot_touch_another_tenant(
    start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node()
    acme_alice = await Client.connect(ws_url(node), make_token("alice", tenant="acme"))
    globex = make_token("pbx", tenant="globex", role="producer")
    await post_events(http, node, [event("e1", "call_started", "alice", "c1")], token=globex)
    async with http.get(f"{base(node)}/v1/presence?users=alice", headers=auth(PRODUCER)) as r:
        acme_view = (await r.json())["presences"][0]
    assert acme_view["status"] == "available"
    query = await acme_alice.request({"type": "query", "users": ["alice"]})
    assert query["presences"][0]["status"] == "available"


async def test_accepts_calls_for_call_routing(start_node: StartNode, http: ClientSession) -> None:
    node = await start_node()
    url = ws_url(node)
    for user, status in [("avail", "available"), ("dnd", "dnd"), ("ghost", "invisible")]:
        client = await Client.connect(url, make_token(user))
        await client.request({"type": "set_status", "status": status})
    oncall = await Client.connect(url, make_token("oncall"))
    await post_events(http, node, [event("e1", "call_started", "oncall", "c1")])
    await oncall.expect(lambda f: f["type"] == "self" and f["calls"] == 1)
    users = "avail,dnd,ghost,oncall,nobody"
    async with http.get(f"{base(node)}/v1/presence?users={users}", headers=auth(PRODUCER)) as r:
        presences = (await r.json())["presences"]
    assert [(p["user"], p["status"], p["accepts_calls"]) for p in presences] == [
        ("avail", "available", True),
        ("dnd", "dnd", False),
        ("ghost", "offline", True),
        ("oncall", "on_call", True),
        ("nobody", "offline", False),
    ]
    for bad in ["", "a,,b,bad id", ",".join(f"u{n}" for n in range(1001))]:
        async with http.get(f"{base(node)}/v1/presence?users={bad}", headers=auth(PRODUCER)) as r:
            assert r.status == 400


async def test_explain_says_which_rule_decided(start_node: StartNode, http: ClientSession) -> None:
    node = await start_node()
    alice = await Client.connect(ws_url(node), make_token("alice"), device="mobile")
    await alice.request({"type": "set_settings", "auto_away_after": 600})
    await post_events(http, node, [event("e1", "meeting_started", "alice", "standup")])
    async with http.get(f"{base(node)}/v1/users/alice/explain", headers=auth(ADMIN)) as r:
        assert r.status == 200
        why = await r.json()
    assert (why["effective"], why["rule"], why["manual"]) == ("busy", 7, "available")
    assert "meeting" in why["reason"]
    assert [s["device"] for s in why["sessions"]] == ["mobile"]
    assert why["sessions"][0]["node"] == node.id
    assert [m["ref"] for m in why["meetings"]] == ["standup"]
    assert why["meetings"][0]["expires_at"] > time.time()
    assert why["auto_away_after"] == 600
    assert why["last_activity"] is not None
    async with http.get(f"{base(node)}/v1/users/alice/explain", headers=auth(PRODUCER)) as r:
        assert r.status == 403


async def test_health_and_readiness_follow_redis(
    own_redis_server: EmbeddedRedis, start_node: StartNode, http: ClientSession
) -> None:
    node = await start_node(own_redis_server)
    async with http.get(f"{base(node)}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{base(node)}/readyz") as r:
        assert r.status == 200
    own_redis_server.stop(kill=True)
    async with http.get(f"{base(node)}/readyz") as r:
        assert r.status == 503
    async with http.get(f"{base(node)}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{base(node)}/v1/presence?users=a", headers=auth(PRODUCER)) as r:
        assert r.status == 503
    own_redis_server.start()

    async def ready() -> bool:
        async with http.get(f"{base(node)}/readyz") as r:
            return r.status == 200

    for _ in range(150):
        if await ready():
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("never ready again")


async def test_metrics_count_what_happens(start_node: StartNode, http: ClientSession) -> None:
    node = await start_node()
    bob = await Client.connect(ws_url(node), make_token("bob"), device="web")
    await bob.request({"type": "subscribe", "users": ["alice"]})
    await post_events(http, node, [event("e1", "call_started", "alice", "c1")])
    await Client.connect(ws_url(node), make_token("alice"))
    await bob.presence("alice", status="on_call")
    await eventually(lambda: node.metrics.deliveries._value.get() >= 1)
    async with http.get(f"{base(node)}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['presence_hub_connections{device="web"}'] == 1
    assert samples['presence_hub_frames_in_total{type="subscribe"}'] == 1
    assert samples['presence_hub_events_total{kind="call_started",result="applied"}'] == 1
    assert samples["presence_hub_subscriptions"] == 1
    assert samples["presence_hub_deliveries_total"] >= 1
    assert samples["presence_hub_update_latency_seconds_count"] >= 1
    assert samples['presence_hub_store_seconds_count{op="events"}'] == 1
    for name in ["coalesced_updates_total", "slow_consumer_closes_total", "redis_errors_total"]:
        assert f"presence_hub_{name}" in samples


async def test_the_openapi_document_is_served(start_node: StartNode, http: ClientSession) -> None:
    node = await start_node()
    async with http.get(f"{base(node)}/openapi.json") as r:
        served = await r.json()
    shipped = json.loads(resources.files("presence_hub").joinpath("openapi.json").read_text())
    assert served == shipped
    assert set(served["paths"]) == {
        "/v1/events",
        "/v1/presence",
        "/v1/changes",
        "/v1/webhooks",
        "/v1/webhooks/{name}",
        "/v1/users/{user}/explain",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/",
        "/page.js",
        "/page/config",
    }


@pytest.mark.slow
async def test_generated_requests_never_cause_a_server_error(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = await start_node()
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is a test dependency"
    process = await asyncio.create_subprocess_exec(
        cli, "run", f"{base(node)}/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
        "--max-examples", "40",
        # An endless stream, and webhooks that would post to whatever URL it makes up:
        # their refusals are tested in test_feed.py and test_webhooks.py.
        "--exclude-path", "/v1/changes",
        "--exclude-path-regex", "^/v1/webhooks",
        "-H", f"Authorization: Bearer {ADMIN}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its cache stays out of the repository
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout(240))
    assert process.returncode == 0, output.decode()[-5000:]
