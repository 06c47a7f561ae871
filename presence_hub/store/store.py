"""Users' presence state in Redis: atomic transitions, publication and timers.

A transition reads the user's state, runs the pure rules on it and commits the
result with one Lua script that checks nobody committed in between (otherwise
it re-reads and retries), stores the new state and observer view, publishes
what changed on the user's channels, remembers a producer event's id and sets
the user's next timer, all atomically. Any number of hub nodes and processes
can therefore write the same user at once without losing an update, and
subscribers receive each ``ver`` once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeAlias

import msgspec
from redis.asyncio import RedisCluster

from presence_hub import codec, model, rules
from presence_hub.errors import StoreContention, StoreError, StoreUnavailable
from presence_hub.ids import TenantId, UserId
from presence_hub.model import Outcome, TimerFired, UserState, View
from presence_hub.store import keys
from presence_hub.store.alarm import Alarm
from presence_hub.store.clients import RedisClient, describe, redis_errors
from presence_hub.store.corrupt import CorruptRecords
from presence_hub.store.feed import ChangeFeed
from presence_hub.store.scripts import (
    PackedKeys,
    ScriptBatcher,
    ScriptCall,
    register_script,
    run_scripts,
)
from presence_hub.store.serde import encode_state

__all__ = [
    "EVENT_TTL",
    "FEED_RETENTION",
    "Applied",
    "EventResult",
    "LocalSessions",
    "PresenceStore",
]

log = logging.getLogger(__name__)

EventResult: TypeAlias = Literal["applied", "stale", "refused", "duplicate"]

#: Producer event ids are remembered this long (PROTOCOL.md: idempotency).
EVENT_TTL: Final = 86400
#: PROTOCOL.md: the change feed keeps changes for 24 hours by default.
FEED_RETENTION: Final = 86400.0
#: A frame, packed and as a map.
Frame: TypeAlias = tuple[bytes, dict[str, Any]]


class CommitCall(NamedTuple):
    """commit.lua's keys and arguments, and the frames the transition changed."""

    keys: list[str]
    args: list[Any]
    #: The user's new Self frame, if it changed.
    own: Frame | None
    #: The user's new presence frame (what observers see), if it changed.
    seen: Frame | None
    #: When its input arrived, as the published frames carry it.
    sent_at: float


class LocalSessions(Protocol):
    """This node's sessions, handed what the node commits as soon as it commits it, in
    the same write as the reply to the request that caused it, rather than through
    Redis a round trip later (the published copy, if any, is stale by then)."""

    def hand_self(
        self,
        tenant: TenantId,
        user: UserId,
        packed: bytes,
        frame: dict[str, Any],
        origin: float | None,
    ) -> None:
        """The user's new Self frame, for the user's sessions here."""

    def hand_presence(
        self,
        tenant: TenantId,
        user: UserId,
        packed: bytes,
        frame: dict[str, Any],
        origin: float | None,
    ) -> None:
        """The user's new presence frame, for the user's watchers here."""

    def witness(self, tenant: TenantId, user: UserId) -> str:
        """The witness of the user's presence channel on the node's listening connection,
        or "" (``store.pubsub``): the commit then publishes the frame only if someone
        else listens too."""


#: A claimed timer that its node never committed fires again after this long.
CLAIM_RETRY: Final = 30.0
#: Every partition's timer bucket, claimed from in one call on a single Redis.
_TIMER_BUCKETS: Final = PackedKeys(keys.timer_buckets())
_MAX_ATTEMPTS: Final = 64
#: Reads, a second apart, of a Self map whose commit's reply was lost.
_REFRESH_TRIES: Final = 60
#: A stored Presence frame straight into a View (the user and type fields are skipped),
#: in C: a snapshot decodes one per contact.
_decode_view: Final = msgspec.msgpack.Decoder(View).decode


@dataclass(frozen=True, slots=True)
class Applied:
    result: EventResult
    #: What the rules made of the input; None for a duplicate event.
    outcome: Outcome | None


