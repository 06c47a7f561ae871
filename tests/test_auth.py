"""Access tokens: only a well-signed HS256 token with the claims PROTOCOL.md names admits."""

from __future__ import annotations

import time

import jwt
import pytest

from presence_hub.auth import verify_token
from presence_hub.errors import AuthError
from tests.conftest import SECRET, make_token

FULL = {"sub": "alice", "tenant": "acme", "role": "user", "exp": int(time.time() + 60)}


def test_a_well_formed_token_gives_its_claims() -> None:
    claims = verify_token(make_token("alice", role="producer"), SECRET)
    assert (claims.user, claims.tenant, claims.role) == ("alice", "acme", "producer")


@pytest.mark.parametrize(
    ("claims", "algorithm", "why"),
    [
        ({k: v for k, v in FULL.items() if k != "exp"}, "HS256", "exp"),
        ({k: v for k, v in FULL.items() if k != "sub"}, "HS256", "sub"),
        ({k: v for k, v in FULL.items() if k != "tenant"}, "HS256", "sub and tenant"),
        ({**FULL, "exp": int(time.time() - 10)}, "HS256", "expired"),
        ({**FULL, "role": "root"}, "HS256", "role"),
        (FULL, "none", "alg value is not allowed"),
    ],
)
def test_a_token_without_what_the_protocol_requires_is_refused(
    claims: dict[str, object], algorithm: str, why: str
) -> None:
    token = jwt.encode(claims, SECRET if algorithm != "none" else None, algorithm=algorithm)
    with pytest.raises(AuthError, match=why):
        verify_token(token, SECRET)
