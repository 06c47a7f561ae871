#!/usr/bin/env python3
"""Side by side: the same fan-out load against the hub, a Node socket.io 4 server with
the Redis adapter (``bench/peers/socketio.mjs``) and a bare ``websockets`` broadcast
server without Redis (``bench/peers/bare.py``).

U clients each subscribe to K random contacts; the clients change their own custom
messages at R changes a second (or as fast as the server acknowledges them, 100 in
flight), each change reaching its watchers. Each server gets core 0; the load
generator and Redis share core 1. CPU is read from /proc: per delivered update (per
expected one where the hub coalesced), and per change beyond the bare server's.

    bench/sidebyside.py                 the table of docs/PERFORMANCE.md
    bench/sidebyside.py --quick         a short run of the two 1,000 x 20 rows
    bench/sidebyside.py --rows "5000x50 at 100"
                                        only that row (and its population's connect)
    bench/sidebyside.py --repeat 3      three rounds of every target in turn: each
                                        row's medians, and every round's ratio
    bench/sidebyside.py --idle 30       also each server's CPU with each population
                                        connected and nothing changing, over 30 s
    bench/sidebyside.py --bare-keepalive
                                        the bare relay pings its sockets as the hub
                                        does, every 20 s (by default it pings none)
    bench/sidebyside.py --targets hub --profile "1000x20 at 500"
                                        py-spy's samples of the hub during that row:
                                        bench/results/profile.txt (collapsed stacks)
                                        and the functions that take the most time
    bench/sidebyside.py --targets hub,bare --instructions "200x20 at 20"
                                        the instructions each server executes per
                                        change in that row, counted by valgrind's
                                        callgrind: unlike CPU time the same from run
                                        to run, so it settles what the noise of a
                                        shared machine cannot (user space only: a
                                        system call counts as one); --callgrind-out
                                        DIR keeps callgrind's files for
                                        callgrind_annotate

The socket.io peer's packages are installed into bench/peers/ with npm on first use.
Every loop is bounded in count and time; everything listens on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack
import msgspec
import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(ROOT))
from presence_hub.auth import issue_token  # noqa: E402
from presence_hub.store import find_redis_server  # noqa: E402
from presence_hub.store.embedded import free_port  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from loadtest import masked, read_frames, take_upgrade  # noqa: E402

SECRET = "side-by-side-secret-side-by-side-secret"
#: The fewest changes a row at a set rate makes.
MIN_CHANGES = 5000
#: With --idle, how long a connected population waits before its idle CPU is read:
#: socket.io pings each socket 25 s after it opened, the hub spreads a round over 20 s.
IDLE_SETTLE = 30.0

ROWS: list[tuple[int, int, float | None]] = [
    (1000, 20, 500.0),
    (1000, 20, 2000.0),
    (1000, 20, None),
    (5000, 50, 100.0),
    (5000, 50, 500.0),
    (5000, 50, None),
]
TARGETS = ("hub", "socketio", "bare")
IN_FLIGHT = 100


# --- The wire of each target ------------------------------------------------------------


class Update(msgspec.Struct):
    user: str
    message: str | None = None
    ver: int = 0


class HubFrame(msgspec.Struct):
    type: str
    id: int | None = None
    user: str = ""
    message: str | None = None
    ver: int = 0
    items: list[Update] = []


decode_hub = msgspec.msgpack.Decoder(HubFrame).decode
decode_json = msgspec.json.Decoder().decode


@dataclass
class Stats:
    deliveries: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


class Client(asyncio.Protocol):
    """One simulated client of any target: a minimal WebSocket reader, and the target's
    framing of subscribe, set_message and their replies."""

    def __init__(self, kind: str, user: str, stats: Stats) -> None:
        self.kind, self.user, self.stats = kind, user, stats
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.opened = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[None]] = {}
        self.next_id = 0
        self.upgraded = False
        #: The newest message seen of each contact.
        self.view: dict[str, tuple[int, str | None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in [self.opened, *self.replies.values()]:
            if not future.done():
                future.set_exception(ConnectionError("closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            try:
                self.upgraded = take_upgrade(self.buffer)
            except ConnectionError as exc:
                self.opened.set_exception(exc)
                return
            if not self.upgraded:
                return
            if self.kind != "socketio":  # socket.io opens with its own packets
                self.opened.set_result(None)
        now = time.time()
        for opcode, payload in read_frames(self.buffer):
            if opcode in (0x1, 0x2):
                self._payload(payload, now)
            elif opcode == 0x9:
                self._write(0x8A, payload)

    def _payload(self, payload: bytes, now: float) -> None:
        if self.kind == "hub":
            frame = decode_hub(payload)
            if frame.type == "presence":
                self._update(frame.user, frame.ver, frame.message, now)
            elif frame.type == "presences":
                for item in frame.items:
                    self._update(item.user, item.ver, item.message, now)
            elif frame.id is not None:
                self._reply(frame.id)
        elif self.kind == "bare":
            m = decode_json(payload)
            if m["type"] == "presence":
                self._update(m["user"], m["ver"], m["message"], now)
            else:
                self._reply(m["id"])
        else:
            self._socketio(payload, now)

    def _socketio(self, packet: bytes, now: float) -> None:
        if packet.startswith(b"42"):  # an event: ["presence", {...}]
            _, m = decode_json(packet[2:])
            self._update(m["user"], m["ver"], m["message"], now)
        elif packet.startswith(b"43"):  # an ack: 43<id>[...]
            digits = packet[2:].split(b"[", 1)[0]
            self._reply(int(digits))
        elif packet == b"2":  # engine.io ping
            self._write(0x81, b"3")
        elif packet.startswith(b"0"):  # engine.io open: connect to the namespace
            self._write(0x81, b"40")
        elif packet.startswith(b"40"):
            self.opened.set_result(None)

    def _update(self, user: str, ver: int, message: str | None, now: float) -> None:
        self.stats.deliveries += 1
        seen = self.view.get(user)
        if seen is not None and ver <= seen[0]:
            return
        self.view[user] = (ver, message)
        if message and message.startswith("lt:"):
            self.stats.latencies.append(now - float(message[3:].split(":")[0]))

    def _reply(self, rid: int) -> None:
        future = self.replies.pop(rid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _write(self, first_byte: int, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(masked(first_byte, payload))

    def request(self, kind: str, value: Any) -> asyncio.Future[None]:
        """``subscribe`` (a list of users) or ``set_message`` (a text); done on its reply."""
        self.next_id += 1
        rid = self.next_id
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies[rid] = future
        field_name = "users" if kind == "subscribe" else "text"
        if self.kind == "hub":
            self._write(0x82, msgpack.packb({"type": kind, "id": rid, field_name: value}))
        elif self.kind == "bare":
            frame = {"type": kind, "id": rid, field_name: value}
            self._write(0x81, json.dumps(frame).encode())
        else:
            self._write(0x81, f"42{rid}".encode() + json.dumps([kind, value]).encode())
        return future


async def open_client(kind: str, port: int, user: str, stats: Stats) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(kind, user, stats), "127.0.0.1", port)
    path = {
        "hub": "/v1/ws",
        "socketio": f"/socket.io/?EIO=4&transport=websocket&user={user}",
        "bare": f"/?user={user}",
    }[kind]
    extra = ""
    if kind == "hub":
        token = issue_token(SECRET, tenant="bench", user=user, ttl=86400)
        extra = f"Sec-WebSocket-Protocol: presence.v1.msgpack\r\nAuthorization: Bearer {token}\r\n"
    key = base64.b64encode(os.urandom(16)).decode()
    assert client.transport is not None
    client.transport.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n"
        ).encode()
    )
    await asyncio.wait_for(client.opened, 60)
    return client


def row_name(clients: int, contacts: int, rate: float | None) -> str:
    return f"{clients}x{contacts} at {'max' if rate is None else int(rate)}"


# --- The servers ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wakeups(pid: int) -> int:
    """Times the server's main thread (its event loop) went to sleep and woke up."""
    return int(psutil.Process(pid).num_ctx_switches().voluntary)


