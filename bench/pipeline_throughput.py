"""Pipeline throughput against three references, same broker, same events, same run.

    .venv/bin/python bench/pipeline_throughput.py            # about 3 minutes
    .venv/bin/python bench/pipeline_throughput.py --quick    # a smoke run in under a minute

(a) raw aiokafka ``getmany`` + orjson decode: the ceiling, no processing at all;
(b) a naive per-event faust agent (bench/naive_faust.py: table write and send per event): the
    floor;
(c) promo-stream's worker: validate -> state (RocksDB + changelog) -> one batched encoder call
    -> decide -> publish, at-least-once;
(d) two such workers in one consumer group on the same topic (partitions >= 2), on fresh
    topics pre-filled with the same events: the scale-out ratio d/c on this machine;
(e) one worker with attribution off (``attribution.enabled = false``: no windows, no
    outcomes), on fresh topics with the same events: what attribution costs, c/e;
(f) the peer: a Quix Streams application (bench/quix_peer.py: confluent-kafka underneath, the
    library users most often pick instead of faust) doing only the stateful part of the work,
    per-user state in its RocksDB store and one output record per trigger: c/f is
    ``pipeline_vs_quixstreams``, promo-stream with its encoder and policy over it.

Besides events/s, each of (b), (c), (e) and (f) reports its own process's CPU seconds per 100k
events over the same span: the broker and the producer share the two cores, and this figure does not
depend on how much of them they took. ``worker_cpu_vs_naive_cpu`` is (c)'s CPU per event over
(b)'s. Then (b) and (c) run again on fresh topics **pinned**: the broker (when this script
started it) and this process (the producer) on one core, the measured process on another, so
that neither takes the other's core; ``pinned`` reports their rates and ratio beside the
unpinned ones.

(a), (b), (c) and (f) read the same pre-filled `events` topic (real Instacart events) from the
beginning; a run's rate is events / (time of the last event processed - time of the first). Writes
bench/results/pipeline_throughput.{json,png}, merges the ratios and the mean state record size
into bench/results/summary.json, and prints ``c/b``, ``c/a``, ``c/f``, ``d/c`` and ``c/e`` as its
last line.
``--quick`` writes pipeline_throughput_quick.* and touches summary.json only with ``--summary``.
``--profile`` also runs one worker under pyinstrument, on fresh topics after the measured runs
(a profiler slows what it watches: its rate is not a figure), and writes its profile to
pipeline_profile.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import orjson
from _common import ROOT, add_output_options, merge_summary, summary_path, write_json
from _stream import (
    add_worker_options,
    broker,
    drain_rate,
    on_cores,
    pin,
    prefill,
    quick_checkpoint,
    real_events,
    stream_facts,
)
from _stream import with_topics as on_topics
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.kafka import launcher
from stream.config import Settings


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


def naive_faust(settings: Settings, n: int, workdir: Path,
                cores: set[int] | None = None) -> tuple[float, float]:
    """(events per second, the agent process's CPU seconds) over its ``n`` events (on
    ``cores`` only, if given)."""
    env = {**os.environ, "NAIVE_BOOTSTRAP": settings.kafka.bootstrap_servers,
           "NAIVE_TOPIC": settings.kafka.events_topic, "NAIVE_EVENTS": str(n),
           "NAIVE_DATADIR": str(workdir / "naive"),
           "NAIVE_APP_ID": f"{settings.worker.app_id}-naive",
           "NAIVE_PARTITIONS": str(settings.kafka.partitions),
           "NAIVE_OUT": f"{settings.kafka.events_topic}-naive-out"}
    # It stops itself with SIGTERM: its exit status says nothing, its result line does.
    return run_peer("naive_faust.py", env, cores, must_exit_cleanly=False,
                    timeout=120 + n / 50)  # it runs at 1,000-2,000 events/s


def quix_streams(settings: Settings, n: int, workdir: Path) -> tuple[float, float]:
    """(f): (events per second, the process's CPU seconds) of bench/quix_peer.py over ``n``
    events of the events topic."""
    env = {**os.environ, "QUIX_BOOTSTRAP": settings.kafka.bootstrap_servers,
           "QUIX_TOPIC": settings.kafka.events_topic, "QUIX_EVENTS": str(n),
           "QUIX_STATE_DIR": str(workdir / "quix"),
           "QUIX_APP_ID": f"{settings.worker.app_id}-quix",
           "QUIX_OUT": f"{settings.kafka.events_topic}-quix-out"}
    return run_peer("quix_peer.py", env, None, must_exit_cleanly=True, timeout=120 + n / 500)


def run_peer(script: str, env: dict[str, str], cores: set[int] | None,
             must_exit_cleanly: bool, timeout: float = 900.0) -> tuple[float, float]:
    """Run a peer in bench/ (on ``cores`` only, if given) until it prints its result line
    ``{"events": n, "seconds": s, "cpu_seconds": c}``; (events per second, CPU seconds).

    A peer that has not finished after ``timeout`` seconds is killed and run once more as a
    new consumer group and state directory (once, on the suite's shared broker under load, the
    naive faust agent stalled for good before its first event; a second stall raises)."""
    try:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / script)], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              preexec_fn=on_cores(cores))
    except subprocess.TimeoutExpired:
        print(f"{script} did not finish in {timeout:.0f} s; running it again", file=sys.stderr)
        again = {k: v + "-again" if k.endswith(("_APP_ID", "_DATADIR", "_STATE_DIR")) else v
                 for k, v in env.items()}
        done = subprocess.run([sys.executable, str(ROOT / "bench" / script)], env=again,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              preexec_fn=on_cores(cores))
    # faust redirects stdout into its log, so the result line may carry a log prefix.
    found = re.findall(r'\{"events":.*?\}', done.stdout + done.stderr)
    if not found or (must_exit_cleanly and done.returncode != 0):
        raise RuntimeError(f"{script} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result = json.loads(found[-1])
    return float(result["events"] / result["seconds"]), float(result["cpu_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000,
                        help="events in the topic; (a) and (c) read them all")
    parser.add_argument("--naive-events", type=int, default=5_000,
                        help="events the naive agent reads (it is slow; its rate is a rate)")
    add_worker_options(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--profile", action="store_true", help="profile the worker")
    add_output_options(parser)
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.quick:
        args.events, args.naive_events = 10_000, 1_500
    summary = summary_path(args)
    out = args.out_dir / f"pipeline_throughput{suffix}"
    profile = args.out_dir / f"pipeline_profile{suffix}.txt" if args.profile else None
    with tempfile.TemporaryDirectory(prefix="promo-bench-") as tmp, \
            broker(Path(tmp), args.partitions, args.bootstrap_servers) as settings:
        workdir = Path(tmp)
        rows = real_events(args.events)
        prefill(settings, rows, "bench")
        checkpoint = args.checkpoint or quick_checkpoint(workdir)
        print("(a) raw aiokafka getmany + orjson...", file=sys.stderr)
        raw = asyncio.run(raw_aiokafka(settings, len(rows)))
        print("(b) naive per-event faust agent...", file=sys.stderr)
        naive, naive_cpu = naive_faust(settings, args.naive_events, workdir)
        print("(c) promo-stream worker...", file=sys.stderr)
        promo, stats = drain_rate(settings, len(rows), workdir / "c", checkpoint)
        print("(f) Quix Streams peer...", file=sys.stderr)
        quix, quix_cpu = quix_streams(settings, len(rows), workdir)
        print("(d) two promo-stream workers...", file=sys.stderr)
        two = on_topics(settings, "two")
        prefill(two, rows, "two")
        pair, _ = drain_rate(two, len(rows), workdir / "d", checkpoint, workers=2)
        print("(e) promo-stream worker, attribution off...", file=sys.stderr)
        bare = on_topics(settings, "bare")
        bare = dataclasses.replace(bare, attribution=dataclasses.replace(
            bare.attribution, enabled=False))
        prefill(bare, rows, "bare")
        unattributed, bare_stats = drain_rate(bare, len(rows), workdir / "e", checkpoint)
        pinned = pinned_pair(on_topics(settings, "pinned"), rows, args.naive_events, workdir,
                             checkpoint, broker_pids=[] if args.bootstrap_servers else
                             _broker_pids(Path(tmp) / "broker"))
        if profile is not None:
            print("profiling one worker (not measured)...", file=sys.stderr)
            profiled = on_topics(settings, "profiled")
            prefill(profiled, rows, "profiled")
            drain_rate(profiled, len(rows), workdir / "g", checkpoint, profile=profile)
    per_100k = {"naive_faust": naive_cpu / args.naive_events * 1e5,
                "promo": stats["worker_cpu_seconds"] / len(rows) * 1e5,
                "quixstreams": quix_cpu / len(rows) * 1e5,
                "promo_attribution_off": bare_stats["worker_cpu_seconds"] / len(rows) * 1e5}
    cpu_ratio = per_100k["promo"] / per_100k["naive_faust"]
    result = {
        "benchmark": "pipeline_throughput", "machine": stream_facts(),
        "config": {"events": len(rows), "naive_events": args.naive_events,
                   "partitions": args.partitions,
                   "batch_max_events": settings.worker.batch_max_events,
                   "batch_max_seconds": settings.worker.batch_max_seconds,
                   "guarantee": settings.worker.processing_guarantee},
        "events_per_second": {"raw_aiokafka": raw, "naive_faust": naive, "promo": promo,
                              "promo_two_workers": pair,
                              "promo_attribution_off": unattributed, "quixstreams": quix},
        "worker_cpu_seconds_per_100k_events": per_100k,
        "pinned": pinned,
        "worker_histograms": stats,
        "ratios": {"promo_over_naive": promo / naive, "promo_over_raw": promo / raw,
                   "promo_over_quixstreams": promo / quix,
                   "two_workers_over_one": pair / promo,
                   "attribution_on_over_off": promo / unattributed,
                   "worker_cpu_vs_naive_cpu": cpu_ratio},
    }
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    if summary is not None:
        state_bytes = (stats.get("promo_state_record_bytes_sum", 0)
                       / max(1.0, stats.get("promo_state_record_bytes_count", 0)))
        merge_summary(summary, pipeline_vs_naive_faust=round(promo / naive, 2),
                      pipeline_vs_raw_aiokafka=round(promo / raw, 4),
                      pipeline_vs_quixstreams=round(promo / quix, 2),
                      state_bytes_per_user=round(state_bytes) or None,
                      two_workers_over_one=round(pair / promo, 2),
                      attribution_throughput_ratio=round(promo / unattributed, 2),
                      worker_cpu_vs_naive_cpu=round(cpu_ratio, 3))
    print(f"events/s: raw aiokafka {raw:,.0f}, naive faust {naive:,.0f}, promo {promo:,.0f}, "
          f"two promo workers {pair:,.0f}, attribution off {unattributed:,.0f}, "
          f"quix streams {quix:,.0f}")
    print("worker CPU seconds per 100k events: "
          + ", ".join(f"{name} {value:,.1f}" for name, value in per_100k.items())
          + f"; promo / naive = {cpu_ratio:.3f} (goal <= 0.1)")
    if pinned is not None:
        print(f"pinned (broker and producer on core {pinned['producer_core']}, measured process "
              f"on core {pinned['worker_core']}"
              + ("" if pinned["broker_pinned"] else "; the broker is not ours: not pinned")
              + f"): naive {pinned['naive_faust']:,.0f}, promo {pinned['promo']:,.0f} ev/s, "
              f"c/b = {pinned['promo_over_naive']:.1f}x")
    print(f"c/b = {promo / naive:.1f}x (goal >= 10x); c/a = {promo / raw:.1%} (goal >= 5%); "
          f"c/f = {promo / quix:.2f}x (goal >= 1); d/c = {pair / promo:.2f}x; "
          f"c/e = {promo / unattributed:.2f}x (goal >= 0.85)")


def pinned_pair(settings: Settings, rows: list[Any], naive_events: int, workdir: Path,
                checkpoint: Path, broker_pids: list[int]) -> dict[str, Any] | None:
    """(b) and (c) again, the broker and this process on one core and the measured process on
    another; None on a machine with one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    producer, worker = cores[0], cores[1]
    everything = set(cores)
    for pid in broker_pids:
        pin(pid, {producer})
    os.sched_setaffinity(0, {producer})
    try:
        prefill(settings, rows, "pinned")
        print("(b, pinned) naive per-event faust agent...", file=sys.stderr)
        (workdir / "pinned").mkdir(exist_ok=True)
        naive, _ = naive_faust(settings, naive_events, workdir / "pinned", {worker})
        print("(c, pinned) promo-stream worker...", file=sys.stderr)
        promo, _ = drain_rate(settings, len(rows), workdir / "f", checkpoint, cores={worker})
    finally:
        os.sched_setaffinity(0, everything)
        for pid in broker_pids:
            pin(pid, everything)
    return {"producer_core": producer, "worker_core": worker,
            "broker_pinned": bool(broker_pids), "naive_faust": naive, "promo": promo,
            "promo_over_naive": promo / naive}


def _broker_pids(data_dir: Path) -> list[int]:
    cluster = launcher.Cluster.load(data_dir)
    return list(cluster.pids.values()) if cluster else []


def plot(result: dict, path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["events_per_second"]
    labels = ["(a) raw aiokafka\n+ orjson", "(b) naive faust\nagent", "(c) promo-stream\nworker",
              "(d) two promo\nworkers", "(e) attribution\noff", "(f) Quix Streams\n(state only)"]
    values = [rates["raw_aiokafka"], rates["naive_faust"], rates["promo"],
              rates["promo_two_workers"], rates["promo_attribution_off"], rates["quixstreams"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    colors = ["#999999", "#cc6666", "#3366cc", "#6699dd", "#99bbee", "#cc9944"]
    bars = ax.bar(labels, values, color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("events per second (log scale)")
    ax.set_title(f"Throughput, same broker and events ({result['machine']['cores']} cores)")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:,.0f}", ha="center",
                va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
