"""A user's state as a compact MessagePack blob, and back; and what can still be
trusted of a blob that no longer decodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgpack
import msgspec

from presence_hub.codec import pack
from presence_hub.errors import CorruptRecord
from presence_hub.ids import SessionId
from presence_hub.model import (
    MANUAL_STATUSES,
    STATUSES,
    Activity,
    Device,
    Manual,
    Session,
    Status,
    UserState,
    View,
)

__all__ = ["decode_state", "encode_state", "salvage_state"]

# Bump when the layout changes incompatibly; decode_state must read every older one.
_FORMAT = 1


def encode_state(state: UserState) -> bytes:
    view = state.view
    blob: dict[str, Any] = {
        "f": _FORMAT,
        "m": state.manual,
        "mu": state.manual_until,
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
    """The state of a blob, or CorruptRecord."""
    try:
        state = _decode(data)
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise CorruptRecord(f"undecodable state record: {exc!r}"[:200]) from exc
    if state.manual not in MANUAL_STATUSES or state.view.status not in STATUSES:
        raise CorruptRecord("state record with an unknown status")
    if state.manual_until is not None and not isinstance(state.manual_until, float | int):
        raise CorruptRecord("state record with a manual end time that is not a time")
    return state


def _decode(data: bytes) -> UserState:
    blob = msgpack.unpackb(data)
    status, message, since, ver = blob["v"]
    return UserState(
        manual=blob["m"],
        # Records written before manual end times have none.
        manual_until=blob.get("mu"),
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


_Time = float | None
_Times = dict[str, tuple[float, float]]
#: Each field of the state, read on its own from a blob that does not decode as a
#: whole: (its key in the blob, how to read it).
_SALVAGE: Final[dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "manual": ("m", lambda v: msgspec.convert(v, Manual)),
    "manual_until": ("mu", lambda v: msgspec.convert(v, _Time)),
    "message": ("msg", lambda v: msgspec.convert(v, str | None)),
    "message_expires_at": ("mx", lambda v: msgspec.convert(v, _Time)),
    "auto_away_after": ("aa", lambda v: msgspec.convert(v, _Time)),
    "last_activity": ("la", lambda v: msgspec.convert(v, _Time)),
    "idle": ("idle", lambda v: msgspec.convert(v, bool)),
    "sessions": (
        "s",
        lambda v: {
            SessionId(k): Session(device=d, node=n, since=t, grace_until=g)
            for k, (d, n, t, g) in msgspec.convert(
                v, dict[str, tuple[Device, str, float, _Time]]
            ).items()
        },
    ),
    "calls": ("c", lambda v: {k: Activity(*a) for k, a in msgspec.convert(v, _Times).items()}),
    "meetings": (
        "mt",
        lambda v: {k: Activity(*a) for k, a in msgspec.convert(v, _Times).items()},
    ),
    "ended": ("e", lambda v: msgspec.convert(v, dict[str, float])),
    "view": (
        "v",
        lambda v: View(*msgspec.convert(v, tuple[Status, str | None, _Time, int])),
    ),
    "self_ver": ("sv", lambda v: msgspec.convert(v, int)),
}


#: Keys that records written by older versions lack: their absence loses nothing.
_ADDED_LATER: Final = frozenset({"mu"})


def salvage_state(data: bytes, rev: int) -> tuple[UserState, list[str]]:
    """What can still be trusted of a blob that ``decode_state`` refused, field by
    field, and the names of the fields lost (they take their defaults). A lost view
    or self version becomes ``rev``: each commit raises the revision by one and a
    version by at most one, so versions published from here on stay the newest."""
    try:
        blob = msgpack.unpackb(data, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        blob = None
    if not isinstance(blob, dict):
        blob = {}
    kept: dict[str, Any] = {}
    lost: list[str] = []
    for name, (key, read) in _SALVAGE.items():
        try:
            kept[name] = read(blob.get(key) if key in _ADDED_LATER else blob[key])
        except (KeyError, TypeError, ValueError, msgspec.ValidationError):
            lost.append(name)
    if "view" in lost:
        kept["view"] = View(ver=rev)
    if "self_ver" in lost:
        kept["self_ver"] = rev
    return UserState(**kept), lost
