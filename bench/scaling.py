"""Cost of work vs number of distinct users: throughput, memory, state size, recovery time.

    .venv/bin/python bench/scaling.py            # 10k, 100k and 1M users: about 6 minutes
    .venv/bin/python bench/scaling.py --quick    # 1k and 10k users, a smoke run

For each size N, on fresh topics of one broker:

1. state: N users' records (each built from one real Instacart event by the worker's own state
   code) are written to the `users` table's changelog topic, as a worker would have written
   them; the measured events, the same number for every size (``--events``), real events for
   users drawn uniformly from the N, are produced to `events`;
2. recovery: a worker starts with an empty state directory; the time until it processes its
   first event (it does so only once its tables are restored) is the time to restore N users
   from the changelog (process start included: compare sizes);
3. throughput: events / (time the last event was processed - time the first was);
4. memory: the worker's resident set size after the events;
5. the mean encoded user record the worker wrote (bytes, from its histogram).

Every size does the same work per batch (each event is for a user drawn from N, so a batch of
2,000 events touches about 2,000 users): what grows is only the state the worker holds, reads
and restores. That per-user work (one vector row and one decision per user in a batch) is why
the rates are below bench/pipeline_throughput.py, whose real Instacart order sessions bring
many events per user into each batch.
Writes bench/results/scaling.{json,png}, merges ``throughput_1m_over_10k_users`` (largest size
over smallest) into summary.json, and prints that ratio as its last line. ``--quick`` writes
scaling_quick.* and touches summary.json only with ``--summary``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
from _common import add_output_options, merge_summary, summary_path, write_json
from _stream import (
    accounted,
    add_worker_options,
    broker,
    prefill,
    quick_checkpoint,
    real_events,
    scrape,
    start_worker,
    stream_facts,
    with_topics,
)
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from encoder.data import Interaction
from stream import state as user_state
from stream.config import Settings
from stream.contracts import Event
from stream.topics import ensure_topics


def measured_events(users: int, n: int, seed: int = 0) -> list[Interaction]:
    """n real events, each for a user drawn uniformly from ``users``."""
    picks = np.random.default_rng(seed).integers(users, size=n)
    return [dataclasses.replace(r, user_id=f"s{int(u)}")
            for r, u in zip(real_events(n), picks, strict=True)]


def user_records(n: int) -> Iterator[tuple[bytes, bytes]]:
    """(user id, encoded state) for n users, each state from one real event."""
    templates = []
    for k, row in enumerate(real_events(min(n, 5_000))):
        st = user_state.UserState()
        user_state.apply_events(st, [Event(f"w{k}", "w", row.event_type, row.item_id,
                                           row.ts_ms)])
        templates.append(user_state.encode(st))
    for u in range(n):
        yield f"s{u}".encode(), templates[u % len(templates)]


async def write_changelog(settings: Settings, users: int) -> None:
    """The `users` table's changelog, created as the worker would and filled with ``users``
    records; keyed by user id, so the default partitioner puts each where the worker looks."""
    kafka = settings.kafka
    topic = f"{settings.worker.app_id}-users-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, kafka.partitions, 1,
                                            topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all",
                                linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        pending = []
        for key, value in user_records(users):
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await producer.flush()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_accounted(port: int, proc: subprocess.Popen[bytes], n: int, timeout: float) -> float:
    """Until the worker has accounted for n records; the perf_counter time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accounted(port) >= n:
            return time.perf_counter()
        if proc.poll() is not None:
            raise RuntimeError("the worker exited")
        time.sleep(0.05)
    raise RuntimeError(f"the worker did not account for {n} records in {timeout} s")


def run_size(settings: Settings, users: int, measured: int, workdir: Path,
             checkpoint: Path) -> dict[str, Any]:
    print(f"  writing {users:,} users' state to the changelog...", file=sys.stderr)
    asyncio.run(ensure_topics(settings.kafka))
    asyncio.run(write_changelog(settings, users))
    prefill(settings, measured_events(users, measured), f"scale{users}")
    started = time.perf_counter()
    worker = start_worker(settings, workdir, checkpoint, "worker")
    try:
        # Events are processed only once the tables are recovered: the first one marks it.
        ready = wait_accounted(worker.port, worker.proc, 1, timeout=1800)
        done = wait_accounted(worker.port, worker.proc, measured, timeout=1800)
        memory = rss_mb(worker.proc.pid)
        samples = scrape(worker.port)
    finally:
        worker.stop()
    state_bytes = (samples.get("promo_state_record_bytes_sum", 0.0)
                   / max(1.0, samples.get("promo_state_record_bytes_count", 0.0)))
    return {"users": users, "measured_events": measured,
            "events_per_second": (measured - 1) / (done - ready), "rss_mb": memory,
            "state_bytes_per_user": state_bytes, "recovery_seconds": ready - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--events", type=int, default=100_000,
                        help="measured events per size (after the warm-up)")
    add_worker_options(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    add_output_options(parser)
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.quick:
        args.users, args.events = [1_000, 10_000], 3_000
    summary = summary_path(args)
    out = args.out_dir / f"scaling{suffix}"
    sizes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="promo-bench-") as tmp, \
            broker(Path(tmp), args.partitions, args.bootstrap_servers) as settings:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or quick_checkpoint(workdir)
        for users in sorted(args.users):
            print(f"{users:,} users...", file=sys.stderr)
            sizes.append(run_size(with_topics(settings, f"u{users}"), users, args.events,
                                  workdir / f"u{users}", checkpoint))
            print(f"  {sizes[-1]['events_per_second']:,.0f} ev/s, "
                  f"{sizes[-1]['rss_mb']:,.0f} MB, recovery {sizes[-1]['recovery_seconds']:.1f} s",
                  file=sys.stderr)
    smallest, largest = sizes[0], sizes[-1]
    ratio = largest["events_per_second"] / smallest["events_per_second"]
    result = {
        "benchmark": "scaling", "machine": stream_facts(),
        "config": {"users": sorted(args.users), "measured_events": args.events,
                   "partitions": args.partitions,
                   "batch_max_events": settings.worker.batch_max_events,
                   "guarantee": settings.worker.processing_guarantee},
        "sizes": sizes,
        "ratios": {"throughput_largest_over_smallest": ratio,
                   "memory_largest_over_smallest": largest["rss_mb"] / smallest["rss_mb"],
                   "recovery_largest_over_smallest": (largest["recovery_seconds"]
                                                      / smallest["recovery_seconds"])},
    }
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    if summary is not None:
        merge_summary(summary, throughput_1m_over_10k_users=round(ratio, 3))
    for size in sizes:
        print(f"{size['users']:>9,} users: {size['events_per_second']:>8,.0f} ev/s, "
              f"RSS {size['rss_mb']:>6,.0f} MB, {size['state_bytes_per_user']:>5.0f} B/user, "
              f"recovery {size['recovery_seconds']:>6.1f} s")
    print(f"throughput {largest['users']:,} / {smallest['users']:,} users = {ratio:.2f}x "
          f"(goal: within 0.8-1.2x)")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    users = [s["users"] for s in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("events_per_second", "rss_mb", "recovery_seconds"),
                              ("events per second", "worker RSS (MB)",
                               "recovery from changelog (s)"), strict=True):
        ax.plot(users, [s[key] for s in sizes], marker="o")
        ax.set_xscale("log")
        ax.set(xlabel="distinct users", ylabel=label)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"Scaling with users ({result['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
