"""An identity provider's public keys from its JWKS URL (RFC 7517), cached.

The keys are fetched at start, again every ``refresh`` seconds, and at once when a
token names a key id the cache does not hold, at most every ``min_refetch``
seconds (5) so that a flood of tokens with made-up ids cannot hammer the provider.
While the provider is down the cached keys keep working; a key is forgotten only
once a fetch succeeds without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Final

import aiohttp
import jwt

__all__ = ["MIN_REFETCH", "JwksKeys"]

log = logging.getLogger(__name__)

#: Seconds between two fetches, whatever asks for them.
MIN_REFETCH: Final = 5.0
FETCH_TIMEOUT: Final = 5.0
#: A key set is a few kilobytes; a larger answer is not one.
MAX_DOCUMENT: Final = 1 << 20


class JwksKeys:
    def __init__(self, url: str, refresh: float = 300.0, min_refetch: float = MIN_REFETCH) -> None:
        self.url = url
        self.refresh = refresh
        self.min_refetch = min_refetch
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_attempt = -min_refetch
        self._fetching: asyncio.Task[None] | None = None

    def get(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    def all(self) -> list[jwt.PyJWK]:
        return list(self._keys.values())

    async def find(self, kid: str) -> jwt.PyJWK | None:
        """The key of ``kid``, fetching the set again if it is unknown and the last
        fetch is old enough."""
        if kid not in self._keys:
            if self._fetching is not None and not self._fetching.done():
                await asyncio.shield(self._fetching)  # a fetch under way may bring it
            elif time.monotonic() - self._last_attempt >= self.min_refetch:
                await self.fetch()
        return self._keys.get(kid)

    async def fetch(self) -> None:
        """Fetch the set once (concurrent callers share the fetch); on failure, log
        and keep the cached keys."""
        if self._fetching is None or self._fetching.done():
            self._last_attempt = time.monotonic()
            self._fetching = asyncio.create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def run(self) -> None:
        """Keep the cache fresh, after a first ``fetch``, until cancelled."""
        while True:
            await asyncio.sleep(self.refresh if self._keys else self.min_refetch)
            await self.fetch()

    async def _fetch(self) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(self.url, headers={"Accept": "application/json"}) as response,
            ):
                response.raise_for_status()
                body = await response.content.read(MAX_DOCUMENT + 1)
            if len(body) > MAX_DOCUMENT:
                raise ValueError(f"the key set is over {MAX_DOCUMENT} bytes")
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError("the key set is not a JSON object")
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            # The provider's answer is input like any other: a bad one changes nothing.
            log.warning("JWKS %s unavailable (%s): keeping the cached keys", self.url, exc)
            return
        # Keys for encryption, or without a kid to choose them by, verify nothing here.
        fresh = {k.key_id: k for k in keys if k.key_id and k.public_key_use in (None, "sig")}
        if fresh.keys() != self._keys.keys():
            log.info("JWKS %s: keys %s", self.url, ", ".join(sorted(fresh)) or "none")
        self._keys = fresh

    async def close(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetching
