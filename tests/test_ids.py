"""Id validation: a whole list checked in one match agrees with checking each id."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from presence_hub.ids import are_valid_ids, is_valid_id

_ID_CHARS = "AZaz09._@+-"
ids = st.text(alphabet=_ID_CHARS, min_size=1, max_size=130)
anything = st.one_of(
    ids,
    st.text(max_size=20),  # line breaks, colons, braces, empty strings
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)


@given(st.lists(anything, max_size=20))
def test_a_list_is_valid_exactly_when_each_of_its_ids_is(values: list[Any]) -> None:
    assert are_valid_ids(values) == all(is_valid_id(v) for v in values)


def test_an_id_with_a_line_break_does_not_pass_for_two() -> None:
    assert not are_valid_ids(["alice\nbob"])
    assert not are_valid_ids(["alice", "bob\ncarol"])
    assert are_valid_ids(["alice", "bob"])
    assert not are_valid_ids(["a" * 129])
    assert not are_valid_ids(["alice", ""])