@contextlib.contextmanager
def server(
    kind: str,
    redis_url: str,
    data: Path,
    under: Sequence[str] = (),
    bare_keepalive: bool = False,
) -> Iterator[tuple[int, int]]:
    """The server under test on core 0, run ``under`` a tool if given: (port, pid)."""
    port = free_port()
    if kind == "hub":
        args = [
            sys.executable, "-m", "presence_hub", "serve", "--redis-url", redis_url,
            "--ws-port", str(port), "--http-port", str(free_port()), "--secret", SECRET,
            "--data-dir", str(data), "--log-level", "WARNING", "--connect-rate", "0",
            "--rate-limit", "100000", "--rate-burst", "100000",
        ]  # fmt: skip
    elif kind == "socketio":
        args = ["node", str(PEERS / "socketio.mjs"), str(port), redis_url]
    else:
        args = [sys.executable, str(PEERS / "bare.py"), str(port)]
        args += ["--keepalive"] if bare_keepalive else []
    process = subprocess.Popen(["taskset", "-c", "0", *under, *args], cwd=PEERS)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the {kind} server did not start") from None
                time.sleep(0.1)
        time.sleep(0.5)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def install_peers() -> None:
    if not (PEERS / "node_modules" / "socket.io").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=PEERS, check=True
        )


