"""Reading the change log: every observer-visible change of a tenant, in one order,
from any position the retention still holds.

Each partition's log (``keys.changes_log``) is a stream that the commit of a change
appends to, in the same atomic step. Entries are ordered across partitions by
(stream id, partition), and a position (``Cursor``) is the last entry read. A reader
only goes up to the watermark, the millisecond before the oldest clock of the
servers: no entry at or below it can appear any more (a stream id is the server's
time when it is appended), so a cursor handed out is never passed by a later
entry, and resuming from it misses nothing. Per user, the order is the order of
commits, that is of ``ver``.

A round reads every partition, however few changed. So the readers of a node that
are at the live edge, or a few seconds behind it, share one reader (``_Tail``) that
holds those seconds in memory: a node with a hundred streams and webhooks following
costs Redis one read a round, as one does. A reader further behind reads Redis
itself until it catches up.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from redis.asyncio import RedisCluster

from presence_hub.errors import StoreError
from presence_hub.ids import TenantId, UserId
from presence_hub.store import keys
from presence_hub.store.clients import RedisClient, redis_errors

__all__ = ["PAGE", "POLL", "Change", "ChangeFeed", "Cursor", "CursorExpired", "Round"]

#: Entries read from each partition's log per round: what a reader holds in memory is
#: at most a round, PAGE x PARTITIONS entries.
PAGE: Final = 32
#: Seconds between the rounds of a reader that has caught up: a round costs a read of
#: every partition, however few of them changed.
POLL: Final = 0.05
_MAX_SEQ: Final = 2**64 - 1
#: Seconds of changes a node's tail holds behind the live edge.
TAIL_SPAN: Final = 5.0
#: Seconds after which a tail that no reader read or waited on stops: a reader back
#: from a longer wait on its own stream or webhook reads Redis once, and starts a
#: tail anew.
TAIL_IDLE: Final = 2.0
#: The longest a reader at the tail waits while its tenant does not change: its
#: position then moves on (a webhook's saved cursor with it), and a stream may write
#: its keep-alive.
QUIET_WAIT: Final = 10.0
#: Changes of a tenant a reader is handed from the tail at a time, at most: a round's worth.
_TAIL_ROUND: Final = PAGE * keys.PARTITIONS


class CursorExpired(Exception):
    """The cursor is older than the feed's retention: what followed it is gone."""


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A position in the feed: an entry's stream id and its partition."""

    ms: int
    seq: int
    partition: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}-{self.partition}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """A cursor as ``str`` gave it; ValueError for anything else."""
        parts = text.split("-")
        if len(parts) != 3 or not all(p.isdigit() and len(p) <= 20 for p in parts):
            raise ValueError("not a cursor of this feed")
        ms, seq, partition = map(int, parts)
        if seq > _MAX_SEQ or partition >= keys.PARTITIONS:
            raise ValueError("not a cursor of this feed")
        return cls(ms, seq, partition)


@dataclass(frozen=True, slots=True)
class Change:
    cursor: Cursor
    user: UserId
    #: The Presence frame as committed (MessagePack).
    frame: bytes


class Round(NamedTuple):
    changes: list[Change]
    #: Where the next round starts: past what was read, even if none of it was the
    #: tenant's.
    after: Cursor
    #: Whether the round read up to the watermark: the next should wait POLL.
    caught_up: bool


