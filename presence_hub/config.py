"""Settings of one hub node, from flags and ``PRESENCE_HUB_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from presence_hub.store.embedded import default_data_dir

__all__ = ["Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    ws_port: int = 8765
    http_port: int = 8766
    #: None: start the embedded redis-server, with its data in ``data_dir``.
    redis_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    #: None: generate one and keep it in ``data_dir``.
    secret: str | None = None
    #: Offline grace after a dropped connection (RULES.md: default 10 s).
    grace: float = 10.0
    #: How long a dead node's sessions outlive it (RULES.md: default 30 s).
    lease: float = 30.0
    max_frame: int = 64 * 1024
    max_users_per_request: int = 1000
    max_subscriptions: int = 10_000
    #: Frames a connection may send per second, with bursts of ``rate_burst``.
    rate_limit: float = 50.0
    rate_burst: int = 200
    #: The same for producers (call and meeting servers), who speak for many users.
    producer_rate_limit: float = 20_000.0
    producer_rate_burst: int = 40_000
    #: A socket whose writes stall this long is closed with 1013.
    send_timeout: float = 20.0
    #: Seconds between keepalive pings; a socket that misses one is closed as dead.
    keepalive: float = 20.0
    #: Kernel send buffer per socket: bounds what a stalled client holds in the kernel.
    socket_send_buffer: int = 64 * 1024
    #: The shortest auto-away setting a client may choose (PROTOCOL.md: 60 s).
    min_auto_away: float = 60.0
    #: Sockets opened per second from which a node is in a connect storm and writes each
    #: socket's updates together every quarter of a second (0: never).
    storm_rate: int = 300
    #: Start even on a Redis whose maxmemory-policy evicts keys (it may lose users' state).
    allow_evicting_redis: bool = False
    #: Worker processes sharing the ports (SO_REUSEPORT), each a node of its own.
    workers: int = 1
    log_json: bool = False
    log_level: str = "INFO"
