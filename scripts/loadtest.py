#!/usr/bin/env python3
"""Load test a presence hub: N simulated clients with K contacts each, and producers.

    scripts/loadtest.py --clients 1000 --contacts 50 --rate 500 --duration 20 \\
        --url ws://127.0.0.1:8765/v1/ws --http-url http://127.0.0.1:8766 --secret S

Clients are spread over --workers processes and speak the wire protocol with a
minimal WebSocket reader of their own (a general-purpose WebSocket library
would make the load generator saturate before the hub). Producers change the
clients' own state at --rate changes per second with a realistic mix (message
and status changes over the clients' sockets, calls and meetings over the HTTP
API, activity reports). At the end every client's view of every contact is
compared with the hub's truth, and a report gives connect time, throughput,
latency percentiles and the hub's CPU and memory. Every loop is bounded by
--duration and --max-changes. The workers run on uvloop (--loop asyncio for the
standard event loop): it takes a quarter less CPU per client, which leaves more
of a shared machine to the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import multiprocessing as mp
import os
import queue
import random
import statistics
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import msgpack
import msgspec
import uvloop
from websockets.utils import apply_mask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from presence_hub.auth import issue_token

MIX_DEFAULT = "message=0.45,status=0.15,call=0.15,meeting=0.1,activity=0.15"
LAT_PREFIX = "lt:"


# --- A minimal WebSocket client --------------------------------------------------------


class Presence(msgspec.Struct):
    user: str
    ver: int
    status: str
    message: str | None = None


class ServerFrame(msgspec.Struct):
    """What the load generator reads of a hub's frame (the other fields are skipped):
    decoded straight into a struct, in a third of the time of building its maps."""

    type: str
    id: int | str | None = None
    # A presence frame's fields.
    user: str = ""
    ver: int = 0
    status: str = ""
    message: str | None = None
    # A batch of presence frames, and a snapshot.
    items: list[Presence] = []
    presences: list[Presence] = []
    # The reply to an event: its result.
    result: str | None = None


decode_frame = msgspec.msgpack.Decoder(ServerFrame).decode


class LightClient(asyncio.Protocol):
    """One simulated client: reads frames with as little work as possible."""

    def __init__(self, user: str, stats: WorkerStats) -> None:
        self.user = user
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshake_done = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[ServerFrame]] = {}
        self.view: dict[str, tuple[int, str, Any]] = {}
        self.upgraded = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionError("closed during handshake"))
        for future in self.replies.values():
            if not future.done():
                future.set_exception(ConnectionError("closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            try:
                self.upgraded = take_upgrade(self.buffer)
            except ConnectionError as exc:
                self.handshake_done.set_exception(exc)
                return
            if not self.upgraded:
                return
            self.handshake_done.set_result(None)
        self._frames()

    def _frames(self) -> None:
        now = time.time()
        for opcode, payload in read_frames(self.buffer):
            if opcode == 0x2:
                try:
                    frame = decode_frame(payload)
                except msgspec.DecodeError as exc:
                    self.stats.errors[f"undecodable frame: {exc}"[:120]] += 1
                else:
                    self._frame(frame, now)
            elif opcode == 0x9:
                # The hub closes a socket that misses its keepalive pings.
                self._write(0x8A, payload)
            elif opcode == 0x8:
                self.closed = True

    def _frame(self, frame: ServerFrame, now: float) -> None:
        kind = frame.type
        if kind == "presence":
            self._presence(frame, now)
        elif kind == "presences":
            for item in frame.items:
                self._presence(item, now)
        elif isinstance(frame.id, int) and frame.id in self.replies:
            self.replies.pop(frame.id).set_result(frame)

    def _presence(self, p: Presence | ServerFrame, now: float) -> None:
        self.stats.deliveries += 1
        user, ver, message = p.user, p.ver, p.message
        current = self.view.get(user)
        if current is not None and ver <= current[0]:
            return
        self.view[user] = (ver, p.status, message)
        # Time only the update that carried a new stamped message.
        if (
            message
            and message.startswith(LAT_PREFIX)
            and (current is None or current[2] != message)
        ):
            sent = float(message[len(LAT_PREFIX) :].split(":")[0])
            self.stats.latencies.append(now - sent)
            self.stats.latency_times.append(now)

    def send(self, frame: dict[str, Any]) -> None:
        self._write(0x82, msgpack.packb(frame))

    def send_many(self, frames: list[dict[str, Any]]) -> None:
        """Several frames in one write, as a pipelining producer sends them."""
        assert self.transport is not None
        self.transport.write(b"".join(masked(0x82, msgpack.packb(f)) for f in frames))

    def _write(self, first_byte: int, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(masked(first_byte, payload))

    async def request(self, frame: dict[str, Any], rid: int) -> ServerFrame:
        future: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
        self.replies[rid] = future
        self.send({**frame, "id": rid})
        return await asyncio.wait_for(future, 60)


def take_upgrade(buf: bytearray) -> bool:
    """Whether ``buf`` holds the whole answer to the upgrade (then taken out of it);
    ConnectionError if it refused."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    status = bytes(buf[:12])
    del buf[: end + 4]
    if b" 101" not in status:
        raise ConnectionError(status.decode(errors="replace"))
    return True


