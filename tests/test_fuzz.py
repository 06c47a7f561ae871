"""Hostile input on every way in, generated: frames of both subprotocols on user and
producer sockets, HTTP bodies, queries and handshakes. Every one gets a clear answer
(a 4xx, or an error of bad_request, forbidden or limit_exceeded), exactly one reply,
no close of the sender's connection, no traceback in the hub's log, and no change to
a victim's state.

``PRESENCE_HUB_FUZZ_EXAMPLES`` sets the examples of each generated test (README: the
long run)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import msgpack
import pytest
from aiohttp import ClientSession
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from presence_hub.ids import TenantId, UserId, is_valid_id
from presence_hub.model import MANUAL_STATUSES
from presence_hub.server import Node
from presence_hub.store import keys
from tests.conftest import StartNode, make_token, ws_url
from tests.utils import timeout
from tests.wsclient import Client, Frame

EXAMPLES: Final = int(os.environ.get("PRESENCE_HUB_FUZZ_EXAMPLES", "150"))
FUZZ: Final = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: The suite's 300 s per test, stretched for a long run (an example takes up to 30 ms).
FUZZ_TIME: Final = pytest.mark.timeout(max(300, EXAMPLES // 10))
#: What a hostile frame may be answered with; never internal, unavailable or a close.
CLEAR_ERRORS: Final = {"bad_request", "forbidden", "limit_exceeded"}
#: Frames that answer a request; the others (self, presence, presences) are updates.
REPLIES: Final = {"ok", "snapshot", "error"}
#: Kept under the hub's 64 KiB frame limit: above it, 1009 is the documented answer.
MAX_FRAME: Final = 60_000
VICTIM: Final = "victim"

# --- Values an attacker sends -----------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.one_of(st.characters(), SURROGATES), min_size=1, max_size=6),
    st.sampled_from(["", "alice", VICTIM, "x" * 300, "a b", "{tag}", "a:b", "\n", "ü" * 129]),
)
HUGE_INTS = st.one_of(
    st.integers(min_value=2**64, max_value=10**400),
    st.integers(min_value=-(10**400), max_value=-(2**63) - 1),
)
INTS_64 = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**53 + 1, 2**63, 2**64 - 1, -(2**63)]),
)
FLOATS = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -1e308, 1e308]))


def values(fmt: str) -> st.SearchStrategy[Any]:
    """Any value the format can carry: MessagePack has no integer beyond 64 bits and
    JSON no bytes."""
    ints = st.one_of(INTS_64, HUGE_INTS) if fmt == "json" else INTS_64
    scalars = st.one_of(st.none(), st.booleans(), ints, FLOATS, TEXT)
    if fmt == "msgpack":
        scalars = st.one_of(scalars, st.binary(max_size=8))
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
        max_leaves=12,
    )


def nested(depth: int, leaf: Any, as_map: bool) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_map else [value]
    return value


USERS = st.one_of(
    st.lists(st.sampled_from([VICTIM, "alice", "attacker", "nobody", "u1"]), max_size=6),
    st.integers(990, 1500).map(lambda n: [f"u{k}" for k in range(n)]),
)
TIMES = st.one_of(st.none(), st.floats(time.time() - 10, time.time() + 10**6))


#: Strategies are built once: one that read the clock as it is drawn would not replay.
EVENTS: Final = st.fixed_dictionaries(
    {
        "event_id": st.text("abcdef0123456789", min_size=1, max_size=12),
        "kind": st.sampled_from(["call_started", "call_ended", "meeting_started"]),
        "user": st.sampled_from([VICTIM, "alice", "u1"]),
        "ref": st.sampled_from(["c1", "c2"]),
        "at": st.floats(time.time() - 100, time.time() + 100),
    },
    optional={"max_duration": st.floats(1, 604800)},
)
TOKENS: Final = st.sampled_from(
    [
        make_token("attacker"),
        make_token(VICTIM),
        make_token("attacker", tenant="globex"),
        make_token("attacker", ttl=-10),
        "not-a-token",
        "",
    ]
)


def frame_of(kind: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just(kind), **fields})


#: One well-formed frame of every type a client sends.
VALID_FRAMES: Final = st.one_of(
    frame_of("set_status", status=st.sampled_from(MANUAL_STATUSES), until=TIMES),
    frame_of("set_message", text=st.one_of(st.none(), st.text(max_size=280)), expires_at=TIMES),
    frame_of("set_settings", auto_away_after=st.one_of(st.none(), st.floats(60, 86400))),
    frame_of("activity"),
    frame_of(
        "subscribe",
        users=USERS,
        known=st.dictionaries(st.sampled_from([VICTIM, "u1"]), st.integers(0, 5)),
    ),
    frame_of("unsubscribe", users=USERS),
    frame_of("query", users=USERS),
    frame_of("auth", token=TOKENS),
    frame_of("event", event=EVENTS),
)


@st.composite
def hostile_maps(draw: st.DrawFn, fmt: str) -> Any:
    """A frame as an attacker shapes it: valid, with fields mutated, dropped or added,
    or not a map at all."""
    shape = draw(st.sampled_from(["mutated", "mutated", "valid", "any"]))
    if shape == "any":
        return draw(values(fmt))
    frame: dict[Any, Any] = draw(VALID_FRAMES)
    if shape == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            field = draw(st.one_of(st.sampled_from(sorted(frame) or ["type"]), TEXT))
            if draw(st.integers(0, 4)) == 0:
                frame.pop(field, None)
            else:
                frame[field] = draw(values(fmt))
        if "event" in frame and isinstance(frame["event"], dict) and draw(st.booleans()):
            field = draw(st.sampled_from(["event_id", "kind", "user", "ref", "at", "max_duration"]))
            frame["event"] = {**frame["event"], field: draw(values(fmt))}
    request_id = draw(st.one_of(st.none(), st.integers(1, 2**31), st.text(max_size=8), values(fmt)))
    if request_id is not None:
        frame["id"] = request_id
    return frame


@dataclass(frozen=True)
class Sent:
    """A hostile frame on the wire, and what its reply must say."""

    data: str | bytes
    #: The id the reply must echo; None when the frame has no valid id.
    request_id: Any
    #: False when nested too deep for its id to be read.
    readable: bool
    #: A valid activity report has no reply.
    activity: bool

    @classmethod
    def of(cls, frame: Any, fmt: str, data: str | bytes | None = None) -> Sent:
        return cls(
            wire(frame, fmt) if data is None else data,
            sent_id(frame),
            depth(frame) < UNREADABLE_DEPTH,
            isinstance(frame, dict) and frame.get("type") == "activity",
        )


@st.composite
def frames(draw: st.DrawFn, fmt: str) -> Sent:
    """A hostile map, or one with a field nested deep (built here: Hypothesis prints
    what a test draws, and would recurse as deep)."""
    frame = draw(hostile_maps(fmt))
    if isinstance(frame, dict) and draw(st.integers(0, 4)) == 0:
        field = draw(st.sampled_from(["users", "event", "text", "extra"]))
        # msgpack packs 511 levels at most; deeper is one of the known cases.
        most = 1500 if fmt == "json" else 500
        frame[field] = nested(draw(st.integers(10, most)), draw(values(fmt)), draw(st.booleans()))
    return Sent.of(frame, fmt)


def wire(frame: Any, fmt: str) -> str | bytes:
    if fmt == "json":
        # ASCII escapes: a lone surrogate travels as \\ud800, as an attacker would send it.
        return json.dumps(frame, default=lambda b: b.decode("latin-1"))
    # Lone surrogates become invalid UTF-8 on the wire.
    packed: bytes = msgpack.packb(frame, unicode_errors="surrogatepass")
    return packed


def depth(value: Any) -> int:
    """How deep ``value`` nests (without recursion: it may nest thousands deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level + 1)
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


