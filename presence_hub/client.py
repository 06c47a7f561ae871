"""An asyncio client for presence-hub: desktop-style clients and event producers.

``PresenceClient`` keeps one WebSocket open for as long as it is used: it
reconnects after any drop with exponential backoff and full jitter (so that
thousands of clients that lost a node do not come back in one wave),
resubscribes with the ``ver`` it holds of every contact (the hub answers with
only what changed), and merges every snapshot and update into a live mapping
by ``ver``, so a late or duplicate frame never overwrites newer state::

    async with PresenceClient("ws://127.0.0.1:8765/v1/ws", token) as client:
        await client.subscribe(["bob", "carol"])
        await client.set_status("busy")
        async for presence in client.updates():
            print(presence.user, presence.status)

``ProducerClient`` posts call and meeting events over HTTP. Every client takes
``wss://`` and ``https://`` URLs, and ``ca_file``: the CA (or self-signed
certificate) to trust instead of the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

import aiohttp
import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

__all__ = [
    "HubError",
    "Presence",
    "PresenceClient",
    "ProducerClient",
    "backoff_delay",
]

log = logging.getLogger(__name__)

SUBPROTOCOLS: Final = {"msgpack": "presence.v1.msgpack", "json": "presence.v1.json"}
#: The hub takes at most this many users in one request.
CHUNK: Final = 1000

TokenSource = str | Callable[[], str | Awaitable[str]]


class HubError(Exception):
    """The hub answered a request with an ``error`` frame, or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    status: str
    message: str | None
    since: float | None
    ver: int

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Presence:
        return cls(m["user"], m["status"], m.get("message"), m.get("since"), m["ver"])


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt, 32)))


