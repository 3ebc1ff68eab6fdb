"""Run a worker process: create topics, serve metrics, run the faust app until a signal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import faust
from aiokafka.errors import KafkaError

from stream import exporter
from stream.app import create_app, exporter_dir
from stream.config import Settings
from stream.exporter import write_snapshot
from stream.metrics import Metrics
from stream.topics import BrokerNotReady, ensure_topics, probe

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
    """Run a worker until SIGINT/SIGTERM. Raises :class:`exporter.ExporterError` if its metrics
    cannot be served (the port taken)."""
    # First the exporter: a worker waiting for its broker is already visible (not ready).
    exporter_proc, port = exporter.start(settings, exporter_dir(settings))
    log.info("metrics served", extra={
        "url": f"http://{settings.worker.metrics_host}:{port}/metrics"})
    try:
        _run(settings)
    finally:
        exporter_proc.terminate()
        exporter_proc.wait(10)


def wait_for_broker(settings: Settings, metrics: Metrics,
                    max_delay_seconds: float = 30.0) -> None:
    """Create or check the topics, retrying with backoff while the broker cannot be reached.

    Forgetting to start the broker is the likeliest first mistake: the worker says so once per
    attempt and goes on the moment the broker appears. Meanwhile its exporter serves
    ``promo_worker_ready 0`` with a fresh heartbeat (up, but not ready). A contradiction
    between the settings and the cluster (:class:`TopicConfigError`) or a broker refusing
    the worker's credentials (:class:`BrokerRefused`) is raised at once.
    """
    delay, attempt = 1.0, 0
    while True:
        try:
            asyncio.run(ensure_topics(settings.kafka, app_id=settings.worker.app_id,
                                      timeout_s=10.0))
            if attempt:
                log.info("broker reachable", extra={"attempts": attempt + 1})
            return
        except (KafkaError, BrokerNotReady) as exc:
            asyncio.run(probe(settings.kafka))  # refused, not absent: raises BrokerRefused
            attempt += 1
            log.warning("cannot reach Kafka at %s (attempt %d: %s); retrying in %.0f s",
                        settings.kafka.bootstrap_servers, attempt, exc, delay)
            write_snapshot(exporter_dir(settings), metrics.registry, ())
            time.sleep(delay)
            delay = min(2 * delay, max_delay_seconds)


def _stop_waiting(signum: int, frame: object) -> None:
    log.info("stopped while waiting for the broker")
    sys.exit(0)


def _run(settings: Settings) -> None:
    metrics = Metrics()
    write_snapshot(exporter_dir(settings), metrics.registry, ())  # up, not ready
    built = create_app(settings, metrics)  # builds only: nothing connects before run
    built.models.load_now()  # decide with the model from the first batch, not the first poll
    previous = signal.signal(signal.SIGTERM, _stop_waiting)
    try:
        wait_for_broker(settings, metrics)
    finally:
        signal.signal(signal.SIGTERM, previous)
    marker = Path(settings.worker.data_dir) / CLEAN_SHUTDOWN
    if settings.worker.processing_guarantee == "exactly_once":
        discard_state_after_crash(Path(built.app.conf.tabledir), marker)
    marker.unlink(missing_ok=True)
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
