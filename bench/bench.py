#!/usr/bin/env python3
"""The benchmark scenarios of docs/PERFORMANCE.md, one command each:

    bench/bench.py fanout      5,000 clients x 50 contacts, status changes at rising rates
    bench/bench.py latency     the same at 1,000 changes per second: p99 latency
    bench/bench.py ingest      producer events through POST /v1/events and WebSocket frames
    bench/bench.py connect     10,000 clients connect and subscribe to 50 contacts each,
                               against a hub of one worker process, then of two
    bench/bench.py idle        10,000 idle connections: hub memory per connection; the CPU and
                               wake-ups a second of a hub without connections, then with 1,000
                               quiet webhooks; the CPU of one wake-up of an asyncio loop and
                               of an epoll that only sleep
    bench/bench.py cores       1,000 changes per second with --workers 1, 2, and 2 on a relay
                               (the workers' CPU a delivery, the relay's a change apart)
    bench/bench.py nodes       one node, two nodes on one Redis, two on a 3-master Redis Cluster
    bench/bench.py floor       without any hub: the kernel's CPU cost of one loopback send(),
                               and a server's for a request that waits for one Redis round
                               trip, asleep in asyncio's loop and spinning on the socket
    bench/bench.py micro       the hub's per-event pieces: one rules transition, decoding a
                               state, packing a commit command (redis-py's packer and hiredis'),
                               packing a state and decoding a stored view (msgpack and msgspec),
                               framing an update (websockets' Frame and the hub's own),
                               a script call through redis-py's pool, on a held connection
                               and through the hub's batcher, a worker's take-in of a
                               published update from Redis and from a relay, the relay's
                               own, Redis' to publish one and per subscriber
    bench/bench.py feed        the change feed's cost: CPU and Redis memory per change with it
                               on and off, and the delay from a change to its webhook
    bench/bench.py instructions
                               the instructions the hub executes for a storm of 1,000
                               clients x 50, counted by valgrind: a figure that does not
                               drift with the machine's load, to compare two versions
    bench/sidebyside.py        the fan-out against the hub, Node socket.io + Redis and a
                               bare websockets broadcast, side by side (bench/peers/)

Each starts its own hub (embedded Redis in a temporary directory, on loopback),
runs scripts/loadtest.py or its own bounded load against it, prints the figures
and writes them to bench/results/SCENARIO.json. ``--repeat N`` runs it N times
(a shared machine's figures vary from run to run; the docs give their spread).
``--loop asyncio`` runs the load generator on asyncio's loop instead of uvloop, and
``--storm-rate N`` passes ``--storm-rate N`` to every hub (0: no connect storm hold),
for the comparisons in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from presence_hub.auth import issue_token  # noqa: E402
from presence_hub.store import EmbeddedRedis, find_redis_server  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from loadtest import ServerFrame, WorkerStats, open_client  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret"
TENANT = "loadtest"
RESULTS = ROOT / "bench" / "results"
#: Set from the command line: flags for every hub, and for every load tester run.
HUB_FLAGS: list[str] = []
LOADTEST_FLAGS: list[str] = []
SCENARIOS = [
    "fanout", "latency", "ingest", "connect", "idle", "cores", "nodes", "floor", "micro",
    "instructions", "feed",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    port: int, seconds: float = 30, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something listens on ``port``; RuntimeError after ``seconds``, or once
    ``process`` (the server meant to listen) exits."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline or (process and process.poll() is not None):
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


@contextmanager
def hub(
    *extra: str, redis_url: str | None = None, under: list[str] | None = None, wait: float = 60
) -> Iterator[tuple[str, str, list[psutil.Process]]]:
    """A hub on free ports, with its own embedded Redis unless ``redis_url`` is given, run
    ``under`` a tool (valgrind) if asked; yields (ws url, http url, processes)."""
    ws_port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        args = [
            *(under or []), sys.executable, "-m", "presence_hub", "serve",
            "--ws-port", str(ws_port), "--http-port", str(http_port),
            "--data-dir", data, "--secret", SECRET, "--log-level", "WARNING",
            "--rate-limit", "100000", "--rate-burst", "100000",
            # Every simulated client comes from one address, the load generator's.
            "--connect-rate", "0", *HUB_FLAGS, *extra,
            *(["--redis-url", redis_url] if redis_url else []),
        ]  # fmt: skip
        process = subprocess.Popen(args)
        try:
            wait_for_port(ws_port, wait, process)
            time.sleep(0.5)
            parent = psutil.Process(process.pid)
            # The hub's own processes: itself and its workers, not the embedded redis-server.
            procs = [parent] + [c for c in parent.children() if "redis-server" not in c.name()]
            yield f"ws://127.0.0.1:{ws_port}/v1/ws", f"http://127.0.0.1:{http_port}", procs
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                process.kill()


def fanout_args(rate: float, clients: int = 5000) -> list[str]:
    return [
        "--clients", str(clients), "--contacts", "50", "--rate", str(rate),
        "--mix", "message=0.8,status=0.2", "--duration", "15", "--workers", "1",
        "--settle", "3",
    ]  # fmt: skip


def loadtest(ws: str, http: str, procs: list[psutil.Process], *args: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, str(ROOT / "scripts" / "loadtest.py"),
            "--url", ws, "--http-url", http, "--secret", SECRET, "--tenant", TENANT,
            "--json", out.name, "--quiet",
            *[a for p in procs for a in ("--hub-pid", str(p.pid))], *LOADTEST_FLAGS, *args,
        ]  # fmt: skip
        subprocess.run(command, check=False, timeout=3600, stdout=subprocess.DEVNULL)
        report: dict[str, Any] = json.loads(Path(out.name).read_text())
        return report


def cpu_seconds(procs: list[psutil.Process]) -> float:
    return float(sum(p.cpu_times().user + p.cpu_times().system for p in procs))


def summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = [
        "clients", "connected", "event_loop", "rate_target", "changes_per_second",
        "deliveries_per_second", "run_seconds",
        "latency_ms", "hub_latency_ms_at_most", "contact_views_stale", "hub_cpu_us_per_delivery",
        "hub_cpu_share", "load_generator_cpu_share", "hub_rss_mib",
        "connect_and_subscribe_seconds", "hub_cpu_seconds_connecting",
        "load_generator_cpu_seconds_connecting", "errors",
    ]  # fmt: skip
    return {k: report[k] for k in keys}


def fanout(
    rates: list[float], workers: int = 1, clients: int = 5000, relays: int = 0
) -> list[dict[str, Any]]:
    """One fresh hub per rate, so that a saturated run leaves no backlog to the next."""
    rows = []
    for rate in rates:
        with hub("--workers", str(workers), "--relays", str(relays)) as (ws, http, procs):
            redis = [c for c in procs[0].children() if "redis-server" in c.name()]
            relay = [p for p in procs if _is_relay(p)]
            args = [a for r in redis for a in ("--redis-pid", str(r.pid))]
            args += [a for r in relay for a in ("--relay-pid", str(r.pid))]
            nodes = [p for p in procs if p not in relay]
            report = loadtest(ws, http, nodes, *fanout_args(rate, clients), *args)
        rows.append(
            {
                **summary(report),
                "redis_cpu_us_per_change": report["redis_cpu_us_per_change"],
                "relay_cpu_us_per_change": report["relay_cpu_us_per_change"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _is_relay(process: psutil.Process) -> bool:
    """A relay listens on a Unix socket in the run's relay directory."""
    return any("presence-hub-relays-" in c.laddr for c in process.net_connections(kind="unix"))


