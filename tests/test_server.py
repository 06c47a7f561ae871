"""The WebSocket protocol end to end: real sockets, a real hub node, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import msgpack
import pytest
from aiohttp import ClientSession
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from presence_hub import model
from presence_hub.ids import TenantId, UserId
from presence_hub.store import keys, serde
from presence_hub.store.nodes import NODES_KEY
from tests.conftest import SECRET, StartNode, make_token, ws_url
from tests.utils import eventually
from tests.wsclient import Client, send_masked, stalled_client

FORMATS = ["json", "msgpack"]


async def test_the_handshake_refuses_bad_tokens_before_upgrading(start_node: StartNode) -> None:
    node = await start_node()
    url = ws_url(node)
    expired = make_token("alice", ttl=-10)
    forged = make_token("alice").rsplit(".", 1)[0] + ".forged"
    cases = {
        "missing": (url, {}),
        "expired": (url, {"Authorization": f"Bearer {expired}"}),
        "forged": (url, {"Authorization": f"Bearer {forged}"}),
        "garbage": (url, {"Authorization": "Bearer not-a-jwt"}),
    }
    for name, (target, headers) in cases.items():
        with pytest.raises(InvalidStatus) as refused:
            await connect(target, additional_headers=headers)
        assert refused.value.response.status_code == 401, name
    with pytest.raises(InvalidStatus) as not_found:
        await connect(url.replace("/v1/ws", "/nope"), additional_headers={})
    assert not_found.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as bad_device:
        await connect(f"{url}?device=fridge&access_token={make_token('alice')}")
    assert bad_device.value.response.status_code == 400


async def test_browsers_pass_the_token_in_the_query(start_node: StartNode) -> None:
    node = await start_node()
    token = make_token("alice")
    async with connect(
        f"{ws_url(node)}?access_token={token}&device=web",
        subprotocols=[Subprotocol("presence.v1.json")],
    ) as ws:
        welcome = json.loads(await ws.recv())
    assert (welcome["type"], welcome["user"], welcome["device"]) == ("welcome", "alice", "web")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_welcome_comes_first_with_the_self_map(start_node: StartNode, fmt: str) -> None:
    node = await start_node()
    client = await Client.connect(ws_url(node), make_token("alice", tenant="acme"), fmt=fmt)
    welcome = client.welcome
    assert welcome["user"] == "alice"
    assert welcome["tenant"] == "acme"
    assert welcome["device"] == "desktop"
    assert abs(welcome["server_time"] - time.time()) < 60
    assert welcome["self"]["manual"] == "available"
    assert welcome["self"]["devices"] == ["desktop"]
    assert welcome["session"]
    await client.close()


async def test_without_a_subprotocol_the_hub_speaks_msgpack(start_node: StartNode) -> None:
    node = await start_node()
    client = await Client.connect(ws_url(node), make_token("alice"), fmt="msgpack", offer=[])
    assert client.ws.subprotocol is None
    reply = await client.request({"type": "query", "users": ["bob"]})
    assert reply["presences"][0]["status"] == "offline"


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


async def test_an_oversized_frame_closes_with_1009(start_node: StartNode) -> None:
    node = await start_node(max_frame=1024)
    alice = await Client.connect(ws_url(node), make_token("alice"))
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await alice.send({"type": "set_message", "text": "x" * 2000})
    with pytest.raises(ConnectionClosed) as closed:
        await alice.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    assert (await bob.request({"type": "query", "users": ["bob"]}))["type"] == "snapshot"


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


async def test_logout_is_offline_at_once_and_a_drop_after_the_grace(start_node: StartNode) -> None:
    node = await start_node(grace=1.0)
    url = ws_url(node)
    bob = await Client.connect(url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice", "carol"]})

    alice = await Client.connect(url, make_token("alice"))
    await bob.presence("alice", status="available")
    await alice.close(1000)
    await bob.presence("alice", status="offline")

    carol = await Client.connect(url, make_token("carol"))
    await bob.presence("carol", status="available")
    dropped_at = time.time()
    carol.ws.transport.abort()
    gone = await bob.presence("carol", status="offline")
    assert gone["since"] >= dropped_at + 0.9


async def test_a_reconnect_within_the_grace_publishes_nothing(start_node: StartNode) -> None:
    node = await start_node(grace=3.0)
    url = ws_url(node)
    bob = await Client.connect(url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice", "carol"]})
    alice = await Client.connect(url, make_token("alice"))
    await bob.presence("alice", status="available")
    alice.ws.transport.abort()
    alice = await Client.connect(url, make_token("alice"))
    await asyncio.sleep(4)  # past the grace of the dropped session
    carol = await Client.connect(url, make_token("carol"))
    await bob.presence("carol", status="available")
    assert [p["status"] for p in bob.updates_of("alice")] == []
    await alice.close()
    await carol.close()


async def test_a_mobile_session_blocks_auto_away_and_devices_stay_in_sync(
    start_node: StartNode,
) -> None:
    node = await start_node()
    url = ws_url(node)
    bob = await Client.connect(url, make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    desk = await Client.connect(url, make_token("alice"))
    phone = await Client.connect(url, make_token("alice"), device="mobile")
    synced = await desk.expect(
        lambda f: f["type"] == "self" and f["devices"] == ["desktop", "mobile"]
    )
    assert synced["effective"] == "available"

    await desk.request({"type": "set_settings", "auto_away_after": 0.5})
    idle = await phone.expect(lambda f: f["type"] == "self" and f["idle"] is True)
    assert idle["effective"] == "available"

    await phone.close()
    away = await bob.presence("alice", status="away")
    assert away["ver"] > 1
    await desk.send({"type": "activity"})
    await bob.presence("alice", status="available")


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


async def test_a_user_dropped_and_watched_again_at_once_stays_watched(
    start_node: StartNode,
) -> None:
    """The node's last watcher leaves and a new one comes in the same instant: the
    node's own subscription must end in place, not be undone by the late unsubscribe."""
    node = await start_node()
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    bob = await Client.connect(url, make_token("bob"))
    carol = await Client.connect(url, make_token("carol"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    for _ in range(20):
        # Bob's unsubscribe and Carol's subscribe reach the node back to back.
        await bob.send({"type": "unsubscribe", "users": ["alice"], "id": 1})
        await carol.send({"type": "subscribe", "users": ["alice"], "id": 1})
        await bob.expect(lambda f: f.get("id") == 1)
        await carol.expect(lambda f: f.get("id") == 1)
        await carol.send({"type": "unsubscribe", "users": ["alice"], "id": 2})
        await bob.send({"type": "subscribe", "users": ["alice"], "id": 2})
        await carol.expect(lambda f: f.get("id") == 2)
        await bob.expect(lambda f: f.get("id") == 2)
    await alice.request({"type": "set_status", "status": "busy"})
    await bob.presence("alice", status="busy")


async def test_a_stalled_reader_is_cut_off_and_slows_nobody(start_node: StartNode) -> None:
    node = await start_node(send_timeout=1.0, rate_limit=1e6, rate_burst=10**6)
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    # A reader that keeps up: it buffers whatever arrives (no flow control).
    fast = await Client.connect(url, make_token("fast"), max_queue=None)
    await fast.request({"type": "subscribe", "users": ["alice"]})
    # A reader that never reads: its client buffers at most one frame, then TCP fills up.
    stalled = await stalled_client(url, make_token("slow"), ["alice"])

    last = 0
    for n in range(5000):
        await alice.send({"type": "set_message", "text": f"{n:04d}" + "x" * 270})
        last = n
        if not any(c.user == "slow" for c in node.hub.connections):
            break
    # The query waits behind up to 5,000 commits (slow under a coverage tracer).
    await alice.request({"type": "query", "users": []}, wait=60)
    final = await fast.presence("alice", message=f"{last:04d}" + "x" * 270, wait=30)
    assert final["ver"] == last + 2

    await eventually(lambda: all(c.user != "slow" for c in node.hub.connections), wait=30)
    stalled.transport.abort()


async def test_the_stalled_reader_backlog_is_one_update_per_user(start_node: StartNode) -> None:
    node = await start_node(send_timeout=60.0, rate_limit=1e6, rate_burst=10**6)
    url = ws_url(node)
    alice = await Client.connect(url, make_token("alice"))
    stalled = await stalled_client(url, make_token("slow"), ["alice"])
    await alice.request({"type": "query", "users": []})
    conn = next(c for c in node.hub.connections if c.user == "slow")
    await eventually(lambda: "alice" in conn.watching)
    for n in range(2000):
        await alice.request({"type": "set_message", "text": f"{n}" + "y" * 270})
    assert len(conn._pending) <= 1
    assert conn.coalesced > 1000
    stalled.transport.abort()


async def test_a_producer_that_stops_reading_its_replies_is_cut_off(
    start_node: StartNode,
) -> None:
    node = await start_node(send_timeout=1.0, rate_limit=1e6, rate_burst=10**6)
    producer = await stalled_client(ws_url(node), make_token("calls", role="producer"))
    bob = await Client.connect(ws_url(node), make_token("bob"))
    for n in range(50_000):
        event = {"event_id": f"e{n}", "kind": "call_started", "user": f"u{n % 50}", "ref": f"c{n}"}
        send_masked(producer, {"type": "event", "id": n, "event": event})
        if n % 500 == 0:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(producer.drain(), 5)
            if all(c.user != "calls" for c in node.hub.connections):
                break
    await eventually(lambda: all(c.user != "calls" for c in node.hub.connections), wait=30)
    # Nobody else noticed.
    assert (await bob.request({"type": "query", "users": ["u1"]}))["type"] == "snapshot"
    producer.transport.abort()


def test_secret_is_shared_by_the_fixtures() -> None:
    assert SECRET


async def test_a_node_declared_dead_sends_its_clients_elsewhere(
    start_node: StartNode, redis: Redis
) -> None:
    node = await start_node()
    alice = await Client.connect(ws_url(node), make_token("alice"))
    # Another node reaped this one (it stalled past its lease): it must not keep ghosts.
    await redis.zrem(NODES_KEY, node.id)
    with pytest.raises(ConnectionClosed) as closed:
        await alice.recv(wait=15)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1012
    again = await Client.connect(ws_url(node), make_token("alice"))
    assert again.welcome["self"]["effective"] == "available"


async def test_a_corrupt_record_is_kept_aside_and_the_user_goes_on(
    start_node: StartNode, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node()
    garbage = b"\x93garbage"
    # One record beyond reading, one whose manual status can still be read.
    state = model.UserState(manual="dnd", view=model.View(ver=3), self_ver=3)
    readable = msgpack.unpackb(serde.encode_state(state))
    readable["s"] = "not sessions"
    records = {"mallory": garbage, "dora": msgpack.packb(readable)}
    for user, blob in records.items():
        await redis.hset(
            keys.state_key(TenantId("acme"), UserId(user)), mapping={"rev": 3, "state": blob}
        )  # type: ignore[misc]
    bob = await Client.connect(ws_url(node), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["mallory", "dora"]})
    producer = await Client.connect(ws_url(node), make_token("pbx", role="producer"))
    event = {"event_id": "x", "kind": "call_started", "user": "mallory", "ref": "c"}
    applied = await producer.request({"type": "event", "event": {**event, "at": time.time()}})
    assert (applied["type"], applied["result"]) == ("ok", "applied")

    # Mallory goes on from the defaults, with the call: observers get versions above
    # any the corrupt record could have published.
    mallory = await Client.connect(ws_url(node), make_token("mallory"))
    assert (mallory.welcome["self"]["manual"], mallory.welcome["self"]["calls"]) == (
        "available",
        1,
    )
    update = await bob.presence("mallory", status="on_call")
    assert update["ver"] > 3
    dora = await Client.connect(ws_url(node), make_token("dora"))
    assert dora.welcome["self"]["manual"] == "dnd"
    assert (await bob.presence("dora", status="dnd"))["ver"] > 3

    # The bytes are kept for an operator, explain says what was lost, metrics count it.
    aside = keys.corrupt_key(TenantId("acme"), UserId("mallory"))
    assert await redis.hget(aside, "raw") == garbage  # type: ignore[misc]
    admin = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
    base = f"http://127.0.0.1:{node.http_port}"
    async with ClientSession() as http:
        async with http.get(f"{base}/v1/users/dora/explain", headers=admin) as r:
            found = (await r.json())["corrupt_record"]
        async with http.get(f"{base}/v1/users/bob/explain", headers=admin) as r:
            assert (await r.json())["corrupt_record"] is None
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
    assert "sessions" in found["lost"]
    assert "manual" not in found["lost"]
    assert found["bytes"] == len(records["dora"])
    assert "presence_hub_corrupt_records_total 2.0" in metrics
    logged = [r.getMessage() for r in caplog.records if "corrupt state record" in r.getMessage()]
    assert len(logged) == 2, logged


async def test_a_half_open_connection_is_found_by_keepalive(start_node: StartNode) -> None:
    node = await start_node(keepalive=0.3, grace=0.5)
    bob = await Client.connect(ws_url(node), make_token("bob"))
    # A client that answers its pings, connected through all the rounds below.
    carol = await Client.connect(ws_url(node), make_token("carol"))
    await bob.request({"type": "subscribe", "users": ["ghost"]})
    # A client that vanished without a FIN: it never answers a ping again.
    ghost = await stalled_client(ws_url(node), make_token("ghost"), [])
    await bob.presence("ghost", status="available")
    await bob.presence("ghost", status="offline")
    # Only the dead one was closed.
    snapshot = await bob.request({"type": "query", "users": ["carol"]})
    assert snapshot["presences"][0]["status"] == "available"
    assert (await carol.request({"type": "set_status", "status": "busy"}))["type"] == "ok"
    ghost.transport.abort()


@pytest.mark.parametrize(("storm_rate", "held"), [(4, True), (0, False)])
async def test_a_connect_storm_holds_back_the_nodes_writes_unless_turned_off(
    start_node: StartNode, storm_rate: int, held: bool
) -> None:
    # At 4 a second, any socket opened within the last quarter of a second makes a storm.
    node = await start_node(storm_rate=storm_rate)
    users = [f"arriving{n}" for n in range(5)]
    watcher = await Client.connect(ws_url(node), make_token("watcher"))
    await watcher.request({"type": "subscribe", "users": users})
    for user in users:
        await Client.connect(ws_url(node), make_token(user))
    # Held back or not, every arrival reaches the watcher.
    for user in users:
        await watcher.presence(user, status="available")
    holds = node.metrics.registry.get_sample_value("presence_hub_storm_held_flushes_total")
    assert (holds is not None and holds > 0) is held
