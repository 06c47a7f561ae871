"""State records that do not decode: kept aside once for an operator, salvaged, and
reported by explain, the metrics and the log."""

from __future__ import annotations

import time

import msgpack
import pytest
from aiohttp import ClientSession
from redis.asyncio import Redis

from presence_hub import model
from presence_hub.ids import TenantId, UserId
from presence_hub.store import keys, serde
from presence_hub.store.corrupt import CorruptRecords
from tests.conftest import StartNode, make_token, ws_url
from tests.wsclient import Client


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
        )
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
    assert await redis.hget(aside, "raw") == garbage
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


async def test_the_first_copy_is_kept_and_counted_once(redis: Redis) -> None:
    found: list[None] = []
    records = CorruptRecords(redis, lambda: 1000.0, lambda: found.append(None))
    acme, mallory = TenantId("acme"), UserId("mallory")
    first = await records.decode(acme, mallory, b"4", b"\x93first")
    second = await records.decode(acme, mallory, b"5", b"\x93second")
    # Nothing readable: the defaults, with versions above any the record published.
    assert first == model.UserState(view=model.View(ver=4), self_ver=4)
    assert second == model.UserState(view=model.View(ver=5), self_ver=5)
    kept = await records.kept(acme, mallory)
    assert kept is not None
    assert kept["bytes"] == len(b"\x93first")
    assert kept["found_at"] == 1000.0
    assert await redis.hget(keys.corrupt_key(acme, mallory), "raw") == b"\x93first"
    assert len(found) == 1
    assert await records.kept(acme, UserId("bob")) is None
    sound = serde.encode_state(model.UserState(manual="busy"))
    assert (await records.decode(acme, UserId("bob"), b"1", sound)).manual == "busy"
    assert await records.kept(acme, UserId("bob")) is None
