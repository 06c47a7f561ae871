"""A node's life, end to end (real sockets, real Redis): the handshake, the welcome,
the end of a connection and its grace, keepalive, a node declared dead."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from presence_hub.ids import TenantId, UserId
from presence_hub.store import keys
from presence_hub.store.nodes import NODES_KEY
from tests.conftest import SECRET, StartNode, make_token, ws_url
from tests.utils import timeout
from tests.wsclient import Client, stalled_client

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


async def test_a_change_is_answered_then_self_and_redis_carries_self_only_across_nodes(
    start_node: StartNode, redis: Redis
) -> None:
    """The node hands a user's new Self map to the user's sessions on it as it commits,
    right after the reply; Redis carries it only once a session is on another node."""
    here, there = await start_node(), await start_node()
    desk = await Client.connect(ws_url(here), make_token("alice"))
    phone = await Client.connect(ws_url(here), make_token("alice"), device="mobile")
    await desk.expect(lambda f: f["type"] == "self" and f["devices"] == ["desktop", "mobile"])
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.self_channel(TenantId("acme"), UserId("alice")))
    assert await pubsub.get_message(timeout=timeout(5)) is not None  # the confirmation
    try:
        await desk.send({"type": "set_message", "text": "here", "id": 1})
        assert [(f["type"], f.get("message")) for f in [await desk.recv(), await desk.recv()]] == [
            ("ok", None),
            ("self", "here"),
        ]
        await phone.expect(lambda f: f["type"] == "self" and f["message"] == "here")

        tablet = await Client.connect(ws_url(there), make_token("alice"), device="web")
        await desk.request({"type": "set_message", "text": "everywhere"})
        await tablet.expect(lambda f: f["type"] == "self" and f["message"] == "everywhere")
        published: list[dict[str, Any]] = []
        while not published or published[-1]["message"] != "everywhere":
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout(5))
            assert message is not None, "the Self map was not published for the other node"
            published.append(msgpack.unpackb(msgpack.unpackb(message["data"])[1]))
        # Before: only what the tablet's arrival published, never the change made here.
        assert all("web" in f["devices"] for f in published)
    finally:
        await pubsub.aclose()


async def test_watchers_on_the_writing_node_get_a_change_at_commit_and_redis_only_across_nodes(
    start_node: StartNode, redis: Redis
) -> None:
    """The node hands a change to its own watchers as it commits it; Redis publishes it
    only once a watcher is on another node too."""
    here, there = await start_node(), await start_node()
    bob = await Client.connect(ws_url(here), make_token("bob"))
    await bob.request({"type": "subscribe", "users": ["alice"]})
    alice = await Client.connect(ws_url(here), make_token("alice"))
    await bob.presence("alice", status="available")

    async def publishes() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_publish", {}).get("calls", 0))

    before = await publishes()
    await alice.request({"type": "set_message", "text": "here"})
    await bob.presence("alice", message="here")
    assert await publishes() == before

    carol = await Client.connect(ws_url(there), make_token("carol"))
    await carol.request({"type": "subscribe", "users": ["alice"]})
    before = await publishes()
    await alice.request({"type": "set_message", "text": "everywhere"})
    await carol.presence("alice", message="everywhere")
    await bob.presence("alice", message="everywhere")
    assert await publishes() == before + 1


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