def two_nodes(redis_url: str, rate: float = 1000) -> dict[str, Any]:
    """The fan-out load spread over two hub processes that share ``redis_url``: each
    client connects to one of them, in turn."""
    with (
        hub(redis_url=redis_url) as (ws_a, http_a, procs_a),
        hub(redis_url=redis_url) as (ws_b, _, procs_b),
    ):
        report = loadtest(f"{ws_a},{ws_b}", http_a, procs_a + procs_b, *fanout_args(rate))
    return summary(report)


def nodes(rate: float = 250) -> dict[str, Any]:
    """One node with its embedded Redis, two nodes on one Redis, two nodes on a
    three-master Redis Cluster: the same load (at a rate that all three sustain on
    two shared cores, so that the costs compare)."""
    from tests.cluster import LocalCluster

    result = {"one_node_embedded_redis": fanout([rate])[0]}
    with (
        tempfile.TemporaryDirectory() as data,
        EmbeddedRedis(Path(data), port=free_port()) as single,
    ):
        result["two_nodes_one_redis"] = two_nodes(single.url, rate)
        print(json.dumps(result["two_nodes_one_redis"]), flush=True)
    with tempfile.TemporaryDirectory() as data:
        cluster = LocalCluster(Path(data), find_redis_server())
        try:
            cluster.start()
            result["two_nodes_redis_cluster"] = two_nodes(cluster.url, rate)
            print(json.dumps(result["two_nodes_redis_cluster"]), flush=True)
        finally:
            cluster.stop()
    return result


