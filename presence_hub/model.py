"""The values the rules work on: a user's state, what observers and the user see of
it, the inputs that change it and what the rules make of an input (``rules.apply``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import msgspec

from presence_hub.ids import SessionId

__all__ = [
    "DEFAULT_MAX_DURATION",
    "DEVICES",
    "ENDED_RETENTION",
    "MANUAL_STATUSES",
    "MAX_MANUAL_DURATION",
    "STATUSES",
    "Activity",
    "ActivitySeen",
    "CallEnded",
    "CallStarted",
    "Device",
    "Input",
    "Manual",
    "ManualStatusSet",
    "MeetingEnded",
    "MeetingStarted",
    "MessageSet",
    "Outcome",
    "Result",
    "SelfView",
    "Session",
    "SessionClosed",
    "SessionDropped",
    "SessionExpired",
    "SessionOpened",
    "SettingsChanged",
    "Status",
    "TimerFired",
    "UserState",
    "View",
]

Manual: TypeAlias = Literal["available", "busy", "dnd", "away", "invisible"]
Status: TypeAlias = Literal["available", "busy", "dnd", "on_call", "away", "offline"]
Device: TypeAlias = Literal["desktop", "mobile", "web"]
Result: TypeAlias = Literal["applied", "stale", "refused"]

MANUAL_STATUSES: Final[tuple[Manual, ...]] = ("available", "busy", "dnd", "away", "invisible")
STATUSES: Final[tuple[Status, ...]] = ("available", "busy", "dnd", "on_call", "away", "offline")
DEVICES: Final[tuple[Device, ...]] = ("desktop", "mobile", "web")

#: PROTOCOL.md: a call or meeting whose end never arrives lasts at most 12 hours.
DEFAULT_MAX_DURATION: Final = 43200.0
#: How far ahead a manual status may be given an end time: a year, leap years included.
MAX_MANUAL_DURATION: Final = 366 * 86400.0
#: How long an ended call or meeting is remembered, so that its start, arriving
#: late or replayed, cannot reopen it. Longer than any default maximum duration.
ENDED_RETENTION: Final = 86400.0


# --- State -------------------------------------------------------------------

# Immutable values, as frozen dataclasses would be, but built in C: the rules build
# and copy a state several times per input, and a frozen dataclass sets each field
# through object.__setattr__ (that cost more than the rules themselves). They hold
# only plain data and never take part in a reference cycle, so the cyclic collector
# need not track them (gc=False): a node keeps up to 100,000 of them cached, and with
# their dicts of structs that is hundreds of thousands of objects less to walk.


class Session(msgspec.Struct, frozen=True, gc=False):
    device: Device
    node: str
    since: float
    #: Set when the connection dropped: the session still counts as live until then.
    grace_until: float | None = None


class Activity(msgspec.Struct, frozen=True, gc=False):
    """An open call or meeting."""

    started: float
    deadline: float


class View(msgspec.Struct, frozen=True, gc=False):
    """What observers see of a user: the Presence of PROTOCOL.md, less the user id."""

    status: Status = "offline"
    message: str | None = None
    since: float | None = None
    ver: int = 0


class SelfView(msgspec.Struct, frozen=True, gc=False):
    """The user's full private view of their own state, sent to their own sessions."""

    manual: Manual
    manual_until: float | None
    message: str | None
    message_expires_at: float | None
    effective: Status
    since: float | None
    calls: int
    meetings: int
    idle: bool
    devices: tuple[Device, ...]
    auto_away_after: float | None
    ver: int


class UserState(msgspec.Struct, frozen=True, gc=False):
    manual: Manual = "available"
    #: When the manual status becomes ``available`` by itself (never for ``available``).
    manual_until: float | None = None
    message: str | None = None
    message_expires_at: float | None = None
    auto_away_after: float | None = None
    last_activity: float | None = None
    #: Whether the last activity is older than the auto-away setting.
    idle: bool = False
    sessions: Mapping[SessionId, Session] = msgspec.field(default_factory=dict)
    calls: Mapping[str, Activity] = msgspec.field(default_factory=dict)
    meetings: Mapping[str, Activity] = msgspec.field(default_factory=dict)
    #: "call:REF" or "meeting:REF" -> when it may be forgotten.
    ended: Mapping[str, float] = msgspec.field(default_factory=dict)
    #: The last view published to observers.
    view: View = View()
    self_ver: int = 0


# --- Inputs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManualStatusSet:
    status: Manual
    #: When it becomes ``available`` by itself; None: never.
    until: float | None = None


@dataclass(frozen=True, slots=True)
class MessageSet:
    text: str | None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    auto_away_after: float | None


@dataclass(frozen=True, slots=True)
class ActivitySeen:
    """The person interacted with the app."""


@dataclass(frozen=True, slots=True)
class SessionOpened:
    session: SessionId
    device: Device
    node: str
    #: The sessions the user may hold (dropped ones in their grace count): one more is
    #: refused, so a client that reconnects in a loop cannot pile them up.
    max_sessions: int | None = None


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """Logout or quit: the session ends at once."""

    session: SessionId


@dataclass(frozen=True, slots=True)
class SessionDropped:
    """The connection ended abnormally: the session lives on for ``grace`` seconds."""

    session: SessionId
    grace: float


@dataclass(frozen=True, slots=True)
class SessionExpired:
    """The session's node stopped renewing its lease (it died): the session ends now."""

    session: SessionId


@dataclass(frozen=True, slots=True)
class CallStarted:
    ref: str
    at: float
    max_duration: float = DEFAULT_MAX_DURATION


@dataclass(frozen=True, slots=True)
class CallEnded:
    ref: str
    at: float


@dataclass(frozen=True, slots=True)
class MeetingStarted:
    ref: str
    at: float
    max_duration: float = DEFAULT_MAX_DURATION


@dataclass(frozen=True, slots=True)
class MeetingEnded:
    ref: str
    at: float


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A due time was reached: only time-driven changes happen."""


Input: TypeAlias = (
    ManualStatusSet
    | MessageSet
    | SettingsChanged
    | ActivitySeen
    | SessionOpened
    | SessionClosed
    | SessionDropped
    | SessionExpired
    | CallStarted
    | CallEnded
    | MeetingStarted
    | MeetingEnded
    | TimerFired
)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: UserState
    #: The new observer view, or None when observers see no change.
    view: View | None
    #: The new self view, or None when it did not change.
    self_view: SelfView | None
    #: The next time at which the state changes by itself, if any.
    due: float | None
    #: For call and meeting events: ``stale`` when the event was superseded; for a
    #: session beyond the user's limit, ``refused``.
    result: Result = "applied"
