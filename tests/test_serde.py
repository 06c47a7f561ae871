"""Stored state records: a round trip, and what survives of one that no longer decodes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_hub.errors import CorruptRecord
from presence_hub.ids import SessionId
from presence_hub.model import MANUAL_STATUSES, Activity, Session, UserState, View
from presence_hub.store.serde import decode_state, encode_state, salvage_state

STATE = UserState(
    manual="busy",
    manual_until=1.9e9,
    message="lunch",
    message_expires_at=2e9,
    auto_away_after=600.0,
    last_activity=1.7e9,
    sessions={SessionId("s1"): Session(device="web", node="n1", since=1.7e9)},
    calls={"c1": Activity(started=1.7e9, deadline=1.8e9)},
    ended={"meeting:m1": 1.9e9},
    view=View(status="busy", message="lunch", since=1.7e9, ver=12),
    self_ver=20,
)


def test_a_state_round_trips() -> None:
    assert decode_state(encode_state(STATE)) == STATE


@pytest.mark.parametrize(
    ("key", "value", "lost"),
    [
        ("m", "on_holiday", "manual"),
        ("mu", "tomorrow", "manual_until"),
        ("s", "not sessions", "sessions"),
        ("c", {"c1": [1]}, "calls"),
        ("v", ["teleported", None, None, 3], "view"),
    ],
)
def test_a_bad_field_is_lost_alone(key: str, value: Any, lost: str) -> None:
    blob = msgpack.unpackb(encode_state(STATE))
    blob[key] = value
    with pytest.raises(CorruptRecord):
        decode_state(msgpack.packb(blob))
    state, lost_fields = salvage_state(msgpack.packb(blob), rev=30)
    assert lost_fields == [lost]
    kept = {f: getattr(STATE, f) for f in STATE.__struct_fields__ if f != lost}
    assert {f: getattr(state, f) for f in kept} == kept
    if lost == "view":
        # Versions published from the salvaged state are newer than any before.
        assert state.view.ver == 30


def test_a_record_from_before_manual_end_times_reads_as_having_none() -> None:
    blob = msgpack.unpackb(encode_state(STATE))
    del blob["mu"]
    assert decode_state(msgpack.packb(blob)) == UserState(
        **{f: getattr(STATE, f) for f in STATE.__struct_fields__ if f != "manual_until"}
    )
    blob["s"] = "not sessions"
    assert salvage_state(msgpack.packb(blob), rev=30)[1] == ["sessions"]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_refused_and_salvaged(data: bytes) -> None:
    try:
        decode_state(data)
    except CorruptRecord:
        state, _ = salvage_state(data, rev=5)
        assert state.manual in MANUAL_STATUSES
        assert state.view.ver >= 0
