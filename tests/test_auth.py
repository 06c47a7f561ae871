"""Access tokens: only a well-signed HS256 token with the claims PROTOCOL.md names admits."""

from __future__ import annotations

import time

import jwt
import pytest

from presence_hub.auth import verify_token
from presence_hub.errors import AuthError
from tests.conftest import SECRET, make_token


def test_a_well_formed_token_gives_its_claims() -> None:
    claims = verify_token(make_token("alice", role="producer"), SECRET)
    assert (claims.user, claims.tenant, claims.role) == ("alice", "acme", "producer")


@pytest.mark.parametrize(
    ("without", "lifetime", "role", "algorithm", "why"),
    [
        ("exp", 3600, "user", "HS256", "exp"),
        ("sub", 3600, "user", "HS256", "sub"),
        ("tenant", 3600, "user", "HS256", "sub and tenant"),
        (None, -10, "user", "HS256", "expired"),
        (None, 3600, "root", "HS256", "role"),
        (None, 3600, "user", "none", "alg value is not allowed"),
    ],
)
def test_a_token_without_what_the_protocol_requires_is_refused(
    without: str | None, lifetime: int, role: str, algorithm: str, why: str
) -> None:
    claims = {"sub": "alice", "tenant": "acme", "role": role, "exp": int(time.time()) + lifetime}
    if without is not None:
        del claims[without]
    token = jwt.encode(claims, SECRET if algorithm != "none" else None, algorithm=algorithm)
    with pytest.raises(AuthError, match=why):
        verify_token(token, SECRET)


@pytest.mark.parametrize(
    ("token", "why"),
    [
        pytest.param(
            jwt.encode({"sub": "alice", "tenant": "acme", "exp": 10**400}, SECRET),
            "exp out of range",
            id="exp-beyond-a-float",
        ),
        pytest.param("\ud800.\ud800.\ud800", "not ASCII", id="lone-surrogates"),
        pytest.param("é" * 50, "not ASCII", id="not-ascii"),
    ],
)
def test_a_hostile_token_is_refused_as_invalid(token: str, why: str) -> None:
    with pytest.raises(AuthError, match=why):
        verify_token(token, SECRET)
