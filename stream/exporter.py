"""The worker's ``/metrics`` endpoint, served by a companion process.

A worker that is killed must look down to Prometheus; one that is stuck (a deadlock, a
runaway batch, ``SIGSTOP``) must not look down, but lagging: the on-call action differs
(restart it, or take a stack dump first). A process cannot report on itself while it is
stuck, so the endpoint is served by a small child process, as Kafka consumer-lag exporters
(Burrow, kafka-lag-exporter) watch consumers from the outside:

- the worker writes its registry's exposition and a status file (its partitions and a
  heartbeat) into ``<data_dir>/exporter/`` once a second, from its event loop;
- this process serves that exposition, plus what it measures itself:
  ``promo_stream_consumer_lag_records{partition}`` (the end offsets of `events` and of the
  repartition topic minus the group's committed offsets, for the partitions the worker
  owns, every ``LAG_INTERVAL`` seconds: a stuck worker's lag keeps growing on the dashboard)
  and ``promo_worker_heartbeat_age_seconds`` (how old the worker's last write is);
- it exits when the worker does (it watches its parent), so a dead worker is ``up == 0``.

Started by :func:`start` (the worker); run as ``python -m stream.exporter``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from stream.config import Settings, as_environment, load_settings
from stream.metrics import EXPORTER_GAUGES

log = logging.getLogger(__name__)

EXPOSITION = "metrics.prom"
STATUS = "status.json"
LAG_INTERVAL = 2.0  # seconds between two lag measurements
READY_LINE = "promo-exporter listening"


class ExporterError(RuntimeError):
    """The exporter could not start (the message says why: a port in use, most often)."""


# --- the worker's side ------------------------------------------------------------------------

def write_snapshot(directory: Path, registry: CollectorRegistry,
                   partitions: Iterable[int]) -> None:
    """The worker's metrics and status, each written atomically (rename) for the exporter."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / EXPOSITION, generate_latest(registry))
    status = {"heartbeat": time.time(), "pid": os.getpid(),
              "partitions": sorted(set(partitions))}
    _atomic_write(directory / STATUS, json.dumps(status).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def start(settings: Settings, directory: Path,
          timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start the exporter for this worker, wait until it listens; (process, port).

    Raises :class:`ExporterError` with the exporter's own message if it cannot (the metrics
    port is taken by another worker, typically).
    """
    worker = settings.worker
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream.exporter", "--dir", str(directory),
         "--host", worker.metrics_host, "--port", str(worker.metrics_port),
         "--parent", str(os.getpid())],
        env=as_environment(settings), stdout=subprocess.PIPE)  # its stderr is the worker's
    stdout = proc.stdout
    assert stdout is not None
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith(READY_LINE.encode()):
        proc.kill()
        proc.wait(5)
        said = line[0].decode(errors="replace").strip() if line else ""
        raise ExporterError(said or f"the metrics exporter did not start within "
                                    f"{timeout:.0f} s")
    return proc, int(line[0].split()[-1])


# --- the exporter process -------------------------------------------------------------------

class WorkerCollector(Collector):
    """The worker's last exposition, plus the lag and heartbeat measured here."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lag: dict[int, int] = {}

    def status(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads((self.directory / STATUS).read_bytes())
            return loaded
        except (OSError, ValueError):
            return {}

    def collect(self) -> Iterator[Metric]:
        try:
            text = (self.directory / EXPOSITION).read_text()
        except OSError:
            text = ""
        yield from text_string_to_metric_families(text)
        status = self.status()
        heartbeat = _gauge("promo_worker_heartbeat_age_seconds")
        if "heartbeat" in status:
            heartbeat.add_metric([], max(0.0, time.time() - float(status["heartbeat"])))
        yield heartbeat
        lag = _gauge("promo_stream_consumer_lag_records")
        owned = set(status.get("partitions", []))
        for partition, records in sorted(self.lag.items()):
            if partition in owned:  # a revoked partition's series goes with it
                lag.add_metric([str(partition)], records)
        yield lag


def _gauge(name: str) -> GaugeMetricFamily:
    documentation, labels = EXPORTER_GAUGES[name]
    return GaugeMetricFamily(name, documentation, labels=labels)


async def measure_lag(settings: Settings, collector: WorkerCollector) -> None:
    """Every ``LAG_INTERVAL`` seconds, forever; a broker away is waited for, never fatal."""
    while True:
        try:
            await _measure_lag(settings, collector)
        except Exception as exc:
            log.warning("cannot measure consumer lag: %s", exc)
            await asyncio.sleep(5 * LAG_INTERVAL)


async def _measure_lag(settings: Settings, collector: WorkerCollector) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from stream.topics import client_kwargs, repartition_topic

    kafka, group = settings.kafka, settings.worker.app_id
    topics = (kafka.events_topic, repartition_topic(group, "events"))
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                enable_auto_commit=False)
    await admin.start()
    try:
        await consumer.start()
        try:
            while True:
                partitions = collector.status().get("partitions", [])
                tps = [TopicPartition(t, p) for t in topics for p in partitions]
                ends = await consumer.end_offsets(tps) if tps else {}
                committed = await admin.list_consumer_group_offsets(group) if tps else {}
                lag: dict[int, int] = {}
                for tp in tps:
                    done = committed.get(tp)
                    start = done.offset if done is not None and done.offset >= 0 else 0
                    lag[tp.partition] = lag.get(tp.partition, 0) + max(0, ends[tp] - start)
                collector.lag = lag
                await asyncio.sleep(LAG_INTERVAL)
        finally:
            await consumer.stop()
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="exit when it exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-5s "
                        "promo-exporter: %(message)s")
    from prometheus_client import start_http_server

    settings = load_settings()
    collector = WorkerCollector(args.dir)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _ = start_http_server(args.port, addr=args.host, registry=registry)
    except OSError as exc:  # said on stdout: the worker reads it and stops with it
        print(f"cannot serve metrics on {args.host}:{args.port}: {exc.strerror or exc} "
              f"(another worker there? set worker.metrics_port, or 0 for any free port)",
              flush=True)
        sys.exit(2)
    print(f"{READY_LINE} {server.server_port}", flush=True)
    lag = threading.Thread(target=lambda: asyncio.run(measure_lag(settings, collector)),
                           daemon=True)
    lag.start()
    while os.getppid() == args.parent:  # re-parented: the worker is gone, and so are we
        time.sleep(0.5)
    server.shutdown()


if __name__ == "__main__":
    main()
