"""What the streaming benchmarks share: a real broker, pre-filled topics, `promo worker`
processes, and reading their metrics.

Import ``_common`` first (it sets OMP_WAIT_POLICY before torch loads).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import machine_facts
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import launcher
from encoder.data import Interaction, load_dataset
from stream.config import Settings, as_environment, load_settings
from stream.replay import produce
from stream.topics import ensure_topics

PROMO = str(Path(sys.executable).with_name("promo"))


def stream_facts() -> dict[str, Any]:
    """Machine facts plus the versions of the streaming stack."""
    import aiokafka
    import faust

    return machine_facts() | {"faust": faust.__version__, "aiokafka": aiokafka.__version__,
                              "kafka": launcher.kafka_version()}


@contextmanager
def broker(workdir: Path, partitions: int, bootstrap_servers: str | None = None
           ) -> Iterator[Settings]:
    """Default settings pointing at a broker for the run: a single-node KRaft broker started
    here, or the running one at ``bootstrap_servers`` (then on topics and a consumer group of
    this run's own, so earlier runs on it cannot leak in)."""
    base = load_settings(environ={})
    if bootstrap_servers:
        yield with_topics(dataclasses.replace(base, kafka=dataclasses.replace(
            base.kafka, bootstrap_servers=bootstrap_servers, partitions=partitions)),
            f"run{uuid.uuid4().hex[:8]}")
        return
    cluster = launcher.start(workdir / "broker", nodes=1)
    try:
        yield dataclasses.replace(base, kafka=dataclasses.replace(
            base.kafka, bootstrap_servers=cluster.bootstrap_servers, partitions=partitions))
    finally:
        launcher.stop(workdir / "broker")


def with_topics(settings: Settings, prefix: str) -> Settings:
    """The same settings on a fresh set of topics and a fresh consumer group."""
    k = settings.kafka
    return dataclasses.replace(
        settings,
        kafka=dataclasses.replace(
            k, events_topic=f"{prefix}-{k.events_topic}", dlq_topic=f"{prefix}-{k.dlq_topic}",
            decisions_topic=f"{prefix}-{k.decisions_topic}",
            vectors_topic=f"{prefix}-{k.vectors_topic}",
            outcomes_topic=f"{prefix}-{k.outcomes_topic}",
            coupons_topic=f"{prefix}-{k.coupons_topic}",
            preferences_topic=f"{prefix}-{k.preferences_topic}"),
        worker=dataclasses.replace(settings.worker, app_id=f"{prefix}-{settings.worker.app_id}"))


def real_events(n: int) -> list[Interaction]:
    """n real Instacart interactions (the sample repeated if it is shorter)."""
    rows = load_dataset("instacart")
    return (rows * (n // len(rows) + 1))[:n]


def prefill(settings: Settings, rows: list[Interaction], id_prefix: str) -> None:
    print(f"producing {len(rows):,} real Instacart events...", file=sys.stderr)
    asyncio.run(produce(settings.kafka, rows, id_prefix=id_prefix, progress=False))


def scrape(port: int) -> dict[str, float]:
    """Every unlabelled sample, plus the sums of the labelled ones, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name] = samples.get(s.name, 0.0) + s.value
    return samples


def accounted(port: int) -> float:
    """Records a worker has finished with: consumed, rejected or skipped as redelivered."""
    try:
        samples = scrape(port)
    except OSError:
        return 0.0
    return sum(samples.get(name, 0.0) for name in (
        "promo_stream_events_consumed_total", "promo_stream_records_rejected_total",
        "promo_stream_records_redelivered_total"))


@dataclasses.dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the worker has joined its group and recovered its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                if scrape(self.port).get("promo_worker_ready", 0.0) >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the worker was not ready after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def pin(pid: int, cores: set[int]) -> None:
    """Keep every thread of process ``pid`` on ``cores`` (threads it starts later inherit)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile


def on_cores(cores: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that keeps a child process on ``cores`` (None: anywhere)."""
    return None if cores is None else lambda: os.sched_setaffinity(0, cores)


def start_worker(settings: Settings, workdir: Path, checkpoint: Path, name: str,
                 profile: Path | None = None, cores: set[int] | None = None) -> WorkerProcess:
    """`promo worker` in the background, with its own state directory and metrics port
    (on ``cores`` only, if given: its exporter child inherits them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = launcher.free_port()
    env = as_environment(settings) | {
        "PROMO_WORKER_METRICS_PORT": str(port), "PROMO_WORKER_CHECKPOINT": str(checkpoint),
        "PROMO_WORKER_DATA_DIR": str(workdir / name), "PROMO_WORKER_LOG_LEVEL": "warning",
        # Counters reach the exporter this often: the rates below are timed to 50 ms.
        "PROMO_WORKER_METRICS_SNAPSHOT_SECONDS": "0.05"}
    cmd = [PROMO, "worker"]
    if profile:
        cmd = [sys.executable, "-m", "pyinstrument", "-o", str(profile), "-m", "stream",
               "worker"]
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=on_cores(cores))
    return WorkerProcess(proc, port, log)


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processing_rate(workers: Sequence[WorkerProcess], n: int, timeout: float = 1800) -> float:
    """Events per second the workers take to account for ``n`` records, from the first record
    processed to the last (polling their metrics)."""
    return processing_rate_and_cpu(workers, n, timeout)[0]


def processing_rate_and_cpu(workers: Sequence[WorkerProcess], n: int,
                            timeout: float = 1800, base: float = 0.0) -> tuple[float, float]:
    """:func:`processing_rate`, and the CPU seconds the worker processes used over the same
    span (their own CPU time: what the broker and the producer use on the same cores does not
    count, so this figure does not depend on sharing them). ``base``: records the workers had
    already accounted for (the ``n`` come on top)."""
    first = last = None
    cpu_first = cpu_last = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(accounted(w.port) for w in workers) - base
        now = time.perf_counter()
        if done > 0 and first is None:
            first = now
            cpu_first = sum(process_cpu_seconds(w.proc.pid) for w in workers)
        if done >= n:
            last = now
            cpu_last = sum(process_cpu_seconds(w.proc.pid) for w in workers)
            break
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(w.log.read_text()[-3000:])
        time.sleep(0.05)
    if first is None or last is None:
        raise RuntimeError("the workers did not process every event in time")
    if last - first < 0.25:
        raise RuntimeError(f"{n} events took {last - first:.2f} s: too few to time against "
                           f"the 50 ms metrics snapshot; replay more")
    return n / (last - first), cpu_last - cpu_first


def drain_rate(settings: Settings, n: int, workdir: Path, checkpoint: Path, workers: int = 1,
               profile: Path | None = None,
               cores: set[int] | None = None) -> tuple[float, dict[str, float]]:
    """Start ``workers`` workers on a pre-filled topic of ``n`` events; events per second from
    the first record processed to the last, and the first worker's metrics at the end (with
    ``worker_cpu_seconds``: the workers' CPU time over that span)."""
    started = [start_worker(settings, workdir, checkpoint, f"worker-{i}",
                            profile if i == 0 else None, cores) for i in range(workers)]
    try:
        rate, cpu = processing_rate_and_cpu(started, n)
        stats = {name: value for name, value in scrape(started[0].port).items()
                 if name.endswith(("_sum", "_count"))}
        stats["worker_cpu_seconds"] = cpu
        return rate, stats
    finally:
        for w in started:
            w.stop()


def quick_checkpoint(workdir: Path) -> Path:
    """A one-epoch Instacart model, for runs not given ``--checkpoint``."""
    out = workdir / "model"
    subprocess.run([PROMO, "train", "--dataset", "instacart", "--out", str(out),
                    "--epochs", "1", "--no-progress"], check=True, capture_output=True,
                   timeout=1800)
    return out


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """--partitions, --checkpoint and --bootstrap-servers, as the streaming benchmarks take
    them."""
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap-servers", default=None,
                        help="run on this running broker (on fresh topics) [default: start a "
                             "local broker for the run]")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="encoder checkpoint for the worker [default: train one epoch]")


def rate_beside_producer(settings: Settings, n: int, workdir: Path, checkpoint: Path,
                         ) -> tuple[float, float]:
    """(worker's events/s, producer's events/s) while n events are produced unthrottled."""
    asyncio.run(ensure_topics(settings.kafka))
    worker = start_worker(settings, workdir, checkpoint, "max-worker")
    try:
        worker.wait_ready()
        produced: list[float] = []

        def send() -> None:
            started = time.perf_counter()
            asyncio.run(produce(settings.kafka, real_events(n), id_prefix="max", clock="now",
                                progress=False))
            produced.append(n / (time.perf_counter() - started))

        producer = threading.Thread(target=send, daemon=True)
        producer.start()
        rate = processing_rate([worker], n, timeout=600)
        producer.join(timeout=60)
        if not produced:
            raise RuntimeError("the replay producer did not finish")
        return rate, produced[0]
    finally:
        worker.stop()
