"""The presence rules of RULES.md, as one pure function.

``apply(state, input, now)`` returns the user's new state, what observers must be
told (if anything), what the user's own sessions must be told (if anything) and
the next moment at which the state changes by itself. Nothing here does I/O or
reads the clock: the caller passes ``now`` in, so every rule can be tested
without an event loop and replayed exactly.

Time-driven changes (a dropped session's grace running out, a message expiring,
a call reaching its maximum duration, inactivity turning into auto-away) are
applied at the moment they were due, in order, before the input itself, so the
result does not depend on how late a timer fires.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Literal, TypeAlias

from msgspec.structs import replace

from presence_hub.ids import SessionId
from presence_hub.model import (
    ENDED_RETENTION,
    Activity,
    ActivitySeen,
    CallEnded,
    CallStarted,
    Input,
    ManualStatusSet,
    MeetingEnded,
    MeetingStarted,
    MessageSet,
    Outcome,
    Result,
    SelfView,
    Session,
    SessionClosed,
    SessionDropped,
    SessionExpired,
    SessionOpened,
    SettingsChanged,
    Status,
    TimerFired,
    UserState,
    View,
)

__all__ = [
    "RULE_REASONS",
    "accepts_calls",
    "apply",
    "apply_all",
    "decide",
    "self_view",
]

# --- The rules -----------------------------------------------------------------


def decide(state: UserState) -> tuple[Status, int]:
    """The effective status and the number of the RULES.md rule that decided it."""
    if not state.sessions:
        return "offline", 1
    manual = state.manual
    if manual == "invisible":
        return "offline", 2
    if manual == "dnd":
        return "dnd", 3
    if manual == "busy":
        return "busy", 4
    if manual == "away":
        return "away", 5
    if state.calls:
        return "on_call", 6
    if state.meetings:
        return "busy", 7
    if state.idle and not any(s.device == "mobile" for s in state.sessions.values()):
        return "away", 8
    return "available", 9


#: Why each rule of ``decide`` decided, in RULES.md's words (for ``explain``).
RULE_REASONS: Final = {
    1: "no live session",
    2: "manual status is invisible",
    3: "manual status is dnd",
    4: "manual status is busy",
    5: "manual status is away",
    6: "manual status is available and at least one call is open",
    7: "manual status is available and at least one meeting is open",
    8: "available, auto-away on, no mobile session, inactive longer than the setting",
    9: "otherwise available",
}


def accepts_calls(state: UserState) -> bool:
    """PROTOCOL.md: false for dnd and offline (calls go to voicemail). An invisible user
    with a live session takes calls (rule 2): they are reachable, only hidden."""
    status, rule = decide(state)
    return rule == 2 or status not in ("dnd", "offline")


def self_view(state: UserState) -> SelfView:
    return SelfView(
        manual=state.manual,
        manual_until=state.manual_until,
        message=state.message,
        message_expires_at=state.message_expires_at,
        effective=state.view.status,
        since=state.view.since,
        calls=len(state.calls),
        meetings=len(state.meetings),
        idle=state.idle,
        devices=tuple(sorted({s.device for s in state.sessions.values()})),
        auto_away_after=state.auto_away_after,
        ver=state.self_ver,
    )


def apply(state: UserState, event: Input, now: float) -> Outcome:
    tracker = _StatusTracker(state.view)
    new = _expire(state, now, tracker)
    new, result = _handle(new, event, now)
    if new.ended:
        new = _forget_ended(new, now)
    tracker.observe(new, now)

    view = _next_view(new, tracker)
    if view is not None:
        new = replace(new, view=view)
    own = None
    if new != state:
        # Both at the old self_ver: equal unless what the user sees of themselves changed.
        own = self_view(new)
        if own == self_view(state):
            own = None
        else:
            new = replace(new, self_ver=state.self_ver + 1)
            own = replace(own, ver=new.self_ver)
    return Outcome(state=new, view=view, self_view=own, due=_next_due(new, now), result=result)


def apply_all(
    state: UserState, inputs: Sequence[Input], now: float
) -> tuple[Outcome, list[Result]]:
    """Several inputs in order, as one net change (a batch of producer events): the
    final state, the last observer and self views that changed, the final due time;
    and each input's result. ``inputs`` must not be empty."""
    view: View | None = None
    own: SelfView | None = None
    results: list[Result] = []
    due: float | None = None
    for event in inputs:
        outcome = apply(state, event, now)
        state, due = outcome.state, outcome.due
        view = outcome.view or view
        own = outcome.self_view or own
        results.append(outcome.result)
    return Outcome(state, view, own, due, results[-1]), results


class _StatusTracker:
    """Follows the effective status through the steps of one ``apply`` to know ``since``."""

    __slots__ = ("since", "status")

    def __init__(self, view: View) -> None:
        self.status: Status = view.status
        self.since = view.since

    def observe(self, state: UserState, at: float) -> None:
        status, _ = decide(state)
        if status != self.status:
            self.status = status
            self.since = at


def _next_view(state: UserState, tracker: _StatusTracker) -> View | None:
    old = state.view
    status = tracker.status
    message = state.message if status != "offline" else None
    if status == old.status and message == old.message:
        return None
    # A status that changed and changed back within one step keeps its old since.
    since = old.since if status == old.status else tracker.since
    return View(status=status, message=message, since=since, ver=old.ver + 1)


def _is_idle(auto_away_after: float | None, last_activity: float | None, now: float) -> bool:
    return (
        auto_away_after is not None
        and last_activity is not None
        and last_activity + auto_away_after <= now
    )


# Time-driven changes: (when, what, which).
_Due: TypeAlias = tuple[
    float, Literal["manual", "message", "call", "meeting", "grace", "idle"], str
]


