"""The Redis store against real redis-server processes."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import msgpack
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from presence_hub.errors import EmbeddedRedisError, StoreUnavailable
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.model import (
    CallEnded,
    CallStarted,
    Input,
    ManualStatusSet,
    MessageSet,
    SessionOpened,
    SettingsChanged,
    UserState,
    View,
)
from presence_hub.store import EVENT_TTL, EmbeddedRedis, PresenceStore, keys
from presence_hub.store.alarm import Alarm
from presence_hub.store.clients import open_redis
from presence_hub.store.scripts import ScriptBatcher, ScriptCall
from tests.utils import Clock, eventually, timeout

ACME = TenantId("acme")
ALICE = UserId("alice")
BOB = UserId("bob")
CAROL = UserId("carol")
DESK = SessionOpened(SessionId("s1"), "desktop", "node-a")


@asynccontextmanager
async def listening(redis: Redis, *channels: str) -> AsyncIterator[PubSub]:
    pubsub = redis.pubsub()
    await pubsub.subscribe(*channels)
    # Wait for the subscribe confirmations, so that nothing published later is missed.
    for _ in channels:
        await pubsub.get_message(timeout=timeout(5))
    try:
        yield pubsub
    finally:
        await pubsub.aclose()


async def next_frame(pubsub: PubSub) -> dict[str, Any]:
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout(5))
    assert message is not None, "nothing was published"
    _origin, raw = msgpack.unpackb(message["data"])
    frame: dict[str, Any] = msgpack.unpackb(raw)
    return frame


async def test_state_survives_in_redis_and_unknown_users_are_offline(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, MessageSet("in the lab"))
    reread = PresenceStore(redis, clock=clock)
    state = await reread.load(ACME, ALICE)
    assert state.message == "in the lab"
    assert list(state.sessions) == ["s1"]
    views = await reread.views(ACME, [ALICE, UserId("nobody")])
    assert views == [View("available", "in the lab", clock.now, 2), View()]
    assert await reread.load(ACME, UserId("nobody")) == UserState()


async def test_changes_are_published_on_the_users_channels(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    async with listening(
        redis, keys.presence_channel(ACME, ALICE), keys.self_channel(ACME, ALICE)
    ) as pubsub:
        await store.apply(ACME, ALICE, DESK)
        frames = [await next_frame(pubsub), await next_frame(pubsub)]
    presence = next(f for f in frames if f["type"] == "presence")
    own = next(f for f in frames if f["type"] == "self")
    assert presence == {
        "type": "presence",
        "user": "alice",
        "status": "available",
        "message": None,
        "since": clock.now,
        "ver": 1,
    }
    assert own["devices"] == ["desktop"]
    assert own["effective"] == "available"


async def test_a_private_change_publishes_only_on_the_self_channel(
    store: PresenceStore, redis: Redis
) -> None:
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, ManualStatusSet("dnd"))
    presence = keys.presence_channel(ACME, ALICE)
    async with listening(redis, presence, keys.self_channel(ACME, ALICE)) as pubsub:
        await store.apply(ACME, ALICE, CallStarted("call-1", at=0, max_duration=1e10))
        # A later visible change: if the call had leaked, its frame would come first.
        await store.apply(ACME, ALICE, ManualStatusSet("available"))
        frames = [await next_frame(pubsub) for _ in range(3)]
    assert [(f["type"], f.get("status")) for f in frames] == [
        ("self", None),
        ("presence", "on_call"),
        ("self", None),
    ]
    assert frames[0]["calls"] == 1


class NodeSessions:
    """A node's own sessions as its store sees them (store.LocalSessions): what it was
    handed, and the witness channel of its listening connection."""

    def __init__(self, witness: str = "") -> None:
        self.own: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.channel = witness

    def hand_self(
        self, tenant: TenantId, user: UserId, packed: bytes, frame: dict[str, Any], origin: Any
    ) -> None:
        self.own.put_nowait(frame)

    def hand_presence(
        self, tenant: TenantId, user: UserId, packed: bytes, frame: dict[str, Any], origin: Any
    ) -> None:
        assert msgpack.unpackb(packed) == frame
        self.seen.put_nowait(frame)

    def witness(self, tenant: TenantId, user: UserId) -> str:
        return self.channel


#: The presence channel's witness on the node's listening connection (store.pubsub).
WITNESS = f"{keys.presence_channel(ACME, ALICE)}:test"


async def next_message(pubsub: PubSub) -> bytes:
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout(5))
    assert message is not None, "nothing was published"
    data: bytes = message["data"]
    return data


async def test_a_presence_frame_is_published_only_for_listeners_besides_the_committing_node(
    redis: Redis, clock: Clock
) -> None:
    """The node hands its watchers what it commits; Redis carries the frame only to
    someone else, and to anyone once the node's listening connection (its witness's
    one subscriber) is gone."""
    store = PresenceStore(redis, clock=clock, node="node-a")
    store.local = node = NodeSessions(WITNESS)
    presence = keys.presence_channel(ACME, ALICE)
    async with listening(redis, presence, WITNESS) as mine:
        await store.apply(ACME, ALICE, DESK)
        assert (await node.seen.get())["status"] == "available"
        # Redis delivers in order: had the commit published, its frame would come first.
        await redis.publish(presence, b"marker")
        assert await next_message(mine) == b"marker"

        async with listening(redis, presence) as elsewhere:
            await store.apply(ACME, ALICE, MessageSet("for the other node"))
            assert (await node.seen.get())["message"] == "for the other node"
            assert (await next_frame(elsewhere))["message"] == "for the other node"
            assert (await next_frame(mine))["message"] == "for the other node"

            await mine.aclose()
            await store.apply(ACME, ALICE, MessageSet("after the node stopped listening"))
            assert (await next_frame(elsewhere))["message"] == "after the node stopped listening"


async def test_frames_whose_commit_reply_was_lost_are_read_again_for_the_nodes_sessions(
    redis: Redis, clock: Clock
) -> None:
    """Every session and watcher is on this node, so the commit publishes nothing: if its
    reply is lost after it ran, the node's sessions get the stored frames instead."""
    store = PresenceStore(redis, clock=clock, node="node-a")
    store.local = node = NodeSessions(WITNESS)
    await store.apply(ACME, ALICE, DESK)
    assert (await node.own.get())["devices"] == ["desktop"]
    assert (await node.seen.get())["status"] == "available"
    batcher = store.batcher

    def reply_lost(call: ScriptCall) -> asyncio.Future[Any]:
        async def run_then_lose() -> Any:
            await batcher(call)
            raise RedisConnectionError("connection lost after the call was sent")

        return asyncio.ensure_future(run_then_lose())

    store.batcher = cast(ScriptBatcher, reply_lost)
    presence, own = keys.presence_channel(ACME, ALICE), keys.self_channel(ACME, ALICE)
    async with listening(redis, presence, own, WITNESS) as pubsub:
        with pytest.raises(StoreUnavailable):
            await store.apply(ACME, ALICE, MessageSet("set unseen"))
        store.batcher = batcher
        refreshed = await asyncio.wait_for(node.own.get(), timeout(10))
        assert refreshed["message"] == "set unseen"
        seen = await asyncio.wait_for(node.seen.get(), timeout(10))
        assert (seen["message"], seen["ver"]) == ("set unseen", 2)
        await redis.publish(presence, b"marker")
        assert await next_message(pubsub) == b"marker"