class PresenceStore:
    def __init__(
        self,
        redis: RedisClient,
        *,
        clock: Callable[[], float] = time.time,
        event_ttl: int = EVENT_TTL,
        cache_size: int = 100_000,
        on_corrupt_record: Callable[[], object] | None = None,
        feed_retention: float = FEED_RETENTION,
        node: str | None = None,
    ) -> None:
        """``on_corrupt_record`` is called for each record found not to decode (once per
        record and node). ``node``: the node's id, as its sessions record it."""
        self.redis = redis
        self.node = node
        self.corrupt = CorruptRecords(redis, clock, on_corrupt_record)
        self.cluster = isinstance(redis, RedisCluster)
        # Sharded pub/sub on a cluster: an update travels only within its user's shard.
        self._publish = "SPUBLISH" if self.cluster else "PUBLISH"
        self._clock = clock
        self._event_ttl = event_ttl
        #: How long the change log keeps a change (0: no change log).
        self._feed_retention_ms = int(feed_retention * 1000)
        self.feed = ChangeFeed(redis, feed_retention, clock)
        # The last state this node committed per user, to skip the read before the next
        # commit; the commit's revision check catches any copy another writer made stale.
        self._cache: OrderedDict[str, tuple[int, UserState]] = OrderedDict()
        self._cache_size = cache_size
        #: State key -> the commit of a batch of this node still on its way for that user.
        self._committing: dict[str, asyncio.Future[None]] = {}
        self._commit = register_script(redis, "commit.lua")
        self._claim = register_script(redis, "claim_timers.lua")
        self._views = register_script(redis, "views.lua")
        self._read_many = register_script(redis, "read.lua")
        #: One pipeline per pass of the event loop for its script calls; other parts of
        #: the node (the session index) send theirs through it too.
        self.batcher = ScriptBatcher(redis)
        #: When the timer poll next looks: told each due time this node commits.
        self.alarm = Alarm(clock)
        #: Given each committed frame. A Self frame is then published only for sessions
        #: on other nodes (``node`` says which are this node's), a presence frame only
        #: for listeners other than this node.
        self.local: LocalSessions | None = None
        self._refreshing: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """End the re-reads of Self maps still under way (their node is stopping), and
        the change feed's tail."""
        for task in self._refreshing:
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        await self.feed.stop()

    async def load(self, tenant: TenantId, user: UserId) -> UserState:
        with redis_errors():
            _, state, _ = await self._read(tenant, user)
        return state

    async def load_many(self, tenant: TenantId, users: Sequence[UserId]) -> list[UserState]:
        """Several users' states in one round trip; a user never seen has the default state."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.hmget(keys.state_key(tenant, user), ["rev", "state"])
                replies: list[list[bytes | None]] = await pipe.execute()
            return [
                UserState() if blob is None else await self.corrupt.decode(tenant, user, rev, blob)
                for user, (rev, blob) in zip(users, replies, strict=True)
            ]

    async def views(self, tenant: TenantId, users: Sequence[UserId]) -> list[View]:
        """What observers see of each user; a user never seen is offline at ver 0."""
        return [View() if f is None else _decode_view(f) for f in await self.frames(tenant, users)]

    async def frames(self, tenant: TenantId, users: Sequence[UserId]) -> list[bytes | None]:
        """Each user's stored ``presence`` frame, packed as it was published; None for a
        user never seen."""
        if not users:
            return []
        state_keys = [keys.state_key(tenant, u) for u in users]
        with redis_errors():
            if self.cluster:
                return await self._views_by_partition(tenant, users, state_keys)
            frames: list[bytes | None] = await self.batcher((self._views, state_keys, []))
            return frames

    async def _views_by_partition(
        self, tenant: TenantId, users: Sequence[UserId], state_keys: list[str]
    ) -> list[bytes | None]:
        """A script's keys must share a slot: one call per partition, pipelined."""
        groups: dict[int, list[int]] = {}
        for n, user in enumerate(users):
            groups.setdefault(keys.partition(tenant, user), []).append(n)
        calls: list[ScriptCall] = [
            (self._views, [state_keys[n] for n in group], []) for group in groups.values()
        ]
        frames: list[bytes | None] = [None] * len(users)
        for group, reply in zip(groups.values(), await run_scripts(self.redis, calls), strict=True):
            for n, frame in zip(group, _raise_error(reply), strict=True):
                frames[n] = frame
        return frames

    async def apply(
        self,
        tenant: TenantId,
        user: UserId,
        event: model.Input,
        *,
        event_id: str | None = None,
        origin: float | None = None,
    ) -> Applied:
        """Apply one input to one user, atomically; ``event_id`` makes it idempotent.

        ``origin`` is when the input arrived; it travels with the published update,
        so that the latency to each subscriber can be measured.
        """
        with redis_errors():
            return await self._apply(tenant, user, event, event_id, origin)

    async def _apply(
        self,
        tenant: TenantId,
        user: UserId,
        event: model.Input,
        event_id: str | None,
        origin: float | None = None,
    ) -> Applied:
        state_key = keys.state_key(tenant, user)
        event_key = keys.event_key(tenant, user, event_id) if event_id is not None else None
        cache = self._cache
        for attempt in range(_MAX_ATTEMPTS):
            cached = cache.get(state_key) if event_key is None else None
            if cached is not None:
                rev, state = cached
            else:
                rev, state, seen = await self._read(tenant, user, event_key)
                if seen:
                    return Applied("duplicate", None)
            now = self._clock()
            outcome = rules.apply(state, event, now)
            changed = outcome.state != state
            # A timer must always commit: its claim moved the user's due time.
            if not changed and event_key is None and not isinstance(event, TimerFired):
                if cached is not None:
                    # "No change" must be judged on the stored state, not a cached copy.
                    cache.pop(state_key, None)
                    continue
                return Applied(outcome.result, outcome)
            call = self._commit_call(
                tenant,
                user,
                rev,
                outcome.state if changed else None,
                outcome,
                [event_key] if event_key is not None else [],
                [outcome.result] if event_key is not None else [],
                now if origin is None else origin,
            )
            try:
                committed = await self.batcher((self._commit, call.keys, call.args))
            except Exception:
                self._refresh(tenant, user, call)
                raise
            if committed == -2:
                return Applied("duplicate", None)
            if committed >= 0:
                self._remember(state_key, committed, outcome.state)
                self._hand(tenant, user, call)
                return Applied(outcome.result, outcome)
            cache.pop(state_key, None)
            if attempt >= 4:
                # Many writers on one user: spread the retries out.
                await asyncio.sleep(random.uniform(0, 0.001 * attempt))
        raise StoreContention(f"{tenant}:{user} kept changing; gave up after {_MAX_ATTEMPTS} tries")

    def _commit_call(
        self,
        tenant: TenantId,
        user: UserId,
        rev: int,
        new_state: UserState | None,
        outcome: Outcome,
        event_keys: list[str],
        results: list[str],
        sent_at: float,
    ) -> CommitCall:
        """The keys and arguments of commit.lua for one user's transition, and the frames
        it changed."""
        local = self.local
        view = b""
        seen = None
        witness = ""
        due = outcome.due
        if due is not None:
            self.alarm.due(due)
        if outcome.view:
            frame = codec.presence_frame(user, outcome.view)
            view = codec.pack(frame)
            seen = (view, frame)
            if local is not None:
                witness = local.witness(tenant, user)
        own = None
        published = b""
        if outcome.self_view:
            frame = codec.self_frame(outcome.self_view)
            own = (codec.pack(frame), frame)
            if local is None or any(
                session.node != self.node for session in outcome.state.sessions.values()
            ):
                published = codec.sealed(sent_at, own[0])
        return CommitCall(
            [
                keys.state_key(tenant, user),
                keys.timer_bucket(tenant, user),
                keys.changes_log(tenant, user),
                *event_keys,
            ],
            [
                rev,
                b"" if new_state is None else encode_state(new_state),
                view,
                published,
                keys.member(tenant, user),
                "" if due is None else repr(due),
                keys.presence_channel(tenant, user),
                keys.self_channel(tenant, user),
                self._event_ttl,
                codec.sealed(sent_at, view) if view else b"",
                self._publish,
                self._feed_retention_ms,
                witness,
                *results,
            ],
            own,
            seen,
            sent_at,
        )

    def _hand(self, tenant: TenantId, user: UserId, call: CommitCall) -> None:
        local = self.local
        if local is None:
            return
        if call.seen is not None:
            local.hand_presence(tenant, user, *call.seen, call.sent_at)
        if call.own is not None:
            local.hand_self(tenant, user, *call.own, call.sent_at)

    def _refresh(self, tenant: TenantId, user: UserId, call: CommitCall) -> None:
        """After a commit whose reply was lost: it may have run, and published its frames
        for no one here, so this node's sessions get the stored ones."""
        local = self.local
        if local is None or (call.own is None and call.seen is None):
            return

        async def refresh() -> None:
            for _ in range(_REFRESH_TRIES):
                try:
                    state = await self.load(tenant, user)
                    (stored,) = await self.frames(tenant, [user])
                except StoreError:
                    await asyncio.sleep(1.0)
                    continue
                if stored is not None:
                    local.hand_presence(tenant, user, stored, codec.unpack(stored), None)
                frame = codec.self_frame(rules.self_view(state))
                local.hand_self(tenant, user, codec.pack(frame), frame, None)
                return

        task = asyncio.get_running_loop().create_task(refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def apply_events(
        self,
        tenant: TenantId,
        batch: Sequence[tuple[UserId, model.Input, str]],
        *,
        origin: float | None = None,
    ) -> list[EventResult]:
        """Apply a batch of producer events (user, input, event id), each user's in order.

        One script call reads the users whose state this node does not hold and their
        event ids, the rules fold each user's events together, and one pipeline
        commits every user. Batches of this node that share users go one after the
        other. A user whose commit meets another writer, or an event seen before,
        falls back to one transition per event. Observers get one update per user
        with the final state (coalesced)."""
        with redis_errors():
            return await self._apply_events(tenant, batch, origin)

    async def _apply_events(
        self,
        tenant: TenantId,
        batch: Sequence[tuple[UserId, model.Input, str]],
        origin: float | None,
    ) -> list[EventResult]:
        by_user: dict[UserId, list[int]] = {}
        for n, (user, _, _) in enumerate(batch):
            by_user.setdefault(user, []).append(n)
        # Batches of this node that share users go one after the other: one that read a
        # user while another had that user's commit still to come would compute from the
        # older state and conflict.
        state_keys = [keys.state_key(tenant, user) for user in by_user]
        earlier = {f for k in state_keys if (f := self._committing.get(k)) is not None}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in state_keys:
            self._committing[key] = done
        try:
            if earlier:
                await asyncio.wait(earlier)
            return await self._fold_and_commit(tenant, batch, origin, by_user)
        finally:
            for key in state_keys:
                if self._committing.get(key) is done:
                    del self._committing[key]
            done.set_result(None)

    async def _fold_and_commit(
        self,
        tenant: TenantId,
        batch: Sequence[tuple[UserId, model.Input, str]],
        origin: float | None,
        by_user: dict[UserId, list[int]],
    ) -> list[EventResult]:
        event_keys = [keys.event_key(tenant, user, eid) for user, _, eid in batch]
        # The states this node committed last are used as they are, unread (no batch of
        # this node can have changed them since): the commit's revision check catches
        # another writer and its event check a repeated event, and either sends that
        # user's events one by one through the reading path.
        states: dict[UserId, tuple[int, UserState]] = {}
        unread: dict[UserId, list[int]] = {}
        for user, indices in by_user.items():
            held = self._cache.get(keys.state_key(tenant, user))
            if held is None:
                unread[user] = indices
            else:
                states[user] = held
        seen = [False] * len(batch)
        if unread:
            states.update(await self._read_batch(tenant, unread, event_keys, seen))

        now = self._clock()
        sent_at = now if origin is None else origin
        results: list[EventResult] = ["duplicate"] * len(batch)
        commits: list[tuple[UserId, list[int], UserState, CommitCall]] = []
        for user, indices in by_user.items():
            rev, state = states[user]
            fresh: list[int] = []
            ids: set[str] = set()
            for n in indices:
                if not seen[n] and batch[n][2] not in ids:
                    ids.add(batch[n][2])
                    fresh.append(n)
            if not fresh:
                continue
            net, each = rules.apply_all(state, [batch[n][1] for n in fresh], now)
            for n, result in zip(fresh, each, strict=True):
                results[n] = result
            folded = net.state
            call = self._commit_call(
                tenant,
                user,
                rev,
                folded if folded != state else None,
                net,
                [event_keys[n] for n in fresh],
                [results[n] for n in fresh],
                sent_at,
            )
            commits.append((user, fresh, folded, call))

        try:
            committed = await run_scripts(
                self.redis, [(self._commit, c.keys, c.args) for _, _, _, c in commits]
            )
        except Exception:
            for user, _, _, call in commits:
                self._refresh(tenant, user, call)
            raise
        for (user, fresh, folded, call), result in zip(commits, committed, strict=True):
            if isinstance(result, int) and result >= 0:
                self._remember(keys.state_key(tenant, user), result, folded)
                self._hand(tenant, user, call)
                continue
            # Another writer came first: one transition per event, re-reading each time.
            for n in fresh:
                applied = await self._apply(tenant, user, batch[n][1], batch[n][2], origin)
                results[n] = applied.result
        return results

    async def _read_batch(
        self,
        tenant: TenantId,
        by_user: dict[UserId, list[int]],
        event_keys: list[str],
        seen: list[bool],
    ) -> dict[UserId, tuple[int, UserState]]:
        """Each user's revision and state, and in ``seen`` whether each of their event
        keys was seen: one script call, or one per partition on a cluster (a script's
        keys share a slot)."""
        groups: dict[int, list[UserId]] = {}
        for user in by_user:
            groups.setdefault(keys.partition(tenant, user) if self.cluster else 0, []).append(user)
        events = [[n for user in users for n in by_user[user]] for users in groups.values()]
        calls: list[ScriptCall] = [
            (
                self._read_many,
                [keys.state_key(tenant, u) for u in users] + [event_keys[n] for n in group],
                [len(users)],
            )
            for users, group in zip(groups.values(), events, strict=True)
        ]
        states: dict[UserId, tuple[int, UserState]] = {}
        replies = await run_scripts(self.redis, calls)
        for users, group, reply in zip(groups.values(), events, replies, strict=True):
            values = _raise_error(reply)
            for i, user in enumerate(users):
                raw_rev, blob = values[2 * i], values[2 * i + 1]
                if raw_rev is None or blob is None:
                    states[user] = (0, UserState())
                else:
                    states[user] = (
                        int(raw_rev),
                        await self.corrupt.decode(tenant, user, raw_rev, blob),
                    )
            for n, flag in zip(group, values[2 * len(users) :], strict=True):
                seen[n] = bool(flag)
        return states

    def _remember(self, state_key: str, rev: int, state: UserState) -> None:
        cache = self._cache
        cache[state_key] = (rev, state)
        cache.move_to_end(state_key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    async def _read(
        self, tenant: TenantId, user: UserId, event_key: str | None = None
    ) -> tuple[int, UserState, bool]:
        """The state, its revision, and whether ``event_key`` was seen: one script call,
        in the pipeline of the pass (a connect storm reads thousands of users)."""
        state_key = keys.state_key(tenant, user)
        extra = [event_key] if event_key is not None else []
        values = await self.batcher((self._read_many, [state_key, *extra], [1]))
        rev, blob = values[0], values[1]
        seen = bool(extra) and bool(values[2])
        if rev is None or blob is None:
            return 0, UserState(), seen
        return int(rev), await self.corrupt.decode(tenant, user, rev, blob), seen

    async def fire_due_timers(self, limit: int = 200) -> int:
        """Fire every due timer this node can claim; returns how many it fired, and
        tells the alarm the earliest due time left.

        Every partition's bucket is claimed in one round trip: on a single Redis one
        script call, which joins the batcher's; on a cluster (whose scripts may only
        touch one slot) one call per bucket, pipelined."""
        self.alarm.polling()
        now = self._clock()
        args = [repr(now), limit, repr(now + CLAIM_RETRY)]
        with redis_errors():
            if self.cluster:
                replies = await run_scripts(
                    self.redis, [(self._claim, [bucket], args) for bucket in _TIMER_BUCKETS]
                )
            else:
                replies = [await self.batcher((self._claim, _TIMER_BUCKETS, args))]
        answered = [reply for reply in replies if not isinstance(reply, Exception)]
        users = [keys.parse_member(m.decode()) for reply in answered for m in reply[1:]]
        for reply in answered:
            if reply[0]:
                self.alarm.due(float(reply[0]))
        with redis_errors():
            await asyncio.gather(*(self._apply(t, u, TimerFired(), None) for t, u in users))
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            # What could be claimed has fired; the rest waits for the shard to come back.
            raise StoreUnavailable(describe(failed))
        return len(users)

    async def run_timers(self) -> None:
        """Fire due timers until cancelled, each at its due time (``store.alarm``);
        survives Redis outages."""
        while True:
            try:
                fired = await self.fire_due_timers()
            except StoreUnavailable as exc:
                log.warning("timers paused: Redis unavailable (%s)", exc)
                await asyncio.sleep(1.0)
                continue
            except StoreContention as exc:
                log.warning("timer deferred: %s", exc)
                fired = 0
            if not fired:  # else more may be due than one claim takes
                await self.alarm.sleep()


def _raise_error(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply
