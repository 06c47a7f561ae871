"""Tokens from an identity provider: a JWKS server (aiohttp on loopback) that rotates
its keys while clients connect, goes down, and is flooded with tokens of made-up key
ids; the WebSocket handshake, the ``auth`` frame and the HTTP API verify alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.exceptions import InvalidStatus

from presence_hub.auth import Role, TokenVerifier, issue_token
from presence_hub.jwks import JwksKeys
from tests.conftest import StartNode, ws_url
from tests.utils import eventually
from tests.wsclient import Client

ISSUER = "https://id.example.com/realms/acme"


class Provider:
    """An identity provider's JWKS endpoint, Keycloak-style: the keys it publishes
    change as the test rotates them, and it counts its fetches."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {
            "k1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "k2": ec.generate_private_key(ec.SECP256R1()),
        }
        self.published: list[str] = ["k1"]
        #: Served instead of the key set, when set.
        self.garbage: bytes | None = None
        #: Seconds each answer takes.
        self.delay = 0.0
        self.fetches = 0
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def keys(self, request: web.Request) -> web.Response:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.garbage is not None:
            return web.Response(body=self.garbage, content_type="application/json")
        jwks = []
        for kid in self.published:
            public = self.private[kid].public_key()
            kind = RSAAlgorithm if kid == "k1" else ECAlgorithm
            jwks.append({**kind.to_jwk(public, as_dict=True), "kid": kid, "use": "sig"})
        return web.json_response({"keys": jwks})

    def token(self, kid: str, user: str = "alice", role: Role = "user") -> str:
        key = self.private[kid]
        return issue_token(
            key, tenant="acme", user=user, role=role, kid=kid, claims={"iss": ISSUER}
        )

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/realms/acme/protocol/openid-connect/certs", self.keys)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/realms/acme/protocol/openid-connect/certs"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    idp = Provider()
    await idp.start()
    yield idp
    if idp.runner is not None:
        await idp.runner.cleanup()


async def refused(url: str, token: str) -> int:
    with pytest.raises(InvalidStatus) as refusal:
        await Client.connect(url, token)
    status: int = refusal.value.response.status_code
    return status


async def test_keys_rotate_at_the_provider_without_logging_anyone_out(
    start_node: StartNode, provider: Provider
) -> None:
    jwks = JwksKeys(provider.url, refresh=0.5, min_refetch=0.0)
    node = await start_node(tokens=TokenVerifier(jwks=jwks, issuer=ISSUER))
    url = ws_url(node)
    old = await Client.connect(url, provider.token("k1"))

    # The provider adds a key: a token of it fetches the keys at once.
    provider.published = ["k1", "k2"]
    new = await Client.connect(url, provider.token("k2", user="bob"))
    again = await Client.connect(url, provider.token("k1", user="carol"))
    assert (await old.request({"type": "auth", "token": provider.token("k2")}))["type"] == "ok"

    # The old key is withdrawn: once the hub has fetched the keys again (every 0.5 s
    # here), a token of it is refused at its next connect; the sockets open stay.
    provider.published = ["k2"]
    await eventually(lambda: jwks.get("k1") is None)
    assert await refused(url, provider.token("k1", user="dave")) == 401
    for client in (old, new, again):
        assert (await client.request({"type": "query", "users": ["alice"]}))["type"] == "snapshot"

    # A token of another issuer is refused, though signed with a key of the provider.
    foreign = issue_token(
        provider.private["k2"], tenant="acme", user="erin", kid="k2", claims={"iss": "https://evil"}
    )
    assert await refused(url, foreign) == 401


async def test_while_the_provider_is_down_the_cached_keys_keep_working(
    start_node: StartNode, provider: Provider
) -> None:
    jwks = JwksKeys(provider.url, min_refetch=0.0)
    node = await start_node(tokens=TokenVerifier(jwks=jwks))
    alice = await Client.connect(ws_url(node), provider.token("k1"))
    await provider.stop()
    provider.runner = None
    await jwks.fetch()  # fails: the provider is down
    bob = await Client.connect(ws_url(node), provider.token("k1", user="bob"))
    assert (await bob.request({"type": "auth", "token": provider.token("k1", "bob")}))[
        "type"
    ] == "ok"
    assert (await alice.request({"type": "query", "users": ["bob"]}))["type"] == "snapshot"
    # An unknown kid finds the provider down and nothing cached: refused.
    provider.private["k3"] = provider.private["k1"]
    assert await refused(ws_url(node), provider.token("k3")) == 401
    # The HTTP API verifies the same way.
    headers = {"Authorization": f"Bearer {provider.token('k1', 'pbx', role='producer')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{node.http_port}/v1/presence",
            params={"users": "alice"},
            headers=headers,
        ) as r,
    ):
        assert r.status == 200
        assert [p["status"] for p in (await r.json())["presences"]] == ["available"]


async def test_a_flood_of_unknown_key_ids_fetches_the_keys_at_most_once(
    start_node: StartNode, provider: Provider
) -> None:
    jwks = JwksKeys(provider.url, min_refetch=60.0)
    node = await start_node(tokens=TokenVerifier(jwks=jwks))
    assert provider.fetches == 1
    for n in range(50):
        provider.private[f"made-up-{n}"] = provider.private["k1"]
        assert await refused(ws_url(node), provider.token(f"made-up-{n}")) == 401
    assert provider.fetches == 1
    alice = await Client.connect(ws_url(node), provider.token("k1"))
    assert alice.welcome["type"] == "welcome"


@pytest.mark.parametrize(
    "garbage",
    [
        b"[1, 2]",
        b"{not json",
        b'{"keys": "x"}',
        b'{"keys": [{"kty": "RSA"}]}',
        b"\xff" * 10,
        b'{"keys": []' + b" " * (1 << 20) + b"}",
    ],
    ids=["a-list", "not-json", "keys-not-a-list", "a-broken-key", "not-utf8", "over-1-MiB"],
)
async def test_a_provider_answering_garbage_changes_nothing(
    start_node: StartNode, provider: Provider, garbage: bytes
) -> None:
    jwks = JwksKeys(provider.url, min_refetch=0.0)
    node = await start_node(tokens=TokenVerifier(jwks=jwks))
    alice = await Client.connect(ws_url(node), provider.token("k1"))
    provider.garbage = garbage
    await jwks.fetch()
    assert jwks.get("k1") is not None  # the cached keys stay
    await Client.connect(ws_url(node), provider.token("k1", user="bob"))
    assert (await alice.request({"type": "query", "users": ["bob"]}))["type"] == "snapshot"


async def test_tokens_of_a_new_key_arriving_together_share_one_fetch(
    start_node: StartNode, provider: Provider
) -> None:
    jwks = JwksKeys(provider.url, min_refetch=1.0)
    node = await start_node(tokens=TokenVerifier(jwks=jwks))
    await asyncio.sleep(1.0)  # past the start's fetch by the least time between fetches
    provider.published, provider.delay = ["k1", "k2"], 0.3
    fetched = provider.fetches
    # The first starts the fetch; the others wait for it rather than being refused.
    clients = await asyncio.gather(
        *(Client.connect(ws_url(node), provider.token("k2", user=f"u{n}")) for n in range(5))
    )
    assert all(c.welcome["type"] == "welcome" for c in clients)
    assert provider.fetches == fetched + 1
