"""One hub node: the WebSocket endpoint of PROTOCOL.md, sessions and leases. Wiring only:
the rules decide, the store commits and publishes, the hub fans out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, cast
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from redis.asyncio import Redis
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from presence_hub import codec, model, rules
from presence_hub.api import make_app
from presence_hub.auth import Claims, TokenVerifier, bearer_token
from presence_hub.codec import FORMATS
from presence_hub.config import Settings
from presence_hub.delivery import Connection
from presence_hub.errors import AuthError, StoreError, UnsafeRedis
from presence_hub.hub import Hub
from presence_hub.ids import SessionId
from presence_hub.keepalive import HeardConnection, keep_alive
from presence_hub.limits import AddressRates
from presence_hub.metrics import Metrics
from presence_hub.session import Session, SessionContext
from presence_hub.store import PresenceStore
from presence_hub.store.clients import RedisClient
from presence_hub.store.nodes import NodeRegistry
from presence_hub.store.safety import check_redis
from presence_hub.webhooks import WebhookDispatcher, Webhooks

__all__ = ["WS_PATH", "Node"]

log = logging.getLogger(__name__)

WS_PATH: Final = "/v1/ws"


@dataclass(frozen=True, slots=True)
class _Admission:
    claims: Claims
    device: model.Device


class Node:
    """A hub node: serve() until stop(); any number of nodes may share one Redis."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        pubsub_redis: RedisClient,
        tokens: TokenVerifier,
        *,
        lease_redis: RedisClient | None = None,
        relays: Sequence[Redis] = (),
    ) -> None:
        """``lease_redis``, when given, carries the node's lease renewals; ``relays``,
        when given, are listened to instead of Redis (``presence_hub.relay``)."""
        self.settings = settings
        self.tokens = tokens
        self.id = uuid.uuid4().hex[:12]
        self.metrics = Metrics()
        self.store = PresenceStore(
            redis,
            on_corrupt_record=self.metrics.corrupt_records.inc,
            feed_retention=settings.feed_retention,
            node=self.id,
        )
        self.registry = NodeRegistry(
            redis, self.id, settings.lease, lease_redis=lease_redis, batcher=self.store.batcher
        )
        self.hub = Hub(
            self.store, pubsub_redis, self.metrics, storm_rate=settings.storm_rate, relays=relays
        )
        self.store.local = self.hub
        self.webhooks = Webhooks(redis, self.store.feed)
        self._admissions: weakref.WeakKeyDictionary[ServerConnection, _Admission] = (
            weakref.WeakKeyDictionary()
        )
        #: Admitted handshakes not yet welcomed (one that fails is garbage, and leaves).
        self._handshaking: weakref.WeakSet[ServerConnection] = weakref.WeakSet()
        self._address_rates = AddressRates(settings.connect_rate, settings.connect_burst)
        self._origins = (
            None
            if settings.allowed_origins is None
            else {o.strip() for o in settings.allowed_origins.split(",") if o.strip()}
        )
        self.tls = self._tls_context()
        self._tasks: list[asyncio.Task[None]] = []
        self._server: Server | None = None
        self._http: web.AppRunner | None = None
        self._cleanup: set[asyncio.Task[None]] = set()
        #: True while the node takes WebSocket connections (for /readyz).
        self.accepting = False
        #: What makes the Redis unsafe, for /readyz's body.
        self.redis_warnings: list[str] = []
        self._session_context = SessionContext(
            settings=settings,
            store=self.store,
            hub=self.hub,
            metrics=self.metrics,
            verify=tokens.verify,
            expire_at=self._expire_at,
        )

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
        if self.tokens.jwks is not None:
            # The first tokens find the keys at hand; a provider down now is retried.
            await self.tokens.jwks.fetch()
            self._tasks.append(asyncio.create_task(self.tokens.jwks.run(), name="jwks"))
        if self.settings.feed_retention > 0:
            dispatcher = WebhookDispatcher(self.webhooks, self.id, self.metrics)
            self._tasks.append(asyncio.create_task(dispatcher.run(), name="webhooks"))
            await asyncio.wait_for(dispatcher.first_round.wait(), 30)
        self._tasks.append(asyncio.create_task(self._keep_lease(), name="lease"))
        self._tasks.append(
            asyncio.create_task(
                keep_alive(lambda: [c.ws for c in self.hub.connections], self.settings.keepalive),
                name="keepalive",
            )
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
            create_connection=HeardConnection,
            # Updates never wait on a socket's receive side; keep its queue short.
            max_queue=4,
            backlog=4096,
            ssl=self.tls,
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
            ssl_context=self.tls,
        ).start()
        self.accepting = True
        secure = "s" if self.tls is not None else ""
        log.info(
            "node %s listening on ws%s://%s:%d%s and http%s://%s:%d",
            self.id,
            secure,
            self.settings.host,
            self.ws_port,
            WS_PATH,
            secure,
            self.settings.host,
            self.http_port,
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        return context

    def reload_tls(self) -> None:
        """Load the certificate again (SIGHUP): new connections get it, open ones stay."""
        if self.tls is None:
            return
        try:
            self.tls.load_cert_chain(self.settings.tls_cert or "", self.settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, the old one stays: %s", exc)
            return
        log.info("TLS certificate reloaded from %s", self.settings.tls_cert)

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
        await self.store.stop()
        if self._http is not None:
            await self._http.cleanup()
        with contextlib.suppress(StoreError):
            await self.registry.deregister()
        log.info("node %s stopped", self.id)

    # --- Leases -------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.registry.renew_every)
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

    # --- The handshake --------------------------------------------------------------

    async def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != WS_PATH:
            return ws.respond(HTTPStatus.NOT_FOUND, f"not found; the WebSocket is at {WS_PATH}\n")
        origin = request.headers.get("Origin")
        if self._origins is not None and origin is not None and origin not in self._origins:
            return self._refuse(ws, "origin", HTTPStatus.FORBIDDEN, "origin not allowed")
        if not self._address_rates.allow(str(ws.remote_address[0]) if ws.remote_address else ""):
            return self._refuse(
                ws, "connect_rate", HTTPStatus.TOO_MANY_REQUESTS, "too many new connections"
            )
        if len(self._handshaking) >= self.settings.max_handshakes:
            return self._refuse(
                ws, "handshakes", HTTPStatus.SERVICE_UNAVAILABLE, "too many handshakes at once"
            )
        query = parse_qs(url.query)
        token = bearer_token(request.headers.get("Authorization", ""))
        token = token or next(iter(query.get("access_token", [])), None)
        if not token:
            return _unauthorized(ws, "missing token")
        device = (query.get("device") or ["desktop"])[0]
        if device not in model.DEVICES:
            return ws.respond(HTTPStatus.BAD_REQUEST, "device must be desktop, mobile or web\n")
        self._handshaking.add(ws)
        try:
            claims = await self.tokens.verify(token)
        except AuthError as exc:
            self._handshaking.discard(ws)
            return _unauthorized(ws, str(exc))
        self._admissions[ws] = _Admission(claims, device)
        return None

    def _refuse(
        self, ws: ServerConnection, limit: str, status: HTTPStatus, reason: str
    ) -> Response:
        """A handshake that a limit refuses: counted, and, unless forbidden, to retry."""
        self.metrics.refused(limit).inc()
        if status == HTTPStatus.FORBIDDEN:
            return ws.respond(status, reason + "\n")
        response = ws.respond(status, f"{reason}; retry later\n")
        response.headers["Retry-After"] = "1"
        return response

    # --- A connection ---------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(ws)
        claims = admission.claims
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_send_buffer)
        conn = Connection(
            cast(HeardConnection, ws),  # serve(create_connection=HeardConnection)
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
                conn.tenant,
                conn.user,
                model.SessionOpened(
                    conn.session,
                    conn.device,
                    self.id,
                    # Call servers may share one producer identity: people have the limit.
                    self.settings.max_sessions_per_user if claims.role == "user" else None,
                ),
            )
        except (StoreError, TimeoutError) as exc:
            self._handshaking.discard(ws)
            self.hub.leave(conn)
            self.metrics.redis_errors.inc()
            log.warning("refusing %s/%s: %s", conn.tenant, conn.user, exc)
            with contextlib.suppress(ConnectionClosed):
                await conn.send(codec.error_frame("unavailable", "store unavailable; retry later"))
            await ws.close(1011, "store unavailable")
            return
        self._handshaking.discard(ws)
        if opened.result == "refused":
            await self._refuse_session(ws, conn)
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
            await Session(self._session_context, conn, claims).serve()
        finally:
            self.metrics.connected(conn.device).dec()
            conn.stop()
            self.hub.leave(conn)
            logout = ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
            ended: model.Input = (
                model.SessionClosed(conn.session)
                if logout
                else model.SessionDropped(conn.session, self.settings.grace)
            )
            task = asyncio.create_task(self._end_session(conn, ended))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

    async def _refuse_session(self, ws: ServerConnection, conn: Connection) -> None:
        """One session more than the user may hold: said, then closed (1008)."""
        self.hub.leave(conn)
        self.metrics.refused("sessions_per_user").inc()
        limit = self.settings.max_sessions_per_user
        log.warning("refusing %s/%s: %d sessions already", conn.tenant, conn.user, limit)
        with contextlib.suppress(ConnectionClosed):
            await conn.send(
                codec.error_frame("limit_exceeded", f"at most {limit} sessions for one user")
            )
        await ws.close(1008, "too many sessions")
        with contextlib.suppress(StoreError):
            await self.registry.remove_session(conn.session)

    async def _end_session(self, conn: Connection, ended: model.Input) -> None:
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


def _select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return next((name for name in offered if name in FORMATS), None)


def _unauthorized(ws: ServerConnection, reason: str) -> Response:
    response = ws.respond(HTTPStatus.UNAUTHORIZED, reason + "\n")
    response.headers["WWW-Authenticate"] = 'Bearer realm="presence-hub"'
    return response
