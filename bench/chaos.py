#!/usr/bin/env python3
"""Chaos: two hub nodes on one Redis (AOF on) under a few hundred clients that change
their statuses and messages, and a producer posting calls, while Redis is restarted,
Redis is paused (SIGSTOP) for longer than the clients' request timeout, and one node
is killed with SIGKILL and started again. Then it checks:

- no acknowledged write was lost: every user's manual status, message and open calls
  are the last ones the hub acknowledged, and the setting each wrote once before the
  first fault is still there (``explain``);
- every subscriber's view of every contact equals the truth (``GET /v1/presence``);
- no ``ver`` of a user reached a client twice with different content;
- no Presence ever carried ``invisible``;
- no user is online without a live session once every client has dropped and the
  grace and the lease have passed;
- a backend following the change feed, by a webhook and by a stream, ends on the
  truth too, with every signature right, and each user's changes in ver order (a
  webhook's batch may come again, never out of order);

and reports, for each fault, how long until a change reached every client again.

    bench/chaos.py            the long form (300 clients; Redis paused 35 s)
    bench/chaos.py --short    the short form that scripts/test runs (60 clients, 3 s)

Everything runs on loopback, bounded in time; the report is printed and written to
bench/results/chaos.json. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from presence_hub.auth import issue_token  # noqa: E402
from presence_hub.changes import ChangeFollower  # noqa: E402
from presence_hub.client import HubError, Presence, PresenceClient  # noqa: E402
from presence_hub.signature import HEADER, verify  # noqa: E402
from presence_hub.store import EmbeddedRedis  # noqa: E402
from presence_hub.store.embedded import free_port  # noqa: E402

SECRET = "chaos-secret-chaos-secret-chaos-secret"
TENANT = "chaos"
PROBE = "probe"
RESULTS = ROOT / "bench" / "results"
MANUALS = ["available", "busy", "dnd", "away", "invisible"]


@dataclass(frozen=True)
class Form:
    clients: int
    contacts: int
    steady: float
    pause: float
    grace: float = 2.0
    lease: float = 6.0
    #: The clients' request timeout: the pause is longer than it in the long form.
    request_timeout: float = 10.0


FORMS = {
    "long": Form(clients=300, contacts=10, steady=15.0, pause=35.0),
    "short": Form(clients=60, contacts=8, steady=4.0, pause=3.0),
}


def token(user: str, role: str = "user") -> str:
    return issue_token(SECRET, tenant=TENANT, user=user, role=role, ttl=3600)  # type: ignore[arg-type]


class Node:
    """``presence-hub serve`` in a child process, on ports it keeps across restarts."""

    def __init__(self, name: str, redis_url: str, form: Form, logs: Path) -> None:
        self.name = name
        self.ws_port, self.http_port = free_port(), free_port()
        self.url = f"ws://127.0.0.1:{self.ws_port}/v1/ws"
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.log = logs / f"{name}.log"
        self.args = [
            sys.executable, "-m", "presence_hub", "serve", "--redis-url", redis_url,
            "--secret", SECRET, "--ws-port", str(self.ws_port), "--http-port",
            str(self.http_port), "--grace", str(form.grace), "--lease", str(form.lease),
            "--rate-limit", "1000", "--rate-burst", "1000", "--log-level", "WARNING",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.process = self._spawn()
        async with asyncio.timeout(60):
            while True:
                assert self.process.poll() is None, f"node {self.name} exited"
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.ws_port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                return

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " ERROR " in line][:10]


class RecordingClient(PresenceClient):
    """A client that remembers every (user, ver) it was handed, to find a version
    delivered twice with different content, or a Presence that shows invisible."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[tuple[str, int], tuple[str, str | None, float | None]] = {}
        self.conflicts: list[str] = []
        self.invisible: list[str] = []

    def _merge(self, m: Mapping[str, Any]) -> Presence:
        key = (m["user"], m["ver"])
        content = (m["status"], m.get("message"), m.get("since"))
        if m["status"] == "invisible":
            self.invisible.append(f"{m['user']} ver {m['ver']}")
        if self.seen.setdefault(key, content) != content:
            self.conflicts.append(f"{m['user']} ver {m['ver']}: {self.seen[key]} then {content}")
        return super()._merge(m)

    def drop(self) -> None:
        """End the connection as a crash would: no close frame."""
        self._closing = True
        if self._ws is not None:
            self._ws.transport.abort()
        if self._runner is not None:
            self._runner.cancel()


