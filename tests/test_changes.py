"""A backend's side of the feed: ``ChangeFollower`` yields every change and resumes on
its own when its stream breaks; ``signature`` signs and checks webhook deliveries."""

from __future__ import annotations

import asyncio
import time

import pytest

from presence_hub.changes import Change, ChangeFollower
from presence_hub.client import HubError
from presence_hub.signature import sign, verify
from tests.conftest import StartNode, make_token, ws_url
from tests.wsclient import Client

PRODUCER = make_token("crm", role="producer")


async def test_the_follower_resumes_after_its_node_stops_and_misses_nothing(
    start_node: StartNode,
) -> None:
    node = await start_node()
    port = node.http_port
    erin = await Client.connect(ws_url(node), make_token("erin"))
    seen: list[Change] = []
    first = asyncio.Event()
    # From a second ago, whenever the follower gets its stream open.
    since = f"{int((time.time() - 1) * 1000)}-0-0"
    async with ChangeFollower(
        f"http://127.0.0.1:{port}", PRODUCER, users=["erin"], after=since, backoff=(0.05, 0.5)
    ) as feed:

        async def collect(until: str) -> None:
            async for change in feed:
                seen.append(change)
                first.set()
                if change.presence["message"] == until:
                    return

        reading = asyncio.create_task(collect("three"))
        await erin.request({"type": "set_message", "text": "one"})
        await asyncio.wait_for(first.wait(), 30)
        await node.stop()
        # Changes while no node serves the feed; then a node on the same address.
        writer = await start_node()
        erin = await Client.connect(ws_url(writer), make_token("erin"))
        await erin.request({"type": "set_message", "text": "two"})
        await start_node(http_port=port)
        await erin.request({"type": "set_message", "text": "three"})
        await asyncio.wait_for(reading, 30)
    messages = [c.presence["message"] for c in seen]
    assert "one" in messages
    assert messages[-2:] == ["two", "three"]
    vers = [c.presence["ver"] for c in seen]
    assert vers == sorted(vers)
    assert feed.cursor == seen[-1].cursor


async def test_the_follower_says_when_its_cursor_is_past_the_retention(
    start_node: StartNode,
) -> None:
    node = await start_node()
    async with ChangeFollower(
        f"http://127.0.0.1:{node.http_port}", PRODUCER, after="1000-0-0"
    ) as feed:
        with pytest.raises(HubError) as expired:
            async for _ in feed:
                pass
    assert expired.value.code == "cursor_expired"


def test_a_signature_checks_the_secret_the_body_and_the_time() -> None:
    body = b'{"tenant": "acme", "changes": []}'
    header = sign("s3cret", body, now=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify("s3cret", header, body, now=1_000_100)
    assert not verify("other", header, body, now=1_000_100)
    assert not verify("s3cret", header, body + b" ", now=1_000_100)
    assert not verify("s3cret", header, body, now=1_000_000 + 301)
    assert not verify("s3cret", "t=soon,v1=00", body)
    assert not verify("s3cret", "", body)
