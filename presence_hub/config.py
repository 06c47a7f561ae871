"""Settings of one hub node, from flags and ``PRESENCE_HUB_*`` environment variables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from presence_hub.store.embedded import default_data_dir

__all__ = ["Settings", "setting"]

_MISSING: Any = object()


def setting(
    default: Any = _MISSING, help: str = "", *, factory: Callable[[], Any] | None = None
) -> Any:
    """A setting's default and its help text, written once: ``serve --help`` and the
    README's table are made to agree with them."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = setting("127.0.0.1", "address to listen on")
    ws_port: int = setting(8765, "WebSocket port")
    http_port: int = setting(8766, "HTTP API port")
    redis_url: str | None = setting(
        None,
        "Redis URL (redis://, rediss://, unix://), or any node of a Redis Cluster "
        "(redis+cluster://host:port); none: start an embedded redis-server",
    )
    data_dir: Path = setting(
        factory=default_data_dir, help="where the embedded Redis and the generated secret live"
    )
    secret: str | None = setting(
        None,
        "HS256 token secrets, comma-separated: the first signs `presence-hub token`'s, "
        "all verify; none, and no public key or JWKS: generate one in the data directory",
    )
    token_public_keys: str | None = setting(
        None,
        "PEM files of token public keys (RS256, ES256, EdDSA), comma-separated; a token's "
        "kid, if it has one, names its file (less .pem)",
    )
    jwks_url: str | None = setting(
        None, "the identity provider's JWKS URL: token public keys chosen by kid"
    )
    jwks_refresh: float = setting(
        300.0,
        "seconds between fetches of the JWKS (a token of an unknown kid fetches it at "
        "once, at most every 5 s)",
    )
    token_algorithms: str = setting(
        "HS256,RS256,ES256,EdDSA", "the token algorithms accepted, comma-separated"
    )
    token_issuer: str | None = setting(None, "the iss every token must carry")
    token_audience: str | None = setting(None, "the aud every token must carry")
    #: RULES.md: 10 s by default.
    grace: float = setting(
        10.0, "seconds a dropped connection stays online before it turns offline"
    )
    #: RULES.md: 30 s by default.
    lease: float = setting(30.0, "seconds within which a dead node's sessions expire")
    max_frame: int = setting(
        64 * 1024, "largest client frame, in bytes (larger ones close the socket with 1009)"
    )
    #: PROTOCOL.md: 1000.
    max_users_per_request: int = setting(
        1000, "users in one subscribe, unsubscribe or query, and in GET /v1/presence or /v1/changes"
    )
    max_subscriptions: int = setting(10_000, "subscriptions on one connection")
    max_sessions_per_user: int = setting(
        20,
        "sessions one user (role user) may hold, dropped ones within their grace included "
        "(one more is refused: limit_exceeded, then close 1008)",
    )
    max_handshakes: int = setting(
        4096, "WebSocket handshakes in progress on a node (one more: HTTP 503)"
    )
    connect_rate: float = setting(
        200.0, "new WebSocket connections a second from one address (more: HTTP 429; 0: any)"
    )
    connect_burst: int = setting(2000, "new WebSocket connections from one address in a burst")
    allowed_origins: str | None = setting(
        None,
        "the browser origins that may connect, comma-separated (another Origin: HTTP 403; "
        "clients that send none, not browsers, may); none: any",
    )
    tls_cert: str | None = setting(
        None, "PEM certificate (chain) for wss:// and https:// on both ports; SIGHUP reloads it"
    )
    tls_key: str | None = setting(None, "the certificate's PEM private key")
    #: PROTOCOL.md: 24 hours by default.
    feed_retention: float = setting(
        86400.0, "seconds the change feed (GET /v1/changes) keeps a change (0: no feed)"
    )
    rate_limit: float = setting(50.0, "frames a connection may send per second")
    rate_burst: int = setting(200, "frames a connection may send in a burst")
    #: Producers (call and meeting servers) speak for many users.
    producer_rate_limit: float = setting(
        20_000.0, "frames a producer connection may send per second"
    )
    producer_rate_burst: int = setting(40_000, "frames a producer connection may send in a burst")
    send_timeout: float = setting(
        20.0, "seconds a stalled socket may block its updates before it is closed (1013)"
    )
    keepalive: float = setting(
        20.0, "seconds between pings; a socket that misses one is closed as dead"
    )
    #: Bounds what a stalled client holds in the kernel.
    socket_send_buffer: int = setting(64 * 1024, "kernel send buffer per socket, in bytes")
    #: PROTOCOL.md: 60 s.
    min_auto_away: float = setting(
        60.0, "shortest auto-away setting a client may choose, in seconds"
    )
    storm_rate: int = setting(
        300,
        "sockets opened per second from which a node is in a connect storm and writes "
        "each socket's updates together every quarter of a second (0: never)",
    )
    allow_evicting_redis: bool = setting(
        False, "start even if Redis' maxmemory-policy evicts keys (users' states may vanish)"
    )
    workers: int = setting(
        1, "worker processes on the same ports (SO_REUSEPORT), each a node of its own"
    )
    relays: int = setting(
        0,
        "with --workers: processes that listen on Redis for the workers, each for a slice "
        "of the users, so that an update reaches the node once (0: each worker listens "
        "for itself)",
    )
    log_json: bool = setting(False, "log one JSON object per line")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