class WebhookReceiver:
    """A webhook endpoint in a thread of this process: the delay from each change (its
    cursor's time, the commit's) to its arrival."""

    def __init__(self) -> None:
        import threading

        self.delays: list[float] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self) -> None:
        from aiohttp import web

        async def deliver(request: web.Request) -> web.Response:
            body = await request.json()
            now = time.time()
            for change in body["changes"]:
                self.delays.append(now - int(change["cursor"].split("-")[0]) / 1000)
            return web.Response(status=204)

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/hook", deliver)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await asyncio.Event().wait()

        self._loop.run_until_complete(main())

    def register(self, http: str, name: str = "bench", users: list[str] | None = None) -> None:
        admin = issue_token(SECRET, tenant=TENANT, user="bench-admin", role="admin")
        hook: dict[str, Any] = {"url": f"http://127.0.0.1:{self.port}/hook", "secret": "b" * 32}
        if users is not None:
            hook["users"] = users
        request = urllib.request.Request(
            f"{http}/v1/webhooks/{name}",
            data=json.dumps(hook).encode(),
            method="PUT",
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).read()


def feed(rate: float = 1000) -> dict[str, Any]:
    """What the change feed costs: the fan-out load at ``rate`` changes/s (5,000 x 50)
    with the feed off (``--feed-retention 0``) and on with a webhook registered: hub
    and Redis CPU per change, Redis memory per retained change, and the delay from a
    change's commit to its webhook delivery."""
    result: dict[str, Any] = {}
    for name, flags in (("feed_off", ["--feed-retention", "0"]), ("feed_on", [])):
        receiver = WebhookReceiver()
        with hub(*flags) as (ws, http, procs):
            redis = [c for p in procs for c in p.children(recursive=True) if "redis" in c.name()]
            if name == "feed_on":
                receiver.register(http)
            hub_before, redis_before = cpu_seconds(procs), cpu_seconds(redis)
            memory_before = sum(r.memory_info().rss for r in redis)
            report = loadtest(ws, http, procs, *fanout_args(rate))
            hub_used, redis_used = (
                cpu_seconds(procs) - hub_before,
                cpu_seconds(redis) - redis_before,
            )
            time.sleep(3)  # the last deliveries
            memory_after = sum(r.memory_info().rss for r in redis)
        changes = report["changes_sent"]
        row = summary(report)
        row["hub_cpu_us_per_change"] = round(hub_used / changes * 1e6, 1)
        row["redis_cpu_us_per_change"] = round(redis_used / changes * 1e6, 1)
        row["redis_rss_bytes_per_change"] = round((memory_after - memory_before) / changes)
        if receiver.delays:
            delays = sorted(receiver.delays)
            row["webhook_changes"] = len(delays)
            row["webhook_delay_ms"] = {
                q: round(delays[min(len(delays) - 1, int(len(delays) * f))] * 1000, 1)
                for q, f in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            }
        result[name] = row
        print(json.dumps({name: row}), flush=True)
    return result


class Calls:
    """A producer's events: calls (or meetings) that start on random users of 10,000 and
    end on the user they started on, about 1,000 at a time in progress."""

    def __init__(self, kind: str, in_progress: int = 1000) -> None:
        self.kind = kind
        self.in_progress = in_progress
        self.open: deque[tuple[str, str]] = deque()
        self.rng = random.Random()

    def next(self, event_id: str) -> dict[str, Any]:
        if len(self.open) >= self.in_progress:
            user, ref = self.open.popleft()
            kind = f"{self.kind}_ended"
        else:
            user, ref = f"u{self.rng.randrange(10000)}", event_id
            self.open.append((user, ref))
            kind = f"{self.kind}_started"
        return {"event_id": event_id, "kind": kind, "user": user, "ref": ref, "at": time.time()}


async def ingest_http(
    http: str, seconds: float = 10, batch: int = 1000, parallel: int = 4
) -> float:
    token = issue_token(SECRET, tenant=TENANT, user="bench", role="producer")
    accepted = 0
    deadline = time.time() + seconds
    counter = iter(range(10**9))

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        calls = Calls("call")
        while time.time() < deadline:
            events = [calls.next(f"h{next(counter)}") for _ in range(batch)]
            async with session.post(f"{http}/v1/events", json={"events": events}) as r:
                results = (await r.json())["results"]
                accepted += sum(x["result"] != "rejected" for x in results)

    started = time.time()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        await asyncio.gather(*(one(session) for _ in range(parallel)))
    return accepted / (time.time() - started)


async def ingest_ws(
    ws_url: str, seconds: float = 10, window: int = 2000, parallel: int = 2
) -> float:
    """Producers that pipeline event frames over WebSockets, ``window`` unanswered at a
    time, written in batches with the load tester's minimal client (a full WebSocket
    library costs the load generator more per frame than the hub)."""
    token = issue_token(SECRET, tenant=TENANT, user="bench-ws", role="producer")
    accepted = 0
    deadline = time.time() + seconds

    async def one(k: int) -> None:
        nonlocal accepted
        client = await open_client(ws_url, token, "bench-ws", WorkerStats())
        loop = asyncio.get_running_loop()
        meetings = Calls("meeting")
        in_flight: deque[asyncio.Future[ServerFrame]] = deque()
        sent = 0
        try:
            while time.time() < deadline or in_flight:
                frames = []
                while len(in_flight) < window and time.time() < deadline:
                    sent += 1
                    event = meetings.next(f"w{k}-{sent}")
                    in_flight.append(client.replies.setdefault(sent, loop.create_future()))
                    frames.append({"type": "event", "id": sent, "event": event})
                if frames:
                    client.send_many(frames)
                # Awaited first: ``accepted += await ...`` would add to a stale count.
                reply = await asyncio.wait_for(in_flight.popleft(), 60)
                accepted += _accepted(reply)
                while in_flight and in_flight[0].done():
                    accepted += _accepted(in_flight.popleft().result())
        finally:
            if client.transport is not None:
                client.transport.close()

    started = time.time()
    await asyncio.gather(*(one(k) for k in range(parallel)))
    return accepted / (time.time() - started)


