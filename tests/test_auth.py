"""Access tokens: only a token signed with one of the hub's keys, in an algorithm it
accepts, with the claims PROTOCOL.md names, admits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from presence_hub.auth import TokenVerifier, issue_token, load_public_key, verify_token
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
        (None, 3600, "user", "none", "algorithm 'none' not accepted"),
    ],
)
def test_a_token_without_what_the_protocol_requires_is_refused(
    without: str | None, lifetime: int, role: str, algorithm: str, why: str
) -> None:
    claims = {"sub": "alice", "tenant": "acme", "role": role, "exp": int(time.time()) + lifetime}
    if without is not None:
        del claims[without]
    key: Any = SECRET if algorithm != "none" else None
    token = jwt.encode(claims, key, algorithm=algorithm)
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


PRIVATE_KEYS = {
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}


def write_public_key(path: Path, private: Any) -> Path:
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


async def test_any_of_several_secrets_verifies_so_one_can_be_rotated() -> None:
    tokens = TokenVerifier(["new-secret-with-enough-entropy-for-hs256", SECRET])
    for secret in ("new-secret-with-enough-entropy-for-hs256", SECRET):
        claims = await tokens.verify(issue_token(secret, tenant="acme", user="alice"))
        assert claims.user == "alice"
    with pytest.raises(AuthError, match="Signature verification failed"):
        await tokens.verify(
            issue_token("a-secret-nobody-gave-the-hub-of-enough-length", tenant="acme", user="x")
        )


@pytest.mark.parametrize("algorithm", sorted(PRIVATE_KEYS))
async def test_a_token_signed_with_a_private_key_verifies_with_its_public_key(
    algorithm: str, tmp_path: Path
) -> None:
    private = PRIVATE_KEYS[algorithm]
    public = load_public_key(write_public_key(tmp_path / "k1.pem", private))
    other = load_public_key(write_public_key(tmp_path / "k0.pem", PRIVATE_KEYS["ES256"]))
    tokens = TokenVerifier(public_keys={"k0": other, "k1": public})
    for kid in ("k1", None):  # chosen by its kid, or tried in turn
        token = issue_token(private, tenant="acme", user="alice", kid=kid)
        assert jwt.get_unverified_header(token)["alg"] == algorithm
        assert (await tokens.verify(token)).user == "alice"
    with pytest.raises(AuthError, match="no key"):
        await tokens.verify(issue_token(private, tenant="acme", user="alice", kid="k9"))
    if algorithm != "ES256":
        with pytest.raises(AuthError):
            await tokens.verify(issue_token(private, tenant="acme", user="alice", kid="k0"))


def hs256_signed_with(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token made by hand: PyJWT itself will not use a public key as a secret."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signed = f"{header}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"


async def test_algorithm_confusion_and_algorithms_not_allowed_are_refused(tmp_path: Path) -> None:
    pem = write_public_key(tmp_path / "k1.pem", PRIVATE_KEYS["RS256"])
    claims = {"sub": "alice", "tenant": "acme", "exp": int(time.time()) + 60}
    forged = hs256_signed_with(pem.read_bytes(), claims)
    public_only = TokenVerifier(public_keys={"k1": load_public_key(pem)})
    with pytest.raises(AuthError, match="no key"):
        await public_only.verify(forged)
    both = TokenVerifier([SECRET], public_keys={"k1": load_public_key(pem)})
    with pytest.raises(AuthError, match="Signature verification failed"):
        await both.verify(forged)
    rs256_only = TokenVerifier([SECRET], algorithms=["RS256"])
    with pytest.raises(AuthError, match="algorithm 'HS256' not accepted"):
        await rs256_only.verify(make_token("alice"))
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="algorithm 'none' not accepted"):
        await both.verify(unsigned)
    with pytest.raises(ValueError, match="unknown token algorithms: HS512"):
        TokenVerifier([SECRET], algorithms=["HS256", "HS512"])


async def test_issuer_and_audience_are_checked_when_configured() -> None:
    tokens = TokenVerifier([SECRET], issuer="https://id.example.com", audience="presence")
    good = {"iss": "https://id.example.com", "aud": "presence"}
    token = issue_token(SECRET, tenant="acme", user="alice", claims=good)
    assert (await tokens.verify(token)).user == "alice"
    for claims, why in (
        ({**good, "iss": "https://evil.example.com"}, "issuer"),
        ({**good, "aud": "another-app"}, "Audience"),
        ({"iss": good["iss"]}, "aud"),
    ):
        with pytest.raises(AuthError, match=why):
            await tokens.verify(issue_token(SECRET, tenant="acme", user="alice", claims=claims))
    # Without an audience configured, a token's aud (every IdP sets one) is no reason to refuse.
    assert (await TokenVerifier([SECRET]).verify(token)).user == "alice"


async def test_a_key_of_the_wrong_curve_verifies_nothing_and_signs_nothing(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    tokens = TokenVerifier(public_keys={"k1": p384.public_key()})
    token = issue_token(PRIVATE_KEYS["ES256"], tenant="acme", user="alice", kid="k1")
    with pytest.raises(AuthError, match="no key"):
        await tokens.verify(token)
    with pytest.raises(ValueError, match="RSA, EC P-256 or Ed25519"):
        issue_token(p384, tenant="acme", user="alice")
