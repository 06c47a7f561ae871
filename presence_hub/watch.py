"""``presence-hub watch``: a live terminal view of a user's contacts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from rich.console import Console
from rich.live import Live
from rich.table import Table

from presence_hub.client import Presence, PresenceClient

__all__ = ["render", "watch"]

_STYLE = {
    "available": "green",
    "busy": "red",
    "on_call": "red",
    "dnd": "bold red",
    "away": "yellow",
    "offline": "dim",
}


def _ago(since: float | None, now: float) -> str:
    if since is None:
        return "never seen"
    seconds = max(0, int(now - since))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m ago"


def _until(at: float | None, now: float) -> str:
    """The suffix of a status that ends: `` until 10:30`` today, `` until 2 Dec 09:00`` later
    (local time); empty for none."""
    if at is None:
        return ""
    when, today = time.localtime(at), time.localtime(now)
    same_day = (when.tm_year, when.tm_yday) == (today.tm_year, today.tm_yday)
    day = "" if same_day else f"{when.tm_mday} {time.strftime('%b', when)} "
    return f" until {day}{time.strftime('%H:%M', when)}"


def render(
    contacts: Sequence[str],
    presence: dict[str, Presence],
    now: float,
    *,
    me: str | None = None,
    manual_until: float | None = None,
) -> Table:
    """The contacts' table; ``me``, if one of them, shows when its manual status ends."""
    table = Table(title="presence-hub", expand=True)
    table.add_column("user")
    table.add_column("status")
    table.add_column("message", ratio=2)
    table.add_column("since", justify="right")
    for user in contacts:
        p = presence.get(user)
        status = p.status if p else "offline"
        until = _until(manual_until, now) if user == me else ""
        table.add_row(
            user,
            f"[{_STYLE.get(status, '')}]{status.replace('_', ' ')}[/]{until}",
            (p.message or "") if p else "",
            _ago(p.since if p else None, now),
        )
    return table


async def watch(
    url: str,
    token: str,
    contacts: Sequence[str],
    *,
    console: Console | None = None,
    ca_file: str | None = None,
) -> None:
    """Show ``contacts`` until interrupted, redrawn in place on every change."""
    console = console or Console()
    async with PresenceClient(url, token, ca_file=ca_file) as client:
        await client.subscribe(contacts)
        me = client.welcome["user"]

        def line(p: Presence) -> str:
            until = _until(client.me.get("manual_until"), time.time()) if p.user == me else ""
            return f"{p.user} {p.status}{until} {p.message or ''}"

        def table() -> Table:
            return render(
                contacts,
                dict(client.presence),
                time.time(),
                me=me,
                manual_until=client.me.get("manual_until"),
            )

        if not console.is_terminal:
            for p in client.presence.values():
                console.print(line(p))
            async for p in client.updates():
                console.print(line(p))
            return
        changed = asyncio.Event()

        async def note_changes() -> None:
            async for _ in client.updates():
                changed.set()

        follower = asyncio.create_task(note_changes())
        try:
            with Live(table(), console=console) as live:
                while True:
                    # Redraw on each change, and every second for the "since" column.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 1.0)
                    changed.clear()
                    live.update(table())
        finally:
            follower.cancel()
