"""A manual status with an end time, end to end: observers see it end at its time,
calls show as soon as it ends, and the end survives a restart of the hub and of Redis
and fires once however many nodes share the Redis."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from presence_hub.store import EmbeddedRedis
from tests.conftest import StartNode, make_token, ws_url
from tests.processes import HubProcess
from tests.wsclient import Client

FORMATS = ["json", "msgpack"]
#: How far ahead the tests end a status: long enough to see it first on a busy machine.
LASTS = 2.0


@pytest.mark.parametrize("fmt", FORMATS)
async def test_dnd_for_two_seconds_then_available(start_node: StartNode, fmt: str) -> None:
    node = await start_node()
    alice = await Client.connect(ws_url(node), make_token("alice"), fmt=fmt)
    bob = await Client.connect(ws_url(node), make_token("bob"), fmt=fmt)
    await bob.request({"type": "subscribe", "users": ["alice"]})

    until = time.time() + LASTS
    reply = await alice.request({"type": "set_status", "status": "dnd", "until": until})
    assert reply["type"] == "ok"
    dnd = await bob.presence("alice", status="dnd")
    own = await alice.expect(lambda f: f["type"] == "self" and f["manual"] == "dnd")
    assert own["manual_until"] == until

    # It ends by itself, at its end time, as if alice had set available then.
    ended = await bob.presence("alice", wait=30)
    assert (ended["status"], ended["since"], ended["ver"]) == ("available", until, dnd["ver"] + 1)
    assert time.time() >= until
    own = await alice.expect(lambda f: f["type"] == "self" and f["manual"] == "available")
    assert own["manual_until"] is None


async def test_a_call_open_when_dnd_ends_shows_at_once(start_node: StartNode) -> None:
    node = await start_node()
    alice = await Client.connect(ws_url(node), make_token("alice"))
    bob = await Client.connect(ws_url(node), make_token("bob"))
    producer = await Client.connect(ws_url(node), make_token("pbx", role="producer"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    until = time.time() + LASTS
    await alice.request({"type": "set_status", "status": "dnd", "until": until})
    await bob.presence("alice", status="dnd")
    event = {"event_id": "c1", "kind": "call_started", "user": "alice", "ref": "c1"}
    applied = await producer.request({"type": "event", "event": {**event, "at": time.time()}})
    assert applied["result"] == "applied"

    ended = await bob.presence("alice", wait=30)
    assert (ended["status"], ended["since"]) == ("on_call", until)
    admin = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
    url = f"http://127.0.0.1:{node.http_port}/v1/users/alice/explain"
    async with aiohttp.ClientSession() as http, http.get(url, headers=admin) as r:
        explained = await r.json()
    assert (explained["manual"], explained["manual_until"]) == ("available", None)
    assert explained["at_manual_until"] is None


async def test_explain_says_when_the_status_ends_and_what_comes_then(
    start_node: StartNode,
) -> None:
    node = await start_node()
    alice = await Client.connect(ws_url(node), make_token("alice"))
    until = time.time() + 3600
    await alice.request({"type": "set_status", "status": "busy", "until": until})
    producer = await Client.connect(ws_url(node), make_token("pbx", role="producer"))
    event = {"event_id": "m1", "kind": "meeting_started", "user": "alice", "ref": "m1"}
    await producer.request({"type": "event", "event": {**event, "at": time.time()}})
    admin = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
    url = f"http://127.0.0.1:{node.http_port}/v1/users/alice/explain"
    async with aiohttp.ClientSession() as http, http.get(url, headers=admin) as r:
        explained = await r.json()
    assert (explained["effective"], explained["manual_until"]) == ("busy", until)
    assert explained["at_manual_until"] == {
        "manual": "available",
        "effective": "busy",
        "reason": "manual status is available and at least one meeting is open",
    }


async def test_the_end_survives_a_restart_of_the_hub_and_of_redis(
    own_redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    # A grace long enough for alice to come back to the restarted hub without a flap.
    first = HubProcess(own_redis_server.url, tmp_path, "--grace", "60")
    await first.ready()
    alice = await Client.connect(first.url, make_token("alice"))
    until = time.time() + 3 * LASTS
    await alice.request({"type": "set_status", "status": "dnd", "until": until})

    first.stop()
    own_redis_server.stop()
    own_redis_server.start()
    second = HubProcess(own_redis_server.url, tmp_path, "--grace", "60")
    try:
        await second.ready()
        alice = await Client.connect(second.url, make_token("alice"))
        bob = await Client.connect(second.url, make_token("bob"))
        snapshot = await bob.request({"type": "subscribe", "users": ["alice"]})
        (before,) = snapshot["presences"]
        if time.time() < until:
            assert before["status"] == "dnd"
            assert alice.welcome["self"]["manual_until"] == until
            ended = await bob.presence("alice", wait=60)
        else:  # the machine was slow: it ended while the hub was away
            ended = before
        assert (ended["status"], ended["since"]) == ("available", until)
    finally:
        await Client.close_all()
        second.stop()


async def test_with_two_nodes_the_end_fires_once(start_node: StartNode) -> None:
    node_a, node_b = await start_node(), await start_node()
    alice = await Client.connect(ws_url(node_a), make_token("alice"))
    watchers = [
        await Client.connect(ws_url(node_a), make_token("bob")),
        await Client.connect(ws_url(node_b), make_token("carol")),
    ]
    phone = await Client.connect(ws_url(node_b), make_token("alice"), device="mobile")
    for watcher in watchers:
        await watcher.request({"type": "subscribe", "users": ["alice"]})
    until = time.time() + LASTS
    await alice.request({"type": "set_status", "status": "away", "until": until})
    away = [await w.presence("alice", status="away") for w in watchers]

    for watcher, before in zip(watchers, away, strict=True):
        ended = await watcher.presence("alice", wait=30)
        assert (ended["status"], ended["ver"]) == ("available", before["ver"] + 1)
    # Each of alice's devices is told, whichever node fired it.
    told = []
    for device in (alice, phone):
        set_ = await device.expect(lambda f: f["type"] == "self" and f["manual"] == "away")
        device.inbox = [f for f in device.inbox if f["type"] != "self" or f["ver"] > set_["ver"]]
        told.append(
            await device.expect(lambda f: f["type"] == "self" and f["manual"] == "available")
        )
    # Nothing else came of it: the next change is the very next version, everywhere.
    await alice.request({"type": "set_message", "text": "back"})
    for watcher, before in zip(watchers, away, strict=True):
        after = await watcher.presence("alice", message="back")
        assert after["ver"] == before["ver"] + 2
        assert watcher.updates_of("alice") == []
    for device, ended in zip((alice, phone), told, strict=True):
        back = await device.expect(lambda f: f["type"] == "self" and f["message"] == "back")
        assert back["ver"] == ended["ver"] + 1
        assert [f for f in device.inbox if f["type"] == "self"] == []
