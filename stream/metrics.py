"""Every Prometheus metric promo-stream exports, defined once.

Names follow Prometheus conventions: ``promo_`` prefix, base units (seconds, bytes), ``_total``
on counters (prometheus_client appends it). Labels take only bounded values: event types,
rejection reasons, actions, arms. Never a user, item or coupon id.

Metrics live on a :class:`Metrics` object with its own registry, so tests and several workers in
one process do not share counters by accident; the worker serves its registry over HTTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from encoder.data import EVENT_TYPES
from stream.events import Reason

# Micro-batches take milliseconds to a few seconds.
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "promo_stream_events_consumed", "Valid events consumed, by event type.",
            ["type"], registry=r)
        self.records_rejected = Counter(
            "promo_stream_records_rejected",
            "Records rejected and sent to the dead-letter topic, by reason.", ["reason"],
            registry=r)
        self.batch_size = Histogram(
            "promo_stream_batch_size_records", "Records per micro-batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "promo_stream_batch_duration_seconds", "Wall time to process one micro-batch.",
            buckets=BATCH_SECONDS_BUCKETS, registry=r)
        self.worker_up = Gauge(
            "promo_worker_up", "1 while the worker process runs.", registry=r)
        self.worker_ready = Gauge(
            "promo_worker_ready", "1 once the worker has joined its group and recovered state.",
            registry=r)
        # Labels are not initialised when declared; pre-create them so dashboards and alerts
        # see zeros instead of missing series.
        for event_type in EVENT_TYPES:
            self.events_consumed.labels(type=event_type)
        for reason in Reason:
            self.records_rejected.labels(reason=reason.value)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port (port 0 picks a free one); return the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
