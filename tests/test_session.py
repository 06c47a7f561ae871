"""A client's session, end to end (real sockets, a real node, real Redis): every
request answered, limits, token expiry, tenants and invisibility kept apart."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import StartNode, make_token, ws_url
from tests.wsclient import Client

FORMATS = ["json", "msgpack"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_client_frame(start_node: StartNode, fmt: str) -> None:
    node = await start_node()
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"), fmt=fmt)
    bob = await Client.connect(url, make_token("bob"), fmt=fmt)

    snapshot = await bob.request({"type": "subscribe", "users": ["alice", "nobody"]})
    assert snapshot["type"] == "snapshot"
    first, nobody = snapshot["presences"]
    assert (first["user"], first["status"], first["ver"]) == ("alice", "available", 1)
    assert nobody == {
        "user": "nobody",
        "status": "offline",
        "message": None,
        "since": None,
        "ver": 0,
    }

    assert await alice.request({"type": "set_status", "status": "busy"}) == {
        "type": "ok",
        "id": 1,
    }
    assert (await bob.presence("alice", status="busy"))["ver"] == 2
    own = await alice.expect(lambda f: f["type"] == "self" and f["manual"] == "busy")
    assert own["effective"] == "busy"

    expires = time.time() + 3600
    reply = await alice.request({"type": "set_message", "text": "demo", "expires_at": expires})
    assert reply["type"] == "ok"
    assert (await bob.presence("alice", message="demo"))["status"] == "busy"

    reply = await alice.request({"type": "set_settings", "auto_away_after": 300})
    assert reply["type"] == "ok"
    own = await alice.expect(lambda f: f["type"] == "self" and f["auto_away_after"] == 300)
    assert own["message_expires_at"] == expires

    await alice.send({"type": "activity"})  # no reply

    query = await alice.request({"type": "query", "users": ["alice", "bob"]})
    assert [(p["user"], p["status"]) for p in query["presences"]] == [
        ("alice", "busy"),
        ("bob", "available"),
    ]

    refreshed = await alice.request({"type": "auth", "token": make_token("alice", ttl=7200)})
    assert refreshed["type"] == "ok"

    assert (await bob.request({"type": "unsubscribe", "users": ["alice"]}))["type"] == "ok"
    await alice.request({"type": "set_status", "status": "away"})
    # bob watches carol now; if alice's change had reached him it would come first.
    await bob.request({"type": "subscribe", "users": ["carol"]})
    carol = await Client.connect(url, make_token("carol"), fmt=fmt)
    await bob.presence("carol", status="available")
    assert bob.updates_of("alice") == []
    await carol.close()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_producer_events_over_websocket(start_node: StartNode, fmt: str) -> None:
    node = await start_node()
    url = ws_url(node)
    producer = await Client.connect(url, make_token("callserver", role="producer"), fmt=fmt)
    alice = await Client.connect(url, make_token("alice"), fmt=fmt)
    event = {
        "event_id": "e-1",
        "kind": "call_started",
        "user": "alice",
        "ref": "call-1",
        "at": time.time(),
    }
    reply = await producer.request({"type": "event", "event": event})
    assert (reply["result"], "error" in reply) == ("applied", False)
    again = await producer.request({"type": "event", "event": event})
    assert again["result"] == "duplicate"
    bad = await producer.request(
        {"type": "event", "event": {**event, "event_id": "e-2", "kind": "x"}}
    )
    assert bad["result"] == "rejected"
    assert "kind" in bad["error"]
    own = await alice.expect(lambda f: f["type"] == "self" and f["calls"] == 1)
    assert own["effective"] == "on_call"

    denied = await alice.request({"type": "event", "event": {**event, "event_id": "e-3"}})
    assert (denied["type"], denied["code"]) == ("error", "forbidden")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_bad_frames_get_errors_and_leave_every_connection_working(
    start_node: StartNode, fmt: str
) -> None:
    node = await start_node()
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"), fmt=fmt)
    bob = await Client.connect(url, make_token("bob"), fmt=fmt)
    await bob.request({"type": "subscribe", "users": ["alice"]})

    wrong_kind = b"\x93\x01\x02" if fmt == "json" else "text frame"
    raw_frames: list[bytes | str] = [
        b"\xc1\xff\x00random" if fmt == "msgpack" else "{not json",
        json.dumps([1, 2]) if fmt == "json" else msgpack.packb([1, 2]),
        wrong_kind,
    ]
    for raw in raw_frames:
        await alice.send_raw(raw)
        error = await alice.expect(lambda f: f["type"] == "error")
        assert error["code"] == "bad_request"

    bad_requests: list[dict[str, Any]] = [
        {"type": "teleport"},
        {"no": "type"},
        {"type": "set_status", "status": "on_call"},
        {"type": "set_status", "status": 7},
        {"type": "set_status", "status": "dnd", "until": "in an hour"},
        {"type": "set_status", "status": "dnd", "until": -60},
        {"type": "set_status", "status": "dnd", "until": float("nan")},
        {"type": "set_status", "status": "dnd", "until": float("inf")},
        {"type": "set_status", "status": "dnd", "until": time.time() + 367 * 86400},
        {"type": "set_message", "text": "x" * 281},
        {"type": "set_message", "text": ["list"]},
        {"type": "set_message", "text": "old", "expires_at": time.time() - 10},
        {"type": "set_settings", "auto_away_after": "soon"},
        {"type": "set_settings", "auto_away_after": 86401},
        {"type": "set_settings"},
        {"type": "subscribe", "users": "alice"},
        {"type": "subscribe", "users": ["bad id with spaces"]},
        {"type": "subscribe", "users": ["x"], "known": {"x": "1"}},
        {"type": "query", "users": [1, 2]},
        {"type": "auth", "token": "not-a-token"},
        {"type": "event", "event": "call"},
    ]
    for frame in bad_requests:
        error = await alice.request(frame)
        assert (error["type"], error["code"]) == ("error", "bad_request"), frame
        assert error["message"]
    await alice.send({"type": "set_status", "status": "busy", "id": "x" * 65})
    bad_id = await alice.expect(lambda f: f["type"] == "error")
    assert (bad_id["code"], "id" in bad_id) == ("bad_request", False)

    # Nothing was changed by any of them, and both connections still work.
    query = await bob.request({"type": "query", "users": ["alice"]})
    assert query["presences"][0] == {**query["presences"][0], "status": "available", "ver": 1}
    await alice.request({"type": "set_status", "status": "dnd"})
    assert (await bob.presence("alice"))["status"] == "dnd"


async def test_limits(start_node: StartNode) -> None:
    node = await start_node(max_users_per_request=5, max_subscriptions=8)
    alice = await Client.connect(ws_url(node), make_token("alice"))
    users = [f"u{n}" for n in range(6)]
    too_many = await alice.request({"type": "subscribe", "users": users})
    assert too_many["code"] == "limit_exceeded"
    assert (await alice.request({"type": "query", "users": users}))["code"] == "limit_exceeded"
    assert (await alice.request({"type": "subscribe", "users": users[:5]}))["type"] == "snapshot"
    more = await alice.request({"type": "subscribe", "users": ["v1", "v2", "v3", "v4"]})
    assert more["code"] == "limit_exceeded"
    # Resubscribing to users already watched does not count twice.
    assert (await alice.request({"type": "subscribe", "users": users[:5]}))["type"] == "snapshot"
    assert node.hub.subscriptions == 5


async def test_a_flood_is_rate_limited_then_closed(start_node: StartNode) -> None:
    node = await start_node(rate_limit=1.0, rate_burst=3)
    alice = await Client.connect(ws_url(node), make_token("alice"))
    for _ in range(3):
        assert (await alice.request({"type": "query", "users": []}))["type"] == "snapshot"
    limited = await alice.request({"type": "query", "users": []})
    assert limited["code"] == "rate_limited"

    async def flood() -> None:
        for _ in range(200):
            await alice.send({"type": "query", "users": []})
            await alice.recv()

    with pytest.raises(ConnectionClosed) as closed:
        await flood()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


async def test_an_expired_token_closes_with_1008_unless_refreshed(start_node: StartNode) -> None:
    node = await start_node()
    url = ws_url(node)
    short = await Client.connect(url, make_token("alice", ttl=2))
    refreshed = await Client.connect(url, make_token("bob", ttl=2))
    reply = await refreshed.request({"type": "auth", "token": make_token("bob", ttl=600)})
    assert reply["type"] == "ok"
    other = await refreshed.request({"type": "auth", "token": make_token("alice", ttl=600)})
    assert other["code"] == "forbidden"
    with pytest.raises(ConnectionClosed) as closed:
        await short.recv(wait=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert (await refreshed.request({"type": "query", "users": []}))["type"] == "snapshot"


async def test_tenants_never_see_each_other(start_node: StartNode) -> None:
    node = await start_node()
    url = ws_url(node)
    acme_alice = await Client.connect(url, make_token("alice", tenant="acme"))
    globex_eve = await Client.connect(url, make_token("eve", tenant="globex"))
    globex_alice = await Client.connect(url, make_token("alice", tenant="globex"))
    await globex_eve.request({"type": "subscribe", "users": ["alice"]})
    await globex_alice.request({"type": "set_status", "status": "dnd"})
    await globex_eve.presence("alice", status="dnd")
    await acme_alice.request({"type": "set_status", "status": "busy"})
    await acme_alice.request({"type": "set_message", "text": "acme only"})
    query = await globex_eve.request({"type": "query", "users": ["alice"]})
    assert query["presences"][0]["status"] == "dnd"
    assert query["presences"][0]["message"] is None
    assert globex_eve.updates_of("alice") == []
    producer = await Client.connect(url, make_token("pbx", tenant="globex", role="producer"))
    event = {
        "event_id": "x",
        "kind": "call_started",
        "user": "alice",
        "ref": "c",
        "at": time.time(),
    }
    await producer.request({"type": "event", "event": event})
    own = await globex_alice.expect(lambda f: f["type"] == "self" and f["calls"] == 1)
    assert own["calls"] == 1
    acme_view = await acme_alice.request({"type": "query", "users": ["alice"]})
    assert acme_view["presences"][0]["status"] == "busy"


async def test_an_invisible_user_leaks_nothing(start_node: StartNode) -> None:
    node = await start_node()
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    bob = await Client.connect(url, make_token("bob"))
    producer = await Client.connect(url, make_token("pbx", role="producer"))
    await bob.request({"type": "subscribe", "users": ["alice", "carol"]})
    await alice.request({"type": "set_status", "status": "invisible"})
    offline = await bob.presence("alice", status="offline")

    call = {
        "event_id": "c1",
        "kind": "call_started",
        "user": "alice",
        "ref": "c",
        "at": time.time(),
    }
    await producer.request({"type": "event", "event": call})
    await alice.request({"type": "set_message", "text": "secret"})
    await alice.send({"type": "activity"})
    phone = await Client.connect(url, make_token("alice"), device="mobile")
    await phone.close()
    # A marker: carol's login reaches bob after anything alice's changes could have sent.
    carol = await Client.connect(url, make_token("carol"))
    await bob.presence("carol", status="available")
    assert bob.updates_of("alice") == []
    query = await bob.request({"type": "query", "users": ["alice"]})
    assert query["presences"][0] == {
        "user": "alice",
        "status": "offline",
        "message": None,
        "since": offline["since"],
        "ver": offline["ver"],
    }
    await carol.close()


async def test_subscribe_with_known_sends_only_what_changed(start_node: StartNode) -> None:
    node = await start_node()
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    bob = await Client.connect(url, make_token("bob"))
    first = await bob.request({"type": "subscribe", "users": ["alice", "bob", "zed"]})
    known = {p["user"]: p["ver"] for p in first["presences"]}
    await alice.request({"type": "set_status", "status": "busy"})
    await bob.presence("alice", status="busy")

    again = await Client.connect(url, make_token("bob"), device="web")
    resync = await again.request({"type": "subscribe", "users": list(known), "known": known})
    assert [(p["user"], p["status"]) for p in resync["presences"]] == [("alice", "busy")]
