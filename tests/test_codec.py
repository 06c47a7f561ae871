"""Frames to clients: a snapshot's presences go out exactly as PROTOCOL.md's Presence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from presence_hub import codec
from presence_hub.rules import STATUSES, View

views = st.builds(
    View,
    status=st.sampled_from(STATUSES),
    message=st.none() | st.text(max_size=codec.MAX_MESSAGE_LENGTH),
    since=st.none() | st.floats(min_value=0, max_value=4e9),
    ver=st.integers(min_value=0, max_value=2**53),
)


@given(user=st.text(min_size=1, max_size=64), view=views)
def test_a_snapshot_presence_is_encoded_as_the_presence_map(user: str, view: View) -> None:
    by_struct = codec.Presence(user, view.status, view.message, view.since, view.ver)
    for fmt in codec.FORMATS.values():
        assert codec.encode({"type": "snapshot", "id": 1, "presences": [by_struct]}, fmt) == (
            codec.encode(
                {"type": "snapshot", "id": 1, "presences": [codec.presence_map(user, view)]}, fmt
            )
        )
