"""One hub node: the WebSocket endpoint of PROTOCOL.md, sessions and leases. Wiring only:
the rules decide, the store commits and publishes, the hub fans out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
import uuid
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from presence_hub import codec, rules
from presence_hub.api import make_app
from presence_hub.auth import Claims, bearer_token, verify_token
from presence_hub.codec import FORMATS
from presence_hub.config import Settings
from presence_hub.delivery import Connection
from presence_hub.errors import AuthError, FrameError, StoreError, StoreUnavailable, UnsafeRedis
from presence_hub.events import MAX_EVENTS, apply_events
from presence_hub.hub import Hub
from presence_hub.ids import SessionId, TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.store import PresenceStore
from presence_hub.store.nodes import NodeRegistry
from presence_hub.store.safety import check_redis
from presence_hub.store.store import RedisClient

__all__ = ["WS_PATH", "Node"]

log = logging.getLogger(__name__)

WS_PATH: Final = "/v1/ws"
#: Refused frames in a row (rate-limited) after which a connection is closed with 1008.
ABUSE_LIMIT: Final = 100
#: Seconds between two slices of a keepalive round.
KEEPALIVE_SLICE: Final = 0.05


@dataclass(frozen=True, slots=True)
class _Admission:
    claims: Claims
    device: rules.Device


class _RateLimit:
    """A token bucket: ``rate`` frames a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _EventBatcher:
    """A producer's event frames, applied in batches: the frames that arrive while one
    batch is being applied form the next, so a producer that pipelines its events gets
    the batch path of ``POST /v1/events``, with batches as large as its. Replies go out
    in the order of the frames."""

    def __init__(self, node: Node, conn: Connection) -> None:
        self.node = node
        self.conn = conn
        self.queue: list[tuple[codec.RequestId, Any, float]] = []
        self.flusher: asyncio.Task[None] | None = None
        self.room = asyncio.Event()
        self.room.set()

    async def take(self, data: bytes | str) -> bool:
        """Queue ``data`` if it is a well-formed event frame; False for any other frame."""
        try:
            request = codec.decode_request(data, self.conn.fmt)
        except FrameError:
            return False
        if not isinstance(request, codec.EventRequest):
            return False
        self.node.metrics.received("event").inc()
        await self.room.wait()
        self.queue.append((request.id, request.event, time.time()))
        if len(self.queue) >= MAX_EVENTS:
            self.room.clear()
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())
        return True

    async def _flush(self) -> None:
        node, conn = self.node, self.conn
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                self.room.set()
                try:
                    with node.metrics.store_op("events").time():
                        results = await apply_events(
                            node.store,
                            conn.tenant,
                            [event for _, event, _ in batch],
                            origin=batch[0][2],
                            metrics=node.metrics,
                        )
                    replies = [
                        codec.event_reply(rid, result)
                        for (rid, _, _), result in zip(batch, results, strict=True)
                    ]
                except (StoreUnavailable, TimeoutError):
                    node.metrics.redis_errors.inc()
                    replies = [
                        codec.error_frame("unavailable", "store unavailable; retry later", rid)
                        for rid, _, _ in batch
                    ]
                except Exception:
                    log.exception("internal error applying events for %s", conn.tenant)
                    replies = [
                        codec.error_frame("internal", "internal error", rid) for rid, _, _ in batch
                    ]
                await conn.send_all(replies)
        except ConnectionClosed:
            pass
        except TimeoutError:
            await conn.close_stalled()
        finally:
            self.flusher = None
            # A reader waiting for room must not wait for a flusher that is gone.
            self.room.set()

    def stop(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()


class Node:
    """A hub node: serve() until stop(); any number of nodes may share one Redis."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        pubsub_redis: RedisClient,
        secret: str,
        *,
        lease_redis: RedisClient | None = None,
    ) -> None:
        """``lease_redis``, when given, carries the node's lease renewals."""
        self.settings = settings
        self.secret = secret
        self.id = uuid.uuid4().hex[:12]
        self.metrics = Metrics()
        self.store = PresenceStore(redis, on_corrupt_record=self.metrics.corrupt_records.inc)
        self.registry = NodeRegistry(
            redis, self.id, settings.lease, lease_redis=lease_redis, batcher=self.store.batcher
        )
        self.hub = Hub(self.store, pubsub_redis, self.metrics, storm_rate=settings.storm_rate)
        self._admissions: weakref.WeakKeyDictionary[ServerConnection, _Admission] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._server: Server | None = None
        self._http: web.AppRunner | None = None
        self._cleanup: set[asyncio.Task[None]] = set()
        #: True while the node takes WebSocket connections (for /readyz).
        self.accepting = False
        #: What makes the Redis unsafe, for /readyz's body.
        self.redis_warnings: list[str] = []

    @property
    def ws_port(self) -> int:
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def http_port(self) -> int:
        assert self._http is not None
        port: int = self._http.addresses[0][1]
        return port

    async def start(self) -> None:
        await self._check_redis()
        self._tasks.append(asyncio.create_task(self.hub.run(), name="hub"))
        await asyncio.wait_for(self.hub.wait_ready(), 30)
        await self.registry.register()
        self._tasks.append(asyncio.create_task(self.store.run_timers(), name="timers"))
        self._tasks.append(asyncio.create_task(self._keep_lease(), name="lease"))
        self._tasks.append(
            asyncio.create_task(self._keep_alive(self.settings.keepalive), name="keepalive")
        )
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.ws_port,
            process_request=self._admit,
            select_subprotocol=_select_subprotocol,
            max_size=self.settings.max_frame,
            # Presence frames are small; deflate would cost more CPU than it saves.
            compression=None,
            reuse_port=self.settings.workers > 1,
            # One keepalive loop for the node (below) instead of a task per socket.
            ping_interval=None,
            # Updates never wait on a socket's receive side; keep its queue short.
            max_queue=4,
            backlog=4096,
        )
        self._http = web.AppRunner(
            make_app(self), access_log=None, handle_signals=False, auto_decompress=False
        )
        await self._http.setup()
        await web.TCPSite(
            self._http,
            self.settings.host,
            self.settings.http_port,
            reuse_port=self.settings.workers > 1,
        ).start()
        self.accepting = True
        log.info(
            "node %s listening on ws://%s:%d%s and http://%s:%d",
            self.id,
            self.settings.host,
            self.ws_port,
            WS_PATH,
            self.settings.host,
            self.http_port,
        )

    async def _check_redis(self) -> None:
        """Refuse a Redis that evicts keys unless the settings accept it; warn of one
        that persists nothing (in the log, and in /readyz)."""
        safety = await check_redis(self.store.redis)
        if safety.evicting and not self.settings.allow_evicting_redis:
            raise UnsafeRedis(
                "; ".join(safety.evicting) + " (or accept it with --allow-evicting-redis)"
            )
        self.redis_warnings = [*safety.evicting, *safety.warnings]
        for warning in self.redis_warnings:
            log.warning("unsafe Redis: %s", warning)

    async def stop(self, code: int = 1001) -> None:
        """Close every socket with ``code``; their sessions enter the grace period."""
        self.accepting = False
        if self._server is not None:
            self._server.close(close_connections=False)
            await asyncio.gather(
                *(c.ws.close(code, "node shutting down") for c in list(self.hub.connections)),
                return_exceptions=True,
            )
            await self._server.wait_closed()
        if self._cleanup:
            await asyncio.wait(self._cleanup, timeout=10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.cleanup()
        with contextlib.suppress(StoreError):
            await self.registry.deregister()
        log.info("node %s stopped", self.id)

    # --- Leases -------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.registry.renew_every))
            try:
                if not await self.registry.renew():
                    log.error("node %s was declared dead; closing its sockets", self.id)
                    await asyncio.gather(
                        *(c.ws.close(1012, "reconnect") for c in list(self.hub.connections)),
                        return_exceptions=True,
                    )
                    await self.registry.register()
                reaped = await self.registry.reap(self.store)
                if reaped:
                    log.info("expired %d sessions of dead nodes", reaped)
            except StoreError as exc:
                log.warning("lease not renewed: %s", exc)

    async def _keep_alive(self, every: float) -> None:
        """Ping every socket once a round; a socket that has not answered the previous
        round's ping, sent at least half a round ago, is dead (a half-open TCP
        connection) and is closed, so its session drops.

        A round is spread over slices of about 50 ms: thousands of pings written in one
        pass of the event loop, and their pongs read in the next, would hold up every
        delivery for as long."""
        loop = asyncio.get_running_loop()
        #: Socket -> when its last ping went out, and its pong.
        pinged: dict[Connection, tuple[float, Awaitable[float]]] = {}
        slices = max(1, round(every / KEEPALIVE_SLICE))
        while True:
            this_round: dict[Connection, tuple[float, Awaitable[float]]] = {}
            conns = list(self.hub.connections)
            size = -(-len(conns) // slices)  # rounded up
            for n in range(slices):
                await asyncio.sleep(every / slices)
                for conn in conns[n * size : (n + 1) * size]:
                    if conn.ws.paused:
                        continue  # a full socket is the backlog writer's to judge (send_timeout)
                    previous = pinged.get(conn)
                    if previous is not None and not previous[1].done():  # type: ignore[attr-defined]
                        if loop.time() - previous[0] >= every / 2:
                            conn.ws.transport.abort()
                        else:
                            this_round[conn] = previous
                        continue
                    with contextlib.suppress(ConnectionClosed):
                        this_round[conn] = (loop.time(), await conn.ws.ping())
            pinged = this_round

    # --- The handshake --------------------------------------------------------------

    def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != WS_PATH:
            return ws.respond(HTTPStatus.NOT_FOUND, f"not found; the WebSocket is at {WS_PATH}\n")
        query = parse_qs(url.query)
        token = bearer_token(request.headers.get("Authorization", ""))
        token = token or next(iter(query.get("access_token", [])), None)
        if not token:
            return _unauthorized(ws, "missing token")
        try:
            claims = verify_token(token, self.secret)
        except AuthError as exc:
            return _unauthorized(ws, str(exc))
        device = (query.get("device") or ["desktop"])[0]
        if device not in rules.DEVICES:
            return ws.respond(HTTPStatus.BAD_REQUEST, "device must be desktop, mobile or web\n")
        self._admissions[ws] = _Admission(claims, device)
        return None

    # --- A connection ---------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(ws)
        claims = admission.claims
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_send_buffer)
        conn = Connection(
            ws,
            FORMATS.get(ws.subprotocol or "", "msgpack"),
            tenant=claims.tenant,
            user=claims.user,
            session=SessionId(secrets.token_hex(16)),
            device=admission.device,
            send_timeout=self.settings.send_timeout,
            metrics=self.metrics,
            flusher=self.hub.flusher,
        )
        self.hub.flusher.opened()
        try:
            await self.hub.join(conn)
            await self.registry.add_session(conn.session, conn.tenant, conn.user)
            opened = await self.store.apply(
                conn.tenant, conn.user, rules.SessionOpened(conn.session, conn.device, self.id)
            )
        except (StoreError, TimeoutError) as exc:
            self.hub.leave(conn)
            self.metrics.redis_errors.inc()
            log.warning("refusing %s/%s: %s", conn.tenant, conn.user, exc)
            with contextlib.suppress(ConnectionClosed):
                await conn.send(codec.error_frame("unavailable", "store unavailable; retry later"))
            await ws.close(1011, "store unavailable")
            return
        assert opened.outcome is not None
        own = rules.self_view(opened.outcome.state)
        conn.self_ver = max(conn.self_ver, own.ver)
        await conn.send(
            codec.welcome_frame(conn.session, conn.user, conn.tenant, conn.device, time.time(), own)
        )
        log.info(
            "session %s opened: %s/%s on %s", conn.session, conn.tenant, conn.user, conn.device
        )
        self.metrics.opened(conn.device).inc()
        self.metrics.connected(conn.device).inc()
        conn.start(own.ver)
        self._expire_at(conn, claims.expires_at)
        try:
            await self._serve(conn, claims)
        finally:
            self.metrics.connected(conn.device).dec()
            conn.stop()
            self.hub.leave(conn)
            logout = ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
            ended: rules.Input = (
                rules.SessionClosed(conn.session)
                if logout
                else rules.SessionDropped(conn.session, self.settings.grace)
            )
            task = asyncio.create_task(self._end_session(conn, ended))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

    async def _end_session(self, conn: Connection, ended: rules.Input) -> None:
        """Record the end of a session; while Redis is away retry; the lease is the backstop."""
        for attempt in range(600):
            try:
                await self.store.apply(conn.tenant, conn.user, ended)
                await self.registry.remove_session(conn.session)
                log.info("session %s ended (%s)", conn.session, type(ended).__name__)
                return
            except StoreError as exc:
                if attempt == 0:
                    log.warning("session %s end deferred: %s", conn.session, exc)
                await asyncio.sleep(1.0)

    def _expire_at(self, conn: Connection, expires_at: float) -> None:
        """Close the socket with 1008 when its token expires (a timer, not a task: cheap)."""
        if conn.expiry is not None:
            conn.expiry.cancel()
        loop = asyncio.get_running_loop()

        def expire() -> None:
            task = loop.create_task(conn.ws.close(1008, "token expired"))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

        conn.expiry = loop.call_at(loop.time() + max(0.0, expires_at - time.time()), expire)

    async def _serve(self, conn: Connection, claims: Claims) -> None:
        s = self.settings
        producer = claims.role == "producer"
        limit = (
            _RateLimit(s.producer_rate_limit, s.producer_rate_burst)
            if producer
            else _RateLimit(s.rate_limit, s.rate_burst)
        )
        events = _EventBatcher(self, conn) if producer else None
        refused = 0
        try:
            async for data in conn.ws:
                if not limit.allow():
                    refused += 1
                    if refused >= ABUSE_LIMIT:
                        await conn.ws.close(1008, "too many frames")
                        return
                    await conn.send(
                        codec.error_frame(
                            "rate_limited", "slow down", codec.request_id(data, conn.fmt)
                        )
                    )
                    continue
                refused = 0
                if events is not None and await events.take(data):
                    continue
                reply = await self._answer(conn, claims, data)
                if reply is not None:
                    await conn.send(reply)
        except ConnectionClosed:
            pass
        finally:
            if events is not None:
                events.stop()

    async def _answer(
        self, conn: Connection, claims: Claims, data: bytes | str
    ) -> dict[str, Any] | None:
        request_id: codec.RequestId = None
        arrived = time.time()
        try:
            try:
                request = codec.decode_request(data, conn.fmt)
            except FrameError:
                self.metrics.received("invalid").inc()
                raise
            self.metrics.received(request.type).inc()
            request_id = request.id
            return await self._dispatch(conn, claims, request, arrived)
        except FrameError as exc:
            rid = exc.request_id if exc.request_id is not None else request_id
            return codec.error_frame(exc.code, exc.message, rid)
        except (StoreUnavailable, TimeoutError):
            self.metrics.redis_errors.inc()
            return codec.error_frame("unavailable", "store unavailable; retry later", request_id)
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("internal error answering %s/%s", conn.tenant, conn.user)
            return codec.error_frame("internal", "internal error", request_id)

    async def _dispatch(
        self, conn: Connection, claims: Claims, request: codec.Request, arrived: float
    ) -> dict[str, Any] | None:
        s = self.settings

        async def apply(tenant: TenantId, user: UserId, change: rules.Input) -> None:
            with self.metrics.store_op("apply").time():
                await self.store.apply(tenant, user, change, origin=arrived)

        match request:
            case codec.SetStatus(status=status):
                await apply(conn.tenant, conn.user, rules.ManualStatusSet(status))
            case codec.SetMessage(text=text, expires_at=expires_at):
                if expires_at is not None and expires_at <= time.time():
                    raise FrameError("bad_request", "expires_at is in the past")
                await apply(conn.tenant, conn.user, rules.MessageSet(text, expires_at))
            case codec.SetSettings(auto_away_after=after):
                if after is not None and not s.min_auto_away <= after <= 86400:
                    raise FrameError(
                        "bad_request",
                        f"auto_away_after must be {s.min_auto_away:g} to 86400 seconds, or null",
                    )
                await apply(conn.tenant, conn.user, rules.SettingsChanged(after))
            case codec.ActivityReport():
                await apply(conn.tenant, conn.user, rules.ActivitySeen())
                return None
            case codec.Subscribe(users=users, known=known):
                self._check_size(users)
                # Only a request that could pass the limit pays for counting its new users.
                if len(conn.watching) + len(users) > s.max_subscriptions:
                    fresh = {u for u in users if u not in conn.watching}
                    if len(conn.watching) + len(fresh) > s.max_subscriptions:
                        raise FrameError(
                            "limit_exceeded", f"at most {s.max_subscriptions} subscriptions"
                        )
                await self.hub.watch(conn, users)
                presences = await self._snapshot(conn, users, known)
                return codec.snapshot_frame(request.id, presences)
            case codec.Unsubscribe(users=users):
                self._check_size(users)
                self.hub.unwatch(conn, users)
            case codec.Query(users=users):
                self._check_size(users)
                presences = await self._snapshot(conn, users, {})
                return codec.snapshot_frame(request.id, presences)
            case codec.AuthRefresh(token=token):
                try:
                    fresh_claims = verify_token(token, self.secret)
                except AuthError as exc:
                    raise FrameError("bad_request", str(exc)) from exc
                if (fresh_claims.user, fresh_claims.tenant) != (claims.user, claims.tenant):
                    raise FrameError("forbidden", "the token is for another user")
                self._expire_at(conn, fresh_claims.expires_at)
            case codec.EventRequest():
                # A producer's events never get here: its _EventBatcher takes them.
                raise FrameError("forbidden", "events need the producer role")
        return codec.ok_frame(request.id)

    def _check_size(self, users: list[UserId]) -> None:
        limit = self.settings.max_users_per_request
        if len(users) > limit:
            raise FrameError("limit_exceeded", f"at most {limit} users in a request")

    async def _snapshot(
        self, conn: Connection, users: list[UserId], known: dict[UserId, int]
    ) -> list[codec.Presence]:
        unique = list(dict.fromkeys(users))
        with self.metrics.store_op("views").time():
            views = await self.store.views(conn.tenant, unique)
        watching = conn.watching
        presences = []
        for user, view in zip(unique, views, strict=True):
            ver = view.ver
            handed = watching.get(user)
            if handed is not None and ver > handed:
                watching[user] = ver
            if not known or known.get(user) != ver:
                presences.append(codec.Presence(user, view.status, view.message, view.since, ver))
        return presences


def _select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return next((name for name in offered if name in FORMATS), None)


def _unauthorized(ws: ServerConnection, reason: str) -> Response:
    response = ws.respond(HTTPStatus.UNAUTHORIZED, reason + "\n")
    response.headers["WWW-Authenticate"] = 'Bearer realm="presence-hub"'
    return response
