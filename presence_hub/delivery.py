"""The socket side of the fan-out: an update as it travels, each socket's coalescing
backlog, the flusher, and the slow-consumer close.

Each update is decoded once and framed at most once per frame format, then handed
to every local watcher without waiting for any socket: a socket keeps at most one
pending update per user (the newest ``ver`` wins), and the flusher writes each
socket's pending updates in one ``send()`` at the end of the pass. A socket that
cannot take them gets a writer task of its own that writes them once it drains. A
slow socket delays nobody else and its backlog is bounded by its subscription
count; one whose writes stall longer than ``send_timeout`` is closed with 1013.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.protocol import State

from presence_hub import codec
from presence_hub.codec import Format
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.keepalive import PING, HeardConnection
from presence_hub.metrics import Metrics
from presence_hub.model import Device

__all__ = ["BEHIND", "STORM_WINDOW", "Connection", "Flusher", "Update", "Watchers"]

log = logging.getLogger(__name__)

#: Items per ``presences`` frame, so a coalesced backlog never makes one huge frame.
BATCH: Final = 500
#: Updates per socket per flush, had no flush been held back, from which the node is
#: behind: its flushes are then spaced out.
BEHIND: Final = 2.0
#: Sockets opened per second from which the node is in a connect storm (the default of
#: ``--storm-rate``), counted over STORM_WINDOW seconds, and how long its flushes are then
#: spaced out. A short window: the storm's holds end soon after its last arrival.
STORM_RATE: Final = 300
STORM_WINDOW: Final = 0.25
STORM_HOLD: Final = 0.25
#: Looked up once: an enum member read through its class costs more than a write's checks.
_OPEN: Final = State.OPEN


class Update:
    """One published frame, encoded and framed at most once per format however many
    sockets get it: server frames are not masked, so the same bytes go to every socket."""

    __slots__ = ("_framed", "map", "origin", "raw", "ver")

    def __init__(self, raw: bytes, frame: dict[str, Any], origin: float | None = None) -> None:
        self.raw = raw
        self.map = frame
        self.ver: int = frame["ver"]
        #: When the input that caused it arrived (None for a resync).
        self.origin = origin
        self._framed: dict[Format, bytes] = {}

    @classmethod
    def published(cls, data: bytes) -> Update:
        origin, raw = codec.unsealed(data)
        return cls(raw, codec.unpack(raw), origin)

    def framed(self, fmt: Format) -> bytes:
        """The whole WebSocket frame: binary for msgpack, text for json."""
        framed = self._framed.get(fmt)
        if framed is None:
            if fmt == "msgpack":
                framed = _frame(Opcode.BINARY, self.raw)
            else:
                framed = _frame(Opcode.TEXT, str(codec.encode(self.map, "json")).encode())
            self._framed[fmt] = framed
        return framed


def _frame(opcode: Opcode, payload: bytes) -> bytes:
    """A final, unmasked server frame (RFC 6455, 5.2): the same bytes as websockets'
    ``Frame(opcode, payload).serialize(mask=False)`` with no extension, built without
    a ``Frame`` and its checks at under a third of the cost (``bench/bench.py micro``):
    every reply and update is framed."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 65536:
        return _HEAD_16.pack(0x80 | opcode, 126, length) + payload
    return _HEAD_64.pack(0x80 | opcode, 127, length) + payload


_HEAD_16: Final = struct.Struct("!BBH")
_HEAD_64: Final = struct.Struct("!BBQ")


class Flusher:
    """Writes what one pass of the event loop handed each socket, in one ``send()``.

    The ``send()`` is the largest single cost of a delivery (``bench/bench.py floor``),
    so a socket given several updates in one pass (a busy node reads many published
    updates per pass) pays for one; an idle node adds one pass of delay. A node that
    falls behind spaces its flushes out, so that each ``send()`` carries more updates.
    So does a node in a connect storm (``storm_rate`` sockets opened per second, counted
    over ``STORM_WINDOW`` seconds; 0 for never): each arrival's presence goes to every
    watcher already connected, a ``send()`` each, and those sends slow the arrivals down.
    Held back ``storm_hold`` seconds, a socket's updates share one; presence moves up to
    about that much late while the storm lasts.
    """

    __slots__ = (
        "_coalesced",
        "_due",
        "_held",
        "_last_end",
        "_metrics",
        "_not_before",
        "_opened",
        "_origins",
        "_queued",
        "_storm_hold",
        "_storm_opens",
    )

    def __init__(
        self, metrics: Metrics, storm_rate: int = STORM_RATE, storm_hold: float = STORM_HOLD
    ) -> None:
        self._metrics = metrics
        #: Sockets opened within STORM_WINDOW seconds that make a storm; None: never.
        self._storm_opens = math.ceil(storm_rate * STORM_WINDOW) if storm_rate > 0 else None
        self._storm_hold = storm_hold
        #: Loop times of the sockets opened within the last STORM_WINDOW seconds.
        self._opened: deque[float] = deque()
        self._queued: list[Connection] = []
        #: When the inputs behind this pass's updates arrived, for the latency metric.
        self._origins: list[float] = []
        self._due = False
        #: Updates replaced by a newer one of the same user before their write.
        self._coalesced = 0
        #: Loop time before which the next flush does not run, how long that holds it
        #: back after the last one, and when the last one ended.
        self._not_before = 0.0
        self._held = 0.0
        self._last_end = 0.0

    def opened(self) -> None:
        """A socket was opened (counted towards a connect storm)."""
        now = asyncio.get_running_loop().time()
        self._opened.append(now)
        self._forget_opened_before(now - STORM_WINDOW)

    def _in_storm(self, now: float) -> bool:
        self._forget_opened_before(now - STORM_WINDOW)
        return self._storm_opens is not None and len(self._opened) >= self._storm_opens

    def _forget_opened_before(self, then: float) -> None:
        opened = self._opened
        while opened and opened[0] < then:
            opened.popleft()

    def add(self, conn: Connection) -> None:
        self._queued.append(conn)
        self._schedule()

    def add_all(self, conns: list[Connection]) -> None:
        self._queued.extend(conns)
        self._schedule()

    def arrived(self, origin: float) -> None:
        """An update whose input arrived at ``origin`` is being handed out in this pass."""
        self._origins.append(origin)
        self._schedule()

    def coalesce(self) -> None:
        """Count a coalesced update (one metric update per pass, not per update)."""
        self._coalesced += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._due:
            self._due = True
            loop = asyncio.get_running_loop()
            wait = self._not_before - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._due = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        queued, self._queued = self._queued, []
        origins, self._origins = self._origins, []
        written = writes = 0
        for conn in queued:
            try:
                count = conn.flush()
            except Exception:  # one broken socket must not hold up the others
                log.exception("writing to %s/%s failed", conn.tenant, conn.user)
                continue
            written += count
            writes += count > 0
        if written:
            self._metrics.deliveries.inc(written)
            self._metrics.update_writes.inc(writes)
            self._metrics.sent("presence").inc(written)
        if self._coalesced:
            self._metrics.coalesced.inc(self._coalesced)
            self._coalesced = 0
        # A node that is behind (its sockets get several updates between two flushes
        # even without holding any back) spaces its flushes out: the next waits three
        # times as long as this one took, so that each send() carries more updates and
        # taking changes in keeps three quarters of the time. Whether it is behind is
        # judged on the part of the interval that was not held back, so a node that
        # catches up stops waiting at once; one that keeps up never waits.
        finished = loop.time()
        interval = finished - self._last_end
        unheld = 1.0 - self._held / interval if interval > 0 else 1.0
        behind = bool(queued) and written / len(queued) * unheld >= BEHIND
        self._held = 3 * (finished - started) if behind else 0.0
        if self._in_storm(finished):
            self._held = max(self._held, self._storm_hold)
            self._metrics.storm_holds.inc()
        self._not_before = finished + self._held
        self._last_end = finished
        # One observation per update, not per socket: they were all written just now.
        now = time.time()
        for origin in origins:
            self._metrics.update_latency.observe(now - origin)


#: The watchers of one user on this node -> the highest ``ver`` of that user handed to
#: each (-1: none yet). An update's fan-out reads and writes only this one map, not a
#: map of each watcher's: with thousands of sockets each watcher's own objects are
#: cold in the cache, and every object fewer read a delivery shows in its cost.
Watchers = dict["Connection", int]


class Connection:
    """One client socket: who it is, what it watches, and what it has yet to receive.

    Updates wait, one per watched user (a newer one replaces an older one), until the
    ``Flusher`` writes them all at the end of the pass, with no task switch. Only a
    socket whose transport is full gets a writer task, which sends its backlog as
    soon as the socket drains, or closes it if it never does.
    """

    # Tens of thousands of these live at once: no per-instance __dict__.
    __slots__ = (
        "_first",
        "_first_user",
        "_more",
        "_pending_self",
        "_pump",
        "_scheduled",
        "coalesced",
        "device",
        "expiry",
        "flusher",
        "fmt",
        "metrics",
        "ready",
        "self_ver",
        "send_timeout",
        "session",
        "tenant",
        "user",
        "watching",
        "ws",
    )

    def __init__(
        self,
        ws: HeardConnection,
        fmt: Format,
        *,
        tenant: TenantId,
        user: UserId,
        session: SessionId,
        device: Device,
        send_timeout: float,
        metrics: Metrics,
        flusher: Flusher,
    ) -> None:
        self.ws = ws
        self.metrics = metrics
        self.flusher = flusher
        self.fmt: Format = fmt
        self.tenant = tenant
        self.user = user
        self.session = session
        self.device = device
        self.send_timeout = send_timeout
        #: Each user this socket watches -> that user's watchers, this socket among them.
        self.watching: dict[UserId, Watchers] = {}
        #: The updates waiting for the next write: the first in a slot of its own (most
        #: writes carry one: no map to fill and empty for it), any more by user.
        self._first: Update | None = None
        self._first_user: UserId | None = None
        self._more: dict[UserId, Update] = {}
        self._pending_self: Update | None = None
        #: The ver of the last Self map this socket was given.
        self.self_ver = -1
        #: Whether the flusher or the writer task will take the waiting updates.
        self._scheduled = False
        #: The writer of the backlog; it exists only while there is one.
        self._pump: asyncio.Task[None] | None = None
        #: Set once the welcome went out: nothing may be written before it.
        self.ready = False
        self.coalesced = 0
        #: Closes the socket with 1008 when the token expires; an ``auth`` frame moves it.
        self.expiry: asyncio.TimerHandle | None = None

    @staticmethod
    def offer(watchers: Watchers, user: UserId, update: Update) -> None:
        """Hand each watcher of ``user`` an update, unless it has a newer one.

        One call for all of a user's watchers, not one per socket, and the sockets it
        makes due go to the flusher together: at saturation this loop runs 150,000
        times a second, and a call per socket was a tenth of it."""
        ver = update.ver
        due: list[Connection] = []
        for conn, known in watchers.items():
            if ver <= known:
                continue
            watchers[conn] = ver  # a value replaced: the iteration goes on unharmed
            first = conn._first
            if first is None:
                conn._first, conn._first_user = update, user
            elif conn._first_user == user:
                conn._first = update
                conn.coalesced += 1
                conn.flusher.coalesce()
            else:
                more = conn._more
                if user in more:
                    conn.coalesced += 1
                    conn.flusher.coalesce()
                more[user] = update
            if not conn._scheduled and conn.ready:  # as _schedule(), without the call
                conn._scheduled = True
                due.append(conn)
        if due:
            due[0].flusher.add_all(due)

    def pending(self) -> dict[UserId, Update]:
        """The updates waiting for the next write, by user, in the order they came."""
        if self._first is None or self._first_user is None:
            return dict(self._more)
        return {self._first_user: self._first, **self._more}

    def _take_pending(self) -> list[Update]:
        first, self._first = self._first, None
        if first is None:
            return []
        if not self._more:
            return [first]
        more, self._more = self._more, {}
        return [first, *more.values()]

    def offer_self(self, update: Update) -> None:
        if update.ver <= self.self_ver:
            return
        self.self_ver = update.ver
        self._pending_self = update
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        if self.ready:
            self._scheduled = True
            self.flusher.add(self)

    def flush(self) -> int:
        """Write everything pending in one go, unless the socket is full; returns the
        number of presence updates written."""
        ws = self.ws
        if ws.protocol.state is not _OPEN:
            return 0
        if ws.paused:
            self._pump = asyncio.get_running_loop().create_task(self._write_backlog())
            return 0
        self._scheduled = False
        own, self._pending_self = self._pending_self, None
        fmt = self.fmt
        first = self._first
        if own is None and first is not None and not self._more:
            # The usual case below saturation: one update, no list to build.
            self._first = None
            if ws.ping_due:  # the keepalive's ping, without a send() of its own
                ws.ping_due = False
                ws.transport.write(first.framed(fmt) + PING)
            else:
                ws.transport.write(first.framed(fmt))
            return 1
        batch = self._take_pending()
        frames = [update.framed(fmt) for update in batch]
        if own is not None:
            frames.append(own.framed(fmt))
            self.metrics.sent("self").inc()
        if frames:  # a reply may have taken the pending Self along (send())
            if ws.ping_due:
                ws.ping_due = False
                frames.append(PING)
            ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        return len(batch)

    def start(self, welcomed_ver: int) -> None:
        """The welcome is out, with the user's Self map at ``welcomed_ver``: updates may
        flow, except a Self update that the welcome already carried."""
        self.ready = True
        if self._pending_self is not None and self._pending_self.ver <= welcomed_ver:
            self._pending_self = None
        if self._first is not None or self._pending_self is not None:
            self._schedule()

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self.expiry is not None:
            self.expiry.cancel()

    async def send(self, frame: dict[str, Any]) -> None:
        """One frame, written straight to the socket; only a full socket goes through
        websockets' ``send()``, which waits for it to drain.

        A pending Self update goes in the same write, after it: a request that changed
        the user's state gets its reply and the new Self map in one ``send()`` (the
        store hands the Self map over at commit, before the reply is made)."""
        self.metrics.sent(frame["type"]).inc()
        ws = self.ws
        if ws.paused or ws.protocol.state is not _OPEN:
            await ws.send(codec.encode(frame, self.fmt))
            return
        own = self._pending_self
        if own is None or not self.ready:
            ws.transport.write(self._framed(frame))
        else:
            self._pending_self = None
            ws.transport.write(self._framed(frame) + own.framed(self.fmt))
            self.metrics.sent("self").inc()

    async def send_all(self, frames: list[dict[str, Any]]) -> None:
        """Several frames in one write, in order (a producer's replies to a batch of
        events: one ``send()`` instead of one per reply)."""
        if self.ws.protocol.state is not _OPEN:
            raise ConnectionClosed(None, None)
        self.ws.transport.write(b"".join([self._framed(f) for f in frames]))
        for frame in frames:
            self.metrics.sent(frame["type"]).inc()
        await asyncio.wait_for(self.ws.drain(), self.send_timeout)

    def _framed(self, frame: dict[str, Any]) -> bytes:
        if self.fmt == "msgpack":
            return _frame(Opcode.BINARY, codec.pack(frame))
        return _frame(Opcode.TEXT, str(codec.encode(frame, "json")).encode())

    async def _write_backlog(self) -> None:
        """Write the backlog as the socket drains; close the socket if it stalls."""
        try:
            while self._first is not None or self._pending_self is not None:
                await asyncio.wait_for(self.ws.drain(), self.send_timeout)
                own, self._pending_self = self._pending_self, None
                batch = self._take_pending()
                if own is not None:
                    await self._write(own.framed(self.fmt), "self")
                if len(batch) == 1:
                    await self._write(batch[0].framed(self.fmt), "presence")
                else:
                    for start in range(0, len(batch), BATCH):
                        chunk = batch[start : start + BATCH]
                        frame = codec.presences_frame([u.map for u in chunk])
                        await self.ws.send(codec.encode(frame, self.fmt))
                        self.metrics.sent("presences").inc()
                self._delivered(batch)
        except TimeoutError:
            await self.close_stalled()
        except (ConnectionClosed, OSError):
            # Closed, or reset by the peer (drain() raises what the transport met): the
            # connection's own handler ends the session.
            pass
        finally:
            self._pump = None
            self._scheduled = False

    async def close_stalled(self) -> None:
        """Close a socket whose peer stopped reading for ``send_timeout`` seconds."""
        log.info("closing %s/%s: fell too far behind", self.tenant, self.user)
        self.metrics.slow_consumer_closes.inc()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(1013, "fell too far behind"), 5)
        self.ws.transport.abort()

    async def _write(self, framed: bytes, kind: str) -> None:
        if self.ws.protocol.state is not _OPEN:
            raise ConnectionClosed(None, None)
        self.ws.transport.write(framed)
        self.metrics.sent(kind).inc()
        await asyncio.wait_for(self.ws.drain(), self.send_timeout)

    def _delivered(self, updates: Iterable[Update]) -> None:
        now = time.time()
        count = 0
        for update in updates:
            count += 1
            if update.origin is not None:
                self.metrics.update_latency.observe(now - update.origin)
        self.metrics.deliveries.inc(count)
