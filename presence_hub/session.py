"""One client's session on a node: each frame decoded, checked against its limits,
turned into a rules input for the store, and answered (snapshots included). It
knows the node only through a narrow context."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from websockets.exceptions import ConnectionClosed

from presence_hub import codec, model
from presence_hub.auth import Claims
from presence_hub.config import Settings
from presence_hub.delivery import Connection
from presence_hub.errors import AuthError, FrameError, StoreUnavailable
from presence_hub.events import MAX_EVENTS, apply_events
from presence_hub.hub import Hub
from presence_hub.ids import TenantId, UserId
from presence_hub.limits import TokenBucket
from presence_hub.metrics import Metrics
from presence_hub.store import PresenceStore

__all__ = ["ABUSE_LIMIT", "Session", "SessionContext"]

log = logging.getLogger(__name__)

#: Refused frames in a row (rate-limited) after which a connection is closed with 1008.
ABUSE_LIMIT: Final = 100


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a session needs of its node."""

    settings: Settings
    store: PresenceStore
    hub: Hub
    metrics: Metrics
    #: A token's claims, or AuthError.
    verify: Callable[[str], Awaitable[Claims]]
    #: Close the connection with 1008 when its token expires (at a new time, after ``auth``).
    expire_at: Callable[[Connection, float], None]


class _EventBatcher:
    """A producer's event frames, applied in batches: the frames that arrive while one
    batch is being applied form the next, so a producer that pipelines its events gets
    the batch path of ``POST /v1/events``, with batches as large as its. Replies go out
    in the order of the frames."""

    def __init__(self, ctx: SessionContext, conn: Connection) -> None:
        self.ctx = ctx
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
        self.ctx.metrics.received("event").inc()
        await self.room.wait()
        self.queue.append((request.id, request.event, time.time()))
        if len(self.queue) >= MAX_EVENTS:
            self.room.clear()
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())
        return True

    async def _flush(self) -> None:
        ctx, conn = self.ctx, self.conn
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                self.room.set()
                try:
                    with ctx.metrics.store_op("events").time():
                        results = await apply_events(
                            ctx.store,
                            conn.tenant,
                            [event for _, event, _ in batch],
                            origin=batch[0][2],
                            metrics=ctx.metrics,
                        )
                    replies = [
                        codec.event_reply(rid, result)
                        for (rid, _, _), result in zip(batch, results, strict=True)
                    ]
                except (StoreUnavailable, TimeoutError):
                    ctx.metrics.redis_errors.inc()
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


class Session:
    """Serves one connection's frames."""

    def __init__(self, ctx: SessionContext, conn: Connection, claims: Claims) -> None:
        self.ctx = ctx
        self.conn = conn
        self.claims = claims

    async def serve(self) -> None:
        """Answer the connection's frames until it closes."""
        conn, claims = self.conn, self.claims
        s = self.ctx.settings
        producer = claims.role == "producer"
        limit = (
            TokenBucket(s.producer_rate_limit, s.producer_rate_burst)
            if producer
            else TokenBucket(s.rate_limit, s.rate_burst)
        )
        events = _EventBatcher(self.ctx, conn) if producer else None
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
                reply = await self.answer(data)
                if reply is not None:
                    await conn.send(reply)
        except ConnectionClosed:
            pass
        finally:
            if events is not None:
                events.stop()

    async def answer(self, data: bytes | str) -> dict[str, Any] | None:
        """The reply to one frame (None for a valid ``activity``): exactly one per request."""
        conn = self.conn
        request_id: codec.RequestId = None
        arrived = time.time()
        try:
            try:
                request = codec.decode_request(data, conn.fmt)
            except FrameError:
                self.ctx.metrics.received("invalid").inc()
                raise
            self.ctx.metrics.received(request.type).inc()
            request_id = request.id
            return await self._dispatch(request, arrived)
        except FrameError as exc:
            rid = exc.request_id if exc.request_id is not None else request_id
            return codec.error_frame(exc.code, exc.message, rid)
        except (StoreUnavailable, TimeoutError):
            self.ctx.metrics.redis_errors.inc()
            return codec.error_frame("unavailable", "store unavailable; retry later", request_id)
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("internal error answering %s/%s", conn.tenant, conn.user)
            return codec.error_frame("internal", "internal error", request_id)

    async def _dispatch(self, request: codec.Request, arrived: float) -> dict[str, Any] | None:
        s, conn, claims = self.ctx.settings, self.conn, self.claims

        async def apply(tenant: TenantId, user: UserId, change: model.Input) -> None:
            with self.ctx.metrics.store_op("apply").time():
                await self.ctx.store.apply(tenant, user, change, origin=arrived)

        match request:
            case codec.SetStatus(status=status, until=until):
                if until is not None and until > time.time() + model.MAX_MANUAL_DURATION:
                    raise FrameError("bad_request", "until is more than a year ahead")
                await apply(conn.tenant, conn.user, model.ManualStatusSet(status, until))
            case codec.SetMessage(text=text, expires_at=expires_at):
                if expires_at is not None and expires_at <= time.time():
                    raise FrameError("bad_request", "expires_at is in the past")
                await apply(conn.tenant, conn.user, model.MessageSet(text, expires_at))
            case codec.SetSettings(auto_away_after=after):
                if after is not None and not s.min_auto_away <= after <= 86400:
                    raise FrameError(
                        "bad_request",
                        f"auto_away_after must be {s.min_auto_away:g} to 86400 seconds, or null",
                    )
                await apply(conn.tenant, conn.user, model.SettingsChanged(after))
            case codec.ActivityReport():
                await apply(conn.tenant, conn.user, model.ActivitySeen())
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
                await self.ctx.hub.watch(conn, users)
                presences = await self._snapshot(users, known)
                return codec.snapshot_frame(request.id, presences)
            case codec.Unsubscribe(users=users):
                self._check_size(users)
                self.ctx.hub.unwatch(conn, users)
            case codec.Query(users=users):
                self._check_size(users)
                presences = await self._snapshot(users, {})
                return codec.snapshot_frame(request.id, presences)
            case codec.AuthRefresh(token=token):
                try:
                    fresh_claims = await self.ctx.verify(token)
                except AuthError as exc:
                    raise FrameError("bad_request", str(exc)) from exc
                if (fresh_claims.user, fresh_claims.tenant) != (claims.user, claims.tenant):
                    raise FrameError("forbidden", "the token is for another user")
                self.ctx.expire_at(conn, fresh_claims.expires_at)
            case codec.EventRequest():
                # A producer's events never get here: its _EventBatcher takes them.
                raise FrameError("forbidden", "events need the producer role")
        return codec.ok_frame(request.id)

    def _check_size(self, users: list[UserId]) -> None:
        limit = self.ctx.settings.max_users_per_request
        if len(users) > limit:
            raise FrameError("limit_exceeded", f"at most {limit} users in a request")

    async def _snapshot(
        self, users: list[UserId], known: dict[UserId, int]
    ) -> list[codec.Presence]:
        conn = self.conn
        unique = list(dict.fromkeys(users))
        with self.ctx.metrics.store_op("views").time():
            views = await self.ctx.store.views(conn.tenant, unique)
        watching = conn.watching
        presences = []
        for user, view in zip(unique, views, strict=True):
            ver = view.ver
            watchers = watching.get(user)
            if watchers is not None and ver > watchers[conn]:
                watchers[conn] = ver
            if not known or known.get(user) != ver:
                presences.append(codec.Presence(user, view.status, view.message, view.since, ver))
        return presences