def _accepted(reply: ServerFrame) -> bool:
    """An event's reply: ``ok`` with a result that is not ``rejected``."""
    return reply.type == "ok" and reply.result is not None and reply.result != "rejected"


def run_time(procs: list[psutil.Process]) -> float:
    """Seconds the processes' threads ran, from the scheduler's own count: /proc's user
    and system times are counted in ticks (4 ms here), too coarse for an idle process."""
    total = 0
    for p in procs:
        for stat in Path(f"/proc/{p.pid}/task").glob("*/schedstat"):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def quiet_cost(procs: list[psutil.Process], seconds: float) -> dict[str, float]:
    """CPU and wake-ups (voluntary context switches) a second of processes left alone."""
    cpu, wakeups = run_time(procs), sum(p.num_ctx_switches().voluntary for p in procs)
    time.sleep(seconds)
    wakeups = sum(p.num_ctx_switches().voluntary for p in procs) - wakeups
    return {
        "cpu_ms_per_s": round((run_time(procs) - cpu) / seconds * 1000, 2),
        "wakeups_per_s": round(wakeups / seconds, 1),
    }


#: Programs that only sleep, RATE times a second: an asyncio loop, and a bare epoll.
SLEEPERS = {
    "asyncio": """
import asyncio, sys
async def sleep() -> None:
    while True:
        await asyncio.sleep(1 / float(sys.argv[1]))
asyncio.run(sleep())
""",
    "epoll": """
import select, sys
poll = select.epoll()
while True:
    poll.poll(1 / float(sys.argv[1]))
""",
}


def wakeup_floor(sleeper: str, rate: float = 10, seconds: float = 20) -> float:
    """The CPU, in microseconds, of one wake-up of a program that does nothing else:
    with asyncio, what each timer of an idle node costs on this machine at least."""
    process = subprocess.Popen([sys.executable, "-c", SLEEPERS[sleeper], str(rate)])
    try:
        time.sleep(2)
        cost = quiet_cost([psutil.Process(process.pid)], seconds)
    finally:
        process.kill()
        process.wait()
    if not cost["wakeups_per_s"]:
        raise RuntimeError(f"the {sleeper} sleeper never woke: the machine is too busy")
    return round(cost["cpu_ms_per_s"] * 1000 / cost["wakeups_per_s"], 1)


#: A server that answers each byte a client sends once Redis answered a PING for it,
#: waiting for Redis' reply asleep in asyncio's loop (as the hub waits for a commit) or
#: spinning on the socket without sleeping: argv is Redis' port, its own, and the way.
REPLY_WAITER = """
import asyncio, socket, sys, time
redis = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
redis.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
redis.setblocking(False)
spin = sys.argv[3] == "spinning"
waiting = []
def replied():
    for _ in range(redis.recv(65536).count(b"\\r\\n")):
        waiting.pop(0).write(b"k")
class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        for _ in data:
            redis.send(b"PING\\r\\n")
            give_up = time.monotonic() + 0.002
            while spin and time.monotonic() < give_up:
                try:
                    redis.recv(65536)
                except BlockingIOError:
                    continue
                self.transport.write(b"k")
                break
            else:
                waiting.append(self.transport)
async def main():
    loop = asyncio.get_running_loop()
    loop.add_reader(redis.fileno(), replied)
    await loop.create_server(Server, "127.0.0.1", int(sys.argv[2]))
    await asyncio.Future()
asyncio.run(main())
"""


def round_trip_floor(way: str, rate: float = 200, count: int = 2000) -> float:
    """The CPU, in microseconds, that a server (on core 0) spends on a request that
    waits for one Redis round trip (Redis and the client on core 1), ``way`` being
    "asleep" or "spinning": whether a server that spins through Redis' reply spends
    less than the wake-up it saves."""
    with tempfile.TemporaryDirectory() as data:
        redis_port, port = free_port(), free_port()
        redis = subprocess.Popen(
            ["taskset", "-c", "1", find_redis_server(), "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", data],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(redis_port)
        server = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-c", REPLY_WAITER, str(redis_port),
             str(port), way],
        )  # fmt: skip
        affinity = os.sched_getaffinity(0)
        try:
            wait_for_port(port)
            os.sched_setaffinity(0, {1})
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                before = run_time([psutil.Process(server.pid)])
                due = time.monotonic()
                for _ in range(count):
                    due += 1 / rate
                    time.sleep(max(0.0, due - time.monotonic()))
                    client.send(b"x")
                    client.recv(1)
                spent = run_time([psutil.Process(server.pid)]) - before
        finally:
            os.sched_setaffinity(0, affinity)
            for process in (server, redis):
                process.kill()
                process.wait()
    return round(spent / count * 1e6, 1)