#: Nested deeper than this, a frame is refused before its id can be read.
UNREADABLE_DEPTH: Final = 500


def sent_id(frame: Any) -> Any:
    """The id the hub must echo: present only when the frame is a map whose id is valid."""
    if not isinstance(frame, dict):
        return None
    rid = frame.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and -(2**63) <= rid < 2**64:
        return rid
    if isinstance(rid, str) and len(rid) <= 64 and not any(0xD800 <= ord(c) < 0xE000 for c in rid):
        return rid
    return None


# --- The oracle -------------------------------------------------------------------


@dataclass
class Target:
    """A connection under attack, and a sentinel request after each frame that
    separates the replies of one frame from the next. A producer's sentinel is an
    event: its events are answered in order, but after the frames answered at once."""

    client: Client
    producer: bool
    sentinels: int = 0

    async def exchange(self, data: str | bytes) -> list[Frame]:
        """The replies that ``data`` got: those before the sentinel's answer."""
        self.sentinels += 1
        sentinel = f"sentinel-{self.sentinels}"
        await self.client.send_raw(data)
        if self.producer:
            event = {"event_id": sentinel, "kind": "call_ended", "user": "u9", "ref": sentinel}
            await self.client.send(
                {"type": "event", "id": sentinel, "event": {**event, "at": time.time()}}
            )
        else:
            await self.client.send({"type": "query", "users": [VICTIM], "id": sentinel})
        replies: list[Frame] = []
        while True:
            frame = await self.client.recv(wait=20)
            if frame.get("id") == sentinel:
                assert frame["type"] in ("snapshot", "ok"), frame
                return replies
            if frame["type"] in REPLIES:
                replies.append(frame)


