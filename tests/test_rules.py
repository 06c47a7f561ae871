"""Every row and consequence of RULES.md, as named cases, and properties over random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from presence_hub import model, rules
from presence_hub.ids import SessionId
from presence_hub.model import (
    ActivitySeen,
    CallEnded,
    CallStarted,
    Input,
    ManualStatusSet,
    MeetingEnded,
    MeetingStarted,
    MessageSet,
    SessionClosed,
    SessionDropped,
    SessionExpired,
    SessionOpened,
    SettingsChanged,
    TimerFired,
    UserState,
    View,
)

T0 = 1_700_000_000.0
DESK = SessionId("desk")
PHONE = SessionId("phone")
WEB = SessionId("web")


def desktop() -> SessionOpened:
    return SessionOpened(DESK, "desktop", "node-a")


def mobile() -> SessionOpened:
    return SessionOpened(PHONE, "mobile", "node-a")


Step = tuple[float, Input]


def run(steps: list[Step]) -> tuple[UserState, list[View]]:
    """Apply timed inputs in order; return the final state and every published view."""
    state = UserState()
    published: list[View] = []
    for offset, event in steps:
        outcome = rules.apply(state, event, T0 + offset)
        state = outcome.state
        if outcome.view is not None:
            published.append(outcome.view)
    return state, published


@dataclass(frozen=True)
class Case:
    name: str
    steps: list[Step]
    status: model.Status
    rule: int


CASES = [
    # One case per row of the effective-status table.
    Case("1 no live session is offline", [], "offline", 1),
    Case("1 logged out is offline", [(0, desktop()), (5, SessionClosed(DESK))], "offline", 1),
    Case(
        "2 invisible is offline",
        [(0, desktop()), (1, ManualStatusSet("invisible"))],
        "offline",
        2,
    ),
    Case("3 dnd", [(0, desktop()), (1, ManualStatusSet("dnd"))], "dnd", 3),
    Case("4 busy", [(0, desktop()), (1, ManualStatusSet("busy"))], "busy", 4),
    Case("5 away", [(0, desktop()), (1, ManualStatusSet("away"))], "away", 5),
    Case(
        "6 available in a call is on_call",
        [(0, desktop()), (1, CallStarted("c", T0))],
        "on_call",
        6,
    ),
    Case(
        "7 available in a meeting is busy",
        [(0, desktop()), (1, MeetingStarted("m", T0))],
        "busy",
        7,
    ),
    Case(
        "8 available and inactive is away",
        [(0, SettingsChanged(300)), (0, desktop()), (301, TimerFired())],
        "away",
        8,
    ),
    Case("9 otherwise available", [(0, desktop())], "available", 9),
    # Consequences.
    Case(
        "manual dnd hides a call",
        [(0, desktop()), (1, ManualStatusSet("dnd")), (2, CallStarted("c", T0 + 2))],
        "dnd",
        3,
    ),
    Case(
        "manual busy hides inactivity",
        [
            (0, SettingsChanged(60)),
            (0, desktop()),
            (1, ManualStatusSet("busy")),
            (500, TimerFired()),
        ],
        "busy",
        4,
    ),
    Case(
        "manual away hides a meeting",
        [(0, desktop()), (1, ManualStatusSet("away")), (2, MeetingStarted("m", T0 + 2))],
        "away",
        5,
    ),
    Case(
        "a call outranks a meeting",
        [(0, desktop()), (1, MeetingStarted("m", T0)), (2, CallStarted("c", T0))],
        "on_call",
        6,
    ),
    Case(
        "on_call lasts while a second call is open",
        [
            (0, desktop()),
            (1, CallStarted("c1", T0)),
            (2, CallStarted("c2", T0)),
            (3, CallEnded("c1", T0 + 3)),
        ],
        "on_call",
        6,
    ),
    Case(
        "on_call ends when both calls end",
        [
            (0, desktop()),
            (1, CallStarted("c1", T0)),
            (2, CallStarted("c2", T0)),
            (3, CallEnded("c1", T0 + 3)),
            (4, CallEnded("c2", T0 + 4)),
        ],
        "available",
        9,
    ),
    Case(
        "busy lasts while a second meeting is open",
        [
            (0, desktop()),
            (1, MeetingStarted("m1", T0)),
            (2, MeetingStarted("m2", T0)),
            (3, MeetingEnded("m2", T0 + 3)),
        ],
        "busy",
        7,
    ),
    Case(
        "auto-away ends with an activity report",
        [(0, SettingsChanged(60)), (0, desktop()), (61, TimerFired()), (62, ActivitySeen())],
        "available",
        9,
    ),
    Case(
        "auto-away ends when a new session opens",
        [(0, SettingsChanged(60)), (0, desktop()), (61, TimerFired()), (62, mobile())],
        "available",
        9,
    ),
    Case(
        "auto-away never starts while a mobile session is live",
        [(0, SettingsChanged(60)), (0, desktop()), (0, mobile()), (600, TimerFired())],
        "available",
        9,
    ),
    Case(
        "auto-away starts once the mobile session ends",
        [(0, SettingsChanged(60)), (0, desktop()), (0, mobile()), (600, SessionClosed(PHONE))],
        "away",
        8,
    ),
    Case(
        "auto-away off never turns away",
        [(0, desktop()), (86_400, TimerFired())],
        "available",
        9,
    ),
    Case(
        "a call started while offline shows at login",
        [(0, CallStarted("c", T0)), (10, desktop())],
        "on_call",
        6,
    ),
    Case(
        "a meeting ended while offline is gone at login",
        [(0, MeetingStarted("m", T0)), (5, MeetingEnded("m", T0 + 5)), (10, desktop())],
        "available",
        9,
    ),
    Case(
        "an end before its start leaves nothing open",
        [(0, desktop()), (1, CallEnded("c", T0 + 60)), (2, CallStarted("c", T0))],
        "available",
        9,
    ),
    Case(
        "a call without an end lasts its maximum duration",
        [(0, desktop()), (1, CallStarted("c", T0, max_duration=600)), (601, TimerFired())],
        "available",
        9,
    ),
    Case(
        "the default maximum duration is twelve hours",
        [(0, desktop()), (1, CallStarted("c", T0)), (43_199, TimerFired())],
        "on_call",
        6,
    ),
    Case(
        "a dropped connection stays online during the grace",
        [(0, desktop()), (5, SessionDropped(DESK, 10)), (14, TimerFired())],
        "available",
        9,
    ),
    Case(
        "a dropped connection is offline after the grace",
        [(0, desktop()), (5, SessionDropped(DESK, 10)), (15, TimerFired())],
        "offline",
        1,
    ),
    Case(
        "a session of a dead node expires",
        [(0, desktop()), (30, SessionExpired(DESK))],
        "offline",
        1,
    ),
    Case(
        "one device logging out leaves the other online",
        [(0, desktop()), (1, mobile()), (2, SessionClosed(DESK))],
        "available",
        9,
    ),
    Case(
        "manual status persists across logins",
        [(0, desktop()), (1, ManualStatusSet("dnd")), (2, SessionClosed(DESK)), (3, desktop())],
        "dnd",
        3,
    ),
    # A manual status with an end time.
    Case(
        "dnd until its end is dnd",
        [(0, desktop()), (1, ManualStatusSet("dnd", T0 + 60)), (59, TimerFired())],
        "dnd",
        3,
    ),
    Case(
        "dnd after its end is available",
        [(0, desktop()), (1, ManualStatusSet("dnd", T0 + 60)), (60, TimerFired())],
        "available",
        9,
    ),
    Case(
        "an end time already passed is available at once",
        [(0, desktop()), (5, ManualStatusSet("dnd", T0 + 5))],
        "available",
        9,
    ),
    Case(
        "a call open when dnd ends is on_call",
        [
            (0, desktop()),
            (1, ManualStatusSet("dnd", T0 + 60)),
            (2, CallStarted("c", T0 + 2)),
            (60, TimerFired()),
        ],
        "on_call",
        6,
    ),
    Case(
        "a meeting open when away ends is busy",
        [
            (0, desktop()),
            (1, ManualStatusSet("away", T0 + 60)),
            (2, MeetingStarted("m", T0 + 2)),
            (61, TimerFired()),
        ],
        "busy",
        7,
    ),
    Case(
        "inactivity shows as soon as busy ends",
        [
            (0, SettingsChanged(300)),
            (0, desktop()),
            (1, ManualStatusSet("busy", T0 + 1000)),
            (1000, TimerFired()),
        ],
        "away",
        8,
    ),
    Case(
        "a new status without an end replaces the old end",
        [
            (0, desktop()),
            (1, ManualStatusSet("dnd", T0 + 60)),
            (2, ManualStatusSet("busy")),
            (100, TimerFired()),
        ],
        "busy",
        4,
    ),
    Case(
        "a new status with an end replaces the old end",
        [
            (0, desktop()),
            (1, ManualStatusSet("dnd", T0 + 60)),
            (2, ManualStatusSet("away", T0 + 200)),
            (100, TimerFired()),
        ],
        "away",
        5,
    ),
    Case(
        "the end passes while offline",
        [(0, ManualStatusSet("invisible", T0 + 60)), (100, TimerFired()), (101, desktop())],
        "available",
        9,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_effective_status(case: Case) -> None:
    state, _ = run(case.steps)
    assert rules.decide(state) == (case.status, case.rule)
    assert state.view.status == case.status


def test_a_second_session_publishes_nothing() -> None:
    _, published = run([(0, desktop()), (1, mobile()), (2, SessionOpened(WEB, "web", "n"))])
    assert [v.status for v in published] == ["available"]


def test_a_call_while_dnd_publishes_nothing() -> None:
    _, published = run([(0, desktop()), (1, ManualStatusSet("dnd")), (2, CallStarted("c", T0))])
    assert [v.status for v in published] == ["available", "dnd"]


def test_a_reconnect_within_the_grace_publishes_nothing() -> None:
    steps: list[Step] = [
        (0, desktop()),
        (5, SessionDropped(DESK, 10)),
        (7, SessionOpened(SessionId("desk-2"), "desktop", "node-b")),
        (60, TimerFired()),
    ]
    state, published = run(steps)
    assert [v.status for v in published] == ["available"]
    assert list(state.sessions) == ["desk-2"]


def test_offline_since_is_the_end_of_the_grace_however_late_the_timer() -> None:
    _, published = run([(0, desktop()), (5, SessionDropped(DESK, 10)), (300, TimerFired())])
    assert published[-1] == View("offline", None, T0 + 15, 2)


def test_auto_away_since_is_when_inactivity_crossed_the_setting() -> None:
    _, published = run([(0, SettingsChanged(120)), (0, desktop()), (500, TimerFired())])
    assert published[-1].status == "away"
    assert published[-1].since == T0 + 120


def test_invisible_looks_exactly_like_logging_out() -> None:
    steps_invisible: list[Step] = [
        (0, desktop()),
        (1, MessageSet("at lunch")),
        (9, ManualStatusSet("invisible")),
    ]
    steps_logout: list[Step] = [
        (0, desktop()),
        (1, MessageSet("at lunch")),
        (9, SessionClosed(DESK)),
    ]
    _, invisible = run(steps_invisible)
    _, logged_out = run(steps_logout)
    assert invisible == logged_out
    assert invisible[-1] == View("offline", None, T0 + 9, 3)


def test_nothing_leaks_while_invisible() -> None:
    steps: list[Step] = [
        (0, SettingsChanged(60)),
        (0, desktop()),
        (1, ManualStatusSet("invisible")),
        (2, CallStarted("c", T0 + 2)),
        (3, MessageSet("secret")),
        (4, MeetingStarted("m", T0 + 4)),
        (5, mobile()),
        (6, ActivitySeen()),
        (7, CallEnded("c", T0 + 7)),
        (500, TimerFired()),
        (501, SessionClosed(DESK)),
    ]
    state, published = run(steps)
    assert published == [View("available", None, T0, 1), View("offline", None, T0 + 1, 2)]
    # Leaving invisible shows the current truth, with a fresh since.
    outcome = rules.apply(state, ManualStatusSet("available"), T0 + 600)
    assert outcome.view == View("busy", "secret", T0 + 600, 3)


def test_a_message_change_keeps_since_and_bumps_ver() -> None:
    _, published = run([(0, desktop()), (10, MessageSet("hi"))])
    assert published == [View("available", None, T0, 1), View("available", "hi", T0, 2)]


def test_a_message_expires() -> None:
    state, published = run([(0, desktop()), (1, MessageSet("brb", T0 + 60)), (61, TimerFired())])
    assert published[-1] == View("available", None, T0, 3)
    assert state.message is None
    assert state.message_expires_at is None


def test_observers_see_no_message_while_offline() -> None:
    state, published = run([(0, MessageSet("on leave")), (1, desktop()), (2, SessionClosed(DESK))])
    assert [(v.status, v.message) for v in published] == [
        ("available", "on leave"),
        ("offline", None),
    ]
    assert state.message == "on leave"


def test_due_names_the_next_time_driven_change() -> None:
    state, _ = run([(0, SettingsChanged(300)), (0, desktop())])
    assert rules.apply(state, CallStarted("c", T0, max_duration=100), T0 + 1).due == T0 + 100
    assert rules.apply(state, MessageSet("x", T0 + 50), T0 + 1).due == T0 + 50
    assert rules.apply(state, SessionDropped(DESK, 10), T0 + 1).due == T0 + 11
    assert rules.apply(state, TimerFired(), T0 + 1).due == T0 + 300
    assert rules.apply(state, SettingsChanged(None), T0 + 1).due is None


def test_results_for_events() -> None:
    state, _ = run([(0, CallStarted("c", T0))])
    assert rules.apply(state, CallStarted("c", T0), T0 + 1).result == "stale"
    ended = rules.apply(state, CallEnded("c", T0 + 1), T0 + 1)
    assert ended.result == "applied"
    assert rules.apply(ended.state, CallEnded("c", T0 + 1), T0 + 2).result == "stale"
    assert rules.apply(ended.state, CallStarted("c", T0), T0 + 2).result == "stale"
    too_old = rules.apply(UserState(), CallStarted("old", T0 - 100, max_duration=50), T0)
    assert too_old.result == "stale"


def test_self_view_follows_private_state() -> None:
    state, _ = run([(0, desktop()), (1, mobile()), (2, ManualStatusSet("invisible"))])
    outcome = rules.apply(state, CallStarted("c", T0), T0 + 3)
    assert outcome.view is None
    assert outcome.self_view is not None
    assert outcome.self_view.calls == 1
    assert outcome.self_view.manual == "invisible"
    assert outcome.self_view.effective == "offline"
    assert outcome.self_view.devices == ("desktop", "mobile")
    assert outcome.self_view.ver == state.self_ver + 1


def test_activity_while_active_changes_nothing_private() -> None:
    state, _ = run([(0, SettingsChanged(300)), (0, desktop())])
    outcome = rules.apply(state, ActivitySeen(), T0 + 10)
    assert outcome.view is None
    assert outcome.self_view is None


def test_a_manual_end_publishes_once_with_since_at_the_end() -> None:
    state, _ = run([(0, desktop()), (1, ManualStatusSet("dnd", T0 + 60))])
    assert state.manual_until == T0 + 60
    assert rules.self_view(state).manual_until == T0 + 60
    assert rules.apply(state, TimerFired(), T0 + 30).due == T0 + 60
    # The timer fires late: what observers see still changed at the end time.
    ended = rules.apply(state, TimerFired(), T0 + 75)
    assert ended.view == View("available", None, T0 + 60, state.view.ver + 1)
    assert ended.self_view is not None
    assert (ended.self_view.manual, ended.self_view.manual_until) == ("available", None)
    assert ended.self_view.ver == state.self_ver + 1
    assert rules.apply(ended.state, TimerFired(), T0 + 80).view is None


def test_until_on_available_changes_nothing() -> None:
    state, _ = run([(0, desktop())])
    outcome = rules.apply(state, ManualStatusSet("available", T0 + 60), T0 + 1)
    assert outcome.state == state
    assert (outcome.view, outcome.self_view, outcome.due) == (None, None, None)


def test_leaving_invisible_at_its_end_is_coming_back_from_invisible() -> None:
    state, _ = run(
        [(0, desktop()), (1, MessageSet("hi")), (2, ManualStatusSet("invisible", T0 + 60))]
    )
    by_itself = rules.apply(state, TimerFired(), T0 + 60)
    by_hand = rules.apply(replace(state, manual_until=None), ManualStatusSet("available"), T0 + 60)
    assert by_itself == by_hand
    assert by_itself.view == View("available", "hi", T0 + 60, state.view.ver + 1)


def test_ended_refs_are_forgotten_after_a_day() -> None:
    state, _ = run([(0, CallEnded("c", T0))])
    assert state.ended
    later = rules.apply(state, TimerFired(), T0 + model.ENDED_RETENTION + 1)
    assert not later.state.ended


# --- Properties ------------------------------------------------------------------

sessions = st.sampled_from([DESK, PHONE, WEB])
refs = st.sampled_from(["r1", "r2", "r3"])
times = st.floats(min_value=T0 - 100, max_value=T0 + 100_000, allow_nan=False)

inputs: st.SearchStrategy[Input] = st.one_of(
    st.builds(ManualStatusSet, st.sampled_from(model.MANUAL_STATUSES), st.none() | times),
    st.builds(
        MessageSet,
        st.one_of(st.none(), st.sampled_from(["a", "b"])),
        st.one_of(st.none(), times),
    ),
    st.builds(SettingsChanged, st.one_of(st.none(), st.sampled_from([60.0, 300.0, 3600.0]))),
    st.just(ActivitySeen()),
    st.builds(SessionOpened, sessions, st.sampled_from(model.DEVICES), st.just("node")),
    st.builds(SessionClosed, sessions),
    st.builds(SessionDropped, sessions, st.sampled_from([0.0, 10.0, 30.0])),
    st.builds(SessionExpired, sessions),
    st.builds(CallStarted, refs, times, st.sampled_from([60.0, 3600.0, 43200.0])),
    st.builds(CallEnded, refs, times),
    st.builds(MeetingStarted, refs, times, st.sampled_from([60.0, 3600.0, 43200.0])),
    st.builds(MeetingEnded, refs, times),
    st.just(TimerFired()),
)
timed_inputs = st.lists(
    st.tuples(st.floats(min_value=0, max_value=5000, allow_nan=False), inputs), max_size=40
)


def replay(steps: list[tuple[float, Input]]) -> list[tuple[float, UserState, model.Outcome]]:
    """Apply inputs at increasing times; return (now, state before, outcome) for each."""
    state, now, trace = UserState(), T0, []
    for gap, event in steps:
        now += gap
        outcome = rules.apply(state, event, now)
        trace.append((now, state, outcome))
        state = outcome.state
    return trace


@settings(max_examples=300)
@given(timed_inputs)
def test_observers_only_ever_see_valid_statuses(steps: list[tuple[float, Input]]) -> None:
    for _, _, outcome in replay(steps):
        view = outcome.state.view
        assert view.status in model.STATUSES
        assert view.status != "invisible"  # type: ignore[comparison-overlap]
        assert view.status != "offline" or view.message is None


@settings(max_examples=300)
@given(timed_inputs)
def test_replaying_an_input_changes_nothing(steps: list[tuple[float, Input]]) -> None:
    for (now, _, outcome), (_, event) in zip(replay(steps), steps, strict=True):
        again = rules.apply(outcome.state, event, now)
        assert again.state == outcome.state
        assert again.view is None
        assert again.self_view is None


@settings(max_examples=300)
@given(timed_inputs)
def test_the_view_is_frozen_while_invisible(steps: list[tuple[float, Input]]) -> None:
    for _, before, outcome in replay(steps):
        if before.manual == "invisible" and outcome.state.manual == "invisible":
            assert outcome.view is None


@settings(max_examples=300)
@given(timed_inputs)
def test_a_manual_status_shows_while_a_session_is_live(steps: list[tuple[float, Input]]) -> None:
    for _, _, outcome in replay(steps):
        state = outcome.state
        if state.sessions and state.manual in ("busy", "dnd", "away"):
            assert state.view.status == state.manual


@settings(max_examples=300)
@given(timed_inputs)
def test_ver_counts_observer_visible_changes(steps: list[tuple[float, Input]]) -> None:
    for _, before, outcome in replay(steps):
        old, new = before.view, outcome.state.view
        if (old.status, old.message) != (new.status, new.message):
            assert outcome.view == new
            assert new.ver == old.ver + 1
        else:
            assert outcome.view is None
            assert new == old


@settings(max_examples=300)
@given(timed_inputs, refs, times, times)
def test_an_end_before_its_start_leaves_nothing_open(
    steps: list[tuple[float, Input]], ref: str, start: float, end: float
) -> None:
    trace = replay([*steps, (1.0, CallEnded(ref, end)), (1.0, CallStarted(ref, start))])
    assert ref not in trace[-1][2].state.calls


@settings(max_examples=200)
@given(timed_inputs)
def test_same_inputs_same_outputs(steps: list[tuple[float, Input]]) -> None:
    assert replay(steps) == replay(steps)


@settings(max_examples=300)
@given(timed_inputs)
def test_due_is_in_the_future_and_nothing_changes_before_it(
    steps: list[tuple[float, Input]],
) -> None:
    for now, _, outcome in replay(steps):
        if outcome.due is not None:
            assert outcome.due > now
            just_before = rules.apply(outcome.state, TimerFired(), (now + outcome.due) / 2)
            assert just_before.view is None


@settings(max_examples=300)
@given(timed_inputs.filter(bool))
def test_a_batch_is_its_inputs_in_order_as_one_net_change(
    steps: list[tuple[float, Input]],
) -> None:
    inputs = [event for _, event in steps]
    now = T0 + 10
    net, results = rules.apply_all(UserState(), inputs, now)
    state, views, own = UserState(), [], []
    for event in inputs:
        outcome = rules.apply(state, event, now)
        state = outcome.state
        views.append(outcome.view)
        own.append(outcome.self_view)
        assert results[len(views) - 1] == outcome.result
    assert net.state == state
    assert net.view == next((v for v in reversed(views) if v is not None), None)
    assert net.self_view == next((s for s in reversed(own) if s is not None), None)
    assert net.due == outcome.due


@settings(max_examples=300)
@given(timed_inputs, st.sampled_from(model.MANUAL_STATUSES), st.floats(0, 5000), st.floats(0, 5000))
def test_a_manual_status_lasts_until_its_end_and_is_then_available(
    steps: list[tuple[float, Input]], status: model.Manual, lasts: float, late: float
) -> None:
    trace = replay(steps)
    now = trace[-1][0] if trace else T0
    state = trace[-1][2].state if trace else UserState()
    until = now + lasts
    set_ = rules.apply(state, ManualStatusSet(status, until), now)
    if until > now:  # not when lasts is below the resolution of a time
        assert set_.state.manual == status
        before_end = (now + until) / 2
        if before_end < until:
            assert rules.apply(set_.state, TimerFired(), before_end).state.manual == status
    after = rules.apply(set_.state, TimerFired(), until + late).state
    assert (after.manual, after.manual_until) == ("available", None)


@settings(max_examples=300)
@given(timed_inputs, st.sampled_from(model.MANUAL_STATUSES), st.floats(0.001, 5000))
def test_the_end_of_a_manual_status_is_setting_available_then(
    steps: list[tuple[float, Input]], status: model.Manual, lasts: float
) -> None:
    """Whatever else is going on (calls, meetings, auto-away, invisibility), the end
    of a manual status leaves the user as setting ``available`` at that moment would;
    only the counts of versions may differ (one net change instead of two)."""
    trace = replay(steps)
    now = trace[-1][0] if trace else T0
    state = rules.apply(
        trace[-1][2].state if trace else UserState(), ManualStatusSet(status, now + lasts), now
    ).state
    until = now + lasts
    by_itself = rules.apply(state, TimerFired(), until).state
    meanwhile = rules.apply(replace(state, manual_until=None), TimerFired(), until).state
    by_hand = rules.apply(meanwhile, ManualStatusSet("available"), until).state

    def unversioned(s: UserState) -> UserState:
        return replace(s, view=replace(s.view, ver=0), self_ver=0)

    assert unversioned(by_itself) == unversioned(by_hand)
