"""Where a user's data lives in Redis.

Every key and channel of one user carries the hash tag ``{tenant:user}``, so on
Redis Cluster all of them sit in one slot and each transition runs on one shard.
Ids cannot contain braces or colons (see ``presence_hub.ids``), so a tag is
never ambiguous.
"""

from __future__ import annotations

import zlib
from typing import Final

from presence_hub.ids import TenantId, UserId

__all__ = [
    "TIMER_BUCKETS",
    "channel_member",
    "event_key",
    "member",
    "parse_member",
    "presence_channel",
    "self_channel",
    "state_key",
    "timer_bucket",
    "timer_buckets",
]

#: Timers are spread over this many sorted sets, so that no single key is hot.
TIMER_BUCKETS: Final = 16


def member(tenant: TenantId, user: UserId) -> str:
    return f"{tenant}:{user}"


def parse_member(value: str) -> tuple[TenantId, UserId]:
    tenant, _, user = value.partition(":")
    return TenantId(tenant), UserId(user)


def channel_member(channel: str) -> tuple[TenantId, UserId]:
    """The tenant and user of a presence or self channel."""
    return parse_member(channel[channel.index("{") + 1 : channel.index("}")])


def state_key(tenant: TenantId, user: UserId) -> str:
    return f"ph:{{{tenant}:{user}}}"


def presence_channel(tenant: TenantId, user: UserId) -> str:
    return f"ph:{{{tenant}:{user}}}:p"


def self_channel(tenant: TenantId, user: UserId) -> str:
    return f"ph:{{{tenant}:{user}}}:s"


def event_key(tenant: TenantId, user: UserId, event_id: str) -> str:
    return f"ph:{{{tenant}:{user}}}:ev:{event_id}"


def timer_bucket(tenant: TenantId, user: UserId) -> str:
    return f"ph:timers:{zlib.crc32(member(tenant, user).encode()) % TIMER_BUCKETS}"


def timer_buckets() -> list[str]:
    return [f"ph:timers:{n}" for n in range(TIMER_BUCKETS)]