def check_replies(sent: Sent, replies: list[Frame]) -> None:
    """Exactly one clear reply, echoing the id when the frame had a valid one; an
    activity report that is valid gets none (PROTOCOL.md)."""
    if not replies and sent.activity:
        return
    assert len(replies) == 1, (sent, replies)
    reply = replies[0]
    if reply["type"] == "error":
        assert reply["code"] in CLEAR_ERRORS, (sent, reply)
        assert reply["message"], reply
    if sent.request_id is not None and sent.readable:
        assert reply.get("id") == sent.request_id, (sent, reply)
    elif sent.request_id is not None:
        assert reply.get("id") in (sent.request_id, None), (sent, reply)
    else:
        assert reply.get("id") is None, (sent, reply)


async def victim_states(redis: Redis) -> list[bytes | None]:
    """The stored state of the victim in both tenants."""
    return [
        await redis.hget(keys.state_key(TenantId(t), UserId(VICTIM)), "state")  # type: ignore[misc]
        for t in ("acme", "globex")
    ]


def assert_quiet_log(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


@pytest.fixture
async def victims(start_node: StartNode, redis: Redis) -> Node:
    """A node with a victim in two tenants, each in Do not Disturb with a message."""
    node = await start_node(rate_limit=1e9, rate_burst=10**9)
    for tenant in ("acme", "globex"):
        victim = await Client.connect(ws_url(node), make_token(VICTIM, tenant=tenant))
        await victim.request({"type": "set_status", "status": "dnd"})
        await victim.request({"type": "set_message", "text": "do not touch"})
    return node


# --- WebSocket frames ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("role", ["user", "producer"])
@FUZZ_TIME
@FUZZ
@given(data=st.data())
async def test_generated_frames_get_one_clear_reply_each(
    victims: Node,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
    role: str,
    data: st.DataObject,
) -> None:
    target = await attacker(victims, fmt, role)
    before = await victim_states(redis)
    sent = data.draw(frames(fmt))
    assume(len(sent.data) <= MAX_FRAME)
    check_replies(sent, await target.exchange(sent.data))
    # A producer speaks for its tenant's users; the victim of another tenant is safe.
    after = await victim_states(redis)
    assert after == before if role == "user" else after[1] == before[1]
    assert_quiet_log(caplog)


_attackers: dict[tuple[str, str, str], Target] = {}


async def attacker(node: Node, fmt: str, role: str) -> Target:
    """One connection per node, format and role, kept across the examples of a test."""
    key = (node.id, fmt, role)
    if key not in _attackers or _attackers[key].client.ws.close_code is not None:
        token = make_token("attacker" if role == "user" else "pbx", role=role)  # type: ignore[arg-type]
        _attackers[key] = Target(
            await Client.connect(ws_url(node), token, fmt=fmt), producer=role == "producer"
        )
    target = _attackers[key]
    assert target.client.ws.close_code is None, "the hub closed the attacker's connection"
    return target


def _case(frame: Any, fmt: str = "json") -> Any:
    return pytest.param(Sent.of(frame, fmt), id=f"{fmt}-{json.dumps(frame)[:40]}")


DEEP = nested(5000, 1, as_map=False)
#: The inputs that once got internal, 1011 or no answer at all.
KNOWN_CASES = [
    pytest.param(Sent("[" * 5000 + "]" * 5000, None, False, False), id="json-nested-5000"),
    pytest.param(Sent(b"\x91" * 5000 + b"\xc0", None, False, False), id="msgpack-nested-5000"),
    _case({"type": "set_status", "status": "busy", "id": 1, "x": nested(900, 0, True)}),
    _case({"type": "event", "id": 2, "event": nested(900, 0, True)}),
    _case({"type": "set_message", "id": 3, "text": "x", "expires_at": 10**400}),
    _case({"type": "set_settings", "id": 4, "auto_away_after": -(10**400)}),
    _case({"type": "subscribe", "id": 5, "users": ["a"], "known": {"a": 10**400}}),
    _case({"type": "query", "id": 10**400, "users": ["a"]}),
    _case({"type": "set_message", "id": 6, "text": "x", "expires_at": float("nan")}, "msgpack"),
    _case({"type": "set_message", "id": 7, "text": "x", "expires_at": float("inf")}, "msgpack"),
    _case({"type": "set_status", "status": "busy", "id": "\ud800"}),
    _case({"type": "set_message", "id": 8, "text": "\udfff"}),
    _case({"type": "auth", "id": 9, "token": "\ud800"}),
    _case({"type": "set_message", "id": 10, "text": "\ud800"}, "msgpack"),
    _case(
        {
            "type": "event",
            "id": 11,
            "event": {
                "event_id": "\ud800",
                "kind": "call_started",
                "user": "u1",
                "ref": "c",
                "at": time.time(),
            },
        }
    ),
    _case(
        {
            "type": "event",
            "id": 12,
            "event": {"event_id": "e", "kind": "call_started", "user": "u1", "ref": "c"}
            | {"at": 10**400, "max_duration": 10**400},
        }
    ),
]


@pytest.mark.parametrize("role", ["user", "producer", "rate-limited"])
@pytest.mark.parametrize("sent", KNOWN_CASES)
async def test_inputs_that_once_broke_a_connection_get_a_clear_error(
    victims: Node,
    start_node: StartNode,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
    role: str,
    sent: Sent,
) -> None:
    before = await victim_states(redis)
    fmt = "json" if isinstance(sent.data, str) else "msgpack"
    if role == "rate-limited":
        node = await start_node(rate_limit=0.001, rate_burst=1)
        client = await Client.connect(ws_url(node), make_token("attacker"), fmt=fmt)
        await client.send_raw(sent.data)  # the one frame of the burst
        await client.send_raw(sent.data)
        answered, limited = await client.recv(), await client.recv()
        assert (limited["code"], limited.get("id")) == ("rate_limited", sent.request_id)
        replies = [answered]
    else:
        replies = await (await attacker(victims, fmt, role)).exchange(sent.data)
    check_replies(sent, replies)
    assert replies[0]["code"] == "bad_request", replies
    assert await victim_states(redis) == before
    assert_quiet_log(caplog)


async def test_a_producer_batch_with_a_bad_event_answers_every_frame(
    victims: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined event frames form one batch: one refused frame among them leaves the
    others applied and answered."""
    target = await attacker(victims, "json", "producer")
    event = {"kind": "call_started", "user": "u1", "ref": "c", "at": time.time()}
    frames_sent: list[str] = []
    for n in range(20):
        bad = n % 5 == 2
        item = {**event, "event_id": "\ud800" if bad else f"b{n}", "ref": f"c{n}"}
        frames_sent.append(json.dumps({"type": "event", "id": n, "event": item}))
    for raw in frames_sent:
        await target.client.send_raw(raw)
    replies: dict[int, Frame] = {}
    while len(replies) < 20:
        reply = await target.client.recv()
        if reply["type"] in REPLIES:
            replies[reply["id"]] = reply
    for n, reply in replies.items():
        if n % 5 == 2:
            assert (reply["type"], reply["code"]) == ("error", "bad_request")
        else:
            assert (reply["type"], reply["result"]) == ("ok", "applied")
    assert_quiet_log(caplog)


# --- HTTP -------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


PRODUCER: Final = make_token("pbx", role="producer")
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/msgpack", "text/plain", "", "application/x-msgpack"]
)
ENCODINGS: Final[dict[str, Callable[[bytes], bytes]]] = {
    "identity": lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": lambda b: b,
    "gzip ": lambda b: b[:3],  # a corrupt one
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body of POST /v1/events and its content type."""
    fmt = draw(st.sampled_from(["json", "msgpack"]))
    shape = draw(st.sampled_from(["events", "events", "any", "bytes"]))
    if shape == "bytes":
        return draw(st.binary(max_size=64)), draw(CONTENT_TYPES)
    if shape == "any":
        body: Any = draw(values(fmt))
    else:
        items = draw(
            st.lists(st.one_of(EVENTS, EVENTS.map(lambda e: e | {"at": 1e400})), max_size=5)
        )
        body = {"events": [draw(st.one_of(st.just(e), hostile_maps(fmt))) for e in items]}
        if draw(st.booleans()):
            body = nested(draw(st.integers(10, 500)), body, draw(st.booleans()))
    raw = wire(body, fmt)
    assert isinstance(raw, str | bytes)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return data, "application/msgpack" if fmt == "msgpack" else "application/json"


@FUZZ_TIME
@FUZZ
@given(body=bodies(), encoding=st.sampled_from(sorted(ENCODINGS)))
async def test_generated_event_bodies_get_a_4xx_or_their_results(
    victims: Node,
    http: ClientSession,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
    body: tuple[bytes, str],
    encoding: str,
) -> None:
    before = await victim_states(redis)
    data, content_type = body
    headers = {"Authorization": f"Bearer {PRODUCER}", "Content-Type": content_type}
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    url = f"http://127.0.0.1:{victims.http_port}/v1/events"
    async with http.post(url, data=ENCODINGS[encoding](data), headers=headers) as r:
        assert r.status < 500, await r.text()
        answer = await r.json()
        if r.status == 200:
            assert all(x["result"] != "rejected" or x["error"] for x in answer["results"])
        else:
            assert answer["error"], answer
    assert (await victim_states(redis))[1] == before[1]
    assert_quiet_log(caplog)


@FUZZ_TIME
@FUZZ
@given(user=st.one_of(TEXT, st.just(VICTIM)), users=st.lists(TEXT, max_size=4))
async def test_generated_queries_get_a_4xx_or_an_answer(
    victims: Node,
    http: ClientSession,
    caplog: pytest.LogCaptureFixture,
    user: str,
    users: list[str],
) -> None:
    base = f"http://127.0.0.1:{victims.http_port}"
    admin = {"Authorization": f"Bearer {make_token('ops', role='admin')}"}
    path = quote(user.encode("utf-8", "surrogatepass"), safe="")
    listed = quote(",".join(users).encode("utf-8", "surrogatepass"), safe=",")
    for url in (f"{base}/v1/users/{path}/explain", f"{base}/v1/presence?users={listed}"):
        async with http.get(url, headers=admin) as r:
            assert r.status < 500, await r.text()
            body = await r.json()
            assert ("error" in body) == (r.status >= 400), body
            if r.status == 200 and user == VICTIM and "effective" in body:
                assert body["effective"] == "dnd"
    assert_quiet_log(caplog)


# --- The handshake ----------------------------------------------------------------


async def handshake(url: str, headers: dict[str, str], offer: list[str]) -> int:
    """The handshake's HTTP status; past a 101, the welcome must come first, in the
    subprotocol chosen (MessagePack when none of those offered is the hub's)."""
    try:
        async with connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(name) for name in offer] or None,
            open_timeout=timeout(10),
        ) as ws:
            data = await asyncio.wait_for(ws.recv(), timeout(10))
            if ws.subprotocol == "presence.v1.json":
                welcome = json.loads(data)
            else:
                assert ws.subprotocol in (None, "presence.v1.msgpack"), ws.subprotocol
                welcome = msgpack.unpackb(data)
            assert welcome["type"] == "welcome"
            assert is_valid_id(welcome["user"])
    except InvalidStatus as refused:
        return refused.response.status_code
    return 101