# --- One run ----------------------------------------------------------------------------


async def connect_all(
    kind: str, port: int, clients: int, contacts: int, seed: int, stats: Stats
) -> tuple[dict[str, Client], dict[str, list[str]], float]:
    users = [f"u{n}" for n in range(clients)]
    rng = random.Random(seed)
    watching = {u: rng.sample([v for v in users if v != u], contacts) for u in users}
    gate = asyncio.Semaphore(200)
    opened: dict[str, Client] = {}

    async def join(user: str) -> None:
        async with gate:
            client = await open_client(kind, port, user, stats)
            await asyncio.wait_for(client.request("subscribe", watching[user]), 60)
            opened[user] = client

    started = time.monotonic()
    await asyncio.gather(*(join(u) for u in users))
    return opened, watching, time.monotonic() - started


async def changes(
    opened: dict[str, Client], rate: float | None, seconds: float, seed: int
) -> tuple[int, dict[str, str], dict[str, int]]:
    """Messages changed at ``rate`` a second (none: 100 in flight): how many, the last
    of each user, and how many of each."""
    rng = random.Random(seed)
    users = list(opened)
    last: dict[str, str] = {}
    count: dict[str, int] = {}
    sent = 0
    in_flight: set[asyncio.Future[None]] = set()
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline and sent < 10**6:
        if rate is not None:
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif len(in_flight) >= IN_FLIGHT:
            _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        user = rng.choice(users)
        text = f"lt:{time.time():.6f}:{sent}"
        reply = opened[user].request("set_message", text)
        in_flight.add(reply)
        reply.add_done_callback(in_flight.discard)
        last[user] = text
        count[user] = count.get(user, 0) + 1
        sent += 1
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)
    return sent, last, count


async def settle(stats: Stats, quiet: float = 1.0, at_most: float = 60.0) -> None:
    started = changed = time.monotonic()
    seen = stats.deliveries
    while time.monotonic() - changed < quiet and time.monotonic() - started < at_most:
        await asyncio.sleep(0.1)
        if stats.deliveries != seen:
            seen, changed = stats.deliveries, time.monotonic()


