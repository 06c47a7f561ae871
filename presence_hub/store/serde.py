"""A user's state as a compact MessagePack blob, and back."""

from __future__ import annotations

from typing import Any

import msgpack

from presence_hub.codec import pack
from presence_hub.ids import SessionId
from presence_hub.rules import Activity, Session, UserState, View

__all__ = ["decode_state", "encode_state"]

# Bump when the layout changes incompatibly; decode_state must read every older one.
_FORMAT = 1


def encode_state(state: UserState) -> bytes:
    view = state.view
    blob: dict[str, Any] = {
        "f": _FORMAT,
        "m": state.manual,
        "msg": state.message,
        "mx": state.message_expires_at,
        "aa": state.auto_away_after,
        "la": state.last_activity,
        "idle": state.idle,
        "s": {k: [s.device, s.node, s.since, s.grace_until] for k, s in state.sessions.items()},
        "c": {k: [a.started, a.deadline] for k, a in state.calls.items()},
        "mt": {k: [a.started, a.deadline] for k, a in state.meetings.items()},
        "e": dict(state.ended),
        "v": [view.status, view.message, view.since, view.ver],
        "sv": state.self_ver,
    }
    return pack(blob)


def decode_state(data: bytes) -> UserState:
    blob = msgpack.unpackb(data)
    status, message, since, ver = blob["v"]
    return UserState(
        manual=blob["m"],
        message=blob["msg"],
        message_expires_at=blob["mx"],
        auto_away_after=blob["aa"],
        last_activity=blob["la"],
        idle=blob["idle"],
        sessions={
            SessionId(k): Session(device=d, node=n, since=s, grace_until=g)
            for k, (d, n, s, g) in blob["s"].items()
        },
        calls={k: Activity(started=s, deadline=d) for k, (s, d) in blob["c"].items()},
        meetings={k: Activity(started=s, deadline=d) for k, (s, d) in blob["mt"].items()},
        ended=blob["e"],
        view=View(status=status, message=message, since=since, ver=ver),
        self_ver=blob["sv"],
    )