class Backend:
    """A backend that follows the change feed by a webhook and by a stream: each user's
    changes in the order they came, and what went wrong."""

    HOOK_SECRET: ClassVar = "chaos-webhook-secret-0123456789"
    ADMIN: ClassVar = {"Authorization": f"Bearer {token('ops', 'admin')}"}

    def __init__(self) -> None:
        self.hooked: dict[str, list[dict[str, Any]]] = {}
        self.streamed: dict[str, list[dict[str, Any]]] = {}
        self.bad_signatures = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, http: aiohttp.ClientSession, node: Node) -> asyncio.Task[None]:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        body = {"url": f"http://127.0.0.1:{port}/hook", "secret": self.HOOK_SECRET}
        async with http.put(self._hook(node), json=body, headers=self.ADMIN) as r:
            assert r.status == 200, await r.text()
        return asyncio.create_task(self._follow(node))

    async def stop(self, http: aiohttp.ClientSession, node: Node) -> None:
        async with http.delete(self._hook(node), headers=self.ADMIN) as r:
            assert r.status == 200, await r.text()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _hook(node: Node) -> str:
        return f"{node.http}/v1/webhooks/chaos"

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.HOOK_SECRET, request.headers.get(HEADER, ""), body):
            self.bad_signatures += 1
            return web.Response(status=401)
        for change in json.loads(body)["changes"]:
            self.hooked.setdefault(change["presence"]["user"], []).append(change["presence"])
        return web.Response(status=204)

    async def _follow(self, node: Node) -> None:
        async with ChangeFollower(node.http, token("crm", "producer"), backoff=(0.2, 2.0)) as feed:
            async for change in feed:
                self.streamed.setdefault(change.presence["user"], []).append(change.presence)

    @staticmethod
    def stale(got: dict[str, list[dict[str, Any]]], truth: Mapping[str, Any]) -> list[str]:
        wrong = []
        for user, want in truth.items():
            last = max(got.get(user, []), key=lambda p: p["ver"], default=None)
            if last is None or (last["status"], last["message"], last["ver"]) != (
                want["status"],
                want["message"],
                want["ver"],
            ):
                wrong.append(f"{user}: {last}, not {want}")
        return wrong

    @staticmethod
    def out_of_order(got: dict[str, list[dict[str, Any]]], repeats: bool) -> list[str]:
        wrong = []
        for user, changes in got.items():
            seen: set[int] = set()
            for p in changes:
                if p["ver"] <= max(seen, default=0) and not (repeats and p["ver"] in seen):
                    wrong.append(f"{user}: ver {p['ver']} after {max(seen)}")
                seen.add(p["ver"])
        return wrong


@dataclass
class Truth:
    """What the hub acknowledged, per user; a write never acknowledged leaves both the
    old and the new value possible."""

    manual: dict[str, set[str]] = field(default_factory=dict)
    message: dict[str, set[str | None]] = field(default_factory=dict)
    calls: dict[str, set[str]] = field(default_factory=dict)
    #: Users with a call event never acknowledged: their calls cannot be checked.
    calls_uncertain: set[str] = field(default_factory=set)
    acknowledged: int = 0
    retries: int = 0
    refused: list[str] = field(default_factory=list)


async def until_acknowledged(
    truth: Truth, write: Callable[[], Awaitable[Any]], deadline: float
) -> bool:
    """Retry ``write`` (idempotent) while the hub is unavailable, up to ``deadline``."""
    while time.monotonic() < deadline:
        try:
            await write()
            truth.acknowledged += 1
            return True
        except HubError as exc:
            if exc.code != "unavailable":
                truth.refused.append(str(exc))
                return False
            truth.retries += 1
            await asyncio.sleep(0.2)
    return False


async def write_loop(
    client: RecordingClient, user: str, truth: Truth, stop: asyncio.Event, rng: random.Random
) -> None:
    truth.manual[user], truth.message[user] = {"available"}, {None}
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        if rng.random() < 0.5:
            status = rng.choice(MANUALS)
            old, truth.manual[user] = truth.manual[user], truth.manual[user] | {status}
            done = await until_acknowledged(
                truth, partial(client.set_status, status), time.monotonic() + 90
            )
            truth.manual[user] = {status} if done else old | {status}
        else:
            text = rng.choice([None, f"note {rng.randrange(1000)}"])
            before, truth.message[user] = truth.message[user], truth.message[user] | {text}
            done = await until_acknowledged(
                truth, partial(client.set_message, text), time.monotonic() + 90
            )
            truth.message[user] = {text} if done else before | {text}