def _due_points(state: UserState) -> list[_Due]:
    points: list[_Due] = []
    if state.manual_until is not None:
        points.append((state.manual_until, "manual", ""))
    if state.message_expires_at is not None:
        points.append((state.message_expires_at, "message", ""))
    points.extend((a.deadline, "call", ref) for ref, a in state.calls.items())
    points.extend((a.deadline, "meeting", ref) for ref, a in state.meetings.items())
    points.extend(
        (s.grace_until, "grace", sid)
        for sid, s in state.sessions.items()
        if s.grace_until is not None
    )
    if not state.idle and state.auto_away_after is not None and state.last_activity is not None:
        points.append((state.last_activity + state.auto_away_after, "idle", ""))
    return points


def _next_due(state: UserState, now: float) -> float | None:
    return min((t for t, _, _ in _due_points(state) if t > now), default=None)


def _expire(state: UserState, now: float, tracker: _StatusTracker) -> UserState:
    due = sorted(p for p in _due_points(state) if p[0] <= now)
    for at, what, which in due:
        if what == "manual":
            # As if the user had set available at that moment.
            state, _ = _handle(state, ManualStatusSet("available"), at)
        elif what == "message":
            state = replace(state, message=None, message_expires_at=None)
        elif what == "call":
            state = _close(state, "call", which, forget_at=at + ENDED_RETENTION)
        elif what == "meeting":
            state = _close(state, "meeting", which, forget_at=at + ENDED_RETENTION)
        elif what == "grace":
            state = replace(state, sessions=_without(state.sessions, SessionId(which)))
        else:
            state = replace(state, idle=True)
        tracker.observe(state, at)
    return state


def _handle(state: UserState, event: Input, now: float) -> tuple[UserState, Result]:
    match event:
        case ManualStatusSet(status=status, until=until):
            if status == "available" or (until is not None and until <= now):
                # An end time already passed: available at once; available never ends.
                return replace(state, manual="available", manual_until=None), "applied"
            return replace(state, manual=status, manual_until=until), "applied"
        case MessageSet(text=text, expires_at=expires_at):
            if text is None or (expires_at is not None and expires_at <= now):
                text, expires_at = None, None
            return replace(state, message=text, message_expires_at=expires_at), "applied"
        case SettingsChanged(auto_away_after=after):
            idle = _is_idle(after, state.last_activity, now)
            return replace(state, auto_away_after=after, idle=idle), "applied"
        case ActivitySeen():
            return _touch(state, now), "applied"
        case SessionOpened(session=sid, device=device, node=node, max_sessions=limit):
            if sid in state.sessions:
                return state, "applied"
            if limit is not None and len(state.sessions) >= limit:
                return state, "refused"
            sessions = {**state.sessions, sid: Session(device=device, node=node, since=now)}
            return _touch(replace(state, sessions=sessions), now), "applied"
        case SessionClosed(session=sid) | SessionExpired(session=sid):
            return replace(state, sessions=_without(state.sessions, sid)), "applied"
        case SessionDropped(session=sid, grace=grace):
            session = state.sessions.get(sid)
            if session is None or session.grace_until is not None:
                return state, "applied"
            if grace <= 0:
                return replace(state, sessions=_without(state.sessions, sid)), "applied"
            dropped = replace(session, grace_until=now + grace)
            return replace(state, sessions={**state.sessions, sid: dropped}), "applied"
        case CallStarted(ref=ref, at=at, max_duration=max_duration):
            return _open(state, "call", ref, at, max_duration, now)
        case MeetingStarted(ref=ref, at=at, max_duration=max_duration):
            return _open(state, "meeting", ref, at, max_duration, now)
        case CallEnded(ref=ref):
            return _end(state, "call", ref, now)
        case MeetingEnded(ref=ref):
            return _end(state, "meeting", ref, now)
        case TimerFired():
            return state, "applied"


def _touch(state: UserState, now: float) -> UserState:
    last = now if state.last_activity is None else max(state.last_activity, now)
    return replace(state, last_activity=last, idle=_is_idle(state.auto_away_after, last, now))


def _without(sessions: Mapping[SessionId, Session], sid: SessionId) -> Mapping[SessionId, Session]:
    return {k: v for k, v in sessions.items() if k != sid}


def _open(
    state: UserState,
    kind: Literal["call", "meeting"],
    ref: str,
    at: float,
    max_duration: float,
    now: float,
) -> tuple[UserState, Result]:
    current = state.calls if kind == "call" else state.meetings
    deadline = at + max_duration
    # Already open, already ended (an end that came first wins), or already over.
    if ref in current or f"{kind}:{ref}" in state.ended or deadline <= now:
        return state, "stale"
    opened = {**current, ref: Activity(started=at, deadline=deadline)}
    if kind == "call":
        return replace(state, calls=opened), "applied"
    return replace(state, meetings=opened), "applied"


def _end(
    state: UserState, kind: Literal["call", "meeting"], ref: str, now: float
) -> tuple[UserState, Result]:
    if f"{kind}:{ref}" in state.ended:
        return state, "stale"
    return _close(state, kind, ref, forget_at=now + ENDED_RETENTION), "applied"


def _close(
    state: UserState, kind: Literal["call", "meeting"], ref: str, forget_at: float
) -> UserState:
    ended = {**state.ended, f"{kind}:{ref}": forget_at}
    if kind == "call":
        calls = {k: v for k, v in state.calls.items() if k != ref}
        return replace(state, calls=calls, ended=ended)
    meetings = {k: v for k, v in state.meetings.items() if k != ref}
    return replace(state, meetings=meetings, ended=ended)


def _forget_ended(state: UserState, now: float) -> UserState:
    if min(state.ended.values()) > now:
        return state
    return replace(state, ended={k: t for k, t in state.ended.items() if t > now})
