"""Pipeline throughput against two references, same broker, same events, same run.

    .venv/bin/python bench/pipeline_throughput.py            # about 3 minutes
    .venv/bin/python bench/pipeline_throughput.py --quick    # a smoke run in under a minute

(a) raw aiokafka ``getmany`` + orjson decode: the ceiling, no processing at all;
(b) a naive per-event faust agent (bench/naive_faust.py: table write and send per event): the
    floor;
(c) promo-stream's worker: validate -> state (RocksDB + changelog) -> one batched encoder call
    -> decide -> publish, at-least-once.

All three read the same pre-filled `events` topic (real Instacart events) from the beginning; a
run's rate is events / (time of the last event processed - time of the first). Writes
bench/results/pipeline_throughput.{json,png}, merges the ratios into bench/results/summary.json,
and prints ``c/b`` and ``c/a`` as its last line. ``--profile`` also writes a pyinstrument
profile of the worker to bench/results/pipeline_profile.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.kafka import launcher  # noqa: E402
from encoder.data import load_dataset  # noqa: E402
from stream.config import Settings, load_settings  # noqa: E402
from stream.replay import produce  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMO = str(Path(sys.executable).with_name("promo"))


def machine_facts() -> dict[str, object]:
    import aiokafka
    import faust
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    return {"cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "faust": faust.__version__, "aiokafka": aiokafka.__version__,
            "kafka": launcher.kafka_version(), "git_commit": commit,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def merge_summary(**ratios: float | None) -> None:
    path = RESULTS / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(ratios)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


async def raw_aiokafka(settings: Settings, n: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers,
                                group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_poll_records=5000)
    await consumer.start()
    try:
        topic = settings.kafka.events_topic
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, started = 0, None
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batch.values():
                if started is None:
                    started = time.perf_counter()
                for record in records:
                    orjson.loads(record.value)
                seen += len(records)
        assert started is not None
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def naive_faust(settings: Settings, n: int, workdir: Path) -> float:
    env = {**os.environ, "NAIVE_BOOTSTRAP": settings.kafka.bootstrap_servers,
           "NAIVE_TOPIC": settings.kafka.events_topic, "NAIVE_EVENTS": str(n),
           "NAIVE_DATADIR": str(workdir / "naive"), "NAIVE_APP_ID": "bench-naive",
           "NAIVE_PARTITIONS": str(settings.kafka.partitions), "NAIVE_OUT": "bench-naive-out"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "naive_faust.py")], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    # faust redirects stdout into its log, so the result line may carry a log prefix.
    found = re.findall(r'\{"events":.*?\}', done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"naive faust run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result = json.loads(found[-1])
    return float(result["events"] / result["seconds"])


def processed(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name in ("promo_stream_events_consumed_total",
                             "promo_stream_records_rejected_total"))


def promo_worker(settings: Settings, n: int, workdir: Path, checkpoint: Path,
                 profile: bool) -> tuple[float, dict[str, float]]:
    port = launcher.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    for section in dataclasses.fields(settings):
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            env[f"PROMO_{section.name.upper()}_{name.upper()}"] = str(value)
    env |= {"PROMO_WORKER_METRICS_PORT": str(port), "PROMO_WORKER_CHECKPOINT": str(checkpoint),
            "PROMO_WORKER_DATA_DIR": str(workdir / "worker"), "PROMO_WORKER_APP_ID": "bench-promo",
            "PROMO_WORKER_LOG_LEVEL": "warning"}
    cmd = [PROMO, "worker"]
    if profile:
        cmd = [sys.executable, "-m", "pyinstrument", "-o",
               str(RESULTS / "pipeline_profile.txt"), "-m", "stream", "worker"]
    log = open(workdir / "promo-worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = last = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            try:
                done = processed(port)
            except OSError:
                done = 0.0
            now = time.perf_counter()
            if done > 0 and first is None:
                first = now
            if done >= n:
                last = now
                break
            if proc.poll() is not None:
                raise RuntimeError((workdir / "promo-worker.log").read_text()[-3000:])
            time.sleep(0.05)
        if first is None or last is None:
            raise RuntimeError("the worker did not process every event in time")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        stats = {s.name: s.value for family in text_string_to_metric_families(text)
                 for s in family.samples if not s.labels
                 and s.name.endswith(("_sum", "_count"))}
        return n / (last - first), stats
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()


def quick_checkpoint(workdir: Path) -> Path:
    out = workdir / "model"
    subprocess.run([PROMO, "train", "--dataset", "instacart", "--out", str(out),
                    "--epochs", "1", "--no-progress"], check=True, capture_output=True,
                   timeout=1800)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000,
                        help="events in the topic; (a) and (c) read them all")
    parser.add_argument("--naive-events", type=int, default=20_000,
                        help="events the naive agent reads (it is slow; its rate is a rate)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="encoder checkpoint for the worker [default: train one epoch]")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--profile", action="store_true", help="profile the worker")
    args = parser.parse_args()
    if args.quick:
        args.events, args.naive_events = 6_000, 1_500
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="promo-bench-") as tmp:
        workdir = Path(tmp)
        cluster = launcher.start(workdir / "broker", nodes=1)
        try:
            base = load_settings(environ={})
            settings = dataclasses.replace(base, kafka=dataclasses.replace(
                base.kafka, bootstrap_servers=cluster.bootstrap_servers,
                partitions=args.partitions))
            rows = load_dataset("instacart")
            rows = (rows * (args.events // len(rows) + 1))[:args.events]
            print(f"producing {len(rows):,} real Instacart events...", file=sys.stderr)
            asyncio.run(produce(settings.kafka, rows, id_prefix="bench", progress=False))
            checkpoint = args.checkpoint or quick_checkpoint(workdir)
            print("(a) raw aiokafka getmany + orjson...", file=sys.stderr)
            raw = asyncio.run(raw_aiokafka(settings, len(rows)))
            print("(b) naive per-event faust agent...", file=sys.stderr)
            naive = naive_faust(settings, args.naive_events, workdir)
            print("(c) promo-stream worker...", file=sys.stderr)
            promo, stats = promo_worker(settings, len(rows), workdir, checkpoint, args.profile)
        finally:
            launcher.stop(workdir / "broker")
    result = {
        "benchmark": "pipeline_throughput", "machine": machine_facts(),
        "config": {"events": len(rows), "naive_events": args.naive_events,
                   "partitions": args.partitions, "batch_max_events":
                   base.worker.batch_max_events, "batch_max_seconds":
                   base.worker.batch_max_seconds, "guarantee": base.worker.processing_guarantee},
        "events_per_second": {"raw_aiokafka": raw, "naive_faust": naive, "promo": promo},
        "worker_histograms": stats,
        "ratios": {"promo_over_naive": promo / naive, "promo_over_raw": promo / raw},
    }
    (RESULTS / "pipeline_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result)
    if not args.quick:
        merge_summary(pipeline_vs_naive_faust=round(promo / naive, 2),
                      pipeline_vs_raw_aiokafka=round(promo / raw, 4))
    print(f"events/s: raw aiokafka {raw:,.0f}, naive faust {naive:,.0f}, promo {promo:,.0f}")
    print(f"c/b = {promo / naive:.1f}x (goal >= 10x); c/a = {promo / raw:.1%} (goal >= 5%)")


def plot(result: dict) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["events_per_second"]
    labels = ["(a) raw aiokafka\n+ orjson", "(b) naive faust\nagent", "(c) promo-stream\nworker"]
    values = [rates["raw_aiokafka"], rates["naive_faust"], rates["promo"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#999999", "#cc6666", "#3366cc"])
    ax.set_yscale("log")
    ax.set_ylabel("events per second (log scale)")
    ax.set_title(f"Throughput, same broker and events ({result['machine']['cores']} cores)")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f}", ha="center",
                va="bottom")
    fig.tight_layout()
    fig.savefig(RESULTS / "pipeline_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
