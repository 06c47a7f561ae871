"""Frames of PROTOCOL.md: bytes or text in, typed requests out; maps out, bytes or text.

Every way a frame can be wrong raises one error, ``FrameError`` with code
``bad_request``, carrying the request's ``id`` when it could be read. What passes
``load`` is bounded: nested at most ``MAX_DEPTH`` deep, every string valid Unicode
(no lone surrogates), every number finite and within 64 bits; so nothing past the
edge (the rules, Redis, a log call, an encoder) meets a value it cannot take.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, TypeAlias, cast

import msgpack
import msgspec

from presence_hub.errors import FrameError
from presence_hub.ids import UserId, are_valid_ids, is_valid_id
from presence_hub.model import MANUAL_STATUSES, Manual, SelfView, View

__all__ = [
    "FORMATS",
    "MAX_MESSAGE_LENGTH",
    "ActivityReport",
    "AuthRefresh",
    "EventRequest",
    "Format",
    "Presence",
    "Query",
    "Request",
    "RequestId",
    "SetMessage",
    "SetSettings",
    "SetStatus",
    "Subscribe",
    "Unsubscribe",
    "decode_request",
    "encode",
    "error_frame",
    "event_reply",
    "is_int",
    "is_number",
    "load",
    "ok_frame",
    "presence_frame",
    "presence_map",
    "presences_frame",
    "request_id",
    "sealed",
    "self_frame",
    "self_map",
    "snapshot_frame",
    "unsealed",
    "welcome_frame",
]

Format: TypeAlias = Literal["msgpack", "json"]
#: Subprotocol name -> frame format.
FORMATS: Final[dict[str, Format]] = {"presence.v1.msgpack": "msgpack", "presence.v1.json": "json"}
MAX_MESSAGE_LENGTH: Final = 280
#: MessagePack encoding: the same bytes as ``msgpack.packb``, in a third of the time
#: (a change packs its state and its frames several times over).
pack: Final = msgspec.msgpack.Encoder().encode
#: Decoding MessagePack in half the time of ``msgpack.unpackb`` (strings checked as UTF-8).
unpack: Final = msgspec.msgpack.Decoder().decode
RequestId: TypeAlias = int | str | None
#: Frames of the protocol nest four levels at most (a frame, its event, ...).
MAX_DEPTH: Final = 16
#: MessagePack's integers: a JSON literal beyond them is refused, not carried along.
_INT_RANGE: Final = range(-(2**63), 2**64)
#: Values with no bound to check (strings are valid Unicode once decoded).
_UNBOUNDED: Final = frozenset({str, bytes, bool, type(None)})
#: Strict JSON: unlike ``json.loads`` it refuses lone surrogates, NaN and Infinity.
_load_json: Final = msgspec.json.Decoder().decode


# --- Requests --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetStatus:
    type: ClassVar[str] = "set_status"
    id: RequestId
    status: Manual
    until: float | None


@dataclass(frozen=True, slots=True)
class SetMessage:
    type: ClassVar[str] = "set_message"
    id: RequestId
    text: str | None
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class SetSettings:
    type: ClassVar[str] = "set_settings"
    id: RequestId
    auto_away_after: float | None


@dataclass(frozen=True, slots=True)
class ActivityReport:
    type: ClassVar[str] = "activity"
    id: RequestId


@dataclass(frozen=True, slots=True)
class Subscribe:
    type: ClassVar[str] = "subscribe"
    id: RequestId
    users: list[UserId]
    known: dict[UserId, int]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    type: ClassVar[str] = "unsubscribe"
    id: RequestId
    users: list[UserId]


@dataclass(frozen=True, slots=True)
class Query:
    type: ClassVar[str] = "query"
    id: RequestId
    users: list[UserId]


@dataclass(frozen=True, slots=True)
class AuthRefresh:
    type: ClassVar[str] = "auth"
    id: RequestId
    token: str


@dataclass(frozen=True, slots=True)
class EventRequest:
    type: ClassVar[str] = "event"
    id: RequestId
    event: Mapping[str, Any]


Request: TypeAlias = (
    SetStatus
    | SetMessage
    | SetSettings
    | ActivityReport
    | Subscribe
    | Unsubscribe
    | Query
    | AuthRefresh
    | EventRequest
)


def decode_request(data: bytes | str, fmt: Format) -> Request:
    if fmt == "json" and not isinstance(data, str):
        raise FrameError("bad_request", "presence.v1.json takes text frames")
    if fmt == "msgpack" and not isinstance(data, bytes):
        raise FrameError("bad_request", "presence.v1.msgpack takes binary frames")
    try:
        frame = _decode(data, fmt)
    except FrameError as exc:
        exc.request_id = _salvage_id(data, fmt)
        raise
    if not isinstance(frame, dict):
        _check_bounds(frame, 0)
        raise FrameError("bad_request", "a frame must be a map")
    rid = frame.get("id")
    if not (rid is None or _is_request_id(rid)):
        raise FrameError(
            "bad_request", "id must be an integer or a string of at most 64 characters"
        )
    try:
        _check_bounds(frame, 0)
        return _parse(frame, rid)
    except FrameError as exc:
        exc.request_id = rid
        raise


def _is_request_id(rid: object) -> bool:
    if isinstance(rid, str):
        return len(rid) <= 64
    return isinstance(rid, int) and not isinstance(rid, bool) and rid in _INT_RANGE


def _salvage_id(data: bytes | str, fmt: Format) -> RequestId:
    """The id of a frame the strict decoders refuse (NaN, Infinity, a lone surrogate or
    invalid UTF-8 somewhere in it), read leniently so that the error still answers the
    request; only on this error path."""
    try:
        if fmt == "json":
            frame = json.loads(data)
        else:
            frame = msgpack.unpackb(data, strict_map_key=False, unicode_errors="surrogateescape")
    except (ValueError, RecursionError, msgpack.UnpackException, TypeError):
        return None
    rid = frame.get("id") if isinstance(frame, dict) else None
    if not _is_request_id(rid):
        return None
    if isinstance(rid, str) and not rid.isascii():
        try:
            rid.encode()
        except UnicodeEncodeError:  # a surrogate of its own
            return None
    return rid


def request_id(data: bytes | str, fmt: Format) -> RequestId:
    """The id of a frame that will not be processed, if it has a valid one."""
    try:
        return decode_request(data, fmt).id
    except FrameError as exc:
        return exc.request_id


def load(data: bytes | str, fmt: Format) -> Any:
    """A request body (or any value) decoded within the bounds above, or FrameError."""
    value = _decode(data, fmt)
    _check_bounds(value, 0)
    return value


def _decode(data: bytes | str, fmt: Format) -> Any:
    try:
        if fmt == "json":
            return _load_json(data)
        if isinstance(data, str):
            raise FrameError("bad_request", "MessagePack is binary")
        return unpack(data)
    except RecursionError as exc:
        raise FrameError("bad_request", f"nested deeper than {MAX_DEPTH} levels") from exc
    except (ValueError, msgspec.DecodeError, TypeError) as exc:
        name = "JSON" if fmt == "json" else "MessagePack"
        raise FrameError("bad_request", f"not {name}: {exc}") from exc


def _check_bounds(value: Any, depth: int) -> None:
    kind = type(value)
    if kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise FrameError("bad_request", f"nested deeper than {MAX_DEPTH} levels")
        items = value.values() if kind is dict else value
        # A list of fifty user ids is checked in C: a fifth of the time of a loop.
        if set(map(type, items)) <= _UNBOUNDED:
            return
        for item in items:
            _check_bounds(item, depth + 1)
    elif kind is int:
        if value not in _INT_RANGE:
            raise FrameError("bad_request", "an integer out of range (64 bits at most)")
    elif kind is float and not math.isfinite(value):
        raise FrameError("bad_request", "numbers must be finite")


def _parse(frame: dict[Any, Any], rid: RequestId) -> Request:
    kind = frame.get("type")
    if kind == "set_status":
        status = frame.get("status")
        if status not in MANUAL_STATUSES:
            raise FrameError("bad_request", f"status must be one of {', '.join(MANUAL_STATUSES)}")
        until = _optional_number(frame, "until")
        if until is not None and until < 0:
            raise FrameError("bad_request", "until must be a time (Unix seconds), or null")
        return SetStatus(rid, status, until)
    if kind == "set_message":
        text = frame.get("text")
        if text is not None and (not isinstance(text, str) or len(text) > MAX_MESSAGE_LENGTH):
            raise FrameError(
                "bad_request", "text must be a string of at most 280 characters, or null"
            )
        return SetMessage(rid, text, _optional_number(frame, "expires_at"))
    if kind == "set_settings":
        if "auto_away_after" not in frame:
            raise FrameError(
                "bad_request", "auto_away_after is required (seconds, or null for off)"
            )
        return SetSettings(rid, _optional_number(frame, "auto_away_after"))
    if kind == "activity":
        return ActivityReport(rid)
    if kind == "subscribe":
        known = frame.get("known", {})
        if known is None:
            known = {}
        if not isinstance(known, dict) or not all(
            is_valid_id(k) and is_int(v) for k, v in known.items()
        ):
            raise FrameError("bad_request", "known must map user ids to integer vers")
        return Subscribe(rid, _users(frame), {UserId(k): v for k, v in known.items()})
    if kind == "unsubscribe":
        return Unsubscribe(rid, _users(frame))
    if kind == "query":
        return Query(rid, _users(frame))
    if kind == "auth":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise FrameError("bad_request", "token must be a string")
        return AuthRefresh(rid, token)
    if kind == "event":
        event = frame.get("event")
        if not isinstance(event, dict):
            raise FrameError("bad_request", "event must be a map")
        return EventRequest(rid, event)
    if not isinstance(kind, str):
        raise FrameError("bad_request", "every frame needs a string field type")
    raise FrameError("bad_request", f"unknown frame type {kind[:64]!r}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite number that converts to a float (an int of any size would not)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value in _INT_RANGE
    return isinstance(value, float) and math.isfinite(value)


def _optional_number(frame: Mapping[str, Any], field: str) -> float | None:
    value = frame.get(field)
    if value is None:
        return None
    if not is_number(value):
        raise FrameError("bad_request", f"{field} must be a number or null")
    return float(value)


def _users(frame: Mapping[str, Any]) -> list[UserId]:
    users = frame.get("users")
    if not isinstance(users, list) or not are_valid_ids(users):
        raise FrameError("bad_request", "users must be a list of user ids")
    return cast(list[UserId], users)


# --- Frames to clients ---------------------------------------------------------------


def encode(frame: Mapping[str, Any], fmt: Format) -> bytes | str:
    if fmt == "json":
        return json.dumps(
            frame, separators=(",", ":"), ensure_ascii=False, default=msgspec.to_builtins
        )
    return pack(frame)


def sealed(origin: float, frame: bytes) -> bytes:
    """What the store publishes of an update: its packed frame, and when the input that
    caused it arrived (to measure the latency to each subscriber)."""
    return pack([origin, frame])


def unsealed(data: bytes) -> tuple[float | None, bytes]:
    """``sealed``'s origin and frame, as the hub reads them."""
    origin, frame = unpack(data)
    return origin, frame


