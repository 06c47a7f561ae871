"""The HTTP API of PROTOCOL.md, for producers, call routing and operators. Wiring only."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Final, Protocol

from aiohttp import web

from presence_hub import codec, model, rules
from presence_hub.auth import Claims, Role, TokenVerifier, bearer_token
from presence_hub.config import Settings
from presence_hub.errors import AuthError, FrameError, StoreError
from presence_hub.events import MAX_EVENTS, apply_events
from presence_hub.ids import UserId, are_valid_ids, is_valid_id
from presence_hub.metrics import Metrics
from presence_hub.store import PresenceStore
from presence_hub.store.feed import Cursor, CursorExpired
from presence_hub.webhooks import Webhook, Webhooks


class NodeView(Protocol):
    """What the HTTP API needs of a node: the API does not depend on the server."""

    tokens: TokenVerifier
    settings: Settings
    store: PresenceStore
    metrics: Metrics
    #: True while the node takes WebSocket connections.
    accepting: bool
    #: What makes the node's Redis unsafe, if anything.
    redis_warnings: list[str]
    webhooks: Webhooks

    @property
    def ws_port(self) -> int:
        """The port the node's WebSocket endpoint listens on."""


__all__ = ["MAX_BODY", "NodeView", "make_app"]

#: MAX_EVENTS events of the largest allowed size fit well within this.
MAX_BODY: Final = 2 * 1024 * 1024

#: The Content-Encodings of a body the hub inflates itself (aiohttp's would answer 500
#: for a corrupt one, and 400 for one it lacks a library for); any other answers 415.
BODY_ENCODINGS: Final = ("identity", "gzip", "deflate")
MSGPACK_TYPES: Final = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NODE: web.AppKey[NodeView] = web.AppKey("node")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _authorize(request: web.Request, roles: tuple[Role, ...]) -> Claims:
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "missing bearer token"}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="presence-hub"'},
        )
    try:
        claims = await request.app[NODE].tokens.verify(token)
    except AuthError as exc:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": str(exc)}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="presence-hub"'},
        ) from exc
    if claims.role not in roles:
        raise web.HTTPForbidden(
            text=json.dumps({"error": f"needs the {' or '.join(roles)} role"}),
            content_type="application/json",
        )
    return claims


async def post_events(request: web.Request) -> web.Response:
    arrived = time.time()
    claims = await _authorize(request, ("producer", "admin"))
    node = request.app[NODE]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:
        return _error(415, f"Content-Encoding must be one of {', '.join(BODY_ENCODINGS)}")
    raw = await request.read()  # over MAX_BODY: aiohttp answers 413
    if encoding != "identity":
        try:
            raw = _decompress(raw)
        except zlib.error as exc:
            return _error(400, f"malformed body: not {encoding}: {exc}")
    fmt: codec.Format = "msgpack" if request.content_type in MSGPACK_TYPES else "json"
    try:
        body = codec.load(raw, fmt)
    except FrameError as exc:
        return _error(400, f"malformed body: {exc.message}")
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return _error(400, 'the body must be {"events": [Event, ...]}')
    events = body["events"]
    if len(events) > MAX_EVENTS:
        return _error(413, f"at most {MAX_EVENTS} events in a request")
    with node.metrics.store_op("events").time():
        results = await apply_events(
            node.store, claims.tenant, events, origin=arrived, metrics=node.metrics
        )
    return web.json_response({"results": results})