def read_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """The complete frames at the start of ``buf`` (opcode, payload), taken out of it."""
    frames = []
    pos = 0
    while len(buf) - pos >= 2:
        b1 = buf[pos + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if len(buf) - pos < 4:
                break
            length = struct.unpack_from("!H", buf, pos + 2)[0]
            head = 4
        elif length == 127:
            if len(buf) - pos < 10:
                break
            length = struct.unpack_from("!Q", buf, pos + 2)[0]
            head = 10
        if len(buf) - pos < head + length:
            break
        frames.append((buf[pos] & 0x0F, bytes(buf[pos + head : pos + head + length])))
        pos += head + length
    del buf[:pos]
    return frames


def masked(first_byte: int, payload: bytes) -> bytes:
    """One masked frame (a client's frames must be masked): FIN and opcode in
    ``first_byte``."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first_byte, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first_byte, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first_byte, 0x80 | 127, n)
    return header + mask + apply_mask(payload, mask)


async def open_client(url: str, token: str, user: str, stats: WorkerStats) -> LightClient:
    target = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: LightClient(user, stats), target.hostname or "127.0.0.1", target.port or 80
    )
    key = base64.b64encode(os.urandom(16)).decode()
    assert client.transport is not None
    client.transport.write(
        (
            f"GET {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: presence.v1.msgpack\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await asyncio.wait_for(client.handshake_done, 60)
    return client


# --- One worker process -------------------------------------------------------------------


@dataclass
class WorkerStats:
    deliveries: int = 0
    changes_sent: int = 0
    changes_acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    latency_times: list[float] = field(default_factory=list)


async def _quiet(stats: WorkerStats, quiet: float, at_most: float) -> None:
    """Until no update arrived for ``quiet`` seconds (a hub still working off a backlog
    is not a hub that lost updates), or ``at_most`` seconds have passed."""
    started = last_change = time.monotonic()
    seen = stats.deliveries
    while time.monotonic() - last_change < quiet and time.monotonic() - started < at_most:
        await asyncio.sleep(min(0.25, quiet))
        if stats.deliveries != seen:
            seen, last_change = stats.deliveries, time.monotonic()


async def run_worker(
    args: dict[str, Any], graph: dict[str, list[str]] | None, index: int, progress: Any
) -> dict[str, Any]:
    stats = WorkerStats()
    all_users = [f"u{n}" for n in range(args["clients"])]
    mine = all_users[index :: args["workers"]]
    rng = random.Random(args["seed"] + index)
    population_rng = random.Random(args["seed"])
    contacts = {
        u: population_rng.sample(all_users, min(args["contacts"], len(all_users)))
        for u in all_users
    }
    if graph is not None:
        contacts = {u: graph.get(u, [])[:1000] for u in all_users}
    urls = args["urls"]

    def token(user: str, role: str = "user") -> str:
        return issue_token(args["secret"], tenant=args["tenant"], user=user, role=role, ttl=86400)  # type: ignore[arg-type]

    # Clients hold their tokens before they connect.
    tokens = {user: token(user) for user in mine}
    # Connect and subscribe everyone, once every worker is set up: the connect time is
    # the hub's, not the time the workers take to start.
    progress.put(("set", index))
    await asyncio.to_thread(args["connect"].wait)
    started, cpu_at_start = time.time(), time.process_time()
    clients: dict[str, LightClient] = {}
    semaphore = asyncio.Semaphore(args["concurrency"])
    joined, reported_at = 0, time.time()

    async def join(n: int, user: str) -> None:
        async with semaphore:
            try:
                client = await open_client(urls[n % len(urls)], tokens[user], user, stats)
                want = contacts[user]
                for start in range(0, len(want), 1000):
                    reply = await client.request(
                        {"type": "subscribe", "users": want[start : start + 1000]}, start + 1
                    )
                    if reply.type != "snapshot":
                        raise ConnectionError(f"subscribe answered {reply.type}: {reply.message}")
                    for p in reply.presences:
                        # An update may have overtaken the snapshot: keep the newest ver.
                        seen = client.view.get(p.user)
                        if seen is None or p.ver > seen[0]:
                            client.view[p.user] = (p.ver, p.status, p.message)
                clients[user] = client
            except Exception as exc:
                stats.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
            # Reported every 0.1 s, not per client: a message per client through the
            # queue cost the worker a quarter of its CPU.
            nonlocal joined, reported_at
            joined += 1
            if time.time() - reported_at > 0.1:
                progress.put(("joined", joined))
                joined, reported_at = 0, time.time()

    await asyncio.gather(*(join(n, u) for n, u in enumerate(mine)))
    if joined:
        progress.put(("joined", joined))
    connect_seconds = time.time() - started
    connect_cpu = time.process_time() - cpu_at_start
    progress.put(("ready", index))
    # Wait for every worker to be connected (a multiprocessing event, not an asyncio one).
    await asyncio.to_thread(args["go"].wait)
    cpu_at_go, go_at = time.process_time(), time.time()

    # Produce changes at this worker's share of the rate.
    mix = [(kind, float(w)) for kind, w in (part.split("=") for part in args["mix"].split(","))]
    kinds, weights = zip(*mix, strict=True)
    rate = args["rate"] / args["workers"]
    deadline = time.time() + args["duration"]
    budget = args["max_changes"] // args["workers"]
    open_calls: dict[str, str] = {}
    open_meetings: dict[str, str] = {}
    sent_per_second: Counter[int] = Counter()
    producer_token = token(f"producer-{index}", "producer")
    connected = list(clients)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {producer_token}"}) as http:
        # Changes go out as they fall due, about every millisecond, not in bursts: a
        # burst of N changes is N x contacts deliveries handed to the hub at once, and
        # the latencies would then measure how long the hub takes to drain the burst.
        tick = 0.001
        seq = 0
        pending_http: set[asyncio.Task[None]] = set()
        started_producing = reported_at = posted_at = time.time()
        unreported = 0
        events: list[dict[str, Any]] = []
        stop = False
        while rate > 0 and not stop and connected:
            stop = time.time() >= deadline or stats.changes_sent >= budget
            due = min(budget, int(rate * (time.time() - started_producing)) + 1)
            batch = 0 if stop else due - stats.changes_sent
            for _ in range(batch):
                seq += 1
                user = rng.choice(connected)
                client = clients[user]
                kind = rng.choices(kinds, weights)[0]
                now = time.time()
                if kind == "message" or (kind in ("call", "meeting") and not args["http_url"]):
                    client.send({"type": "set_message", "text": f"{LAT_PREFIX}{now:.6f}:{seq}"})
                elif kind == "status":
                    status = rng.choice(["available", "busy", "away", "dnd"])
                    client.send({"type": "set_status", "status": status})
                elif kind == "activity":
                    client.send({"type": "activity"})
                else:
                    table = open_calls if kind == "call" else open_meetings
                    if user in table:
                        ref = table.pop(user)
                        events.append(_event(f"{kind}_ended", user, ref, now, index, seq))
                    else:
                        ref = f"{kind}-{index}-{seq}"
                        table[user] = ref
                        events.append(_event(f"{kind}_started", user, ref, now, index, seq))
                stats.changes_sent += 1
                sent_per_second[int(now)] += 1
            # Producers' events go in batches of up to 20 ms, as a call server would send them.
            if events and (len(events) >= 100 or time.time() - posted_at >= 0.02 or stop):
                task = asyncio.create_task(_post(http, args["http_url"], events, stats))
                pending_http.add(task)
                task.add_done_callback(pending_http.discard)
                events, posted_at = [], time.time()
            unreported += batch
            if unreported and time.time() - reported_at > 0.1:
                progress.put(("sent", unreported))
                unreported, reported_at = 0, time.time()
            await asyncio.sleep(tick)
        if unreported:
            progress.put(("sent", unreported))
        if pending_http:
            await asyncio.wait(pending_http, timeout=30)
        # Every worker has stopped producing when the hub's own latency is read, before
        # the bulk of ends below.
        progress.put(("produced", index))
        await asyncio.to_thread(args["ends"].wait)
        # End what is open, so that the final state is simple to check.
        ends = [
            _event(f"{kind}_ended", user, ref, time.time(), index, n)
            for kind, table in (("call", open_calls), ("meeting", open_meetings))
            for n, (user, ref) in enumerate(table.items())
        ]
        for start in range(0, len(ends), 1000):
            await _post(http, args["http_url"], ends[start : start + 1000], stats)
    # Every worker has made its last change before anyone reads its final views.
    progress.put(("ended", index))
    await asyncio.to_thread(args["collect"].wait)
    await _quiet(stats, args["settle"], args["settle_max"])
    # Its own share of a core while it produced and read: a load generator near 1.0
    # is the side that saturated, not the hub.
    cpu_share = (time.process_time() - cpu_at_go) / max(1e-9, time.time() - go_at)
    # A request/reply on each socket flushes whatever the hub sent before it.
    await asyncio.gather(
        *(
            c.request({"type": "query", "users": []}, 10**9)
            for c in clients.values()
            if not c.closed
        ),
        return_exceptions=True,
    )
    views = {u: {k: [v[0], v[1], v[2]] for k, v in c.view.items()} for u, c in clients.items()}
    for client in clients.values():
        if client.transport is not None:
            client.transport.abort()
    return {
        "connect_seconds": connect_seconds,
        "connect_cpu": connect_cpu,
        "cpu_share": cpu_share,
        "connected": len(clients),
        "deliveries": stats.deliveries,
        "changes_sent": stats.changes_sent,
        "changes_acked_http": stats.changes_acked,
        "errors": dict(stats.errors),
        "latencies": stats.latencies,
        "latency_times": stats.latency_times,
        "sent_per_second": dict(sent_per_second),
        "views": views,
        "contacts": {u: contacts[u] for u in clients},
    }


def _event(kind: str, user: str, ref: str, at: float, worker: int, seq: int) -> dict[str, Any]:
    return {
        "event_id": f"lt-{worker}-{seq}-{kind}-{ref}",
        "kind": kind,
        "user": user,
        "ref": ref,
        "at": at,
    }


async def _post(
    http: aiohttp.ClientSession, base: str, events: list[dict[str, Any]], stats: WorkerStats
) -> None:
    try:
        async with http.post(f"{base}/v1/events", json={"events": events}) as response:
            body = await response.json()
            if response.status != 200:
                stats.errors[f"http {response.status}"] += 1
                return
            stats.changes_acked += sum(
                r["result"] in ("applied", "duplicate", "stale") for r in body["results"]
            )
    except aiohttp.ClientError as exc:
        stats.errors[f"http: {type(exc).__name__}"] += 1


def worker_main(args: dict[str, Any], index: int, progress: Any, results: Any) -> None:
    # Thousands of clients are a million long-lived objects: with CPython's default
    # thresholds, full collections stall the worker for 100 ms and more, and the
    # latencies it measures with them (the hub tunes its collector the same way).
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    graph = json.loads(Path(args["graph"]).read_text()) if args["graph"] else None
    run = uvloop.run if args["loop"] == "uvloop" else asyncio.run
    results.put((index, run(run_worker(args, graph, index, progress))))


# --- The whole run -----------------------------------------------------------------------


def hub_processes(pids: list[int]) -> list[Any]:
    import psutil

    if pids:
        return [psutil.Process(p) for p in pids]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        hub = "presence_hub" in cmdline or "presence-hub" in cmdline
        if hub and " serve" in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


def cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(Exception):  # a process may have gone
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def rss_bytes(procs: list[Any]) -> int:
    total = 0
    for proc in procs:
        with contextlib.suppress(Exception):
            total += proc.memory_info().rss
    return total


async def hub_truth(http_url: str, token: str, users: list[str]) -> dict[str, list[Any]]:
    truth: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        for start in range(0, len(users), 500):
            chunk = users[start : start + 500]
            async with http.get(f"{http_url}/v1/presence", params={"users": ",".join(chunk)}) as r:
                for p in (await r.json())["presences"]:
                    truth[p["user"]] = [p["ver"], p["status"], p["message"]]
    return truth


async def hub_latency_buckets(http_url: str) -> dict[float, float]:
    """The hub's own update latency histogram (arrival of the input to the write to the
    sockets), as cumulative counts by upper bound; empty when /metrics does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    if not http_url:
        return {}
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{http_url}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return {}
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "presence_hub_update_latency_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }


