"""The hot path, independent of faust: a micro-batch of consumed records in, effects out.

`stream/app.py` feeds it batches from Kafka; tests and benchmarks can feed it directly.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from stream.events import Event, Limits, Rejection, dead_letter, parse_event
from stream.metrics import Metrics

log = logging.getLogger(__name__)

#: Sends one record: (topic, key, value). Awaiting it enqueues the record with the producer.
Send = Callable[[str, bytes | None, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed Kafka record, whatever client read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass
class BatchResult:
    events: list[Event]
    rejected: int


class Pipeline:
    def __init__(self, *, limits: Limits, dlq_topic: str, send: Send, metrics: Metrics) -> None:
        self.limits = limits
        self.dlq_topic = dlq_topic
        self.send = send
        self.metrics = metrics

    async def process(self, records: Sequence[Record]) -> BatchResult:
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: list[Event] = []
        by_type: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for record in records:
            parsed = parse_event(record.value, record.key, now_ms=now_ms, limits=self.limits)
            if isinstance(parsed, Rejection):
                by_reason[parsed.reason.value] += 1
                await self.send(self.dlq_topic, record.key, dead_letter(
                    parsed, raw=record.value, key=record.key, topic=record.topic,
                    partition=record.partition, offset=record.offset, at_ms=now_ms))
                continue
            events.append(parsed)
            by_type[parsed.type] += 1
        for event_type, n in by_type.items():
            self.metrics.events_consumed.labels(type=event_type).inc(n)
        for reason, n in by_reason.items():
            self.metrics.records_rejected.labels(reason=reason).inc(n)
        self.metrics.batch_size.observe(len(records))
        self.metrics.batch_duration.observe(time.perf_counter() - started)
        log.debug("batch", extra={"records": len(records), "rejected": sum(by_reason.values())})
        return BatchResult(events=events, rejected=sum(by_reason.values()))