class PresenceClient:
    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        device: str = "desktop",
        fmt: str = "msgpack",
        reconnect: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        activity_interval: float = 30.0,
        request_timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        if fmt not in SUBPROTOCOLS:
            raise ValueError("fmt must be msgpack or json")
        self.url = url
        #: websockets takes ``ssl`` for wss:// only.
        self._tls: dict[str, Any] = (
            {"ssl": tls_context(ca_file) or True} if url.startswith("wss:") else {}
        )
        self.device = device
        self.fmt = fmt
        self._token = token
        self._reconnect = reconnect
        self._backoff = (backoff_base, backoff_cap)
        self._activity_interval = activity_interval
        self._request_timeout = request_timeout
        self._presence: dict[str, Presence] = {}
        self._watched: set[str] = set()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: set[asyncio.Queue[Presence]] = set()
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._last_activity = -float("inf")
        self._first_welcome: asyncio.Future[dict[str, Any]] | None = None
        #: The user's own state (the Self map), kept current by the hub.
        self.me: dict[str, Any] = {}
        #: The latest ``welcome`` frame.
        self.welcome: dict[str, Any] = {}
        #: How many times the connection was established.
        self.connections = 0

    # --- Lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> PresenceClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, and keep connecting; returns once the first ``welcome`` arrived."""
        self._first_welcome = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run())
        await asyncio.wait_for(asyncio.shield(self._first_welcome), self._request_timeout)

    async def close(self) -> None:
        """Log out: close with 1000, which ends the session at once."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close(1000)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- State ----------------------------------------------------------------------

    @property
    def presence(self) -> Mapping[str, Presence]:
        """Every known contact's presence, newest ``ver`` first-come; read-only and live."""
        return MappingProxyType(self._presence)

    async def updates(self) -> AsyncIterator[Presence]:
        """Every change of a contact's presence, as it is merged."""
        queue: asyncio.Queue[Presence] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)

    # --- Requests -------------------------------------------------------------------

    async def set_status(self, status: str, until: float | None = None) -> None:
        """``until``: when it becomes ``available`` by itself (Unix seconds); None: never."""
        await self._request({"type": "set_status", "status": status, "until": until})

    async def set_message(self, text: str | None, expires_at: float | None = None) -> None:
        await self._request({"type": "set_message", "text": text, "expires_at": expires_at})

    async def set_settings(self, auto_away_after: float | None) -> None:
        await self._request({"type": "set_settings", "auto_away_after": auto_away_after})

    async def activity(self) -> None:
        """Report that the person interacted with the app: call it on every input event;
        at most one report per ``activity_interval`` reaches the hub."""
        now = time.monotonic()
        if now - self._last_activity < self._activity_interval or not self.connected:
            return
        self._last_activity = now
        with contextlib.suppress(ConnectionClosed):
            await self._send({"type": "activity"})

    async def subscribe(self, users: Iterable[str]) -> list[Presence]:
        wanted = list(dict.fromkeys(users))
        self._watched.update(wanted)
        presences: list[Presence] = []
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            reply = await self._request({"type": "subscribe", "users": chunk})
            presences.extend(self._merge_all(reply["presences"]))
        return presences

    async def unsubscribe(self, users: Iterable[str]) -> None:
        gone = list(dict.fromkeys(users))
        self._watched.difference_update(gone)
        for start in range(0, len(gone), CHUNK):
            await self._request({"type": "unsubscribe", "users": gone[start : start + CHUNK]})
        for user in gone:
            self._presence.pop(user, None)

    async def query(self, users: Sequence[str]) -> list[Presence]:
        found: list[Presence] = []
        for start in range(0, len(users), CHUNK):
            chunk = list(users[start : start + CHUNK])
            reply = await self._request({"type": "query", "users": chunk})
            found.extend(Presence.from_map(p) for p in reply["presences"])
        return found

    async def refresh_token(self, token: TokenSource) -> None:
        """Hand the hub a fresh token before the current one expires."""
        self._token = token
        await self._request({"type": "auth", "token": await self._current_token()})

    async def send_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Post a producer event over the WebSocket (needs a producer token); its result,
        as ``POST /v1/events`` gives it: ``result`` and, when rejected, ``error``."""
        reply = await self._request({"type": "event", "event": dict(event)})
        return {k: reply[k] for k in ("result", "error") if k in reply}

    # --- Plumbing -------------------------------------------------------------------

    async def _current_token(self) -> str:
        token = self._token
        if isinstance(token, str):
            return token
        value = token()
        return value if isinstance(value, str) else await value

    def _encode(self, frame: Mapping[str, Any]) -> bytes | str:
        if self.fmt == "json":
            return json.dumps(frame, separators=(",", ":"))
        return msgpack.packb(frame)  # type: ignore[no-any-return]

    def _decode(self, data: bytes | str) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(data) if self.fmt == "json" else msgpack.unpackb(data)
        return frame

    async def _send(self, frame: Mapping[str, Any]) -> None:
        await asyncio.wait_for(self._connected.wait(), self._request_timeout)
        ws = self._ws
        if ws is None:  # dropped again between the wake-up and now
            raise HubError("unavailable", "the connection closed; retry")
        await ws.send(self._encode(frame))

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._send({**frame, "id": rid})
            reply = await asyncio.wait_for(future, self._request_timeout)
        except (ConnectionClosed, TimeoutError) as exc:
            raise HubError("unavailable", "no answer from the hub; retry") from exc
        finally:
            self._pending.pop(rid, None)
            # The connection may have failed it after the send failed: nobody waits.
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()
        if reply["type"] == "error":
            raise HubError(reply["code"], reply["message"])
        return reply

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                headers = {"Authorization": f"Bearer {await self._current_token()}"}
                async with connect(
                    f"{self.url}?device={self.device}",
                    additional_headers=headers,
                    subprotocols=[Subprotocol(SUBPROTOCOLS[self.fmt])],
                    max_size=None,
                    **self._tls,
                ) as ws:
                    await self._serve(ws)
                    attempt = 0
            except InvalidStatus as exc:
                if exc.response.status_code == 401 and isinstance(self._token, str):
                    self._fail(HubError("unauthorized", "the hub refused the token"))
                    return
                log.info("hub refused the connection: %s", exc)
            except InvalidURI as exc:
                self._fail(HubError("bad_request", str(exc)))
                return
            except ssl.SSLCertVerificationError as exc:
                # Retrying would not change it: the wrong hub, or a CA not given.
                self._fail(HubError("untrusted_certificate", exc.verify_message or str(exc)))
                return
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                log.info("connection lost: %s", exc)
                if not self._reconnect:
                    self._fail(HubError("unavailable", f"could not connect: {exc}"))
            finally:
                self._connected.clear()
                self._ws = None
            if self._closing or not self._reconnect:
                return
            await asyncio.sleep(backoff_delay(attempt, *self._backoff))
            attempt += 1

    def _fail(self, error: HubError) -> None:
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(error)

    async def _serve(self, ws: ClientConnection) -> None:
        welcome = self._decode(await ws.recv())
        self.welcome = welcome
        self.me = dict(welcome.get("self", {}))
        self._ws = ws
        self.connections += 1
        self._connected.set()
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_result(welcome)
        reader = asyncio.create_task(self._read(ws))
        try:
            if self.connections > 1 and self._watched:
                await self._resubscribe()
            await reader
        finally:
            reader.cancel()

    async def _resubscribe(self) -> None:
        """After a reconnect: one cheap resync, the hub sends only what changed."""
        users = sorted(self._watched)
        for start in range(0, len(users), CHUNK):
            chunk = users[start : start + CHUNK]
            known = {u: self._presence[u].ver for u in chunk if u in self._presence}
            reply = await self._request({"type": "subscribe", "users": chunk, "known": known})
            self._merge_all(reply["presences"])

    async def _read(self, ws: ClientConnection) -> None:
        try:
            await self._dispatch_frames(ws)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(HubError("unavailable", "the connection closed; retry"))

    async def _dispatch_frames(self, ws: ClientConnection) -> None:
        async for data in ws:
            frame = self._decode(data)
            kind = frame.get("type")
            rid = frame.get("id")
            if rid is not None and isinstance(rid, int) and rid in self._pending:
                future = self._pending[rid]
                if not future.done():
                    future.set_result(frame)
            elif kind == "presence":
                self._merge(frame)
            elif kind == "presences":
                self._merge_all(frame["items"])
            elif kind == "self" and frame.get("ver", 0) >= self.me.get("ver", -1):
                self.me = {k: v for k, v in frame.items() if k != "type"}

    def _merge_all(self, maps: Iterable[Mapping[str, Any]]) -> list[Presence]:
        return [self._merge(m) for m in maps]

    def _merge(self, m: Mapping[str, Any]) -> Presence:
        incoming = Presence.from_map(m)
        current = self._presence.get(incoming.user)
        if current is not None and current.ver >= incoming.ver:
            return current
        self._presence[incoming.user] = incoming
        for queue in self._listeners:
            queue.put_nowait(incoming)
        return incoming


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """A context that trusts ``ca_file``; none: the default (the system's CAs)."""
    return None if ca_file is None else ssl.create_default_context(cafile=ca_file)


class HttpClient:
    """A client of the hub's HTTP API with one token: an HTTP session for the length
    of an ``async with`` block."""

    timeout: aiohttp.ClientTimeout = aiohttp.client.DEFAULT_TIMEOUT

    def __init__(self, base_url: str, token: str, *, ca_file: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._tls = tls_context(ca_file)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=self.timeout,
            connector=aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"use {type(self).__name__} in an async with block")
        return self._session


class ProducerClient(HttpClient):
    """Posts producer events, and asks for presence, over the hub's HTTP API."""

    def __init__(
        self, base_url: str, token: str, *, use_msgpack: bool = False, ca_file: str | None = None
    ) -> None:
        super().__init__(base_url, token, ca_file=ca_file)
        self._msgpack = use_msgpack

    async def post_events(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One result per event, in order; raises HubError for a refused request."""
        body = {"events": list(events)}
        if self._msgpack:
            request = self.session.post(
                f"{self.base_url}/v1/events",
                data=msgpack.packb(body),
                headers={"Content-Type": "application/msgpack"},
            )
        else:
            request = self.session.post(f"{self.base_url}/v1/events", json=body)
        async with request as response:
            answer = await response.json()
            if response.status != 200:
                raise HubError(str(response.status), answer.get("error", ""))
        results: list[dict[str, Any]] = answer["results"]
        return results

    async def presence(self, users: Sequence[str]) -> list[dict[str, Any]]:
        """Each user's presence with ``accepts_calls``, for routing a call."""
        url = f"{self.base_url}/v1/presence"
        async with self.session.get(url, params={"users": ",".join(users)}) as response:
            answer = await response.json()
            if response.status != 200:
                raise HubError(str(response.status), answer.get("error", ""))
        presences: list[dict[str, Any]] = answer["presences"]
        return presences