def floor() -> dict[str, Any]:
    """What this machine charges for a ``send()``, and for waiting on Redis' reply."""
    ways = ("asleep", "spinning") * 2  # in turn: the machine drifts
    spent: dict[str, list[float]] = {}
    for way in ways:
        spent.setdefault(way, []).append(round_trip_floor(way))
    return {
        **send_floor(),
        "redis_round_trip_cpu_us_asleep": spent["asleep"],
        "redis_round_trip_cpu_us_spinning": spent["spinning"],
    }


def idle(count: int = 10000, webhooks: int = 1000) -> dict[str, Any]:
    """Memory per connection; and the CPU and wake-ups of a node without any, beside
    those of a loop that only sleeps; and with ``webhooks`` registered that nothing
    is delivered to (each follows a user who never changes)."""
    floors = {name: wakeup_floor(name) for name in SLEEPERS}
    with hub() as (ws, http, procs):
        time.sleep(5)  # past the start's own work
        alone = quiet_cost(procs, 20)
        receiver = WebhookReceiver()
        for n in range(webhooks):
            receiver.register(http, f"quiet-{n}", users=["nobody"])
        time.sleep(5)  # every webhook claimed, its delivery waiting
        hooked = quiet_cost(procs, 20)
        before = sum(p.memory_info().rss for p in procs)
        report = loadtest(
            ws, http, procs, "--clients", str(count), "--contacts", "0", "--rate", "0",
            "--duration", "10", "--workers", "2", "--concurrency", "200", "--settle", "0",
        )  # fmt: skip
        after = report["hub_rss_mib"] * 2**20
        return {
            "connections": report["connected"],
            "hub_rss_before_mib": round(before / 2**20, 1),
            "hub_rss_with_connections_mib": report["hub_rss_mib"],
            "kib_per_connection": round((after - before) / max(1, report["connected"]) / 1024, 1),
            "errors": report["errors"],
            "hub_without_connections_cpu_ms_per_s": alone["cpu_ms_per_s"],
            "hub_without_connections_wakeups_per_s": alone["wakeups_per_s"],
            f"hub_with_{webhooks}_quiet_webhooks_cpu_ms_per_s": hooked["cpu_ms_per_s"],
            f"hub_with_{webhooks}_quiet_webhooks_wakeups_per_s": hooked["wakeups_per_s"],
            "sleeping_asyncio_cpu_us_per_wakeup": floors["asyncio"],
            "sleeping_epoll_cpu_us_per_wakeup": floors["epoll"],
        }