async def run_target(
    kind: str,
    port: int,
    pid: int,
    seconds: float,
    rows_to_run: Sequence[tuple[int, int, float | None]],
    profile: str | None = None,
    idle: float = 0.0,
) -> list[dict[str, Any]]:
    rows = []
    me = psutil.Process()
    populations = sorted({(u, k) for u, k, _ in rows_to_run})
    for clients, contacts in populations:
        stats = Stats()
        cpu_before = cpu_seconds(pid)
        spy = start_profile(pid, 30) if profile == f"connect {clients}x{contacts}" else None
        opened, watching, connect_s = await connect_all(kind, port, clients, contacts, 1, stats)
        connect_cpu = cpu_seconds(pid) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has when interrupted
            await asyncio.to_thread(spy.wait)
            summarize_profile()
        watchers: dict[str, int] = {}
        for contacts_of in watching.values():
            for contact in contacts_of:
                watchers[contact] = watchers.get(contact, 0) + 1
        rows.append({"row": f"connect {clients}x{contacts}", "seconds": round(connect_s, 2),
                     "server_cpu_s": round(connect_cpu, 2)})  # fmt: skip
        if idle > 0:
            # What the server spends with every socket open and nothing changing
            # (keepalive, timers): a row at a low rate pays it for each change.
            await asyncio.sleep(IDLE_SETTLE)
            spy = start_profile(pid, idle) if profile == f"idle {clients}x{contacts}" else None
            idle_before = cpu_seconds(pid)
            await asyncio.sleep(idle)
            rows[-1]["idle_cpu_ms_per_s"] = round((cpu_seconds(pid) - idle_before) / idle * 1e3, 1)
            if spy is not None:
                await asyncio.to_thread(spy.wait)
                summarize_profile()
        for u, k, rate in rows_to_run:
            if (u, k) != (clients, contacts):
                continue
            await settle(stats)
            stats.deliveries, stats.latencies = 0, []
            server_before, me_before = cpu_seconds(pid), me.cpu_times()
            woke_before = wakeups(pid)
            wall = time.monotonic()
            name = row_name(u, k, rate)
            # At a low rate a short row is a few hundred changes, and a keepalive round
            # or a collection in it moves the figure by a third: a row is long enough
            # for MIN_CHANGES as well.
            length = seconds if rate is None else max(seconds, MIN_CHANGES / rate)
            spy = start_profile(pid, length) if profile == name else None
            sent, last, count = await changes(opened, rate, length, seed=u + int(rate or 0))
            if spy is not None:
                await asyncio.to_thread(spy.wait)
                summarize_profile()
            await settle(stats)
            wall = time.monotonic() - wall
            server_cpu = cpu_seconds(pid) - server_before
            woke = wakeups(pid) - woke_before
            mine = me.cpu_times()
            generator_cpu = (mine.user + mine.system) - (me_before.user + me_before.system)
            stale = sum(
                contact in last and client.view.get(contact, (0, None))[1] != last[contact]
                for client in opened.values()
                for contact in watching[client.user]
            )
            # Every change is expected at each watcher of its user.
            expected = sum(n * watchers.get(user, 0) for user, n in count.items())
            delivered = stats.deliveries
            lat = sorted(stats.latencies)
            rows.append(
                {
                    "row": name,
                    "changes": sent,
                    "changes_per_s": round(sent / length, 1),
                    "delivered": delivered,
                    "expected": expected,
                    "stale_views": stale,
                    "server_cpu_us_per_update": round(server_cpu / max(delivered, 1) * 1e6, 2),
                    "server_cpu_us_per_expected": round(server_cpu / max(expected, 1) * 1e6, 2),
                    "server_cpu_us_per_change": round(server_cpu / max(sent, 1) * 1e6, 1),
                    "server_cpu_share": round(server_cpu / wall, 2),
                    "server_wakeups_per_change": round(woke / max(sent, 1), 2),
                    "generator_cpu_share": round(generator_cpu / wall, 2),
                    "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
                    "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
                }
            )
            print(kind, json.dumps(rows[-1]), flush=True)
        for client in opened.values():
            if client.transport is not None:
                client.transport.close()
        await asyncio.sleep(2)
    return rows


PROFILE = ROOT / "bench" / "results" / "profile.txt"


def start_profile(pid: int, seconds: float) -> subprocess.Popen[bytes]:
    PROFILE.parent.mkdir(exist_ok=True)
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(PROFILE),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(top: int = 25) -> None:
    """The functions the samples spent the most time in, themselves and below them."""
    own: dict[str, int] = {}
    below: dict[str, int] = {}
    total = 0
    for line in PROFILE.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0] for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            below[frame] = below.get(frame, 0) + n
    print(f"{total} samples; by own time:")
    for frame, n in sorted(own.items(), key=lambda x: -x[1])[:top]:
        print(f"  {n / total:6.1%}  {frame}")
    print("by time in and below:")
    for frame, n in sorted(below.items(), key=lambda x: -x[1])[:top]:
        print(f"  {n / total:6.1%}  {frame}")


