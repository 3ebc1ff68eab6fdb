"""The faust application: topics, tables and agents, wired to the hot path. Wiring only.

Nothing here runs at import time: :func:`create_app` builds an app from settings, so tests and
several workers can live side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from stream.batching import BatchingApp
from stream.config import Settings
from stream.events import Limits
from stream.metrics import Metrics
from stream.pipeline import Pipeline, Record

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """A built application and the objects a runner or test needs to reach."""

    app: faust.App
    pipeline: Pipeline
    metrics: Metrics


def faust_settings(settings: Settings) -> dict[str, Any]:
    kafka, worker = settings.kafka, settings.worker
    return {
        "broker": [f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        "store": "rocksdb://",
        "datadir": str(Path(worker.data_dir).resolve()),
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "processing_guarantee": worker.processing_guarantee,
        # The worker serves Prometheus metrics itself; faust's web server is not needed.
        "web_enabled": False,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
    }


def create_app(settings: Settings, metrics: Metrics | None = None) -> Worker:
    metrics = metrics or Metrics()
    kafka = settings.kafka
    app = BatchingApp(settings.worker.app_id, **faust_settings(settings),
                      batch_max_records=settings.worker.batch_max_events,
                      batch_linger_seconds=settings.worker.batch_max_seconds)

    def raw_topic(name: str, partitions: int | None = None) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=partitions)

    events_topic = raw_topic(kafka.events_topic, kafka.partitions)
    outputs = {name: raw_topic(name) for name in (kafka.dlq_topic, kafka.decisions_topic)}

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        await outputs[topic].send(key=key, value=value)

    contract = settings.contract
    pipeline = Pipeline(
        limits=Limits(max_record_bytes=contract.max_record_bytes,
                      max_future_skew_ms=int(contract.max_future_skew_seconds * 1000),
                      min_event_time_ms=contract.min_event_time_ms),
        dlq_topic=kafka.dlq_topic, send=send, metrics=metrics)

    async def process_events(batches: Mapping[TP, Sequence[Any]]) -> None:
        records = [Record(topic=r.topic, partition=r.partition, offset=r.offset, key=r.key,
                          value=r.value, timestamp_ms=r.timestamp)
                   for part in batches.values() for r in part]
        await pipeline.process(records)

    app.batch_topic(events_topic, process_events)

    return Worker(app=app, pipeline=pipeline, metrics=metrics)