def send_floor(sockets: int = 5000, rounds: int = 20, frame: int = 150) -> dict[str, Any]:
    """What one small loopback ``send()`` costs this machine in CPU (user + system),
    with no hub and no Python beyond the loop: a floor under any fan-out that writes
    each delivery with a system call of its own. Also per frame when 4 frames share
    one ``send()``. The receiving ends are drained between rounds, outside the timing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(sockets)
        port = listener.getsockname()[1]
        pairs = []
        for _ in range(sockets):
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pairs.append((server, client))
    data = b"\x82" + bytes([frame - 2]) + b"x" * (frame - 2)

    def cpu_per_send(payload: bytes) -> float:
        spent = 0.0
        for _ in range(rounds):
            before = time.process_time()
            for server, _ in pairs:
                server.send(payload)
            spent += time.process_time() - before
            for _, client in pairs:
                client.recv(65536)
        return spent / (rounds * sockets) * 1e6

    try:
        one = cpu_per_send(data)
        four = cpu_per_send(data * 4) / 4
    finally:
        for server, client in pairs:
            server.close()
            client.close()
    return {
        "sockets": sockets,
        "frame_bytes": frame,
        "cpu_us_per_send_one_frame": round(one, 2),
        "cpu_us_per_frame_four_frames_per_send": round(four, 2),
    }


def micro(count: int = 20000) -> dict[str, Any]:
    """Microseconds per call of the pieces every event goes through, in this process."""
    import msgpack
    import msgspec
    from redis.asyncio.connection import Connection
    from websockets.frames import Frame, Opcode

    from presence_hub import codec, delivery, model, rules
    from presence_hub.ids import SessionId
    from presence_hub.store.clients import open_redis
    from presence_hub.store.serde import decode_state, encode_state

    now = time.time()
    state = rules.apply(
        model.UserState(), model.SessionOpened(SessionId("s1"), "desktop", "n1"), now
    ).state
    state = rules.apply(state, model.CallStarted("c0", now), now).state
    events = [model.CallStarted("c1", now), model.CallEnded("c1", now)]
    blob = encode_state(state)
    state_map = msgpack.unpackb(blob)
    frame = codec.pack(codec.presence_frame("u1", state.view))
    decode_view = msgspec.msgpack.Decoder(model.View).decode

    def _view_by_hand(p: dict[str, Any]) -> model.View:
        return model.View(status=p["status"], message=p["message"], since=p["since"], ver=p["ver"])

    commit = (
        "EVALSHA", "a" * 40, 3, "ph:{p1f}:acme:u1", "ph:{p1f}:acme:u1:ev:e1", "ph:{p1f}:timers",
        7, b"x" * 200, b"y" * 150, b"z" * 100, "acme:u1", repr(now + 60), "ph:{p1f}:acme:u1:p",
        "ph:{p1f}:acme:u1:s", 86400, b"w" * 120, "PUBLISH", "applied",
    )  # fmt: skip
    client = open_redis("redis://127.0.0.1:1")  # never connects: only its packer is used
    packing = client.connection_pool.connection_class()  # type: ignore[union-attr]
    python_packing = Connection()

    def per_call(run: Any) -> float:
        started = time.perf_counter()
        for n in range(count):
            run(n)
        return round((time.perf_counter() - started) / count * 1e6, 2)

    return {
        "rules_apply_us": per_call(lambda n: rules.apply(state, events[n % 2], now)),
        "decode_state_us": per_call(lambda n: decode_state(blob)),
        "pack_commit_redis_py_us": per_call(lambda n: python_packing.pack_command(*commit)),
        "pack_commit_hiredis_us": per_call(lambda n: packing.pack_command(*commit)),
        "pack_state_msgpack_us": per_call(lambda n: msgpack.packb(state_map)),
        "pack_state_msgspec_us": per_call(lambda n: codec.pack(state_map)),
        "decode_view_msgpack_us": per_call(lambda n: _view_by_hand(msgpack.unpackb(frame))),
        "decode_view_msgspec_us": per_call(lambda n: decode_view(frame)),
        "frame_websockets_us": per_call(
            lambda n: Frame(Opcode.BINARY, frame).serialize(mask=False)
        ),
        "frame_hub_us": per_call(lambda n: delivery._frame(Opcode.BINARY, frame)),
        **asyncio.run(_script_round_trips(count // 4)),
        **asyncio.run(_take_in(count * 2)),
    }


async def _script_round_trips(count: int) -> dict[str, float]:
    """CPU microseconds of one script call to a local Redis: in a pipeline through
    redis-py's pool (as the hub commits), and on a connection held by the caller."""
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from presence_hub.store.clients import open_redis
    from presence_hub.store.scripts import ScriptBatcher, ScriptCall

    with tempfile.TemporaryDirectory() as data:
        redis = EmbeddedRedis(Path(data), port=free_port())
        redis.start()
        client = open_redis(redis.url)
        assert isinstance(client, Redis)
        try:
            sha = await client.script_load("return 1")
            started = time.process_time()
            for _ in range(count):
                async with client.pipeline(transaction=False) as pipe:
                    pipe.execute_command("EVALSHA", sha, 0)
                    await pipe.execute()
            pooled = (time.process_time() - started) / count * 1e6
            held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            started = time.process_time()
            for _ in range(count):
                await held.send_packed_command(held.pack_command("EVALSHA", sha, 0))
                await held.read_response()
            own = (time.process_time() - started) / count * 1e6
            await client.connection_pool.release(held)
            batcher = ScriptBatcher(client)
            call: ScriptCall = (AsyncScript(client, "return 1"), [], [])
            await batcher(call)
            started = time.process_time()
            for _ in range(count):
                await batcher(call)
            batched = (time.process_time() - started) / count * 1e6
        finally:
            await client.aclose()
            redis.stop()
    return {
        "script_call_pooled_us": round(pooled, 1),
        "script_call_held_us": round(own, 1),
        "script_call_batcher_us": round(batched, 1),
    }


PUBLISHER = """
import sys, redis
from presence_hub import codec
r = redis.Redis.from_url(sys.argv[1])
frame = codec.sealed(1.0, codec.pack({"type": "presence", "user": "u", "status": "busy",
    "message": "in a meeting until noon", "since": 1.0, "ver": 7}))
channels = sys.argv[3].split(",")
for start in range(0, int(sys.argv[2]), 50):
    pipe = r.pipeline(transaction=False)
    for n in range(start, start + 50):
        pipe.publish(channels[n % len(channels)], frame)
    pipe.execute()
"""