@FUZZ_TIME
@FUZZ
@given(
    token=st.one_of(TOKENS, st.text(st.characters(min_codepoint=33, max_codepoint=126))),
    query_token=st.one_of(st.none(), TEXT, TOKENS),
    device=st.one_of(st.none(), TEXT, st.sampled_from(["desktop", "mobile", "web"])),
    path=st.sampled_from(["/v1/ws", "/", "/v1/ws/", "/%00", "/v1/ws?"]),
    offer=st.lists(
        st.sampled_from(["presence.v1.json", "presence.v1.msgpack", "presence.v2.json", "chat"]),
        max_size=3,
        unique=True,
    ),
)
async def test_generated_handshakes_get_a_4xx_or_a_welcome(
    victims: Node,
    caplog: pytest.LogCaptureFixture,
    token: str,
    query_token: str | None,
    device: str | None,
    path: str,
    offer: list[str],
) -> None:
    query = []
    if query_token is not None:
        query.append("access_token=" + quote(query_token.encode("utf-8", "surrogatepass")))
    if device is not None:
        query.append("device=" + quote(device.encode("utf-8", "surrogatepass")))
    separator = "&" if "?" in path else "?"
    url = f"ws://127.0.0.1:{victims.ws_port}{path}{separator}{'&'.join(query)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status = await handshake(url, headers, offer)
    assert status == 101 or 400 <= status < 500, status
    assert_quiet_log(caplog)