def welcome_frame(
    session: str, user: str, tenant: str, device: str, server_time: float, own: SelfView
) -> dict[str, Any]:
    return {
        "type": "welcome",
        "session": session,
        "user": user,
        "tenant": tenant,
        "device": device,
        "server_time": server_time,
        "self": self_map(own),
    }


def ok_frame(request_id: RequestId) -> dict[str, Any]:
    return {"type": "ok", "id": request_id}


def snapshot_frame(request_id: RequestId, presences: list[Presence]) -> dict[str, Any]:
    return {"type": "snapshot", "id": request_id, "presences": presences}


def presences_frame(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Several updates in one frame: ``items`` are presence frames, less their type."""
    return {
        "type": "presences",
        "items": [{k: v for k, v in m.items() if k != "type"} for m in items],
    }


def event_reply(request_id: RequestId, result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ok`` that answers an ``event`` frame: its result and, if rejected, why."""
    frame: dict[str, Any] = {"type": "ok", "id": request_id, "result": result["result"]}
    if "error" in result:
        frame["error"] = result["error"]
    return frame


def error_frame(code: str, message: str, request_id: RequestId = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return frame


class Presence(msgspec.Struct, gc=False):
    """A Presence as a snapshot lists it: encoded as the map of ``presence_map``, field
    for field, without building that map (a subscribe lists fifty)."""

    user: str
    status: str
    message: str | None
    since: float | None
    ver: int


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
        "manual_until": view.manual_until,
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
