"""JWT access tokens (PROTOCOL.md's authentication: claims sub, tenant, role, exp).

A token is verified with a key of its own algorithm only, from an explicit list of
algorithms: HS256 with the hub's secrets (any of them, so one can be rotated),
RS256, ES256 and EdDSA with public keys from PEM files or a JWKS. So ``none``, or an
HS256 token signed with a public key, is refused."""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from presence_hub.errors import AuthError
from presence_hub.ids import TenantId, UserId, is_valid_id
from presence_hub.jwks import JwksKeys

__all__ = [
    "ALGORITHMS",
    "ROLES",
    "Claims",
    "Role",
    "TokenVerifier",
    "bearer_token",
    "issue_token",
    "load_or_create_secret",
    "load_private_key",
    "load_public_key",
    "verify_token",
]

Role: TypeAlias = Literal["user", "producer", "admin"]
ROLES: Final[tuple[Role, ...]] = ("user", "producer", "admin")
ALGORITHM: Final = "HS256"
#: The algorithms PROTOCOL.md names, and the type of key each is verified with.
ALGORITHMS: Final[dict[str, type[Any] | tuple[type[Any], ...]]] = {
    "HS256": str,
    "RS256": rsa.RSAPublicKey,
    "ES256": ec.EllipticCurvePublicKey,
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
#: Options set once: ``jwt.decode`` merges them anew on every call, a connect storm's
#: most frequent.
#: An IdP's tokens carry an aud for their client: checked only when the hub has one.
_DECODER: Final = jwt.PyJWT(options={"require": ["exp", "sub"], "verify_aud": False})
_DECODER_WITH_AUDIENCE: Final = jwt.PyJWT(options={"require": ["exp", "sub", "aud"]})


@dataclass(frozen=True, slots=True)
class Claims:
    user: UserId
    tenant: TenantId
    role: Role
    expires_at: float


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if it is one."""
    if header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


class TokenVerifier:
    """Verifies tokens with the hub's keys: ``secrets`` for HS256, ``public_keys``
    (by kid, the PEM file's name) and ``jwks`` for the others, of ``algorithms`` only."""

    def __init__(
        self,
        secrets: Sequence[str] = (),
        *,
        public_keys: dict[str, Any] | None = None,
        jwks: JwksKeys | None = None,
        algorithms: Collection[str] = tuple(ALGORITHMS),
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        unknown = set(algorithms) - set(ALGORITHMS)
        if unknown:
            raise ValueError(f"unknown token algorithms: {', '.join(sorted(unknown))}")
        self.secrets = list(secrets)
        self.public_keys = dict(public_keys or {})
        self.jwks = jwks
        self.algorithms = frozenset(algorithms)
        self.issuer = issuer
        self.audience = audience
        self._decoder = _DECODER if audience is None else _DECODER_WITH_AUDIENCE

    async def verify(self, token: str) -> Claims:
        """The token's claims, or AuthError saying what is wrong with it."""
        alg, kid = _header(token)
        keys = self._keys(alg, kid)
        if not keys and kid is not None and self.jwks is not None and alg != "HS256":
            found = await self.jwks.find(kid)
            keys = [found.key] if found is not None and _fits(alg, found.key) else []
        return self._verify(token, alg, keys)

    def verify_now(self, token: str) -> Claims:
        """``verify`` with the keys at hand: no fetch of the JWKS."""
        alg, kid = _header(token)
        return self._verify(token, alg, self._keys(alg, kid))

    def _keys(self, alg: str, kid: str | None) -> list[Any]:
        if alg not in self.algorithms:
            raise AuthError(f"invalid token: algorithm {alg[:16]!r} not accepted")
        if alg == "HS256":
            return self.secrets
        jwks = [] if self.jwks is None else [k.key for k in self.jwks.all()]
        if kid is None:
            keys = [*self.public_keys.values(), *jwks]
        elif kid in self.public_keys:
            keys = [self.public_keys[kid]]
        else:
            found = None if self.jwks is None else self.jwks.get(kid)
            keys = [] if found is None else [found.key]
        return [key for key in keys if _fits(alg, key)]

    def _verify(self, token: str, alg: str, keys: Sequence[Any]) -> Claims:
        if not keys:
            raise AuthError("invalid token: no key of the hub verifies it (unknown kid?)")
        for n, key in enumerate(keys):
            try:
                payload = self._decoder.decode(
                    token, key, algorithms=[alg], issuer=self.issuer, audience=self.audience
                )
                break
            except jwt.InvalidSignatureError as exc:
                if n == len(keys) - 1:
                    raise AuthError(f"invalid token: {exc}") from exc
            except jwt.ExpiredSignatureError as exc:
                raise AuthError("token expired") from exc
            except jwt.PyJWTError as exc:  # InvalidKeyError too: never an escaping error
                raise AuthError(f"invalid token: {exc}") from exc
        return _claims(payload)


def verify_token(token: str, secret: str) -> Claims:
    """The token's claims, with one HS256 secret; AuthError saying what is wrong."""
    return TokenVerifier([secret], algorithms=["HS256"]).verify_now(token)


def _header(token: str) -> tuple[str, str | None]:
    if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
        raise AuthError("invalid token: not ASCII")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
        raise AuthError("invalid token: alg must be a string, and kid too if present")
    return alg, kid


def _fits(alg: str, key: Any) -> bool:
    if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, ec.SECP256R1)  # ES256 is P-256 only
    return isinstance(key, ALGORITHMS[alg])


def _claims(payload: dict[str, Any]) -> Claims:
    user, tenant = payload.get("sub"), payload.get("tenant")
    role = payload.get("role", "user")
    if not is_valid_id(user) or not is_valid_id(tenant):
        raise AuthError("invalid token: sub and tenant must be valid ids")
    if role not in ROLES:
        raise AuthError(f"invalid token: unknown role {str(role)[:32]!r}")
    try:
        expires_at = float(payload["exp"])
    except OverflowError as exc:  # PyJWT takes an integer of any size
        raise AuthError("invalid token: exp out of range") from exc
    return Claims(
        user=UserId(cast(str, user)),
        tenant=TenantId(cast(str, tenant)),
        role=cast(Role, role),
        expires_at=expires_at,
    )


def issue_token(
    key: str | Any,
    *,
    tenant: str,
    user: str,
    role: Role = "user",
    ttl: float = 3600,
    kid: str | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """A token signed with an HS256 secret (a string) or a private key (RS256, ES256 or
    EdDSA by the key's type); ``claims`` adds others (``iss``, ``aud``)."""
    if not is_valid_id(tenant) or not is_valid_id(user):
        raise ValueError("tenant and user must match [A-Za-z0-9._@+-]{1,128}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    payload = {"sub": user, "tenant": tenant, "role": role, "exp": int(time.time() + ttl)}
    algorithm = ALGORITHM if isinstance(key, str) else _signing_algorithm(key)
    headers = None if kid is None else {"kid": kid}
    return jwt.encode({**payload, **(claims or {})}, key, algorithm=algorithm, headers=headers)


def _signing_algorithm(key: Any) -> str:
    for alg in ALGORITHMS:
        if alg != "HS256" and _fits(alg, key.public_key()):
            return alg
    raise ValueError("the private key must be RSA, EC P-256 or Ed25519")


def load_public_key(path: Path) -> Any:
    """A public key from a PEM file (or the public half of a private key's file)."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    return serialization.load_pem_public_key(data)


def load_private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def load_or_create_secret(path: Path) -> str:
    """The signing secret kept in ``path``, made on first use (readable by the owner only)."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret
