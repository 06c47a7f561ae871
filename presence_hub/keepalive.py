"""Keepalive: a ping to every socket once a round, and the close of those that stop
answering (half-open TCP connections: a laptop gone to sleep, a network gone away).

A socket is alive if anything was read from it since its ping, its pong or any other
frame, so a ping is one constant frame and a socket keeps a count of its reads
(``HeardConnection``), where websockets' ``ping()`` makes a payload, a future and a
frame for each. Its cost is in the system calls: a ping asked for goes out with the
socket's next updates if any come within a quarter of a round, in their ``send()``,
and only then in one of its own; a pong read alone, between two frames, is counted
without websockets parsing it.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

__all__ = ["PING", "HeardConnection", "keep_alive"]

#: Seconds between two slices of a round, at least, and pings per slice, at most: a
#: round has as few slices as that allows, so that a node with few sockets wakes up a
#: few times a round rather than twenty times a second.
SLICE: Final = 0.05
PINGS_PER_SLICE: Final = 100
#: A ping frame without payload (a server's frames are not masked).
PING: Final = b"\x89\x00"
#: A client's pong without payload: its header, then the 4 bytes of its mask.
PONG: Final = b"\x8a\x80"
PONG_SIZE: Final = 6
_PARSE: Final = Protocol.parse.__code__
_AT_EOF: Final = StreamReader.at_eof.__code__
_OPEN: Final = State.OPEN


class HeardConnection(ServerConnection):
    """A server connection that counts the reads of its socket, and holds its
    keepalive's state.

    A read that is just the pong of a ping, between two frames, is counted and
    dropped: websockets would parse it into a frame and an event that it ignores."""

    #: Reads of the socket so far.
    heard = 0
    #: A ping was asked for and not written yet: the next write takes it along.
    ping_due = False
    #: Loop time of the last ping asked for, if one is outstanding, and ``heard`` then.
    asked_at: float | None = None
    heard_then = 0

    def data_received(self, data: bytes) -> None:
        self.heard += 1
        if data[:2] == PONG and len(data) == PONG_SIZE and _between_frames(self.protocol):
            return
        super().data_received(data)


def _between_frames(protocol: Protocol) -> bool:
    """Whether websockets' frame parser waits for the first byte of a frame with
    nothing buffered, so that the next bytes read begin a frame. Anything else, a frame
    half read, the discarding after a close, another version's parser, answers no, and
    the bytes go to the parser."""
    # The parser is a chain of generators (the handshake's, then the frames' loop,
    # then the read it waits in): look at the last two.
    outer: types.GeneratorType[Any, Any, Any] | None = None
    inner: object = protocol.parser
    while isinstance(inner, types.GeneratorType) and inner.gi_yieldfrom is not None:
        outer, inner = inner, inner.gi_yieldfrom
    return (
        outer is not None
        and outer.gi_code is _PARSE
        and isinstance(inner, types.GeneratorType)
        and inner.gi_code is _AT_EOF
    )


async def keep_alive(
    sockets: Callable[[], Iterable[HeardConnection]],
    every: float,
    per_slice: int = PINGS_PER_SLICE,
) -> None:
    """Ping every socket of ``sockets()`` once a round of ``every`` seconds, until
    cancelled; a socket not heard from since a ping written at least half a round ago is
    closed, so its session drops.

    A round is spread over slices of at most ``per_slice`` sockets: thousands of pings
    written in one pass of the event loop, and their pongs read in the next, would hold
    up every delivery for as long. A ping asked for in a slice is written on its own a
    quarter of a round later, if no write of updates took it along meanwhile."""
    loop = asyncio.get_running_loop()
    most = max(1, round(every / SLICE))
    #: The sockets asked for a ping in each of the last slices, oldest first.
    asked: deque[list[HeardConnection]] = deque()
    while True:
        round_of = list(sockets())
        slices = min(most, max(1, -(-len(round_of) // per_slice)))
        size = -(-len(round_of) // slices)  # rounded up
        lag = slices // 4
        for n in range(slices):
            await asyncio.sleep(every / slices)
            now = loop.time()
            asking = []
            for ws in round_of[n * size : (n + 1) * size]:
                if ws.paused or ws.protocol.state is not _OPEN:
                    # A full socket is the backlog writer's to judge (send_timeout).
                    ws.asked_at, ws.ping_due = None, False
                    continue
                if ws.asked_at is not None and ws.heard == ws.heard_then:
                    # Written within a quarter round of the ask: at least half a round ago?
                    if now - ws.asked_at >= every * 3 / 4:
                        ws.transport.abort()
                    continue
                ws.asked_at, ws.heard_then, ws.ping_due = now, ws.heard, True
                asking.append(ws)
            asked.append(asking)
            while len(asked) > lag:
                _write_due(asked.popleft())


def _write_due(sockets: list[HeardConnection]) -> None:
    """Write the pings that no write of updates took along."""
    for ws in sockets:
        if not ws.ping_due:
            continue
        ws.ping_due = False
        if ws.paused or ws.protocol.state is not _OPEN:
            ws.asked_at = None  # not written: nothing to judge it by
            continue
        ws.transport.write(PING)
