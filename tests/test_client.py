"""The client library against a real hub."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from presence_hub.client import HubError, Presence, PresenceClient, ProducerClient, backoff_delay
from presence_hub.store.embedded import free_port
from presence_hub.watch import render, watch
from tests.conftest import StartNode, make_token, ws_url
from tests.utils import eventually, timeout

PRODUCER = make_token("pbx", role="producer")


async def next_update(client: PresenceClient, user: str, **fields: object) -> Presence:
    async with asyncio.timeout(timeout(10)):
        async for p in client.updates():
            if p.user == user and all(getattr(p, k) == v for k, v in fields.items()):
                return p
    raise AssertionError("unreachable")


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
async def test_subscribe_and_follow_a_contact(start_node: StartNode, fmt: str) -> None:
    node = await start_node()
    async with (
        PresenceClient(ws_url(node), make_token("bob"), fmt=fmt) as bob,
        PresenceClient(ws_url(node), make_token("alice"), fmt=fmt) as alice,
    ):
        snapshot = await bob.subscribe(["alice", "nobody"])
        assert [(p.user, p.status) for p in snapshot] == [
            ("alice", "available"),
            ("nobody", "offline"),
        ]
        waiting = asyncio.create_task(next_update(bob, "alice", status="busy"))
        await asyncio.sleep(0)
        await alice.set_status("busy")
        await alice.set_message("demo at 3")
        assert (await waiting).status == "busy"
        await eventually(lambda: bob.presence["alice"].message == "demo at 3")
        assert alice.me["manual"] == "busy"
        assert [p.user for p in await bob.query(["alice"])] == ["alice"]
        await bob.unsubscribe(["alice"])
        assert "alice" not in bob.presence
        with pytest.raises(HubError) as refused:
            await alice.set_status("on_holiday")
        assert refused.value.code == "bad_request"


async def test_reconnect_resubscribes_with_known_versions(start_node: StartNode) -> None:
    port = free_port()
    node = await start_node(ws_port=port)
    bob = PresenceClient(ws_url(node), make_token("bob"), backoff_base=0.05, backoff_cap=0.5)
    async with bob, PresenceClient(ws_url(node), make_token("alice"), device="mobile") as alice:
        await bob.subscribe(["alice", "carol"])
        await alice.set_status("dnd")
        await eventually(lambda: bob.presence["alice"].status == "dnd")

        await node.stop()  # the node goes away: 1001, everyone reconnects
        replacement = await start_node(ws_port=port)
        await eventually(lambda: bob.connections == 2 and alice.connections == 2, wait=20)
        await alice.set_status("away")
        await eventually(lambda: bob.presence["alice"].status == "away")
        assert bob.presence["alice"].ver > 2
        assert replacement.hub.subscriptions == 2


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=2**32))
def test_backoff_has_full_jitter_under_an_exponential_cap(attempt: int, seed: int) -> None:
    rng = random.Random(seed)
    delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 4, "a wave of clients must spread out"


async def test_activity_reports_are_throttled(start_node: StartNode) -> None:
    node = await start_node()
    async with PresenceClient(ws_url(node), make_token("alice"), activity_interval=60) as alice:
        for _ in range(20):
            await alice.activity()
        await alice.query([])  # answered after the activity frame was read
    sent = node.metrics.frames_in.labels("activity")._value.get()
    assert sent == 1


async def test_a_refused_token_fails_the_connect(start_node: StartNode) -> None:
    node = await start_node()
    client = PresenceClient(ws_url(node), "not-a-token")
    with pytest.raises(HubError) as refused:
        await client.connect()
    assert refused.value.code == "unauthorized"
    await client.close()


async def test_producers_over_http_and_websocket(start_node: StartNode) -> None:
    node = await start_node()
    http = f"http://127.0.0.1:{node.http_port}"
    call = {
        "event_id": "e1",
        "kind": "call_started",
        "user": "alice",
        "ref": "c1",
        "at": time.time(),
    }
    async with ProducerClient(http, PRODUCER) as producer:
        assert await producer.post_events([call]) == [{"event_id": "e1", "result": "applied"}]
        (alice,) = await producer.presence(["alice"])
        assert alice["accepts_calls"] is False  # offline
    async with ProducerClient(http, PRODUCER, use_msgpack=True) as producer:
        results = await producer.post_events([call])
        assert results == [{"event_id": "e1", "result": "duplicate"}]
    async with ProducerClient(http, make_token("alice")) as not_a_producer:
        with pytest.raises(HubError) as refused:
            await not_a_producer.post_events([call])
        assert refused.value.code == "403"
    async with PresenceClient(ws_url(node), PRODUCER) as producer_ws:
        end = {**call, "event_id": "e2", "kind": "call_ended"}
        assert await producer_ws.send_event(end) == {"result": "applied"}
        rejected = await producer_ws.send_event({**end, "event_id": "e3", "kind": "x"})
        assert rejected["result"] == "rejected"
        assert "kind" in rejected["error"]


async def test_watch_shows_changes_as_they_happen(start_node: StartNode) -> None:
    node = await start_node()
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    watching = asyncio.create_task(
        watch(ws_url(node), make_token("bob"), ["alice"], console=console)
    )
    try:
        await eventually(lambda: "alice offline" in out.getvalue())
        async with PresenceClient(ws_url(node), make_token("alice")) as alice:
            await alice.set_message("back at 3")
            await eventually(lambda: "alice available back at 3" in out.getvalue())
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


def test_the_watch_table_has_a_row_per_contact() -> None:
    now = time.time()
    presence = {"alice": Presence("alice", "on_call", "with a customer", now - 125, 4)}
    table = render(["alice", "bob"], presence, now)
    out = io.StringIO()
    Console(file=out, width=120).print(table)
    text = out.getvalue()
    assert "on call" in text
    assert "with a customer" in text
    assert "2m ago" in text
    assert "bob" in text
    assert "never seen" in text


async def test_a_status_with_an_end_shows_when_it_ends(start_node: StartNode) -> None:
    node = await start_node()
    until = time.time() + 3600
    async with PresenceClient(ws_url(node), make_token("alice")) as alice:
        await alice.set_status("dnd", until=until)
        await eventually(lambda: alice.me["manual_until"] == until)
        assert alice.me["manual"] == "dnd"
        out = io.StringIO()
        console = Console(file=out, force_terminal=False, width=120)
        # Watching oneself, one's own row says when the status ends; others' do not.
        watching = asyncio.create_task(
            watch(ws_url(node), make_token("alice"), ["alice", "bob"], console=console)
        )
        try:
            await eventually(lambda: "bob offline" in out.getvalue())
            (own_line,) = [line for line in out.getvalue().splitlines() if "alice" in line]
            assert own_line.startswith("alice dnd until ")
            assert "until" not in out.getvalue().replace(own_line, "")
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        await alice.set_status("busy")
        await eventually(lambda: alice.me["manual"] == "busy")
        assert alice.me["manual_until"] is None


def test_the_watch_table_shows_when_ones_own_status_ends() -> None:
    now = time.mktime((2026, 12, 1, 9, 0, 0, 0, 0, -1))
    presence = {
        "alice": Presence("alice", "dnd", None, now - 60, 2),
        "bob": Presence("bob", "busy", None, now - 60, 3),
    }
    text = io.StringIO()
    table = render(["alice", "bob"], presence, now, me="alice", manual_until=now + 5400)
    Console(file=text, width=120).print(table)
    assert "dnd until 10:30" in text.getvalue()
    assert text.getvalue().count("until") == 1
    later = io.StringIO()
    tomorrow = render(["alice"], presence, now, me="alice", manual_until=now + 86400)
    Console(file=later, width=120).print(tomorrow)
    assert "until 2 Dec 09:00" in later.getvalue()
