"""Identifiers shared by every layer, and the one rule for what makes them valid."""

from __future__ import annotations

import re
from typing import NewType

__all__ = ["ID_PATTERN", "SessionId", "TenantId", "UserId", "is_valid_id"]

TenantId = NewType("TenantId", str)
UserId = NewType("UserId", str)
SessionId = NewType("SessionId", str)

#: PROTOCOL.md: user and tenant ids. No braces or colons, which keeps store keys unambiguous.
ID_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None
