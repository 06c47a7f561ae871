"""The limits that keep one client from hurting the rest: each reached, answered as the
README says, counted in /metrics, while the other clients keep working."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from presence_hub.auth import TokenVerifier, issue_token
from presence_hub.jwks import JwksKeys
from presence_hub.server import Node
from tests.conftest import SECRET, StartNode, make_token, ws_url
from tests.utils import eventually
from tests.wsclient import Client


async def metrics(node: Node) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{node.http_port}/metrics") as r,
    ):
        return await r.text()


def refusals(text: str, limit: str) -> float:
    line = f'presence_hub_refused_connections_total{{limit="{limit}"}} '
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)


async def refused(url: str, token: str, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refusal:
        await Client.connect(url, token, **kwargs)
    return refusal.value


async def sessions(node: Node, user: str) -> list[object]:
    admin = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{node.http_port}/v1/users/{user}/explain", headers=admin) as r,
    ):
        found: list[object] = (await r.json())["sessions"]
        return found


async def still_works(client: Client) -> None:
    assert (await client.request({"type": "query", "users": ["x"]}))["type"] == "snapshot"


async def test_a_user_cannot_pile_up_sessions(start_node: StartNode) -> None:
    node = await start_node(max_sessions_per_user=3)
    url = ws_url(node)
    alice = [await Client.connect(url, make_token("alice")) for _ in range(3)]
    bob = await Client.connect(url, make_token("bob"))

    async def one_too_many() -> None:
        async with connect(
            f"{url}?device=desktop",
            additional_headers={"Authorization": f"Bearer {make_token('alice')}"},
            subprotocols=[Subprotocol("presence.v1.json")],
        ) as ws:
            error = json.loads(await ws.recv())
            assert (error["type"], error["code"]) == ("error", "limit_exceeded")
            assert "at most 3 sessions" in error["message"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008

    await one_too_many()
    # A socket that drops keeps its session for the grace: a client reconnecting in a
    # loop still finds no room.
    alice[0].ws.transport.abort()
    await one_too_many()
    # One that logs out makes room at once.
    await alice[1].ws.close(1000)
    async with asyncio.timeout(10):
        while len(await sessions(node, "alice")) != 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    alice.append(await Client.connect(url, make_token("alice")))
    await still_works(bob)
    await still_works(alice[2])
    # Call servers that share one producer identity are not people: no such limit.
    for _ in range(4):
        await still_works(await Client.connect(url, make_token("pbx", role="producer")))
    assert refusals(await metrics(node), "sessions_per_user") >= 2


async def test_one_address_opening_too_many_connections_is_slowed(start_node: StartNode) -> None:
    node = await start_node(connect_rate=0.5, connect_burst=3)
    url = ws_url(node)
    clients = [await Client.connect(url, make_token(f"u{n}")) for n in range(3)]
    refusal = await refused(url, make_token("u3"))
    assert refusal.response.status_code == 429
    assert refusal.response.headers["Retry-After"] == "1"
    # Another address is not held back, and the open sockets work on.
    other = await Client.connect(url, make_token("u4"), local_addr=("127.0.0.2", 0))
    for client in [*clients, other]:
        await still_works(client)
    assert refusals(await metrics(node), "connect_rate") == 1


async def test_only_allowed_browser_origins_may_connect(start_node: StartNode) -> None:
    node = await start_node(allowed_origins="https://app.example.com, https://example.org")
    url = ws_url(node)
    refusal = await refused(url, make_token("alice"), origin="https://evil.example.com")
    assert refusal.response.status_code == 403
    await Client.connect(url, make_token("alice"), origin="https://app.example.com")
    await Client.connect(url, make_token("bob"))  # no Origin: not a browser
    assert refusals(await metrics(node), "origin") == 1


class SlowProvider:
    """A JWKS endpoint that answers only when released: the handshakes of tokens with
    a key id the hub does not know wait on it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def keys(self, request: web.Request) -> web.Response:
        self.waiting += 1
        await self.release.wait()
        return web.json_response({"keys": []})


@pytest.fixture
async def slow_provider() -> AsyncIterator[tuple[SlowProvider, str]]:
    provider = SlowProvider()
    app = web.Application()
    app.router.add_get("/certs", provider.keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    provider.release.set()  # the node's first fetch, at its start
    yield provider, f"http://127.0.0.1:{runner.addresses[0][1]}/certs"
    provider.release.set()
    await runner.cleanup()


async def test_handshakes_in_progress_are_bounded(
    start_node: StartNode, slow_provider: tuple[SlowProvider, str]
) -> None:
    provider, jwks_url = slow_provider
    tokens = TokenVerifier([SECRET], jwks=JwksKeys(jwks_url, min_refetch=0.0))
    node = await start_node(tokens=tokens, max_handshakes=2)
    url = ws_url(node)
    early = await Client.connect(url, make_token("early"))
    provider.release.clear()
    waiting = provider.waiting
    # Two handshakes wait on the provider: their tokens name a key it has not shown.
    key = ec.generate_private_key(ec.SECP256R1())
    stuck = [
        asyncio.create_task(refused(url, issue_token(key, tenant="acme", user=f"s{n}", kid="new")))
        for n in range(2)
    ]
    await eventually(lambda: provider.waiting > waiting)
    await eventually(lambda: len(node._handshaking) == 2)
    refusal = await refused(url, make_token("late"))
    assert refusal.response.status_code == 503
    assert refusal.response.headers["Retry-After"] == "1"
    await still_works(early)
    provider.release.set()
    for task in stuck:
        assert (await task).response.status_code == 401
    await Client.connect(url, make_token("late"))
    assert refusals(await metrics(node), "handshakes") == 1