class _Heard:
    """Counts what a listener heard, unsealed as the hub unseals it, until ``expected``."""

    def __init__(self, expected: int, *, unseal: bool = True) -> None:
        from presence_hub.delivery import Update

        self.expected, self.count, self.done = expected, 0, asyncio.Event()
        self._unseal = Update.published if unseal else None

    def __call__(self, channel: str, data: bytes) -> None:
        if self._unseal is not None:
            self._unseal(data)
        self.count += 1
        if self.count == self.expected:
            self.done.set()


async def _publish(url: str, count: int, channels: list[str]) -> None:
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, url, str(count), ",".join(channels)
    )
    await publisher.wait()


async def _take_in(count: int) -> dict[str, float]:
    """CPU microseconds for a worker to take in one published update (read, parsed and
    unsealed: ``Update.published``), heard from Redis, and heard from a relay
    (``presence_hub.relay``, in a process of its own) that forwards a loop pass's
    updates in one message; the relay's own; Redis' to publish one, and to send it to
    one more subscriber. The publisher is a process of its own, pipelining."""
    import multiprocessing

    from redis.asyncio import Redis

    from presence_hub import cli
    from presence_hub.config import Settings
    from presence_hub.store.clients import open_redis
    from presence_hub.store.keys import presence_channel
    from presence_hub.store.pubsub import Listener

    channels = [presence_channel("acme", f"u{n}") for n in range(1000)]
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as data:
        redis = EmbeddedRedis(Path(data), port=free_port())
        redis.start()
        relay_path = Path(data, "relay.sock")
        relay = multiprocessing.get_context("spawn").Process(
            target=cli._relay, args=(Settings(log_level="WARNING"), redis.url, relay_path)
        )
        relay.start()
        try:
            info = open_redis(redis.url)
            redis_proc = psutil.Process((await info.info("server"))["process_id"])
            await info.aclose()
            result.update(await _redis_per_subscriber(redis.url, channels, count, redis_proc))
            relay_proc = psutil.Process(relay.pid)
            for source in ("redis", "relay"):
                heard = _Heard(count)
                listen = open_redis(redis.url, max_connections=4, listener=True)
                relays = [cast(Redis, open_redis(f"unix://{relay_path}", listener=True))]
                listener = Listener(
                    listen, heard, lambda: None, relays=relays if source == "relay" else []
                )
                task = asyncio.create_task(listener.run())
                await asyncio.wait_for(listener.wait_ready(), 60)
                await listener.subscribe(channels)
                started, relay_started = time.process_time(), cpu_seconds([relay_proc])
                await asyncio.gather(_publish(redis.url, count, channels), heard.done.wait())
                result[f"take_in_from_{source}_us"] = round(
                    (time.process_time() - started) / count * 1e6, 1
                )
                if source == "relay":
                    relay_cpu = cpu_seconds([relay_proc]) - relay_started
                    result["relay_us_per_update"] = round(relay_cpu / count * 1e6, 1)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                for client in (listen, *relays):
                    await client.aclose()
        finally:
            relay.terminate()
            relay.join()
            redis.stop()
    return result


async def _redis_per_subscriber(
    url: str, channels: list[str], count: int, redis_proc: psutil.Process
) -> dict[str, float]:
    """Redis' CPU microseconds to publish one update, and to send it to one more
    subscriber: its CPU for ``count`` updates with 1 and with 32 listeners."""
    from presence_hub.store.clients import open_redis
    from presence_hub.store.pubsub import Listener

    used = {}
    for listeners in (1, 32):
        heard = _Heard(count * listeners, unseal=False)
        clients = [open_redis(url, max_connections=4, listener=True) for _ in range(listeners)]
        runs = [Listener(c, heard, lambda: None) for c in clients]
        tasks = [asyncio.create_task(r.run()) for r in runs]
        for r in runs:
            await asyncio.wait_for(r.wait_ready(), 60)
            await r.subscribe(channels)
        started = cpu_seconds([redis_proc])
        await asyncio.gather(_publish(url, count, channels), heard.done.wait())
        used[listeners] = cpu_seconds([redis_proc]) - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()
    return {
        "redis_publish_us": round(used[1] / count * 1e6, 1),
        "redis_per_subscriber_us": round((used[32] - used[1]) / 31 / count * 1e6, 1),
    }


def run(scenario: str) -> Any:
    scenarios: dict[str, Callable[[], Any]] = {
        "fanout": lambda: fanout([500, 1000, 2000, 4000, 6000]),
        "latency": lambda: fanout([1000]),
        "ingest": ingest,
        "connect": lambda: {f"workers_{n}": connect_storm(n) for n in (1, 2)},
        "idle": idle,
        "cores": lambda: {
            "workers_1": fanout([1000]),
            "workers_2": fanout([1000], workers=2),
            "workers_2_relays_1": fanout([1000], workers=2, relays=1),
        },
        "nodes": nodes,
        "floor": floor,
        "micro": micro,
        "instructions": instructions,
        "feed": feed,
    }
    return scenarios[scenario]()


