"""Webhooks: a tenant's changes delivered to its backends' URLs, in signed batches,
at least once.

The webhooks are kept in Redis (``ph:webhooks``), so that every node knows them.
Each is delivered by one node at a time: the node that holds its claim
(``...:owner``, renewed while the node lives, and taken over by another node once
it lapses). The deliverer reads the change feed from the webhook's acknowledged
cursor (``...:cursor``), posts a batch, and moves the cursor past it on a 2xx
answer; anything else is retried with backoff and full jitter, the same batch from
the same cursor. A node that dies mid-batch leaves the cursor where the last
acknowledged batch put it, so its successor sends that batch again: receivers drop
what they have seen by (user, ver). Each webhook is delivered by a task of its own,
so a slow or failing endpoint delays nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Final, NamedTuple, cast

import aiohttp

from presence_hub import codec, signature
from presence_hub.errors import StoreError
from presence_hub.ids import TenantId, UserId
from presence_hub.metrics import Metrics
from presence_hub.store.clients import RedisClient, redis_errors
from presence_hub.store.feed import ChangeFeed, Cursor, CursorExpired

__all__ = ["WEBHOOKS_KEY", "Plan", "Webhook", "WebhookDispatcher", "Webhooks", "plan_claims"]

log = logging.getLogger(__name__)

WEBHOOKS_KEY: Final = "ph:webhooks"
#: Seconds a stopping node spends at most handing its webhooks back.
HAND_BACK: Final = 2.0
#: The nodes that deliver webhooks (node -> until when, renewed each claim round):
#: each claims about its share of the webhooks.
DISPATCHERS_KEY: Final = "ph:webhook-nodes"
#: Changes in one delivery.
BATCH: Final = 500
#: PROTOCOL.md: a 2xx answer within 10 seconds acknowledges a batch.
DELIVERY_TIMEOUT: Final = 10.0
#: How long a node's claim on a webhook lasts unless renewed; renewed every third.
CLAIM: Final = 10.0
#: Retry delays: full jitter under a doubling bound from FIRST_RETRY up to LAST_RETRY.
FIRST_RETRY: Final = 0.5
LAST_RETRY: Final = 60.0
#: Failures in a row from which a webhook is reported as failing.
FAILING: Final = 5


@dataclass(frozen=True, slots=True)
class Webhook:
    tenant: str
    name: str
    url: str
    secret: str
    #: Only these users' changes; None: the whole tenant's.
    users: list[str] | None = None

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}"

    def public(self) -> dict[str, Any]:
        """What the admin API shows of it: everything but the secret."""
        return {"name": self.name, "url": self.url, "users": self.users}


@dataclass(slots=True)
class Status:
    """How a webhook's deliveries go, kept in Redis for ``GET /v1/webhooks``."""

    cursor: str | None = None
    delivered: int = 0
    failures_in_a_row: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_delivery_at: float | None = None
    node: str | None = None


def _part(webhook_key: str, part: str) -> str:
    return f"ph:webhook:{webhook_key}:{part}"


class Webhooks:
    """The registry of webhooks, in Redis."""

    def __init__(self, redis: RedisClient, feed: ChangeFeed) -> None:
        self.redis = redis
        self.feed = feed
        #: Set when this node registers a webhook: its dispatcher claims it at once.
        self.added = asyncio.Event()

    async def put(self, hook: Webhook) -> None:
        """Register (or replace) a webhook; a new one delivers what changes from now."""
        with redis_errors():
            cursor = _part(hook.key, "cursor")
            await self.redis.set(cursor, str(await self.feed.present()), nx=True)
            await self.redis.hset(WEBHOOKS_KEY, hook.key, json.dumps(asdict(hook)))
        self.added.set()

    async def delete(self, tenant: TenantId, name: str) -> bool:
        key = f"{tenant}/{name}"
        with redis_errors():
            removed: int = await self.redis.hdel(WEBHOOKS_KEY, key)
            await self.redis.delete(*(_part(key, p) for p in ("cursor", "owner", "status")))
        return removed > 0

    async def all(self) -> list[Webhook]:
        with redis_errors():
            found = cast("dict[bytes, bytes]", await self.redis.hgetall(WEBHOOKS_KEY))
        return [Webhook(**json.loads(v)) for _, v in sorted(found.items())]

    async def of(self, tenant: TenantId) -> list[Webhook]:
        return [h for h in await self.all() if h.tenant == tenant]

    async def status(self, hook: Webhook) -> dict[str, Any]:
        with redis_errors():
            raw = await self.redis.get(_part(hook.key, "status"))
            cursor = cast("bytes | None", await self.redis.get(_part(hook.key, "cursor")))
        status = json.loads(raw) if raw else asdict(Status())
        status["cursor"] = cursor.decode() if cursor else None
        status["failing"] = status["failures_in_a_row"] >= FAILING
        return status