async def post_until_acknowledged(
    http: aiohttp.ClientSession, nodes: list[Node], event: dict[str, Any], deadline: float
) -> bool:
    headers = {"Authorization": f"Bearer {token('pbx', 'producer')}"}
    attempt = 0
    while time.monotonic() < deadline:
        node = nodes[attempt % len(nodes)]
        attempt += 1
        try:
            async with http.post(
                f"{node.http}/v1/events", json={"events": [event]}, headers=headers
            ) as r:
                if r.status == 200:
                    (result,) = (await r.json())["results"]
                    return bool(result["result"] in ("applied", "duplicate"))
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    return False


async def producer_loop(
    http: aiohttp.ClientSession,
    nodes: list[Node],
    users: list[str],
    truth: Truth,
    stop: asyncio.Event,
    rng: random.Random,
) -> None:
    n = 0
    while not stop.is_set():
        await asyncio.sleep(0.1)
        n += 1
        user = rng.choice(users)
        open_calls = truth.calls.setdefault(user, set())
        ending = bool(open_calls) and rng.random() < 0.6
        ref = next(iter(open_calls)) if ending else f"call-{n}"
        kind = "call_ended" if ending else "call_started"
        event = {"event_id": f"e-{n}", "kind": kind, "user": user, "ref": ref, "at": time.time()}
        if not await post_until_acknowledged(http, nodes, event, time.monotonic() + 90):
            truth.calls_uncertain.add(user)
            continue
        truth.acknowledged += 1
        if ending:
            open_calls.discard(ref)
        else:
            open_calls.add(ref)


async def time_to_flow(
    probe: RecordingClient, clients: list[RecordingClient], label: str, truth: Truth
) -> float | None:
    """From now until a change of the probe user has reached every client."""
    started = time.monotonic()
    text = f"after {label}"
    if not await until_acknowledged(truth, lambda: probe.set_message(text), started + 120):
        return None
    while time.monotonic() < started + 120:
        if all((p := c.presence.get(PROBE)) is not None and p.message == text for c in clients):
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.05)
    return None


async def admin_get(http: aiohttp.ClientSession, url: str) -> Any:
    headers = {"Authorization": f"Bearer {token('ops', 'admin')}"}
    async with http.get(url, headers=headers) as r:
        r.raise_for_status()
        return await r.json()


