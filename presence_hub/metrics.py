"""Prometheus metrics of one hub node, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._sent: dict[str, Counter] = {}
        self._received: dict[str, Counter] = {}
        self._store_ops: dict[str, Histogram] = {}
        self._events: dict[tuple[str, str], Counter] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "presence_hub_connections",
            "Open WebSocket connections, by device.",
            ["device"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "presence_hub_sessions_opened", "Sessions opened, by device.", ["device"], registry=r
        )
        self.subscriptions = Gauge(
            "presence_hub_subscriptions", "Users this node listens to on Redis.", registry=r
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

    def sent(self, kind: str) -> Counter:
        """The frames_out counter of one frame type (children cached: this is a hot path)."""
        child = self._sent.get(kind)
        if child is None:
            child = self._sent[kind] = self.frames_out.labels(kind)
        return child

    def received(self, kind: str) -> Counter:
        child = self._received.get(kind)
        if child is None:
            child = self._received[kind] = self.frames_in.labels(kind)
        return child

    def event(self, kind: str, result: str) -> Counter:
        """The events counter of one kind and result (cached: every event counts)."""
        child = self._events.get((kind, result))
        if child is None:
            child = self._events[kind, result] = self.events.labels(kind, result)
        return child

    def store_op(self, op: str) -> Histogram:
        """The store_seconds histogram of one operation (cached: every change uses one)."""
        child = self._store_ops.get(op)
        if child is None:
            child = self._store_ops[op] = self.store_seconds.labels(op)
        return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