def connect_storm(workers: int) -> dict[str, Any]:
    """10,000 clients connect and subscribe to 50 contacts each, 1,000 at a time from
    each of two load generator processes, against a hub of ``workers`` processes; and
    how many updates each of the hub's send()s carried."""
    with hub("--workers", str(workers)) as (ws, http, procs):
        args = ["--clients", "10000", "--contacts", "50", "--rate", "0", "--duration", "1"]
        args += ["--workers", "2", "--concurrency", "1000", "--settle", "0"]
        result = summary(loadtest(ws, http, procs, *args))
        counts = scrape(http, "presence_hub_deliveries_total", "presence_hub_update_writes_total")
    deliveries = counts["presence_hub_deliveries_total"]
    writes = counts["presence_hub_update_writes_total"]
    result["hub_update_writes"] = int(writes)
    result["hub_updates_per_write"] = round(deliveries / writes, 2) if writes else None
    return result


def scrape(http: str, *names: str) -> dict[str, float]:
    """Samples of the hub's /metrics, by name."""
    with urllib.request.urlopen(f"{http}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in names
    }


def instructions(clients: int = 1000) -> dict[str, Any]:
    """The instructions the hub executes for a connect storm of ``clients`` x 50 (from the
    first connection to the last disconnect, the final check included), counted by
    valgrind's callgrind: unlike CPU time, the same for the same code whatever else a
    shared machine is doing (two runs differ by about 1 %), so it compares two versions
    of the connect path. Python runs about 50 times slower under it, so fewer clients
    connect at once than in ``connect`` (more at once make more keepalive rounds fall
    within the storm, and the count then depends on the timing)."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("the instructions scenario needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as out:
        counts = Path(out) / "callgrind.out"
        tool = [valgrind, "--tool=callgrind", "--instr-atstart=no"]
        with hub(under=[*tool, f"--callgrind-out-file={counts}"], wait=900) as (ws, http, procs):
            pid = str(procs[0].pid)
            subprocess.run([control, "-i", "on", pid], check=True, stdout=subprocess.DEVNULL)
            report = loadtest(
                ws, http, procs, "--clients", str(clients), "--contacts", "50", "--rate", "0",
                "--duration", "1", "--workers", "2", "--concurrency", "200", "--settle", "0",
            )  # fmt: skip
            subprocess.run([control, "-i", "off", pid], check=True, stdout=subprocess.DEVNULL)
        # The hub has exited: its counts are on disk.
        total = next(
            int(line.split()[1])
            for line in counts.read_text().splitlines()
            if line.startswith("totals:")
        )
    return {
        "clients": clients,
        "connected": report["connected"],
        "errors": report["errors"],
        "instructions": total,
        "instructions_per_client": round(total / max(1, report["connected"])),
    }


def ingest() -> dict[str, Any]:
    """Each way in against a fresh hub of its own, so that neither starts on the users
    the other filled with remembered calls."""
    result = {}
    runs: list[tuple[str, Callable[[str, str], Coroutine[Any, Any, float]]]] = [
        ("http", lambda ws, http: ingest_http(http)),
        ("ws", lambda ws, http: ingest_ws(ws)),
    ]
    for name, load in runs:
        with hub() as (ws, http, procs):
            cpu, own, started = cpu_seconds(procs), time.process_time(), time.time()
            rate = asyncio.run(load(ws, http))
            used = cpu_seconds(procs) - cpu
            result[f"{name}_load_generator_cpu_share"] = round(
                (time.process_time() - own) / (time.time() - started), 2
            )
            result[f"{name}_events_per_second"] = round(rate, 1)
            result[f"{name}_hub_cpu_share"] = round(used / (time.time() - started), 2)
            result[f"{name}_hub_cpu_us_per_event"] = round(
                used / (rate * (time.time() - started)) * 1e6, 1
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        choices=range(1, 11),
        metavar="N",
        help="run the scenario N times (1-10); the JSON then holds every run, in order",
    )
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], help="the load generator's event loop"
    )
    parser.add_argument(
        "--storm-rate", type=int, metavar="N", help="the hubs' --storm-rate (0: no storm hold)"
    )
    opts = parser.parse_args()
    if opts.loop:
        LOADTEST_FLAGS.extend(["--loop", opts.loop])
    if opts.storm_rate is not None:
        HUB_FLAGS.extend(["--storm-rate", str(opts.storm_rate)])
    results = []
    for _ in range(opts.repeat):
        results.append(run(opts.scenario))
        print(json.dumps(results[-1], indent=2), flush=True)
    result = results[0] if opts.repeat == 1 else results
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{opts.scenario}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
