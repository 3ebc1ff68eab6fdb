"""Latency from event time to decision published, at half the worker's measured maximum rate.

    .venv/bin/python bench/latency.py            # about 3 minutes
    .venv/bin/python bench/latency.py --quick    # a smoke run in about a minute

In one run, on one real broker:

1. maximum: one worker processes real Instacart events *while* the replay producer sends them
   as fast as it can, on the same cores, as in the sustained phase (a worker draining a
   pre-filled topic alone, the throughput benchmark's (c), has the machine to itself and
   overstates what it sustains beside a producer); the worker's rate from its first processed
   event to its last is the maximum. The producer finishes first, so the last part of that
   window has the cores to itself; counting only the time the producer is sending overstates
   far more (the worker drains the producer's backlog in full batches while the producer sets
   the pace: 21,710 events/s in one run, at half of which the worker saturated);
2. sustained: a fresh worker on fresh topics while real events are replayed at 50% of that rate
   for ``--seconds``, each stamped with the wall clock when it is sent;
3. each decision's latency is its record's timestamp (set by the worker's producer when it
   publishes) minus its trigger event's time, read back from the topics, so every decision is
   a sample, not a histogram bucket. Cart-abandonment reminders are left out: a timer
   triggers them on purpose, minutes after their event.

Goal: p99 <= 4x the micro-batch window (``worker.batch_max_seconds``). Writes
bench/results/latency.{json,png} (every sample, and latency over time), merges
``latency_p99_over_window`` into bench/results/summary.json, and prints the ratio last.
``--quick`` writes latency_quick.* and touches summary.json only with ``--summary``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import orjson
from _common import add_output_options, merge_summary, summary_path, write_json
from _stream import (
    accounted,
    add_worker_options,
    broker,
    quick_checkpoint,
    rate_beside_producer,
    real_events,
    start_worker,
    stream_facts,
    with_topics,
)

from stream.config import Settings
from stream.replay import produce
from stream.topics import ensure_topics


async def read_topic(settings: Settings, topic: str) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers,
                                group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            batch = await consumer.getmany(timeout_ms=1000)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


def latencies(settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the first decision, latency in seconds) for every triggered decision."""
    events = asyncio.run(read_topic(settings, settings.kafka.events_topic))
    event_ts = {(e := orjson.loads(r.value))["event_id"]: e["ts"] for r in events}
    decisions = asyncio.run(read_topic(settings, settings.kafka.decisions_topic))
    published, waited = [], []
    for record in decisions:
        decision = orjson.loads(record.value)
        ts = event_ts.get(decision["trigger_event_id"])
        if ts is None:  # a timer's decision (cart abandonment): no event triggered it
            continue
        published.append(record.timestamp)
        waited.append((record.timestamp - ts) / 1000)
    order = np.argsort(published)
    at = np.asarray(published, dtype=np.float64)[order]
    return (at - at[0]) / 1000 if len(at) else at, np.asarray(waited)[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=60_000,
                        help="events replayed unthrottled to measure the maximum rate")
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="how long the sustained replay lasts")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the maximum rate")
    add_worker_options(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.events, args.seconds = 10_000, 10.0
    summary = summary_path(args)
    out = args.out_dir / ("latency_quick" if args.quick else "latency")

    with tempfile.TemporaryDirectory(prefix="promo-bench-") as tmp, \
            broker(Path(tmp), args.partitions, args.bootstrap_servers) as base:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or quick_checkpoint(workdir)
        window = base.worker.batch_max_seconds
        print("maximum: one worker beside an unthrottled producer...", file=sys.stderr)
        max_rate, producer_rate = rate_beside_producer(with_topics(base, "max"), args.events,
                                                       workdir, checkpoint)
        rate = args.load * max_rate
        n = int(rate * args.seconds)
        sustained = with_topics(base, "sustained")
        asyncio.run(ensure_topics(sustained.kafka))
        worker = start_worker(sustained, workdir, checkpoint, "sustained-worker")
        try:
            worker.wait_ready()
            print(f"sustained: {n:,} events at {rate:,.0f}/s for {args.seconds:.0f} s...",
                  file=sys.stderr)
            asyncio.run(produce(sustained.kafka, real_events(n), id_prefix="sustained",
                                rate=rate, clock="now", progress=False))
            deadline = time.monotonic() + 300
            while accounted(worker.port) < n and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            worker.stop()
        at, waited = latencies(sustained)

    if len(waited) == 0:
        raise SystemExit("no triggered decisions were published: nothing to measure")
    p50, p95, p99 = (float(np.percentile(waited, q)) for q in (50, 95, 99))
    result = {
        "benchmark": "latency", "machine": stream_facts(),
        "config": {"max_events": args.events, "seconds": args.seconds, "load": args.load,
                   "partitions": args.partitions, "batch_max_seconds": window,
                   "batch_max_events": base.worker.batch_max_events},
        "max_events_per_second": max_rate, "max_phase_producer_events_per_second": producer_rate,
        "replay_events_per_second": rate,
        "replayed_events": n, "decisions": len(waited),
        "latency_seconds": {"p50": p50, "p95": p95, "p99": p99, "max": float(waited.max())},
        "p99_over_window": p99 / window,
        "samples": {"published_at_seconds": at.round(3).tolist(),
                    "latency_seconds": waited.round(4).tolist()},
    }
    write_json(out.with_suffix(".json"), result)
    plot(result, at, waited, out.with_suffix(".png"))
    if summary is not None:
        merge_summary(summary, latency_p99_over_window=round(p99 / window, 2))
    print(f"max {max_rate:,.0f} events/s (producer sent {producer_rate:,.0f}/s); "
          f"at {rate:,.0f}/s: {len(waited):,} decisions, "
          f"p50 {p50:.3f} s, p95 {p95:.3f} s, p99 {p99:.3f} s, max {waited.max():.3f} s")
    print(f"latency p99 / batch window = {p99 / window:.1f}x (goal <= 4x)")


def plot(result: dict[str, Any], at: np.ndarray, waited: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["latency_seconds"]
    window = result["config"]["batch_max_seconds"]
    fig, (over_time, spread) = plt.subplots(1, 2, figsize=(11, 4),
                                            gridspec_kw={"width_ratios": [3, 1]})
    over_time.scatter(at, waited, s=3, alpha=0.4)
    for name, style in (("p50", ":"), ("p99", "--")):
        over_time.axhline(lat[name], linestyle=style, color="k", label=f"{name} {lat[name]:.3f} s")
    over_time.axhline(4 * window, color="r", label=f"goal: 4 x window = {4 * window:.2f} s")
    over_time.set(xlabel="seconds into the replay", ylabel="event time -> decision published (s)",
                  title=f"Latency at {result['replay_events_per_second']:,.0f} events/s "
                        f"({result['config']['load']:.0%} of max)")
    over_time.legend(loc="upper right")
    spread.hist(waited, bins=50, orientation="horizontal")
    spread.set(xlabel="decisions", title="distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
