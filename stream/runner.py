"""Run a worker process: create topics, serve metrics, run the faust app until a signal."""

from __future__ import annotations

import asyncio
import logging

import faust

from stream.app import create_app
from stream.config import Settings
from stream.metrics import Metrics
from stream.topics import ensure_topics

log = logging.getLogger(__name__)


class _FaustWorker(faust.Worker):
    """faust's worker, reporting readiness to our metrics and keeping our logging set-up."""

    metrics: Metrics

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        self.metrics.worker_ready.set(1)
        log.info("worker ready")


def run_worker(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    built = create_app(settings)
    port = built.metrics.serve(settings.worker.metrics_host, settings.worker.metrics_port)
    built.metrics.worker_up.set(1)
    log.info("metrics served", extra={
        "url": f"http://{settings.worker.metrics_host}:{port}/metrics"})
    worker = _FaustWorker(built.app, loglevel=settings.worker.log_level,
                          override_logging=False, redirect_stdouts=False, quiet=True)
    worker.metrics = built.metrics
    # mode's Worker installs SIGINT/SIGTERM handlers: the first signal stops gracefully
    # (commit offsets, flush producers, close RocksDB).
    worker.execute_from_commandline()
