"""The faust application: topics, tables and agents, wired to the hot path. Wiring only.

Nothing here runs at import time: :func:`create_app` builds an app from settings, so tests and
several workers can live side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

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
    app = faust.App(settings.worker.app_id, **faust_settings(settings))

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

    @app.agent(events_topic, name="process-events")
    async def process_events(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(settings.worker.batch_max_events,
                                              within=settings.worker.batch_max_seconds):
            records = [Record(topic=e.message.topic, partition=e.message.partition,
                              offset=e.message.offset, key=e.message.key,
                              value=e.message.value,
                              timestamp_ms=int((e.message.timestamp or 0) * 1000))
                       for e in batch]
            await pipeline.process(records)

    return Worker(app=app, pipeline=pipeline, metrics=metrics)