def _decompress(raw: bytes) -> bytes:
    """A gzip or zlib body, inflated to at most MAX_BODY (a small bomb is no large body)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # either header
    body = inflater.decompress(raw, MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
    if not inflater.eof:
        raise zlib.error("truncated")
    return body


async def get_presence(request: web.Request) -> web.Response:
    claims = await _authorize(request, ("producer", "admin"))
    node = request.app[NODE]
    users = [u for u in request.query.get("users", "").split(",") if u]
    if not users or not are_valid_ids(users):
        return _error(400, "users must be a comma-separated list of user ids")
    limit = node.settings.max_users_per_request
    if len(users) > limit:
        return _error(400, f"at most {limit} users in a request")
    presences = []
    states = await node.store.load_many(claims.tenant, [UserId(u) for u in users])
    for user, state in zip(users, states, strict=True):
        presence = codec.presence_map(user, state.view)
        presence["accepts_calls"] = rules.accepts_calls(state)
        presences.append(presence)
    return web.json_response({"presences": presences})


FEED_KEEPALIVE: Final = 15.0


async def get_changes(request: web.Request) -> web.StreamResponse:
    """PROTOCOL.md's change feed as Server-Sent Events, from a cursor or from now."""
    claims = await _authorize(request, ("producer", "admin"))
    node = request.app[NODE]
    feed = node.store.feed
    if feed.retention <= 0:
        return _error(404, "the change feed is off (--feed-retention 0)")
    users = [u for u in request.query.get("users", "").split(",") if u]
    if not are_valid_ids(users):
        return _error(400, "users must be a comma-separated list of user ids")
    if len(users) > node.settings.max_users_per_request:
        return _error(400, f"at most {node.settings.max_users_per_request} users")
    given = request.headers.get("Last-Event-ID") or request.query.get("after")
    try:
        after = await feed.present() if given is None else Cursor.parse(given)
        feed.check(after)
    except ValueError:
        return _error(400, "not a cursor of this feed")
    except CursorExpired:
        return _error(410, "cursor_expired")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    wanted = [UserId(u) for u in users] or None
    quiet_since = time.monotonic()
    try:
        # Until the reader leaves, or the node stops (the reader resumes elsewhere).
        while node.accepting:
            changes, after, caught_up = await feed.read(claims.tenant, after, wanted)
            for change in changes:
                presence = codec.unpack(change.frame)
                del presence["type"]
                data = json.dumps(presence, separators=(",", ":"))
                # write() waits for a slow reader: what is in memory is one round.
                await response.write(
                    f"event: presence\nid: {change.cursor}\ndata: {data}\n\n".encode()
                )
            if changes:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > FEED_KEEPALIVE:
                await response.write(b": keep-alive\n\n")
                quiet_since = time.monotonic()
            if caught_up:
                await feed.wait(claims.tenant, after)
    except (ConnectionResetError, StoreError):
        # The reader left, or Redis did: a reader resumes from its last event's id.
        pass
    return response


async def put_webhook(request: web.Request) -> web.Response:
    claims = await _authorize(request, ("admin",))
    name = request.match_info["name"]
    if not is_valid_id(name):
        return _error(400, "not a valid webhook name")
    try:
        body = codec.load(await request.read(), "json")
    except FrameError as exc:
        return _error(400, f"malformed body: {exc.message}")
    if not isinstance(body, dict):
        return _error(400, 'the body must be {"url": ..., "secret": ..., "users": [...]?}')
    url, secret, users = body.get("url"), body.get("secret"), body.get("users")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
        return _error(400, "url must be an http:// or https:// URL")
    if not isinstance(secret, str) or not 16 <= len(secret) <= 256:
        return _error(400, "secret must be a string of 16 to 256 characters")
    if users is not None and (not isinstance(users, list) or not users or not are_valid_ids(users)):
        return _error(400, "users must be a list of user ids, or absent for the whole tenant")
    limit = request.app[NODE].settings.max_users_per_request
    if users is not None and len(users) > limit:
        return _error(400, f"at most {limit} users")
    hook = Webhook(claims.tenant, name, url, secret, users)
    await request.app[NODE].webhooks.put(hook)
    return web.json_response(hook.public())


async def list_webhooks(request: web.Request) -> web.Response:
    claims = await _authorize(request, ("admin",))
    webhooks = request.app[NODE].webhooks
    listed = [
        {**hook.public(), "status": await webhooks.status(hook)}
        for hook in await webhooks.of(claims.tenant)
    ]
    return web.json_response({"webhooks": listed})


async def delete_webhook(request: web.Request) -> web.Response:
    claims = await _authorize(request, ("admin",))
    name = request.match_info["name"]
    if not await request.app[NODE].webhooks.delete(claims.tenant, name):
        return _error(404, "no such webhook")
    return web.json_response({"deleted": name})