class ChangeFeed:
    def __init__(
        self, redis: RedisClient, retention: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.retention = retention
        self._clock = clock
        self._logs = keys.changes_logs()
        self._tail: _Tail | None = None
        self._stopped = False

    async def stop(self) -> None:
        """Stop the node's tail, if it runs; readers read Redis from now on."""
        self._stopped = True
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    async def wait(self, tenant: TenantId, after: Cursor) -> None:
        """What a reader that has caught up at ``after`` waits for before its next read:
        the tenant's next changes at the node's tail (at most QUIET_WAIT), else POLL.
        Readers of a quiet tenant are not woken by the others' changes."""
        tail = self._tail
        if tail is None or not tail.running:
            await asyncio.sleep(POLL)
            return
        await tail.wait(tenant, after)

    async def present(self) -> Cursor:
        """The position of now: what follows it is what changes from now on."""
        return Cursor(await self._watermark(), _MAX_SEQ, keys.PARTITIONS - 1)

    def check(self, cursor: Cursor) -> None:
        """CursorExpired if the retention no longer holds what follows ``cursor``."""
        if cursor.ms < (self._clock() - self.retention) * 1000:
            raise CursorExpired(str(cursor))

    async def read(
        self, tenant: TenantId, after: Cursor, users: Collection[UserId] | None = None
    ) -> Round:
        """The tenant's changes (of ``users`` only, if given) after ``after``, in order:
        from the node's tail if it holds ``after``, else from Redis."""
        tail = self._tail
        if tail is not None and tail.running:
            held = tail.read(tenant, after, users)
            if held is not None:
                return held
        found = await self.read_redis(tenant, after, users)
        tail = self._tail  # another reader may have started one meanwhile
        if found.caught_up and (tail is None or not tail.running) and not self._stopped:
            # A reader at the live edge: from now on the node's tail reads for it.
            self._tail = _Tail(self, found.after)
        return found

    async def read_redis(
        self, tenant: TenantId | None, after: Cursor, users: Collection[UserId] | None = None
    ) -> Round:
        """``read`` from Redis itself; every tenant's changes if ``tenant`` is None (each
        change's user then reads ``tenant:user``)."""
        watermark = await self._watermark()
        if watermark <= after.ms:
            return Round([], after, caught_up=True)
        entries = await self._ranges(after, watermark)
        # What may be handed out: up to the watermark, or, where a partition had more
        # than a page, up to the last entry read of the most behind such partition.
        limit = whole = Cursor(watermark, _MAX_SEQ, keys.PARTITIONS - 1)
        for partition, page in enumerate(entries):
            if len(page) == PAGE:
                limit = min(limit, _cursor(page[-1][0], partition))
        merged = sorted(
            (_cursor(entry_id, partition), fields)
            for partition, page in enumerate(entries)
            for entry_id, fields in page
        )
        prefix = b"" if tenant is None else f"{tenant}:".encode()
        wanted = None if users is None else {u.encode() for u in users}
        changes = []
        for cursor, fields in merged:
            if cursor > limit:
                break
            member = fields[b"m"]
            if not member.startswith(prefix):
                continue
            user = member[len(prefix) :]
            if wanted is None or user in wanted:
                changes.append(Change(cursor, UserId(user.decode()), fields[b"f"]))
        return Round(changes, limit, caught_up=limit == whole)

    async def _ranges(self, after: Cursor, watermark: int) -> list[list[Any]]:
        """Each partition's entries after ``after``, a page each (some may lie past the
        watermark: the caller leaves those for a later round)."""
        # XREAD reads after an id: a partition up to the cursor's resumes after its id,
        # one after it also holds the entries of that very id.
        after_id = f"{after.ms}-{after.seq}"
        if after.seq:
            before_id = f"{after.ms}-{after.seq - 1}"
        else:  # no stream holds 0-0
            before_id = f"{after.ms - 1}-{_MAX_SEQ}" if after.ms else "0-0"
        starts: dict[Any, Any] = {
            log: after_id if partition <= after.partition else before_id
            for partition, log in enumerate(self._logs)
        }
        with redis_errors():
            if isinstance(self.redis, RedisCluster):
                # A cluster's commands keep to one slot: one read per partition.
                async with self.redis.pipeline() as pipe:
                    for log, start in starts.items():
                        pipe.xread({log: start}, count=PAGE)
                    replies = await pipe.execute()
            else:
                # One command for every partition: a quiet round costs one empty reply.
                replies = [await self.redis.xread(starts, count=PAGE)]
        pages = {name.decode(): entries for reply in replies for name, entries in reply}
        return [pages.get(log, []) for log in self._logs]

    async def _watermark(self) -> int:
        """The last millisecond whose entries are all written, on every server."""
        with redis_errors():
            if isinstance(self.redis, RedisCluster):
                times = await self.redis.time(target_nodes=RedisCluster.PRIMARIES)
                clocks = list(times.values()) if isinstance(times, dict) else [times]
            else:
                clocks = [await self.redis.time()]
        return min(int(seconds) * 1000 + int(micros) // 1000 for seconds, micros in clocks) - 1


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _cursor(entry_id: bytes, partition: int) -> Cursor:
    ms, _, seq = entry_id.partition(b"-")
    return Cursor(int(ms), int(seq), partition)


class _Tail:
    """A node's one reader of the feed's live edge, for all of the node's readers: it
    holds every tenant's changes of the last ``TAIL_SPAN`` seconds, by tenant, and
    hands a reader whose position lies in them the rest. Every change after ``start``
    up to ``position`` is held, but for each tenant those up to its newest forgotten
    one: so a quiet tenant's reader, however long it waited, reads on from the tail.
    It stops after ``TAIL_IDLE`` seconds without a reader, or at Redis' first error
    (its readers then read Redis, and meet the error)."""

    def __init__(self, feed: ChangeFeed, start: Cursor) -> None:
        self._feed = feed
        self.start = start
        self.position = start
        self._caught_up = True
        #: Tenant (as stored) -> its held changes' cursors, and the changes.
        self._held: dict[bytes, tuple[list[Cursor], list[Change]]] = {}
        #: Tenant (as stored) -> the newest of its changes the tail no longer holds.
        self._forgotten: dict[bytes, Cursor] = {}
        self._loop = asyncio.get_running_loop()
        self._used = self._loop.time()
        #: Tenant (as stored) -> its readers' futures, done when a round brings it
        #: changes (or the tail ends).
        self._waiting: dict[bytes, set[asyncio.Future[None]]] = {}
        self._waiters = 0
        self._task = self._loop.create_task(self._run(), name="change feed tail")

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def read(
        self, tenant: TenantId, after: Cursor, users: Collection[UserId] | None
    ) -> Round | None:
        """What follows ``after`` for the tenant (and ``users``), or None if ``after``
        is not held."""
        if not self.start <= after <= self.position:
            return None
        key = tenant.encode()
        forgotten = self._forgotten.get(key)
        if forgotten is not None and forgotten > after:
            return None
        self._used = self._loop.time()
        cursors, changes = self._held.get(key, ([], []))
        first = bisect.bisect_right(cursors, after)
        last = min(len(cursors), first + _TAIL_ROUND)
        if users is None:
            found = changes[first:last]
        else:
            wanted = set(users)
            found = [c for c in changes[first:last] if c.user in wanted]
        if last < len(cursors):
            return Round(found, cursors[last - 1], caught_up=False)
        return Round(found, self.position, caught_up=self._caught_up)

    async def wait(self, tenant: TenantId, after: Cursor) -> None:
        key = tenant.encode()
        cursors, _ = self._held.get(key, ([], []))
        if cursors and cursors[-1] > after:
            return  # changes came while the reader was busy
        # A future of its own: thousands of readers of one tenant time out each alone.
        woken = self._loop.create_future()
        self._waiting.setdefault(key, set()).add(woken)
        timer = self._loop.call_later(QUIET_WAIT, _wake, woken)
        self._waiters += 1
        try:
            await woken
        finally:
            self._waiters -= 1
            timer.cancel()
            self._waiting.get(key, set()).discard(woken)

    async def _run(self) -> None:
        try:
            await self._follow()
        finally:
            for waiting in self._waiting.values():
                for woken in waiting:
                    _wake(woken)

    async def _follow(self) -> None:
        trimmed = self._loop.time()
        while self._waiters or self._loop.time() - self._used < TAIL_IDLE:
            try:
                found = await self._feed.read_redis(None, self.position)
            except StoreError:
                return
            changed: set[bytes] = set()
            for change in found.changes:
                tenant, _, user = change.user.partition(":")
                key = tenant.encode()
                cursors, changes = self._held.setdefault(key, ([], []))
                cursors.append(change.cursor)
                changes.append(Change(change.cursor, UserId(user), change.frame))
                changed.add(key)
            self.position, self._caught_up = found.after, found.caught_up
            for key in changed:
                for woken in self._waiting.pop(key, ()):
                    _wake(woken)
            if self._loop.time() - trimmed >= 1.0:
                self._trim()
                trimmed = self._loop.time()
            if found.caught_up:
                await asyncio.sleep(POLL)

    def _trim(self) -> None:
        """Forget what lies more than TAIL_SPAN behind the position (by Redis' clock)."""
        cut = Cursor(self.position.ms - int(TAIL_SPAN * 1000), 0, 0)
        for tenant, (cursors, changes) in list(self._held.items()):
            gone = bisect.bisect_left(cursors, cut)
            if gone:
                self._forgotten[tenant] = cursors[gone - 1]
            if gone == len(cursors):
                del self._held[tenant]
            elif gone:
                del cursors[:gone], changes[:gone]