def start_redis(data: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            "1",
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
    )
    process.port = port  # type: ignore[attr-defined]
    time.sleep(0.5)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--rows",
        default=None,
        metavar="ROWS",
        help='only these rows, e.g. "5000x50 at 100,5000x50 at max" (default: all)',
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help=f"per row, and at a set rate at least {MIN_CHANGES} changes (default 10)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every target in turn; the table has each row's medians (default 1)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"read each server's CPU that long with a population connected and nothing "
        f"changing, {IDLE_SETTLE:g} s after it connected (default: not)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="ROW",
        help='e.g. "1000x20 at 500", "connect 5000x50", "idle 5000x50" (with --idle)',
    )
    parser.add_argument(
        "--bare-keepalive",
        action="store_true",
        help="the bare relay pings every socket every 20 s, as the hub does (default: never)",
    )
    parser.add_argument(
        "--instructions", default=None, metavar="ROW", help='e.g. "200x20 at 20" (hub, bare)'
    )
    parser.add_argument(
        "--callgrind-out",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --instructions: keep callgrind's files there, for callgrind_annotate",
    )
    args = parser.parse_args()
    named = [] if args.rows is None else [r.strip() for r in args.rows.split(",")]
    unknown = set(named) - {row_name(*row) for row in ROWS}
    if unknown:
        parser.error(
            f"no such row: {', '.join(sorted(unknown))}; the rows: "
            + ", ".join(row_name(*row) for row in ROWS)
        )
    rows_to_run = [
        (u, k, rate)
        for u, k, rate in ROWS
        if (not named or row_name(u, k, rate) in named)
        and (not args.quick or (u == 1000 and rate is not None))
    ]
    install_peers()
    os.sched_setaffinity(0, {1})
    if args.instructions is not None:
        for kind in args.targets.split(","):
            counted = count_instructions(kind, args.instructions, args.callgrind_out)
            print(json.dumps(counted), flush=True)
        return
    # Rounds of every target in turn: a shared machine's noise drifts over minutes, and
    # each round's targets meet about the same.
    rounds: list[dict[str, list[dict[str, Any]]]] = []
    for _ in range(max(1, args.repeat)):
        results: dict[str, list[dict[str, Any]]] = {}
        for kind in args.targets.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                redis = start_redis(Path(tmp))
                try:
                    url = f"redis://127.0.0.1:{redis.port}"  # type: ignore[attr-defined]
                    with server(kind, url, Path(tmp), bare_keepalive=args.bare_keepalive) as (
                        port,
                        pid,
                    ):
                        results[kind] = uvloop.run(
                            run_target(
                                kind,
                                port,
                                pid,
                                args.seconds,
                                rows_to_run,
                                args.profile,
                                args.idle,
                            )
                        )
                finally:
                    redis.terminate()
                    redis.wait(10)
        rounds.append(results)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "sidebyside.json").write_text(json.dumps(rounds, indent=2))
    print_table(rounds)


#: The fewest changes an instructions row makes: Python runs about 50 times slower
#: under callgrind, so its rate must be low, and its background (timers, keepalive)
#: is spread over the changes made meanwhile.
INSTRUCTION_CHANGES = 400


def count_instructions(kind: str, row: str, keep: Path | None = None) -> dict[str, Any]:
    """Instructions per change of one server in ``row`` ("U x K at R"), from the first
    change to the last delivery, counted by callgrind in every process of the server;
    its files are kept in ``keep`` if given."""
    population, _, rate = row.partition(" at ")
    clients, contacts = (int(n) for n in population.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) if keep is None else keep
        where.mkdir(parents=True, exist_ok=True)
        for old in where.glob(f"callgrind.{kind}.out.*"):
            old.unlink()
        out = where / f"callgrind.{kind}.out"
        tool = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}.%p"]  # fmt: skip
        redis = start_redis(Path(tmp))
        try:
            url = f"redis://127.0.0.1:{redis.port}"  # type: ignore[attr-defined]
            with server(kind, url, Path(tmp), under=tool) as (port, pid):
                changes, deliveries = uvloop.run(
                    _instructions_row(kind, port, pid, clients, contacts, float(rate))
                )
        finally:
            redis.terminate()
            redis.wait(10)
        total = sum(
            next(int(line.split()[1]) for line in f.read_text().splitlines()
                 if line.startswith("totals:"))
            for f in where.glob(f"callgrind.{kind}.out.*")
        )  # fmt: skip
    return {
        "target": kind,
        "row": row,
        "changes": changes,
        "delivered": deliveries,
        "instructions_per_change": round(total / max(changes, 1)),
    }


async def _instructions_row(
    kind: str, port: int, pid: int, clients: int, contacts: int, rate: float
) -> tuple[int, int]:
    stats = Stats()
    opened, _, _ = await connect_all(kind, port, clients, contacts, 1, stats)
    await settle(stats)
    # Every process of the server: the hub's workers are its children.
    pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    await asyncio.to_thread(_instrument, pids, "on")
    stats.deliveries = 0
    sent, _, _ = await changes(opened, rate, INSTRUCTION_CHANGES / rate, seed=7)
    await settle(stats)
    await asyncio.to_thread(_instrument, pids, "off")
    for client in opened.values():
        if client.transport is not None:
            client.transport.close()
    await asyncio.sleep(2)
    return sent, stats.deliveries


