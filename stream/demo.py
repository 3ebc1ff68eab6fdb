"""`promo demo`: the whole product end to end on this machine, then everything stopped.

local KRaft broker -> `promo worker` subprocess -> replay of a real dataset slice (plus a few
malformed records, to show the dead-letter path) -> wait until the worker has accounted for every
record -> print what happened -> stop the worker and the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click
import orjson
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import launcher
from stream.config import Settings
from stream.replay import produce

#: Records that break the contract in different ways; each must end up in the DLQ.
MALFORMED: list[tuple[bytes | None, bytes | None]] = [
    (b"demo-user", b"{this is not json"),
    (b"demo-user", b'["an", "array"]'),
    (b"demo-user", b'{"event_id": "m1", "user_id": "demo-user", "type": "view", "ts": 1}'),
    (b"demo-user", orjson.dumps({"event_id": "m2", "user_id": "demo-user", "type": "teleport",
                                 "item_id": "x", "ts": int(time.time() * 1000)})),
    (None, orjson.dumps({"event_id": "m3", "user_id": "demo-user", "type": "view",
                         "item_id": "x", "ts": int(time.time() * 1000)})),
]


def _env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    for section in dataclasses.fields(settings):
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            env[f"PROMO_{section.name.upper()}_{name.upper()}"] = str(value)
    return env


def _scrape(url: str) -> dict[str, dict[str, float]]:
    """{metric sample name: {label value: value}} for the single-label metrics we print."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = next(iter(s.labels.values()), "")
            out.setdefault(s.name, {})[label] = s.value
    return out


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def run_demo(settings: Settings, *, dataset: str, rows: list, limit: int,  # type: ignore[type-arg]
             workdir: Path, keep_running: bool) -> None:
    say = lambda text: click.secho(text, bold=True, err=True)  # noqa: E731
    broker_dir = workdir / "broker"
    launcher.stop(broker_dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    say(f"1/5 starting Kafka {launcher.kafka_version()} (KRaft) in {broker_dir}")
    cluster = launcher.start(broker_dir, nodes=1)
    metrics_port = launcher.free_port()
    settings = dataclasses.replace(
        settings,
        kafka=dataclasses.replace(settings.kafka, bootstrap_servers=cluster.bootstrap_servers),
        worker=dataclasses.replace(settings.worker, data_dir=str(workdir / "worker"),
                                   metrics_port=metrics_port))
    worker_log = workdir / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        say(f"2/5 starting the worker (log: {worker_log})")
        with open(worker_log, "wb") as log_file:
            worker = subprocess.Popen([sys.executable, "-m", "stream", "worker"],
                                      env=_env_for(settings), stdout=log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: b"worker ready" in worker_log.read_bytes() or worker.poll() is not None,
              120, "the worker to join its group")
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited:\n{worker_log.read_text()[-3000:]}")

        say(f"3/5 replaying {min(limit, len(rows)):,} real events from {dataset}, "
            f"plus {len(MALFORMED)} malformed records")
        result = asyncio.run(produce(settings.kafka, rows, id_prefix=dataset, limit=limit))
        asyncio.run(_produce_malformed(settings))
        expected = result.produced + len(MALFORMED)

        url = f"http://{settings.worker.metrics_host}:{metrics_port}/metrics"
        say(f"4/5 waiting for the worker to account for all {expected:,} records ({url})")

        def accounted() -> int:
            m = _scrape(url)
            return int(sum(m.get("promo_stream_events_consumed_total", {}).values())
                       + sum(m.get("promo_stream_records_rejected_total", {}).values()))

        _wait(lambda: accounted() >= expected, 300, f"{expected} records to be processed")
        metrics = _scrape(url)
        say("5/5 what happened")
        click.echo(f"  replayed   {result.produced:,} events in {result.seconds:.1f}s "
                   f"({result.rate:,.0f}/s)")
        for event_type, n in sorted(metrics["promo_stream_events_consumed_total"].items()):
            click.echo(f"  consumed   {int(n):>8,}  {event_type}")
        for reason, n in sorted(metrics["promo_stream_records_rejected_total"].items()):
            if n:
                click.echo(f"  rejected   {int(n):>8,}  {reason} -> {settings.kafka.dlq_topic}")
        batches = metrics.get("promo_stream_batch_size_records_count", {}).get("", 0)
        click.echo(f"  batches    {int(batches):>8,}")
        click.echo(f"  metrics    {url}")
        if keep_running:
            say("running until Ctrl-C (broker and worker stay up)")
            try:
                while worker.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        launcher.stop(broker_dir)
        say("stopped worker and broker")


async def _produce_malformed(settings: Settings) -> None:
    from aiokafka import AIOKafkaProducer

    from stream.topics import client_kwargs

    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    await producer.start()
    try:
        for key, value in MALFORMED:
            await producer.send_and_wait(settings.kafka.events_topic, value, key=key)
    finally:
        await producer.stop()
