"""Frames of PROTOCOL.md as plain maps, ready for MessagePack or JSON."""

from __future__ import annotations

from typing import Any

from presence_hub.ids import UserId
from presence_hub.rules import SelfView, View

__all__ = ["presence_frame", "presence_map", "self_frame", "self_map"]


def presence_map(user: UserId | str, view: View) -> dict[str, Any]:
    """A Presence: what observers see of ``user``."""
    return {
        "user": user,
        "status": view.status,
        "message": view.message,
        "since": view.since,
        "ver": view.ver,
    }


def presence_frame(user: UserId | str, view: View) -> dict[str, Any]:
    return {"type": "presence", **presence_map(user, view)}


def self_map(view: SelfView) -> dict[str, Any]:
    return {
        "manual": view.manual,
        "message": view.message,
        "message_expires_at": view.message_expires_at,
        "effective": view.effective,
        "since": view.since,
        "calls": view.calls,
        "meetings": view.meetings,
        "idle": view.idle,
        "devices": list(view.devices),
        "auto_away_after": view.auto_away_after,
        "ver": view.ver,
    }


def self_frame(view: SelfView) -> dict[str, Any]:
    return {"type": "self", **self_map(view)}
