"""The wire: every frame to clients round-trips in both formats, every request decodes
to its fields, and a bad one says what is wrong."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from presence_hub import codec
from presence_hub.errors import FrameError
from presence_hub.model import DEVICES, MANUAL_STATUSES, STATUSES, SelfView, View

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


FORMATS = sorted(codec.FORMATS.values())
SERVER_TYPES = ("welcome", "ok", "error", "snapshot", "presence", "presences", "self")
ids = st.from_regex(r"[A-Za-z0-9._@+-]{1,16}", fullmatch=True)
request_ids = st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=64)
self_views = st.builds(
    SelfView,
    manual=st.sampled_from(MANUAL_STATUSES),
    manual_until=st.none() | st.floats(0, 4e9),
    message=st.none() | st.text(max_size=20),
    message_expires_at=st.none() | st.floats(0, 4e9),
    effective=st.sampled_from(STATUSES),
    since=st.none() | st.floats(0, 4e9),
    calls=st.integers(0, 5),
    meetings=st.integers(0, 5),
    idle=st.booleans(),
    devices=st.lists(st.sampled_from(DEVICES), unique=True).map(tuple),
    auto_away_after=st.none() | st.floats(60, 86400),
    ver=st.integers(0, 2**53),
)


def decoded(data: bytes | str, fmt: codec.Format) -> Any:
    return json.loads(data) if fmt == "json" else msgpack.unpackb(data)


def as_wire(frame: Any) -> Any:
    """What a frame becomes on the wire: structs as maps, tuples as lists."""
    return json.loads(json.dumps(frame, default=msgspec.to_builtins))


server_frames = st.one_of(
    st.builds(
        codec.welcome_frame,
        st.text(max_size=32),
        ids,
        ids,
        st.sampled_from(DEVICES),
        st.floats(0, 4e9),
        self_views,
    ),
    st.builds(codec.ok_frame, request_ids),
    st.builds(
        codec.event_reply,
        request_ids,
        st.fixed_dictionaries({"result": st.sampled_from(["applied", "duplicate", "stale"])})
        | st.fixed_dictionaries({"result": st.just("rejected"), "error": st.text()}),
    ),
    st.builds(
        codec.error_frame,
        st.sampled_from(["bad_request", "forbidden", "limit_exceeded"]),
        st.text(),
        request_ids,
    ),
    st.builds(
        codec.snapshot_frame,
        request_ids,
        st.lists(
            st.builds(
                lambda u, v: codec.Presence(u, v.status, v.message, v.since, v.ver), ids, views
            ),
            max_size=5,
        ),
    ),
    st.builds(codec.presence_frame, ids, views),
    st.builds(
        codec.presences_frame, st.lists(st.builds(codec.presence_frame, ids, views), max_size=5)
    ),
    st.builds(codec.self_frame, self_views),
)


@pytest.mark.parametrize("fmt", FORMATS)
@given(frame=server_frames)
def test_every_frame_to_clients_round_trips(fmt: codec.Format, frame: dict[str, Any]) -> None:
    data = codec.encode(frame, fmt)
    assert isinstance(data, str if fmt == "json" else bytes)
    assert decoded(data, fmt) == as_wire(frame)
    assert decoded(data, fmt)["type"] in SERVER_TYPES


client_frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("set_status"), "status": st.sampled_from(MANUAL_STATUSES)},
        optional={"until": st.none() | st.floats(0, 4e9)},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("set_message"),
            "text": st.none() | st.text(max_size=codec.MAX_MESSAGE_LENGTH),
            "expires_at": st.none() | st.floats(0, 4e9),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("set_settings"), "auto_away_after": st.none() | st.floats(60, 86400)}
    ),
    st.fixed_dictionaries({"type": st.just("activity")}),
    st.fixed_dictionaries(
        {
            "type": st.just("subscribe"),
            "users": st.lists(ids, max_size=5),
            "known": st.dictionaries(ids, st.integers(0, 2**53), max_size=3),
        }
    ),
    st.fixed_dictionaries({"type": st.just("unsubscribe"), "users": st.lists(ids, max_size=5)}),
    st.fixed_dictionaries({"type": st.just("query"), "users": st.lists(ids, max_size=5)}),
    st.fixed_dictionaries({"type": st.just("auth"), "token": st.text(min_size=1, max_size=40)}),
    st.fixed_dictionaries(
        {
            "type": st.just("event"),
            "event": st.dictionaries(st.text(max_size=5), st.integers(0, 2**63)),
        }
    ),
)


@pytest.mark.parametrize("fmt", FORMATS)
@given(frame=client_frames, rid=request_ids)
def test_every_request_decodes_to_its_fields(
    fmt: codec.Format, frame: dict[str, Any], rid: Any
) -> None:
    if rid is not None:
        frame = {**frame, "id": rid}
    data = json.dumps(frame) if fmt == "json" else msgpack.packb(frame)
    request = codec.decode_request(data, fmt)
    assert (request.type, request.id) == (frame["type"], rid)
    fields = {k: v for k, v in frame.items() if k not in ("type", "id")}
    assert {k: getattr(request, k) for k in fields} == fields


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ({"type": "set_status", "status": "on_call"}, "status must be one of"),
        ({"type": "set_status", "status": "dnd", "until": "soon"}, "until must be a number"),
        ({"type": "set_status", "status": "dnd", "until": -1}, "until must be a time"),
        ({"type": "set_status", "status": "dnd", "until": float("inf")}, "finite"),
        ({"type": "subscribe", "users": ["a b"]}, "users must be a list of user ids"),
        ({"type": "set_message", "text": "x" * 281}, "at most 280"),
        ({"type": "set_settings"}, "auto_away_after is required"),
        ({"type": "set_message", "text": "x", "expires_at": float("nan")}, "finite"),
        ({"type": "query", "users": [], "deep": json.loads("[" * 17 + "]" * 17)}, "nested"),
        ({"type": 5}, "string field type"),
        ({"type": "teleport"}, "unknown frame type"),
    ],
)
def test_a_bad_request_says_what_is_wrong(frame: dict[str, Any], why: str) -> None:
    with pytest.raises(FrameError, match=why) as refused:
        codec.decode_request(msgpack.packb({**frame, "id": 7}), "msgpack")
    assert refused.value.request_id == 7


@given(origin=st.floats(0, 4e9), user=ids, view=views)
def test_a_published_update_is_read_as_it_was_sealed(origin: float, user: str, view: View) -> None:
    frame = codec.pack(codec.presence_frame(user, view))
    assert codec.unsealed(codec.sealed(origin, frame)) == (origin, frame)
