"""Where a user's data lives in Redis.

Users are spread over ``PARTITIONS`` partitions by a hash of ``tenant:user``.
Every key and channel of a partition carries the partition's hash tag, so on
Redis Cluster all of one user's keys, and the partition's timer bucket, sit in
one slot: each transition, timer included, is one script on one shard. The
partitions' slots are spread evenly over the cluster's 16,384 slots, so any
even split of the slots between shards splits users and timers evenly too.
Ids cannot contain braces or colons (see ``presence_hub.ids``), so a key is
never ambiguous.
"""

from __future__ import annotations

import binascii
import functools
import zlib
from typing import Final

from presence_hub.ids import TenantId, UserId

__all__ = [
    "PARTITIONS",
    "channel_member",
    "channel_partition",
    "corrupt_key",
    "event_key",
    "key_slot",
    "member",
    "parse_member",
    "partition",
    "presence_channel",
    "self_channel",
    "state_key",
    "timer_bucket",
    "timer_buckets",
]

#: Enough that slots split evenly between shards and no timer bucket is hot; few
#: enough that a node polls every timer bucket in one pipelined round trip.
PARTITIONS: Final = 256
CLUSTER_SLOTS: Final = 16384


def key_slot(tag: str) -> int:
    """The Redis Cluster slot of a hash tag (CRC16/XMODEM, as Redis computes it)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


@functools.cache
def _tags() -> tuple[str, ...]:
    """For partition n, a short tag whose slot lies in the n-th of PARTITIONS equal
    slot ranges: the partitions are spread evenly over the slots."""
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < PARTITIONS:
        tag = f"p{candidate:x}"
        tags.setdefault(key_slot(tag) * PARTITIONS // CLUSTER_SLOTS, tag)
        candidate += 1
    return tuple(tags[n] for n in range(PARTITIONS))


@functools.cache
def _partitions_by_tag() -> dict[str, int]:
    return {tag: n for n, tag in enumerate(_tags())}


def channel_partition(channel: str) -> int:
    """The partition of a presence or self channel's user."""
    return _partitions_by_tag()[channel[channel.index("{") + 1 : channel.index("}")]]


def member(tenant: TenantId, user: UserId) -> str:
    return f"{tenant}:{user}"


def parse_member(value: str) -> tuple[TenantId, UserId]:
    tenant, _, user = value.partition(":")
    return TenantId(tenant), UserId(user)


def partition(tenant: TenantId, user: UserId) -> int:
    return zlib.crc32(member(tenant, user).encode()) % PARTITIONS


@functools.lru_cache(maxsize=1 << 16)
def _prefix(tenant: TenantId, user: UserId) -> str:
    # Cached: a change names several keys and channels of its user, and hashing the
    # user each time cost more than a lookup.
    return f"ph:{{{_tags()[partition(tenant, user)]}}}:{tenant}:{user}"


def channel_member(channel: str) -> tuple[TenantId, UserId]:
    """The tenant and user of a presence or self channel."""
    tenant, user, _ = channel[channel.index("}") + 2 :].split(":")
    return TenantId(tenant), UserId(user)


#: The user's hash: its prefix itself (one cached call, no wrapper: a subscribe names fifty).
state_key: Final = _prefix


@functools.lru_cache(maxsize=1 << 16)
def presence_channel(tenant: TenantId, user: UserId) -> str:
    # Cached as well: subscribing sockets name fifty of these each.
    return f"{_prefix(tenant, user)}:p"


def self_channel(tenant: TenantId, user: UserId) -> str:
    return f"{_prefix(tenant, user)}:s"


def corrupt_key(tenant: TenantId, user: UserId) -> str:
    """Where a state record that does not decode is kept aside for an operator."""
    return f"{_prefix(tenant, user)}:corrupt"


def event_key(tenant: TenantId, user: UserId, event_id: str) -> str:
    return f"{_prefix(tenant, user)}:ev:{event_id}"


def timer_bucket(tenant: TenantId, user: UserId) -> str:
    """The sorted set of due times of the user's partition, in the user's slot."""
    prefix = _prefix(tenant, user)
    return f"{prefix[: prefix.index('}') + 1]}:timers"


def changes_log(tenant: TenantId, user: UserId) -> str:
    """The stream of observer-visible changes of the user's partition, in the user's slot."""
    prefix = _prefix(tenant, user)
    return f"{prefix[: prefix.index('}') + 1]}:changes"


def changes_logs() -> list[str]:
    """Every partition's change log, in partition order."""
    return [f"ph:{{{tag}}}:changes" for tag in _tags()]


def timer_buckets() -> list[str]:
    """Every partition's timer bucket (polled at least once a second: built once)."""
    return list(_TIMER_BUCKETS)


_TIMER_BUCKETS: Final = tuple(f"ph:{{{tag}}}:timers" for tag in _tags())
