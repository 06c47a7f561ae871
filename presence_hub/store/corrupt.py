"""State records that do not decode: kept aside for an operator, and salvaged.

A record can be damaged outside the hub (a hand edit, a restored backup of another
version, a disk fault under Redis). The user must not be locked out by it, nor its
bytes lost: the first copy is kept in ``keys.corrupt_key`` (never overwritten), the
user goes on from what can still be read of it, and the next commit replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from presence_hub.errors import CorruptRecord
from presence_hub.ids import TenantId, UserId
from presence_hub.model import UserState
from presence_hub.store import keys
from presence_hub.store.clients import RedisClient, redis_errors
from presence_hub.store.serde import decode_state, salvage_state

__all__ = ["CorruptRecords"]

log = logging.getLogger(__name__)


class CorruptRecords:
    def __init__(
        self,
        redis: RedisClient,
        clock: Callable[[], float],
        on_found: Callable[[], object] | None = None,
    ) -> None:
        """``on_found`` is called for each record found not to decode (once per record
        and node)."""
        self._redis = redis
        self._clock = clock
        self._on_found = on_found
        #: The corrupt records this node has logged: once each.
        self._logged: set[str] = set()

    async def decode(
        self, tenant: TenantId, user: UserId, rev: bytes | int | None, blob: bytes
    ) -> UserState:
        """The stored state, or what can be salvaged of it."""
        try:
            return decode_state(blob)
        except CorruptRecord as exc:
            return await self._salvage(tenant, user, int(rev or 0), blob, exc)

    async def _salvage(
        self, tenant: TenantId, user: UserId, rev: int, blob: bytes, exc: CorruptRecord
    ) -> UserState:
        state, lost = salvage_state(blob, rev)
        aside = keys.corrupt_key(tenant, user)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(aside, "raw", blob)
            pipe.hsetnx(aside, "found_at", repr(self._clock()))
            pipe.hsetnx(aside, "lost", ",".join(lost))
            pipe.hsetnx(aside, "error", str(exc))
            await pipe.execute()
        if aside not in self._logged:
            self._logged.add(aside)
            if self._on_found is not None:
                self._on_found()
            log.error(
                "corrupt state record of %s/%s (%s): kept in %s; lost %s",
                tenant,
                user,
                exc,
                aside,
                ", ".join(lost) or "nothing",
            )
        return state

    async def kept(self, tenant: TenantId, user: UserId) -> dict[str, Any] | None:
        """What was kept aside of the user's corrupt record, if any (for ``explain``)."""
        aside = keys.corrupt_key(tenant, user)
        with redis_errors():
            found = cast("dict[bytes, bytes]", await self._redis.hgetall(aside))
        if not found:
            return None
        lost = found.get(b"lost", b"").decode()
        return {
            "key": aside,
            "found_at": float(found.get(b"found_at", b"0")),
            "bytes": len(found.get(b"raw", b"")),
            "lost": lost.split(",") if lost else [],
            "error": found.get(b"error", b"").decode(errors="replace"),
        }
