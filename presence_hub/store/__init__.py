"""Redis-backed presence state: atomic per-user transitions, publication, timers."""

from __future__ import annotations

from presence_hub.store.embedded import EmbeddedRedis, find_redis_server
from presence_hub.store.store import EVENT_TTL, Applied, EventResult, PresenceStore

__all__ = [
    "EVENT_TTL",
    "Applied",
    "EmbeddedRedis",
    "EventResult",
    "PresenceStore",
    "find_redis_server",
]
