"""JWT access tokens (PROTOCOL.md: HS256, claims sub, tenant, role, exp)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias, cast

import jwt

from presence_hub.errors import AuthError
from presence_hub.ids import TenantId, UserId, is_valid_id

__all__ = [
    "ROLES",
    "Claims",
    "Role",
    "bearer_token",
    "issue_token",
    "load_or_create_secret",
    "verify_token",
]

Role: TypeAlias = Literal["user", "producer", "admin"]
ROLES: Final[tuple[Role, ...]] = ("user", "producer", "admin")
ALGORITHM: Final = "HS256"
#: Options set once: ``jwt.decode`` merges them anew on every call, a connect storm's
#: most frequent.
_DECODER: Final = jwt.PyJWT(options={"require": ["exp", "sub"]})


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


def verify_token(token: str, secret: str) -> Claims:
    """The token's claims, or AuthError saying what is wrong with it."""
    if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
        raise AuthError("invalid token: not ASCII")
    try:
        payload = _DECODER.decode(token, secret, algorithms=[ALGORITHM])
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
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
    secret: str, *, tenant: str, user: str, role: Role = "user", ttl: float = 3600
) -> str:
    if not is_valid_id(tenant) or not is_valid_id(user):
        raise ValueError("tenant and user must match [A-Za-z0-9._@+-]{1,128}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    claims = {"sub": user, "tenant": tenant, "role": role, "exp": int(time.time() + ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def load_or_create_secret(path: Path) -> str:
    """The signing secret kept in ``path``, made on first use (readable by the owner only)."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret
