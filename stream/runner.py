"""Run a worker process: create topics, serve metrics, run the faust app until a signal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import faust

from stream.app import create_app
from stream.config import Settings
from stream.topics import ensure_topics

log = logging.getLogger(__name__)

CLEAN_SHUTDOWN = "clean-shutdown"



def discard_state_after_crash(tabledir: Path, marker: Path) -> bool:
    """Under exactly-once, wipe local RocksDB state unless the last run stopped cleanly.

    RocksDB is written as a batch is processed, before its transaction commits. After a crash
    it may hold writes of aborted transactions, which the changelog (read committed) does not
    have; rebuilt from the changelog, the state is exactly what was committed. Kafka Streams
    does the same. Under at-least-once the local state is kept: a batch's outputs are
    acknowledged before its state is written, so local state is never ahead of what was sent.
    """
    if marker.exists() or not tabledir.exists():
        return False
    log.warning("last run did not stop cleanly: rebuilding local state from the changelog",
                extra={"tabledir": str(tabledir)})
    shutil.rmtree(tabledir)
    return True


def run_worker(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings.kafka, app_id=settings.worker.app_id))
    built = create_app(settings)
    built.models.load_now()  # decide with the model from the first batch, not the first poll
    marker = Path(settings.worker.data_dir) / CLEAN_SHUTDOWN
    if settings.worker.processing_guarantee == "exactly_once":
        discard_state_after_crash(Path(built.app.conf.tabledir), marker)
    marker.unlink(missing_ok=True)
    port = built.metrics.serve(settings.worker.metrics_host, settings.worker.metrics_port)
    built.metrics.worker_up.set(1)
    log.info("metrics served", extra={
        "url": f"http://{settings.worker.metrics_host}:{port}/metrics"})
    # Readiness ("worker ready", promo_worker_ready) is reported by the app once its tables
    # have recovered (stream.app), not when faust's services have started.
    worker = faust.Worker(built.app, loglevel=settings.worker.log_level,
                          override_logging=False, redirect_stdouts=False, quiet=True)
    # mode's Worker installs SIGINT/SIGTERM handlers: the first signal stops gracefully
    # (commit offsets, flush producers, close RocksDB), then exits with status 0.
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code in (0, None):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{time.time():.0f}\n")
        raise
