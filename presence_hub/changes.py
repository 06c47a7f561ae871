"""Following the change feed from a backend: ``ChangeFollower`` reads ``GET
/v1/changes`` and resumes on its own from the last change it yielded, after any
drop, with backoff and full jitter::

    async with ChangeFollower("http://127.0.0.1:8766", token) as feed:
        async for change in feed:
            print(change.cursor, change.presence["user"], change.presence["status"])

Keep ``feed.cursor`` (or each change's) to resume after a restart of your own
(``after=``). ``signature.verify`` checks a webhook delivery's signature.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from presence_hub.client import HttpClient, HubError, backoff_delay

__all__ = ["Change", "ChangeFollower"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    #: Resume right after this change with ``after=cursor``.
    cursor: str
    #: The Presence: user, status, message, since, ver.
    presence: dict[str, Any]


class ChangeFollower(HttpClient):
    #: A stream stays open while quiet (keep-alive comments come every 15 s).
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        users: Sequence[str] | None = None,
        after: str | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        ca_file: str | None = None,
    ) -> None:
        """``after``: resume right after this cursor; none: from the present."""
        super().__init__(base_url, token, ca_file=ca_file)
        self.cursor = after
        self._users = list(users) if users else None
        self._backoff = backoff

    async def __aiter__(self) -> AsyncIterator[Change]:
        """Every change from the cursor on, at least once, for as long as it is read.
        Raises HubError for a refusal no retry would change (a bad token, a cursor
        past the retention: ``cursor_expired``)."""
        session = self.session
        attempt = 0
        while True:
            try:
                async for change in self._stream(session):
                    attempt = 0
                    self.cursor = change.cursor
                    yield change
                log.info("the change stream ended; resuming")
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("the change stream broke (%s); resuming", exc)
            await asyncio.sleep(backoff_delay(attempt, *self._backoff))
            attempt += 1

    async def _stream(self, session: aiohttp.ClientSession) -> AsyncIterator[Change]:
        params = {"users": ",".join(self._users)} if self._users else {}
        headers = {} if self.cursor is None else {"Last-Event-ID": self.cursor}
        async with session.get(
            f"{self.base_url}/v1/changes", params=params, headers=headers
        ) as response:
            if response.status != 200:
                error = (await response.json(content_type=None)).get("error", "")
                if response.status >= 500:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status, message=error
                    )
                code = "cursor_expired" if response.status == 410 else str(response.status)
                raise HubError(code, error)
            fields: dict[str, str] = {}
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                    continue
                if fields.get("event") == "presence" and "data" in fields:
                    yield Change(fields["id"], msgspec.json.decode(fields["data"]))
                fields = {}
