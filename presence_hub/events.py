"""Producer events (PROTOCOL.md: Events): validated and applied the same way over HTTP and WS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from presence_hub import model
from presence_hub.codec import is_number
from presence_hub.errors import FrameError
from presence_hub.ids import TenantId, UserId, is_valid_id
from presence_hub.metrics import Metrics
from presence_hub.store import PresenceStore

__all__ = [
    "EVENT_KINDS",
    "MAX_EVENTS",
    "EventKind",
    "ProducerEvent",
    "apply_events",
    "parse_event",
]

EventKind: TypeAlias = Literal["call_started", "call_ended", "meeting_started", "meeting_ended"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = (
    "call_started",
    "call_ended",
    "meeting_started",
    "meeting_ended",
)
#: PROTOCOL.md: events in one request (a POST /v1/events, or a WebSocket batch).
MAX_EVENTS: Final = 1000
#: A producer may lower or raise the 12-hour default, up to a week.
MAX_DURATION_LIMIT: Final = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class ProducerEvent:
    event_id: str
    kind: EventKind
    user: UserId
    ref: str
    at: float
    max_duration: float

    def to_input(self) -> model.Input:
        match self.kind:
            case "call_started":
                return model.CallStarted(self.ref, self.at, self.max_duration)
            case "call_ended":
                return model.CallEnded(self.ref, self.at)
            case "meeting_started":
                return model.MeetingStarted(self.ref, self.at, self.max_duration)
            case "meeting_ended":
                return model.MeetingEnded(self.ref, self.at)


def _bounded_string(raw: Mapping[str, Any], field: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise FrameError("bad_request", f"{field} must be a string of 1 to 128 characters")
    return value


def parse_event(raw: Mapping[str, Any]) -> ProducerEvent:
    """A valid event, or FrameError saying why it is rejected."""
    if not isinstance(raw, Mapping):
        raise FrameError("bad_request", "an event must be a map")
    event_id = _bounded_string(raw, "event_id")
    kind = raw.get("kind")
    if kind not in EVENT_KINDS:
        raise FrameError("bad_request", f"kind must be one of {', '.join(EVENT_KINDS)}")
    user = raw.get("user")
    if not is_valid_id(user):
        raise FrameError("bad_request", "user must be a valid user id")
    ref = _bounded_string(raw, "ref")
    at = raw.get("at")
    if not is_number(at):
        raise FrameError("bad_request", "at must be a time (Unix seconds)")
    max_duration = raw.get("max_duration", model.DEFAULT_MAX_DURATION)
    if max_duration is None:
        max_duration = model.DEFAULT_MAX_DURATION
    if not is_number(max_duration) or not 0 < max_duration <= MAX_DURATION_LIMIT:
        raise FrameError("bad_request", "max_duration must be seconds, above 0 and at most a week")
    return ProducerEvent(
        event_id=event_id,
        kind=kind,
        user=UserId(str(user)),
        ref=ref,
        at=float(at),  # type: ignore[arg-type]
        max_duration=float(max_duration),
    )


async def apply_events(
    store: PresenceStore,
    tenant: TenantId,
    raws: Sequence[Any],
    *,
    origin: float | None = None,
    metrics: Metrics | None = None,
) -> list[dict[str, Any]]:
    """One result map of PROTOCOL.md per event, in order: event_id, result and, when
    rejected, error. Each user's events apply in the order given."""
    results: list[dict[str, Any]] = [{} for _ in raws]
    valid: list[tuple[int, ProducerEvent]] = []
    for n, raw in enumerate(raws):
        try:
            event = parse_event(raw)
        except FrameError as exc:
            event_id = raw.get("event_id") if isinstance(raw, Mapping) else None
            results[n] = {
                "event_id": event_id if isinstance(event_id, str) else None,
                "result": "rejected",
                "error": exc.message,
            }
            if metrics is not None:
                kind = raw.get("kind") if isinstance(raw, Mapping) else None
                label = kind if kind in EVENT_KINDS else "invalid"
                metrics.event(label, "rejected").inc()
            continue
        valid.append((n, event))

    applied = await store.apply_events(
        tenant, [(e.user, e.to_input(), e.event_id) for _, e in valid], origin=origin
    )
    for (n, event), result in zip(valid, applied, strict=True):
        results[n] = {"event_id": event.event_id, "result": result}
        if metrics is not None:
            metrics.event(event.kind, result).inc()
    return results