class Plan(NamedTuple):
    """A claim round's moves: the claims a node renews, hands back and tries to take,
    and the lapsed webhooks it leaves to the others this round."""

    renew: list[str]
    hand_back: list[str]
    take: list[str]
    left: set[str]


def plan_claims(
    holders: dict[str, bytes | None], mine: bytes, dispatchers: int, left_before: set[str]
) -> Plan:
    """``holders``: each webhook's claim holder (None: lapsed). A node renews its own
    claims (one whose delivery ended is delivered again) up to its share of the
    webhooks, the webhooks over the ``dispatchers``, and one more; it hands back the
    rest. It takes lapsed webhooks up to its share, and any it left to the others a
    round before (``left_before``): one that nobody took is taken whatever the share."""
    share = -(-len(holders) // max(1, dispatchers))
    own = [key for key, holder in holders.items() if holder == mine]
    kept = own[: share + 1]  # one over its share is no reason to move
    lapsed = [key for key, holder in holders.items() if holder is None]
    room = max(0, share - len(kept))
    take = [key for n, key in enumerate(lapsed) if n < room or key in left_before]
    return Plan(kept, own[len(kept) :], take, set(lapsed) - set(take))


class WebhookDispatcher:
    """A node's side of the deliveries: claims webhooks nobody delivers, and delivers
    each it holds from a task of its own."""

    def __init__(self, webhooks: Webhooks, node: str, metrics: Metrics) -> None:
        self.webhooks = webhooks
        self.redis = webhooks.redis
        self.feed = webhooks.feed
        self.node = node
        self.metrics = metrics
        self._delivering: dict[str, asyncio.Task[None]] = {}
        #: Webhook -> the cursor its delivery moved on to past other changes only, not
        #: yet saved: the claim round saves it with the renewal, so that a node taking
        #: over starts near it, and a quiet webhook costs no round trip of its own.
        self._quiet: dict[str, Cursor] = {}
        #: Set once the first claim round is over (the node counts among those that
        #: deliver, unless Redis failed it).
        self.first_round = asyncio.Event()
        #: Lapsed webhooks this node left to the others at its last round.
        self._lapsed: set[str] = set()

    async def run(self) -> None:
        """Claim and deliver until cancelled; survives Redis outages."""
        timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                while True:
                    try:
                        await self._claim_round(http)
                    except StoreError as exc:
                        log.warning("webhooks paused: Redis unavailable (%s)", exc)
                    self.first_round.set()
                    added = self.webhooks.added
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(added.wait(), CLAIM / 3)
                    added.clear()
            finally:
                for task in self._delivering.values():
                    task.cancel()
                await asyncio.gather(*self._delivering.values(), return_exceptions=True)
                await self._hand_back()

    async def _hand_back(self) -> None:
        """As the node stops: its claims, its quiet cursors and its place among the
        nodes that deliver, so that the others take its webhooks over at their next
        round rather than once its claims lapse. At most HAND_BACK seconds."""
        held = list(self._delivering)
        mine = self.node.encode()
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(HAND_BACK):
                with redis_errors():
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for key in held:
                            pipe.get(_part(key, "owner"))
                        holders = await pipe.execute()
                    still = [
                        key for key, holder in zip(held, holders, strict=True) if holder == mine
                    ]
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zrem(DISPATCHERS_KEY, self.node)
                        for key in still:
                            if key in self._quiet:
                                pipe.set(_part(key, "cursor"), str(self._quiet[key]))
                            pipe.delete(_part(key, "owner"))
                        await pipe.execute()

    async def _claim_round(self, http: aiohttp.ClientSession) -> None:
        """Count this node among those that deliver, and make ``plan_claims``'s moves:
        two pipelines, however many webhooks there are (a round trip each would cost
        a node a wake-up a webhook)."""
        hooks = {h.key: h for h in await self.webhooks.all()}
        for key, task in list(self._delivering.items()):
            if key not in hooks or task.done():
                task.cancel()
                del self._delivering[key]
        mine = self.node.encode()
        claim_ms = int(CLAIM * 1000)
        now = time.time()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(DISPATCHERS_KEY, {self.node: now + CLAIM})
                pipe.zremrangebyscore(DISPATCHERS_KEY, "-inf", now)
                pipe.zcard(DISPATCHERS_KEY)
                for key in hooks:
                    pipe.get(_part(key, "owner"))
                _, _, dispatchers, *held = await pipe.execute()
            holders: dict[str, bytes | None] = dict(zip(hooks, held, strict=True))
            renewed, handed, wanted, self._lapsed = plan_claims(
                holders, mine, dispatchers, self._lapsed
            )
            quiet = {key: self._quiet[key] for key in renewed + handed if key in self._quiet}
            self._quiet.clear()
            for key in handed:
                if key in self._delivering:
                    self._delivering.pop(key).cancel()
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in wanted:
                    pipe.set(_part(key, "owner"), self.node, nx=True, px=claim_ms)
                for key, cursor in quiet.items():
                    pipe.set(_part(key, "cursor"), str(cursor))
                for key in renewed:
                    pipe.pexpire(_part(key, "owner"), claim_ms)
                for key in handed:
                    pipe.delete(_part(key, "owner"))
                replies = await pipe.execute()
        if handed:
            log.info("node %s hands %d webhooks back to the others", self.node, len(handed))
        taken = [key for key, ok in zip(wanted, replies[: len(wanted)], strict=True) if ok]
        for key, task in list(self._delivering.items()):
            if holders[key] != mine and key not in taken:
                # Lost it (this node stalled past its claim): stop, another delivers.
                task.cancel()
                del self._delivering[key]
        for key in renewed + taken:
            if key not in self._delivering:
                log.info("node %s delivers webhook %s", self.node, key)
                self._delivering[key] = asyncio.create_task(
                    self._deliver(hooks[key], http), name=f"webhook {key}"
                )

    async def _deliver(self, hook: Webhook, http: aiohttp.ClientSession) -> None:
        status = Status(node=self.node)
        users = None if hook.users is None else [UserId(u) for u in hook.users]
        attempt = 0
        #: The acknowledged position, as saved or newer: read once, then kept here.
        after: Cursor | None = None
        while True:
            try:
                if after is None:
                    with redis_errors():
                        key = _part(hook.key, "cursor")
                        raw = cast("bytes | None", await self.redis.get(key))
                    after = Cursor.parse(raw.decode()) if raw else await self.feed.present()
                self.feed.check(after)
                changes, position, caught_up = await self.feed.read(
                    TenantId(hook.tenant), after, users
                )
            except CursorExpired:
                log.error("webhook %s fell behind the feed's retention: from now on", hook.key)
                after = None
                await self._move(hook, await self.feed.present())
                continue
            except StoreError as exc:
                log.warning("webhook %s paused: Redis unavailable (%s)", hook.key, exc)
                after = None
                await asyncio.sleep(1.0)
                continue
            if not changes:
                if position != after:
                    after = self._quiet[hook.key] = position
                if caught_up:
                    await self.feed.wait(TenantId(hook.tenant), after)
                continue
            batch = changes[:BATCH]
            error = await self._post(hook, http, batch)
            if error is None:
                attempt = 0
                status.delivered += len(batch)
                status.failures_in_a_row = 0
                status.last_delivery_at = time.time()
                after = batch[-1].cursor if len(batch) < len(changes) else position
                await self._move(hook, after)
                now = time.time()
                for change in batch:
                    self.metrics.webhook_latency.labels(hook.key).observe(
                        max(0.0, now - change.cursor.ms / 1000)
                    )
                self.metrics.webhook_backlog.labels(hook.key).set(len(changes) - len(batch))
            else:
                status.failures_in_a_row += 1
                status.last_error, status.last_error_at = error, time.time()
                self.metrics.webhook_failures.labels(hook.key).inc()
                self.metrics.webhook_backlog.labels(hook.key).set(len(changes))
                if status.failures_in_a_row == FAILING:
                    log.error("webhook %s keeps failing: %s", hook.key, error)
                await asyncio.sleep(random.uniform(0, min(LAST_RETRY, FIRST_RETRY * 2**attempt)))
                attempt = min(attempt + 1, 16)
            await self._save_status(hook, status)
            if error is None and caught_up and len(batch) == len(changes):
                await self.feed.wait(TenantId(hook.tenant), after)

    async def _post(
        self, hook: Webhook, http: aiohttp.ClientSession, batch: list[Any]
    ) -> str | None:
        """None when the endpoint acknowledged the batch, else what went wrong."""
        body = json.dumps(
            {
                "tenant": hook.tenant,
                "changes": [
                    {"cursor": str(c.cursor), "presence": _presence(c.frame)} for c in batch
                ],
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            signature.HEADER: signature.sign(hook.secret, body),
        }
        try:
            async with http.post(hook.url, data=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    async def _move(self, hook: Webhook, cursor: Cursor) -> None:
        self._quiet.pop(hook.key, None)  # older
        with redis_errors():
            await self.redis.set(_part(hook.key, "cursor"), str(cursor))

    async def _save_status(self, hook: Webhook, status: Status) -> None:
        try:
            with redis_errors():
                await self.redis.set(_part(hook.key, "status"), json.dumps(asdict(status)))
        except StoreError:
            pass  # reported again with the next batch


def _presence(frame: bytes) -> dict[str, Any]:
    presence: dict[str, Any] = codec.unpack(frame)
    del presence["type"]
    return presence