async def explain(request: web.Request) -> web.Response:
    claims = await _authorize(request, ("admin",))
    node = request.app[NODE]
    user = request.match_info["user"]
    if not is_valid_id(user):
        return _error(400, "not a valid user id")
    stored = await node.store.load(claims.tenant, UserId(user))
    # What the state is now, even if a due timer has not fired yet; nothing is written.
    state = rules.apply(stored, model.TimerFired(), time.time()).state
    status, rule = rules.decide(state)
    return web.json_response(
        {
            "user": user,
            "effective": status,
            "rule": rule,
            "reason": rules.RULE_REASONS[rule],
            "presence": codec.presence_map(user, state.view),
            "manual": state.manual,
            "manual_until": state.manual_until,
            "at_manual_until": _at_manual_until(state),
            "message": state.message,
            "message_expires_at": state.message_expires_at,
            "sessions": [
                {
                    "session": sid,
                    "device": s.device,
                    "node": s.node,
                    "since": s.since,
                    "grace_until": s.grace_until,
                }
                for sid, s in state.sessions.items()
            ],
            "calls": _activities(state.calls),
            "meetings": _activities(state.meetings),
            "last_activity": state.last_activity,
            "auto_away_after": state.auto_away_after,
            "idle": state.idle,
            "corrupt_record": await node.store.corrupt.kept(claims.tenant, UserId(user)),
        }
    )


def _at_manual_until(state: model.UserState) -> dict[str, Any] | None:
    """What the user's status becomes when the manual status ends, all else as now."""
    if state.manual_until is None:
        return None
    then = rules.apply(state, model.TimerFired(), state.manual_until).state
    status, rule = rules.decide(then)
    return {"manual": then.manual, "effective": status, "reason": rules.RULE_REASONS[rule]}


def _activities(open_ones: Mapping[str, model.Activity]) -> list[dict[str, Any]]:
    return [
        {"ref": ref, "started": a.started, "expires_at": a.deadline} for ref, a in open_ones.items()
    ]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    problems = []
    try:
        await node.store.redis.ping()
    except Exception:  # any failure to answer means not ready
        problems.append("redis does not answer")
    if not node.accepting:
        problems.append("not accepting connections")
    body: dict[str, Any] = {"status": "ready"}
    if problems:
        body = {"status": "unavailable", "problems": problems}
    if node.redis_warnings:
        body["warnings"] = node.redis_warnings
    return web.json_response(body, status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE].metrics.exposition()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


#: The contact-list page (built from clients/js/page/ into presence_hub/static/).
PAGE_FILES: Final = {"/": ("index.html", "text/html"), "/page.js": ("page.js", "text/javascript")}


async def page(request: web.Request) -> web.Response:
    name, content_type = PAGE_FILES[request.path]
    body = resources.files("presence_hub").joinpath("static", name).read_bytes()
    return web.Response(
        body=body, content_type=content_type, charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


async def page_config(request: web.Request) -> web.Response:
    """Where the page finds the WebSocket endpoint: on the host it was loaded from."""
    return web.json_response({"ws_port": request.app[NODE].ws_port, "ws_path": "/v1/ws"})


async def openapi(request: web.Request) -> web.Response:
    document = resources.files("presence_hub").joinpath("openapi.json").read_bytes()
    return web.Response(body=document, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers ``{"error": ...}``, aiohttp's own (404, 405, 413) included;
    Redis away is 503, so that producers retry (nothing half-done stays visible)."""
    try:
        return await handler(request)
    except StoreError as exc:
        request.app[NODE].metrics.redis_errors.inc()
        return web.json_response({"error": f"store unavailable: {exc}"}, status=503)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return web.json_response(
            {"error": exc.reason}, status=exc.status, headers=_kept_headers(exc)
        )


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}


def make_app(node: NodeView) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app[NODE] = node
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/presence", get_presence)
    app.router.add_get("/v1/changes", get_changes)
    app.router.add_get("/v1/webhooks", list_webhooks)
    app.router.add_put("/v1/webhooks/{name}", put_webhook)
    app.router.add_delete("/v1/webhooks/{name}", delete_webhook)
    app.router.add_get("/v1/users/{user}/explain", explain)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    for path in PAGE_FILES:
        app.router.add_get(path, page)
    app.router.add_get("/page/config", page_config)
    return app