async def test_a_repeated_event_id_is_a_duplicate_and_publishes_nothing(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    await store.apply(ACME, ALICE, DESK)
    call = CallStarted("call-1", at=clock.now)
    async with listening(redis, keys.presence_channel(ACME, ALICE)) as pubsub:
        first = await store.apply(ACME, ALICE, call, event_id="e1")
        second = await store.apply(ACME, ALICE, call, event_id="e1")
        await store.apply(ACME, ALICE, MessageSet("marker"))
        frames = [await next_frame(pubsub), await next_frame(pubsub)]
    assert (first.result, second.result) == ("applied", "duplicate")
    assert [(f["status"], f["message"]) for f in frames] == [
        ("on_call", None),
        ("on_call", "marker"),
    ]
    assert await redis.ttl(keys.event_key(ACME, ALICE, "e1")) > EVENT_TTL - 60


async def test_a_stale_event_is_remembered_too(store: PresenceStore, clock: Clock) -> None:
    await store.apply(ACME, ALICE, CallStarted("c", at=clock.now), event_id="start")
    again = await store.apply(ACME, ALICE, CallStarted("c", at=clock.now), event_id="start-again")
    replayed = await store.apply(
        ACME, ALICE, CallStarted("c", at=clock.now), event_id="start-again"
    )
    assert (again.result, replayed.result) == ("stale", "duplicate")


async def test_timers_fire_on_any_node_and_take_effect_once(
    redis: Redis, redis_server: EmbeddedRedis, clock: Clock
) -> None:
    node_a = PresenceStore(redis, clock=clock)
    other_connection = Redis.from_url(redis_server.url)
    node_b = PresenceStore(other_connection, clock=clock)
    await node_a.apply(ACME, ALICE, DESK)
    await node_a.apply(ACME, ALICE, MessageSet("back at 3", expires_at=clock.now + 60))
    bucket = keys.timer_bucket(ACME, ALICE)
    assert await redis.zscore(bucket, keys.member(ACME, ALICE)) == clock.now + 60

    clock.advance(61)
    async with listening(redis, keys.presence_channel(ACME, ALICE)) as pubsub:
        fired = await asyncio.gather(node_a.fire_due_timers(), node_b.fire_due_timers())
        await node_a.apply(ACME, ALICE, MessageSet("marker"))
        frames = [await next_frame(pubsub), await next_frame(pubsub)]
    await other_connection.aclose()
    assert sorted(fired) == [0, 1]
    assert [(f["message"], f["ver"]) for f in frames] == [(None, 3), ("marker", 4)]
    assert await redis.zscore(bucket, keys.member(ACME, ALICE)) is None


async def test_a_timer_whose_node_died_before_committing_fires_again(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, SettingsChanged(300))
    clock.advance(301)
    # A node claims the timer and dies: only the claim happens.
    await store._claim(keys=[keys.timer_bucket(ACME, ALICE)], args=[clock.now, 10, clock.now + 30])
    assert await store.fire_due_timers() == 0
    clock.advance(31)
    assert await store.fire_due_timers() == 1
    assert (await store.views(ACME, [ALICE]))[0].status == "away"


async def cleared(pubsub: PubSub, count: int) -> list[str]:
    """The users whose messages were cleared, in that order, from the frames published."""
    had: set[str] = set()
    found: list[str] = []
    while len(found) < count:
        frame = await next_frame(pubsub)
        if frame["message"] is not None:
            had.add(frame["user"])
        elif frame["user"] in had:
            had.discard(frame["user"])
            found.append(frame["user"])
    return found


@asynccontextmanager
async def polling(store: PresenceStore) -> AsyncIterator[list[float]]:
    """The store's timer loop, running; the times its polls ended."""
    polls: list[float] = []
    fire = store.fire_due_timers

    async def counted(limit: int = 200) -> int:
        fired = await fire(limit)
        polls.append(time.time())
        return fired

    store.fire_due_timers = counted  # type: ignore[method-assign]
    task = asyncio.create_task(store.run_timers())
    try:
        yield polls
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_timer_poll_sleeps_until_the_next_due_time_it_found_or_was_told(
    redis: Redis, redis_server: EmbeddedRedis
) -> None:
    node_a = PresenceStore(redis)
    node_a.alarm = Alarm(time.time, most=3600)  # no poll but for the due times it knows
    other_connection = Redis.from_url(redis_server.url)
    node_b = PresenceStore(other_connection)  # commits, never polls
    channels = [keys.presence_channel(ACME, u) for u in (ALICE, BOB)]
    async with listening(redis, *channels) as pubsub:
        await node_b.apply(ACME, BOB, DESK)
        await node_b.apply(ACME, BOB, MessageSet("back soon", expires_at=time.time() + 0.5))
        async with polling(node_a) as polls:
            # Bob's due time, set by node B, is found by node A's first poll.
            assert await cleared(pubsub, 1) == ["bob"]
            # Alice's, set by node A while it sleeps, is told by her commit.
            await node_a.apply(ACME, ALICE, DESK)
            await node_a.apply(ACME, ALICE, MessageSet("brb", expires_at=time.time() + 0.5))
            assert await cleared(pubsub, 1) == ["alice"]
        # Five times a second made five polls or more by now: this is one at the start
        # and one at each due time (or two, should the clock not have reached it).
        assert len(polls) <= 5, polls

        # A due time set after a node's poll, by a node that does not fire it, is found
        # by the next poll, at most MAX_POLL later.
        await pubsub.subscribe(keys.presence_channel(ACME, CAROL))
        await pubsub.get_message(timeout=timeout(5))
        async with polling(PresenceStore(redis)) as polls:
            await eventually(lambda: len(polls) > 0)
            await node_b.apply(ACME, CAROL, DESK)
            await node_b.apply(ACME, CAROL, MessageSet("away", expires_at=time.time() + 0.1))
            assert await cleared(pubsub, 1) == ["carol"]
    await other_connection.aclose()


WORKER = """
import asyncio, sys
from redis.asyncio import Redis
from presence_hub.model import MessageSet
from presence_hub.store import PresenceStore

async def main(url, name, count):
    redis = Redis.from_url(url)
    store = PresenceStore(redis)
    for n in range(count):
        await store.apply("acme", "alice", MessageSet(f"{name}-{n}"))
    await redis.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
async def test_concurrent_writers_in_several_processes_lose_nothing(
    store: PresenceStore, redis: Redis, redis_server: EmbeddedRedis
) -> None:
    workers, per_worker = 4, 60
    await store.apply(ACME, ALICE, DESK)
    async with listening(redis, keys.presence_channel(ACME, ALICE)) as pubsub:
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", WORKER, redis_server.url, f"w{w}", str(per_worker)
            )
            for w in range(workers)
        ]
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), timeout(120))
        assert codes == [0] * workers
        frames = [await next_frame(pubsub) for _ in range(workers * per_worker)]
    vers = [f["ver"] for f in frames]
    assert vers == list(range(2, 2 + workers * per_worker)), "a ver was published twice or lost"
    texts = {f["message"] for f in frames}
    assert texts == {f"w{w}-{n}" for w in range(workers) for n in range(per_worker)}
    final = await store.load(ACME, ALICE)
    assert final.view.ver == 1 + workers * per_worker
    assert final.message == frames[-1]["message"]


async def test_every_key_of_a_user_its_timer_and_change_log_share_one_slot(
    store: PresenceStore, redis: Redis
) -> None:
    """On Redis Cluster each transition is then one script on one shard."""
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, CallStarted("c", at=0, max_duration=1e10), event_id="e1")
    stored = {k.decode() for k in cast("list[bytes]", await redis.keys("*"))}
    assert stored == {
        keys.state_key(ACME, ALICE),
        keys.event_key(ACME, ALICE, "e1"),
        keys.timer_bucket(ACME, ALICE),
        keys.changes_log(ACME, ALICE),
    }
    channels = {keys.presence_channel(ACME, ALICE), keys.self_channel(ACME, ALICE)}
    assert len({key_slot(name.encode()) for name in stored | channels}) == 1


def test_partitions_spread_users_and_timers_evenly_over_the_slots() -> None:
    # Three shards with equal slot ranges, as `redis-cli --cluster create` makes them.
    shard_of_bucket = [key_slot(b.encode()) * 3 // 16384 for b in keys.timer_buckets()]
    assert len(set(keys.timer_buckets())) == keys.PARTITIONS
    assert sorted(Counter(shard_of_bucket).values()) == [85, 85, 86]
    users = Counter(
        key_slot(keys.state_key(ACME, UserId(f"u{n}")).encode()) * 3 // 16384 for n in range(30000)
    )
    assert all(9000 < count < 11000 for count in users.values())


async def test_tenants_do_not_share_state(store: PresenceStore) -> None:
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, ManualStatusSet("busy"))
    views = await store.views(TenantId("globex"), [ALICE])
    assert views == [View()]


@pytest.mark.slow
async def test_what_users_set_survives_a_redis_crash(own_redis_server: EmbeddedRedis) -> None:
    redis = Redis.from_url(own_redis_server.url)
    store = PresenceStore(redis)
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, ALICE, ManualStatusSet("dnd"))
    await store.apply(ACME, ALICE, MessageSet("on leave", expires_at=4e9))
    await store.apply(ACME, ALICE, SettingsChanged(900))
    before = await store.load(ACME, ALICE)

    own_redis_server.stop(kill=True)
    with pytest.raises(StoreUnavailable):
        await store.apply(ACME, ALICE, ManualStatusSet("busy"))
    own_redis_server.start()

    after = await store.load(ACME, ALICE)
    await redis.aclose()
    assert after == before
    assert (after.manual, after.message, after.auto_away_after) == ("dnd", "on leave", 900)


async def test_the_embedded_redis_listens_on_a_private_socket_and_keeps_its_files(
    tmp_path: Any,
) -> None:
    data = tmp_path / "data"
    with EmbeddedRedis(data) as server:
        assert server.url == f"unix://{data / 'redis.sock'}"
        redis = Redis.from_url(server.url)
        await PresenceStore(redis).apply(ACME, ALICE, ManualStatusSet("busy"))
        await redis.aclose()
    assert not server.running
    with EmbeddedRedis(data) as server:
        redis = Redis.from_url(server.url)
        assert (await PresenceStore(redis).load(ACME, ALICE)).manual == "busy"
        await redis.aclose()


async def test_a_batch_of_events_applies_in_order_and_publishes_the_net_change(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    bob = UserId("bob")
    await store.apply(ACME, ALICE, DESK)
    await store.apply(ACME, bob, SessionOpened(SessionId("s2"), "desktop", "node-a"))
    batch: list[tuple[UserId, Input, str]] = [
        (ALICE, CallStarted("c1", at=clock.now), "e1"),
        (bob, CallStarted("c2", at=clock.now), "e2"),
        (ALICE, CallEnded("c1", at=clock.now), "e3"),
        (ALICE, CallStarted("c1", at=clock.now), "e4"),
        (ALICE, CallStarted("c9", at=clock.now), "e1"),
    ]
    async with listening(redis, keys.presence_channel(ACME, ALICE)) as pubsub:
        results = await store.apply_events(ACME, batch)
        await store.apply(ACME, ALICE, MessageSet("marker"))
        frames = [await next_frame(pubsub), await next_frame(pubsub)]
    assert results == ["applied", "applied", "applied", "stale", "duplicate"]
    # Alice's call started and ended within the batch: one update, the net one.
    assert [(f["status"], f["message"], f["ver"]) for f in frames] == [
        ("available", None, 3),
        ("available", "marker", 4),
    ]
    assert (await store.views(ACME, [bob]))[0].status == "on_call"
    assert await store.apply_events(ACME, batch) == ["duplicate"] * 5


async def test_a_batch_sees_what_another_node_wrote_since_this_one_last_committed(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    other_node = PresenceStore(redis, clock=clock)
    await store.apply_events(ACME, [(ALICE, CallStarted("c1", at=clock.now), "e1")])
    # This node skips the state it committed last; another node's write must not be.
    await other_node.apply(ACME, ALICE, MessageSet("from the other node"))
    await store.apply_events(ACME, [(ALICE, CallStarted("c2", at=clock.now), "e2")])
    state = await PresenceStore(redis).load(ACME, ALICE)
    assert state.message == "from the other node"
    assert sorted(state.calls) == ["c1", "c2"]
    # And a batch after this node's own commit carries on from it.
    await store.apply_events(ACME, [(ALICE, CallEnded("c1", at=clock.now), "e3")])
    assert sorted((await PresenceStore(redis).load(ACME, ALICE)).calls) == ["c2"]


async def test_concurrent_batches_on_the_same_users_apply_every_event_once(
    store: PresenceStore, redis: Redis, clock: Clock
) -> None:
    users = [UserId(f"u{n}") for n in range(20)]
    batches: list[list[tuple[UserId, Input, str]]] = [
        [(user, CallStarted(f"c{b}-{user}", at=clock.now), f"e{b}-{user}") for user in users]
        for b in range(5)
    ]
    results = await asyncio.wait_for(
        asyncio.gather(*(store.apply_events(ACME, batch) for batch in batches)), timeout(10)
    )
    assert results == [["applied"] * len(users)] * len(batches)
    for user in users:
        state = await PresenceStore(redis).load(ACME, user)
        assert sorted(state.calls) == sorted(f"c{b}-{user}" for b in range(5))


def test_two_embedded_redis_servers_never_share_a_data_directory(tmp_path: Any) -> None:
    with (
        EmbeddedRedis(tmp_path / "data"),
        pytest.raises(EmbeddedRedisError, match="in use by another running hub"),
    ):
        EmbeddedRedis(tmp_path / "data").start()
    # Released with the first one: the directory can be used again.
    with EmbeddedRedis(tmp_path / "data") as again:
        assert again.running


def test_a_channel_names_its_user() -> None:
    user = UserId("alice.smith+ops@example.com")
    assert keys.channel_member(keys.presence_channel(ACME, user)) == (ACME, user)
    assert keys.channel_member(keys.self_channel(ACME, user)) == (ACME, user)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "unix:///tmp/redis.sock"])
async def test_commands_are_packed_in_c_exactly_as_redis_py_packs_them(url: str) -> None:
    client = cast(Redis, open_redis(url))
    fast = client.connection_pool.connection_class()
    assert type(fast).pack_command is not Connection.pack_command
    commands: list[tuple[Any, ...]] = [
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT SETNAME", b"hub"),
        ("EVALSHA", "a" * 40, 1, "ph:{p1f}:acme:é", 1795666777.809494, 0.1 + 0.2, -3, b"\x00\xff"),
        ("SET", "k", 12345678901234567890),
    ]
    for command in commands:
        assert b"".join(fast.pack_command(*command)) == b"".join(
            Connection().pack_command(*command)
        )
    # What redis-py refuses, it still refuses, naming the argument.
    with pytest.raises(DataError, match="bool"):
        fast.pack_command("SET", "k", True)
    await client.aclose()