async def presences(http: aiohttp.ClientSession, node: Node, users: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for start in range(0, len(users), 200):
        chunk = ",".join(users[start : start + 200])
        body = await admin_get(http, f"{node.http}/v1/presence?users={chunk}")
        found.update({p["user"]: p for p in body["presences"]})
    return found


def stale_views(clients: list[RecordingClient], truth: Mapping[str, Any]) -> list[str]:
    wrong = []
    for client in clients:
        for user, seen in client.presence.items():
            want = truth[user]
            if (seen.status, seen.message, seen.ver) != (
                want["status"],
                want["message"],
                want["ver"],
            ):
                wrong.append(f"{client.welcome.get('user')} sees {user} as {seen}, not {want}")
    return wrong


async def run(form: Form, seed: int, *, aof: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    report: dict[str, Any] = {"form": form.__dict__, "seed": seed, "aof": aof}
    with tempfile.TemporaryDirectory(prefix="presence-hub-chaos-") as tmp:
        off = () if aof else ("--appendonly", "no")
        redis = EmbeddedRedis(Path(tmp) / "redis", port=free_port(), extra_args=off)
        redis.start()
        nodes = [Node(name, redis.url, form, Path(tmp)) for name in ("a", "b")]
        try:
            for node in nodes:
                await node.start()
            report.update(await chaos(form, rng, redis, nodes))
        finally:
            redis.send_signal(signal.SIGCONT)
            for node in nodes:
                node.stop()
            report["node_log_errors"] = {node.name: node.log_errors() for node in nodes}
            redis.stop()
    return report


async def chaos(
    form: Form, rng: random.Random, redis: EmbeddedRedis, nodes: list[Node]
) -> dict[str, Any]:
    users = [f"u{n}" for n in range(form.clients)]
    truth = Truth()
    recovery: dict[str, float | None] = {}

    def client_of(user: str, node: Node) -> RecordingClient:
        return RecordingClient(
            node.url,
            token(user),
            backoff_base=0.2,
            backoff_cap=2.0,
            request_timeout=form.request_timeout,
        )

    clients = [client_of(user, nodes[n % 2]) for n, user in enumerate(users)]
    probe = client_of(PROBE, nodes[0])
    backend = Backend()
    setup = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    async with setup:
        # The stream follows the node that is never killed; either node may deliver.
        follower = await backend.start(setup, nodes[0])
    await asyncio.gather(*(c.connect() for c in [*clients, probe]))
    for n, (client, user) in enumerate(zip(clients, users, strict=True)):
        contacts = rng.sample([u for u in users if u != user], form.contacts)
        await client.subscribe([*contacts, PROBE])
        # Written once before any fault and never again: a loss cannot be overwritten.
        await client.set_settings(3600 + n)

    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        load = [
            asyncio.create_task(write_loop(c, u, truth, stop, random.Random(rng.random())))
            for c, u in zip(clients, users, strict=True)
        ]
        load.append(asyncio.create_task(producer_loop(http, nodes, users, truth, stop, rng)))
        await asyncio.sleep(form.steady)

        redis.stop()
        redis.start()
        recovery["redis restarted"] = await time_to_flow(probe, clients, "restart", truth)
        await asyncio.sleep(form.steady)

        redis.send_signal(signal.SIGSTOP)
        await asyncio.sleep(form.pause)
        redis.send_signal(signal.SIGCONT)
        recovery[f"redis paused {form.pause:g} s"] = await time_to_flow(
            probe, clients, "pause", truth
        )
        await asyncio.sleep(form.steady)

        nodes[1].kill()
        await asyncio.sleep(2)
        await nodes[1].start()
        recovery["node killed and restarted"] = await time_to_flow(probe, clients, "kill", truth)
        await asyncio.sleep(form.steady)

        stop.set()
        async with asyncio.timeout(120):
            await asyncio.gather(*load)

        # Every acknowledged write is in the hub's state.
        lost = []
        for user in users:
            why = await admin_get(http, f"{nodes[0].http}/v1/users/{user}/explain")
            calls = {c["ref"] for c in why["calls"]}
            if why["auto_away_after"] != 3600 + users.index(user):
                lost.append(f"{user}: auto_away_after {why['auto_away_after']}")
            if why["manual"] not in truth.manual[user]:
                lost.append(f"{user}: manual {why['manual']}, acknowledged {truth.manual[user]}")
            if why["message"] not in truth.message[user]:
                lost.append(f"{user}: message {why['message']!r}, not {truth.message[user]}")
            if user not in truth.calls_uncertain and calls != truth.calls.get(user, set()):
                lost.append(f"{user}: calls {calls}, acknowledged {truth.calls.get(user)}")

        # Every subscriber's view, and the backend's, settles on the truth.
        views: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            hub_truth = await presences(http, nodes[0], [*users, PROBE])
            views = stale_views(clients, hub_truth)
            hooked = Backend.stale(backend.hooked, hub_truth)
            streamed = Backend.stale(backend.streamed, hub_truth)
            if not views and not hooked and not streamed:
                break
            await asyncio.sleep(0.5)
        follower.cancel()
        await backend.stop(http, nodes[0])

        for client in [*clients, probe]:
            client.drop()
        await asyncio.sleep(form.grace + form.lease + 3)
        left_online = [
            u for u, p in (await presences(http, nodes[0], [*users, PROBE])).items()
            if p["status"] != "offline"
        ]  # fmt: skip

    conflicts = [c for client in clients for c in client.conflicts]
    invisible = [i for client in clients for i in client.invisible]
    return {
        "recovery_s": recovery,
        "writes_acknowledged": truth.acknowledged,
        "retries": truth.retries,
        "checks": {
            "acknowledged_writes_lost": lost[:20],
            "views_not_the_truth": views[:20],
            "ver_twice_with_other_content": conflicts[:20],
            "invisible_delivered": invisible[:20],
            "online_without_a_session": left_online[:20],
            "webhook_not_the_truth": hooked[:20],
            "stream_not_the_truth": streamed[:20],
            "webhook_out_of_ver_order": Backend.out_of_order(backend.hooked, repeats=True)[:20],
            "stream_out_of_ver_order": Backend.out_of_order(backend.streamed, repeats=False)[:20],
            "webhook_bad_signatures": [backend.bad_signatures] if backend.bad_signatures else [],
            "writes_refused": truth.refused[:20],
            "faults_not_recovered": [k for k, v in recovery.items() if v is None],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--without-aof", action="store_true", help="Redis with AOF off: the checks must fail"
    )
    args = parser.parse_args()
    form = FORMS["short" if args.short else "long"]
    started = time.monotonic()
    report = asyncio.run(run(form, args.seed, aof=not args.without_aof))
    report["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    failed = [name for name, found in report["checks"].items() if found]
    print("chaos:", "failed: " + ", ".join(failed) if failed else "every check passed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