def _instrument(pids: list[int], switch: str) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", "-i", switch, str(pid)], stdout=subprocess.DEVNULL)


def table() -> None:
    """The table again, from the last run's bench/results/sidebyside.json."""
    print_table(json.loads((ROOT / "bench" / "results" / "sidebyside.json").read_text()))


def medians(rounds: list[dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Target -> row -> each figure's median over the rounds that have it."""
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for results in rounds:
        for kind, found in results.items():
            for row in found:
                into = merged.setdefault(kind, {}).setdefault(row["row"], {})
                for key, value in row.items():
                    into.setdefault(key, []).append(value)
    return {
        kind: {
            name: {
                key: values[0] if key == "row" else _median(values)
                for key, values in figures.items()
            }
            for name, figures in found.items()
        }
        for kind, found in merged.items()
    }


def _median(values: list[Any]) -> Any:
    numbers = sorted(v for v in values if isinstance(v, int | float))
    if not numbers:
        return None
    middle = len(numbers) // 2
    if len(numbers) % 2:
        return numbers[middle]
    return round((numbers[middle - 1] + numbers[middle]) / 2, 2)


def print_table(rounds: list[dict[str, list[dict[str, Any]]]]) -> None:
    """The table of docs/PERFORMANCE.md: CPU per expected update (connect rows: seconds)
    with each peer's ratio to the hub, p99 latencies, what saturated, and the hub's CPU
    per change beyond the bare server's; with several rounds, each figure's median and
    every round's ratio of the hub to socket.io."""
    rows = medians(rounds)
    hub, node, bare = (rows.get(k, {}) for k in TARGETS)

    def ratios(peer: str, row: str, key: str) -> list[float]:
        """The hub's figure over the peer's, round by round (each round's pair met
        about the same machine)."""
        found = []
        for results in rounds:
            mine = {r["row"]: r for r in results.get("hub", [])}.get(row)
            theirs = {r["row"]: r for r in results.get(peer, [])}.get(row)
            if mine and theirs and mine.get(key) and theirs.get(key):
                found.append(mine[key] / theirs[key])
        return found

    def cell(kind: str, row: str, key: str) -> str:
        figures = rows.get(kind, {})
        if row not in figures or row not in hub or figures[row].get(key) is None:
            return "-"
        value = figures[row][key]
        if kind == "hub":
            return f"{value}"
        return f"{value} ({_median(ratios(kind, row, key)):.2f})"

    def saturated(row: str) -> str:
        sides = [
            f"{k} {side}"
            for k, found in rows.items()
            if row in found
            for side in ("server", "generator")
            if (found[row].get(f"{side}_cpu_share") or 0) >= 0.85
        ]
        return ", ".join(sides) or "none"

    def each_round(row: str) -> str:
        key = "seconds" if row.startswith("connect") else "server_cpu_us_per_expected"
        return ", ".join(f"{r:.2f}" for r in ratios("socketio", row, key)) or "-"

    print("| U x K at R | hub | socket.io (hub / it) | bare (hub / it) | p99 ms hub, socket.io "
          "| saturated | hub CPU a change beyond bare | hub / socket.io, each round |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in hub:
        key = "seconds" if row.startswith("connect") else "server_cpu_us_per_expected"
        beyond = "-"
        if row in bare and not row.startswith("connect"):
            extra = hub[row]["server_cpu_us_per_change"] - bare[row]["server_cpu_us_per_change"]
            beyond = f"{extra:.0f} us"
        p99 = f"{hub[row].get('p99_ms', '-')}, {node.get(row, {}).get('p99_ms', '-')}"
        print(
            f"| {row} | {cell('hub', row, key)} | {cell('socketio', row, key)} "
            f"| {cell('bare', row, key)} "
            f"| {p99} | {saturated(row)} | {beyond} | {each_round(row)} |"
        )
    for row in hub:
        if "idle_cpu_ms_per_s" in hub[row]:
            idle = ", ".join(
                f"{kind} {rows[kind][row].get('idle_cpu_ms_per_s')}"
                for kind in TARGETS
                if row in rows.get(kind, {})
            )
            print(f"idle with {row.removeprefix('connect ')} connected, CPU ms a second: {idle}")


if __name__ == "__main__":
    main()
