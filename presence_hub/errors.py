"""The exceptions of presence-hub.

The whole tree::

    PresenceHubError
    ├── StoreError               the store could not complete an operation
    │   ├── StoreUnavailable     Redis did not answer; retry later
    │   ├── StoreContention      a user's state kept changing under a writer
    │   └── CorruptRecord        a stored state that does not decode (kept aside, salvaged)
    ├── EmbeddedRedisError       the embedded redis-server could not be started
    ├── UnsafeRedis              the Redis given would evict users' data
    ├── AuthError                a token is missing, malformed, forged or expired
    └── FrameError               a client frame is malformed; carries the error code
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CorruptRecord",
    "EmbeddedRedisError",
    "FrameError",
    "PresenceHubError",
    "StoreContention",
    "StoreError",
    "StoreUnavailable",
    "UnsafeRedis",
]


class PresenceHubError(Exception):
    """Base class of every error raised by presence-hub."""


class StoreError(PresenceHubError):
    """The store could not complete an operation."""


class StoreUnavailable(StoreError):
    """Redis did not answer. Nothing was changed that the caller cannot retry."""


class StoreContention(StoreError):
    """A user's state changed under the writer more often than it retries."""


class CorruptRecord(StoreError):
    """A stored state record that does not decode; the store keeps it aside and goes on
    from what it can still read of it."""


class EmbeddedRedisError(PresenceHubError):
    """The embedded redis-server could not be found or did not start."""


class UnsafeRedis(PresenceHubError):
    """The Redis a node was given evicts keys under memory pressure."""


class AuthError(PresenceHubError):
    """A token is missing, malformed, forged or expired."""


class FrameError(PresenceHubError):
    """A client frame or producer event that the hub refuses; nothing was changed."""

    def __init__(self, code: str, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