async def hub_settled_buckets(
    http_url: str, quiet: float = 0.5, at_most: float = 30.0
) -> dict[float, float]:
    """The hub's latency buckets once it has handed out what it had (no update written
    for ``quiet`` seconds, ``at_most`` seconds at the most): after a connect storm the
    last arrivals' presence is still on its way to their watchers, and would be timed
    with the load that follows."""
    deadline = time.monotonic() + at_most
    buckets = await hub_latency_buckets(http_url)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        latest = await hub_latency_buckets(http_url)
        if latest == buckets:
            break
        buckets = latest
    return buckets


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Upper bounds (ms) of the histogram buckets holding p50, p95 and p99 of what the hub
    observed between two scrapes; None where that is beyond the last bucket."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0.0
    result: dict[str, Any] = {"updates": int(total)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        bound = next((le for le, count in counts if total and count >= q * total), None)
        result[name] = None if bound is None or bound == float("inf") else bound * 1000
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _is_graph(path: str) -> bool:
    try:
        graph = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(graph, dict) and all(
        isinstance(contacts, list) and all(isinstance(c, str) for c in contacts)
        for contacts in graph.values()
    )


def _next_progress(progress: Any, workers: list[Any]) -> tuple[str, Any]:
    """The next message of the workers; stops the run if one of them failed, instead of
    waiting for messages it will never send."""
    while True:
        try:
            message: tuple[str, Any] = progress.get(timeout=1)
            return message
        except queue.Empty:
            _stop_if_a_worker_failed(workers)


def _stop_if_a_worker_failed(workers: list[Any]) -> None:
    failed = next((w for w in workers if w.exitcode not in (None, 0)), None)
    if failed is not None:
        for w in workers:
            w.terminate()
        raise SystemExit(f"a load generator worker failed (exit code {failed.exitcode}); see above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default="ws://127.0.0.1:8765/v1/ws", help="hub WebSocket URL(s), comma-separated"
    )
    parser.add_argument(
        "--http-url",
        default="http://127.0.0.1:8766",
        help="hub HTTP API, for events and the final check",
    )
    parser.add_argument(
        "--secret", default=os.environ.get("PRESENCE_HUB_SECRET"), help="the hub's token secret"
    )
    parser.add_argument("--tenant", default="loadtest")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--contacts", type=int, default=50)
    parser.add_argument("--graph", help="JSON file: user -> list of contacts (users are u0..uN-1)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="changes per second, all producers together"
    )
    parser.add_argument("--mix", default=MIX_DEFAULT)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1000,
        help="connections each worker opens at once (a reconnect storm opens them all)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (bounded)")
    parser.add_argument(
        "--max-changes", type=int, default=10_000_000, help="stop after this many changes"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="before the final check, wait until no update arrived for this many seconds",
    )
    parser.add_argument(
        "--settle-max", type=float, default=60.0, help="but wait at most this many seconds"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--hub-pid", type=int, action="append", default=[], help="hub process(es) to measure"
    )
    parser.add_argument(
        "--redis-pid", type=int, action="append", default=[], help="Redis process(es) to measure"
    )
    parser.add_argument(
        "--relay-pid",
        type=int,
        action="append",
        default=[],
        help="the hub's relay process(es), measured apart from --hub-pid",
    )
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write a PNG of latency and throughput over time here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the workers' event loop (uvloop takes less CPU per client)",
    )
    opts = parser.parse_args(argv)
    if not opts.secret:
        parser.error("--secret (or PRESENCE_HUB_SECRET) is required to sign the clients' tokens")
    if opts.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if opts.graph and not _is_graph(opts.graph):
        parser.error(f"--graph {opts.graph}: not a JSON object of user -> list of user ids")
    opts.duration = min(opts.duration, 3600.0)

    ctx = mp.get_context("spawn")
    progress, results = ctx.Queue(), ctx.Queue()
    connect, go, ends, collect = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    shared = {
        "urls": opts.url.split(","),
        "http_url": opts.http_url.rstrip("/"),
        "secret": opts.secret,
        "tenant": opts.tenant,
        "clients": opts.clients,
        "contacts": opts.contacts,
        "graph": opts.graph,
        "rate": opts.rate,
        "mix": opts.mix,
        "workers": opts.workers,
        "concurrency": opts.concurrency,
        "duration": opts.duration,
        "max_changes": opts.max_changes,
        "settle": opts.settle,
        "settle_max": opts.settle_max,
        "seed": opts.seed,
        "loop": opts.loop,
        "connect": connect,
        "go": go,
        "ends": ends,
        "collect": collect,
    }
    workers = [
        ctx.Process(target=worker_main, args=(shared, i, progress, results))
        for i in range(opts.workers)
    ]
    hub = hub_processes(opts.hub_pid)
    redis = hub_processes(opts.redis_pid) if opts.redis_pid else []
    relays = hub_processes(opts.relay_pid) if opts.relay_pid else []
    from tqdm import tqdm  # type: ignore[import-untyped]

    for w in workers:
        w.start()
    set_up = 0
    while set_up < opts.workers:
        kind, value = _next_progress(progress, workers)
        set_up += kind == "set"
    bar = tqdm(total=opts.clients, desc="connecting", unit="client", disable=opts.quiet)
    t0, cpu_at_start = time.time(), cpu_seconds(hub)
    connect.set()
    ready = 0
    while ready < opts.workers:
        kind, value = _next_progress(progress, workers)
        if kind == "joined":
            bar.update(value)
        elif kind == "ready":
            ready += 1
    connect_wall = time.time() - t0
    connect_cpu = cpu_seconds(hub) - cpu_at_start
    bar.close()

    hub_latency_before = asyncio.run(hub_settled_buckets(shared["http_url"]))
    cpu_before, load_started = cpu_seconds(hub), time.time()
    redis_cpu_before, relay_cpu_before = cpu_seconds(redis), cpu_seconds(relays)
    go.set()
    expected = int(min(opts.rate * opts.duration, opts.max_changes))
    bar = tqdm(total=expected, desc="changes", unit="chg", disable=opts.quiet)
    reports: dict[int, dict[str, Any]] = {}
    produced = ended = 0
    hub_latency_after: dict[float, float] = {}
    while len(reports) < opts.workers:
        while not progress.empty():
            kind, value = progress.get()
            if kind == "sent":
                bar.update(value)
            elif kind == "produced":
                produced += 1
                if produced == opts.workers:
                    # The load's last updates handed out, and not the ends that follow.
                    hub_latency_after = asyncio.run(hub_settled_buckets(shared["http_url"]))
                    ends.set()
            elif kind == "ended":
                ended += 1
                if ended == opts.workers:
                    collect.set()
        while not results.empty():
            index, report = results.get()
            reports[index] = report
        if time.time() - load_started > opts.duration + 600:
            print("workers did not finish", file=sys.stderr)
            break
        _stop_if_a_worker_failed(workers)
        time.sleep(0.05)
    bar.close()
    for w in workers:
        w.join(30)
    # Deliveries keep arriving after the last change when the hub is behind: count the whole run.
    load_seconds = time.time() - load_started
    cpu_used = cpu_seconds(hub) - cpu_before
    redis_cpu_used = cpu_seconds(redis) - redis_cpu_before
    relay_cpu_used = cpu_seconds(relays) - relay_cpu_before
    memory = rss_bytes(hub)
    hub_latency = bucket_quantiles(hub_latency_before, hub_latency_after)

    merged = list(reports.values())
    deliveries = sum(r["deliveries"] for r in merged)
    latencies = [x for r in merged for x in r["latencies"]]
    errors: Counter[str] = Counter()
    for r in merged:
        errors.update(r["errors"])

    # Completeness: every client's final view of every contact equals the hub's truth.
    everyone = sorted({c for r in merged for cs in r["contacts"].values() for c in cs})
    token = issue_token(opts.secret, tenant=opts.tenant, user="loadtest-checker", role="producer")
    truth = asyncio.run(hub_truth(shared["http_url"], token, everyone)) if everyone else {}
    stale = 0
    checked = 0
    for r in merged:
        for user, contacts in r["contacts"].items():
            view = r["views"].get(user, {})
            for contact in contacts:
                checked += 1
                seen = view.get(contact)
                if seen is None or seen[0] != truth.get(contact, [None])[0]:
                    stale += 1
    if stale:
        errors[f"incomplete: {stale} of {checked} contact views differ from the hub"] += 1

    changes = sum(r["changes_sent"] for r in merged)
    report = {
        "clients": opts.clients,
        "connected": sum(r["connected"] for r in merged),
        "contacts_per_client": opts.contacts,
        "workers": opts.workers,
        "concurrency": opts.concurrency,
        "event_loop": opts.loop,
        "rate_target": opts.rate,
        "connect_and_subscribe_seconds": round(connect_wall, 3),
        "hub_cpu_seconds_connecting": round(connect_cpu, 3),
        # Each load generator process's CPU time while it connected its clients: on
        # shared cores, what it took is not the hub's.
        "load_generator_cpu_seconds_connecting": [round(r["connect_cpu"], 3) for r in merged],
        "changes_sent": sum(r["changes_sent"] for r in merged),
        "changes_per_second": round(sum(r["changes_sent"] for r in merged) / opts.duration, 1),
        "run_seconds": round(load_seconds, 1),
        "deliveries": deliveries,
        "deliveries_per_second": round(deliveries / load_seconds, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * 1000, 2),
            "p95": round(percentile(latencies, 0.95) * 1000, 2),
            "p99": round(percentile(latencies, 0.99) * 1000, 2),
            "max": round(max(latencies, default=float("nan")) * 1000, 2),
            "samples": len(latencies),
        },
        # The same latency as the hub sees it, without the load generator's share (one
        # process's /metrics when the hub runs several): the bucket each quantile is in.
        "hub_latency_ms_at_most": hub_latency,
        "contact_views_checked": checked,
        "contact_views_stale": stale,
        "hub_processes": len(hub),
        "hub_cpu_seconds": round(cpu_used, 3),
        "hub_cpu_us_per_delivery": round(cpu_used / deliveries * 1e6, 2) if deliveries else None,
        "hub_rss_mib": round(memory / 2**20, 1),
        "redis_cpu_us_per_change": (
            round(redis_cpu_used / changes * 1e6, 1) if redis and changes else None
        ),
        "relay_cpu_us_per_change": (
            round(relay_cpu_used / changes * 1e6, 1) if relays and changes else None
        ),
        "hub_cpu_share": round(cpu_used / load_seconds, 2),
        "load_generator_cpu_share": [round(r["cpu_share"], 2) for r in merged],
        "errors": dict(errors),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if opts.json:
        Path(opts.json).write_text(text + "\n")
    if opts.plot:
        plot(merged, opts.plot)
    return 1 if errors else 0


def plot(reports: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for r in reports for t in r["latency_times"]]
    lat = [x * 1000 for r in reports for x in r["latencies"]]
    if not times:
        return
    t0 = min(times)
    per_second: dict[int, list[float]] = defaultdict(list)
    for t, x in zip(times, lat, strict=True):
        per_second[int(t - t0)].append(x)
    seconds = sorted(per_second)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(seconds, [statistics.median(per_second[s]) for s in seconds], label="p50")
    top.plot(seconds, [percentile(per_second[s], 0.99) for s in seconds], label="p99")
    top.set_ylabel("latency (ms)")
    top.legend()
    bottom.plot(seconds, [len(per_second[s]) for s in seconds], label="timed deliveries/s")
    sent: Counter[int] = Counter()
    for r in reports:
        for second, count in r["sent_per_second"].items():
            sent[int(second) - int(t0)] += count
    bottom.plot(sorted(sent), [sent[s] for s in sorted(sent)], label="changes sent/s")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
