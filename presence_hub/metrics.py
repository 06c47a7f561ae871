"""Prometheus metrics of one hub node, on a registry of its own.

With ``serve --workers N`` the workers keep their values in files of one directory
(prometheus_client's multiprocess mode, set up by the CLI before it starts them) and
each worker's /metrics adds up all of them: a scrape counts the whole node whichever
worker answers it."""

from __future__ import annotations

import os
from typing import Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["MULTIPROCESS_DIR", "Metrics"]

#: The environment variable that puts prometheus_client in multiprocess mode.
MULTIPROCESS_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        #: (metric, label values) -> its child: labels() takes a lock and builds a tuple
        #: on every call, and these are counted per frame, event and change.
        self._children: dict[tuple[Any, ...], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "presence_hub_connections",
            "Open WebSocket connections, by device.",
            ["device"],
            registry=r,
            # Across workers: the sum over the live ones.
            multiprocess_mode="livesum",
        )
        self.refused_connections = Counter(
            "presence_hub_refused_connections",
            "WebSocket connections refused by a limit: connect_rate (from one address), "
            "handshakes (in progress), origin, sessions_per_user.",
            ["limit"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "presence_hub_sessions_opened", "Sessions opened, by device.", ["device"], registry=r
        )
        self.subscriptions = Gauge(
            "presence_hub_subscriptions",
            "Users this node listens to on Redis (with workers, summed over them).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.frames_in = Counter(
            "presence_hub_frames_in", "Client frames received, by type.", ["type"], registry=r
        )
        self.frames_out = Counter(
            "presence_hub_frames_out", "Frames sent to clients, by type.", ["type"], registry=r
        )
        self.events = Counter(
            "presence_hub_events",
            "Producer events, by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.deliveries = Counter(
            "presence_hub_deliveries",
            "Presence updates written to subscribers' sockets.",
            registry=r,
        )
        self.update_writes = Counter(
            "presence_hub_update_writes",
            "Sockets written at the end of a pass of the event loop, one send() each: "
            "deliveries over writes is how many updates a send() carries.",
            registry=r,
        )
        self.storm_holds = Counter(
            "presence_hub_storm_held_flushes",
            "Writes of updates held back a quarter of a second because the node was in a "
            "connect storm.",
            registry=r,
        )
        self.coalesced = Counter(
            "presence_hub_coalesced_updates",
            "Updates replaced by a newer one before a slow socket took them.",
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "presence_hub_slow_consumer_closes", "Sockets closed with 1013.", registry=r
        )
        self.redis_errors = Counter(
            "presence_hub_redis_errors",
            "Operations that failed because Redis did not answer.",
            registry=r,
        )
        self.corrupt_records = Counter(
            "presence_hub_corrupt_records",
            "State records found not to decode (kept aside, salvaged), once per record and node.",
            registry=r,
        )
        self.store_seconds = Histogram(
            "presence_hub_store_seconds",
            "Time of one store operation (reads and an atomic commit), by operation.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.update_latency = Histogram(
            "presence_hub_update_latency_seconds",
            "From the arrival of what caused an update to its write to a subscriber's socket.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.webhook_latency = Histogram(
            "presence_hub_webhook_latency_seconds",
            "From a change to its webhook's acknowledgement, by webhook (tenant/name).",
            ["webhook"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.webhook_failures = Counter(
            "presence_hub_webhook_failures",
            "Webhook deliveries that failed (not 2xx in time), by webhook.",
            ["webhook"],
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "presence_hub_webhook_backlog",
            "Changes read but not yet acknowledged by the webhook (up to a read), by webhook.",
            ["webhook"],
            registry=r,
            multiprocess_mode="max",
        )

    def refused(self, limit: str) -> Counter:
        """The refused_connections counter of one limit."""
        return self._child(self.refused_connections, limit)

    def connected(self, device: str) -> Gauge:
        """The connections gauge of one device kind."""
        return self._child(self.connections, device)

    def opened(self, device: str) -> Counter:
        """The sessions_opened counter of one device kind."""
        return self._child(self.sessions_opened, device)

    def sent(self, kind: str) -> Counter:
        """The frames_out counter of one frame type."""
        return self._child(self.frames_out, kind)

    def received(self, kind: str) -> Counter:
        """The frames_in counter of one frame type."""
        return self._child(self.frames_in, kind)

    def event(self, kind: str, result: str) -> Counter:
        """The events counter of one kind and result."""
        return self._child(self.events, kind, result)

    def store_op(self, op: str) -> Histogram:
        """The store_seconds histogram of one operation."""
        return self._child(self.store_seconds, op)

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        key = (id(metric), *labels)
        child: _Metric | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROCESS_DIR):
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker)  # type: ignore[no-untyped-call]
            return generate_latest(every_worker)
        return generate_latest(self.registry)
