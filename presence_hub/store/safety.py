"""Whether the Redis a node is given keeps what users set: a Redis that evicts keys
under memory pressure drops users' states and sessions silently, and one that never
persists loses everything at a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from presence_hub.store.clients import RedisClient, redis_errors

__all__ = ["RedisSafety", "check_redis"]

#: The one maxmemory-policy that never drops a key.
SAFE_POLICY: Final = "noeviction"


@dataclass(frozen=True, slots=True)
class RedisSafety:
    #: Redis would drop data it holds (keys evicted): refused unless accepted.
    evicting: list[str] = field(default_factory=list)
    #: Redis keeps nothing across its own restart.
    warnings: list[str] = field(default_factory=list)


async def check_redis(redis: RedisClient) -> RedisSafety:
    """Each server's (each primary's, on a cluster) eviction policy and persistence."""
    safety = RedisSafety()
    with redis_errors():
        if isinstance(redis, RedisCluster):
            for node in redis.get_primaries():
                await _check_server(redis, node.name, safety, target_nodes=node)
        else:
            await _check_server(redis, "redis", safety)
    return safety


async def _check_server(redis: RedisClient, name: str, safety: RedisSafety, **route: Any) -> None:
    try:
        config = await redis.config_get("*", **route)
        policy = config.get("maxmemory-policy", SAFE_POLICY)
        aof = config.get("appendonly") == "yes"
        rdb: bool | None = bool((config.get("save") or "").strip())
    except ResponseError:
        # CONFIG renamed or refused (managed services): INFO tells all but RDB's schedule.
        info = await redis.info("all", **route)
        policy = str(info.get("maxmemory_policy", SAFE_POLICY))
        aof = bool(int(info.get("aof_enabled", 0)))
        rdb = None
    if policy != SAFE_POLICY:
        safety.evicting.append(
            f"{name}: maxmemory-policy is {policy}, which evicts keys under memory pressure "
            f"(users' states and sessions would vanish); set it to {SAFE_POLICY}"
        )
    if not aof and rdb is False:
        safety.warnings.append(
            f"{name}: neither AOF nor RDB snapshots are on; a restart of Redis loses every "
            "user's state"
        )
    elif not aof and rdb is None:
        safety.warnings.append(
            f"{name}: AOF is off and CONFIG is refused, so RDB snapshots cannot be checked"
        )
