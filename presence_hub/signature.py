"""The signature of a webhook delivery (PROTOCOL.md): ``Presence-Hub-Signature:
t=UNIX_SECONDS,v1=HEX``, HEX the HMAC-SHA256 of the webhook's secret over ``t``, a
``.`` and the body's bytes. A receiver checks it with ``verify``::

    if not verify(secret, request.headers["Presence-Hub-Signature"], await request.read()):
        return web.Response(status=401)
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

__all__ = ["HEADER", "TOLERANCE", "sign", "verify"]

HEADER: Final = "Presence-Hub-Signature"
#: PROTOCOL.md: receivers refuse a signature more than 5 minutes old.
TOLERANCE: Final = 300.0


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, now: float | None = None) -> str:
    """The header's value for ``body``, signed now."""
    timestamp = str(int(time.time() if now is None else now))
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance: float = TOLERANCE, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret``, within ``tolerance`` seconds."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    timestamp, given = parts.get("t", ""), parts.get("v1", "")
    if not timestamp.isdigit() or not given:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(_digest(secret, timestamp, body), given)
