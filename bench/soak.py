"""Soak: bursts and silences under exactly-once, with cart timers firing in the silences.

    .venv/bin/python bench/soak.py                 # 10 minutes (--minutes 60 for an hour)
    .venv/bin/python bench/soak.py --quick         # one burst and one silence, ~1 minute

A shop's traffic is not a steady stream: bursts of sessions, then nothing for a while, and the
abandoned carts of the burst fall due in the silence. Each cycle here replays a slice of real
Instacart events, produced by librdkafka (confluent-kafka, idempotent, acks=all, its default
CRC32 partitioner, so some events take the repartition hop), with the purchases of a third of
the slice's users left out (their carts are abandoned), then stays silent for a random time,
some silences longer than twice the transaction timeout. The worker runs exactly-once, with
the transaction timeout shortened (``--transaction-timeout``) so that many silences outlast
it. A ``read_committed`` librdkafka consumer reads the decisions throughout, noting when each
one became visible.

Reported (and merged into bench/results/summary.json):

- ``soak_worker_restarts``: times the worker process exited and had to be started again
  (goal 0);
- ``soak_decisions_lost``: cart adds of a burst left without any decision for that user in
  that burst, plus abandoned carts without a reminder (goal 0);
- ``soak_decisions_duplicated``: decision ids committed more than once (goal 0);
- ``soak_rss_growth_mb``: the worker's resident memory in the last quarter of the run minus
  the first quarter after warm-up (medians);
- ``soak_reminder_p99_seconds``: p99 time from a cart's abandonment deadline (cart add +
  ``policy.cart_abandon_seconds``) to its reminder being visible to read_committed readers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import orjson
from _common import add_output_options, merge_summary, summary_path, write_json
from _stream import (
    add_worker_options,
    broker,
    quick_checkpoint,
    real_events,
    start_worker,
    stream_facts,
    with_topics,
)
from confluent_kafka import Consumer, Producer

from encoder.data import Interaction
from stream import state as user_state
from stream.config import Settings
from stream.contracts import Event
from stream.topics import ensure_topics


class CommittedDecisions(threading.Thread):
    """Reads `decisions` with isolation.level=read_committed; notes when each id appeared."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.decisions: list[dict[str, Any]] = []
        self.first_seen: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.settings.kafka.bootstrap_servers,
                             "group.id": "soak-reader", "auto.offset.reset": "earliest",
                             "isolation.level": "read_committed", "enable.auto.commit": False})
        consumer.subscribe([self.settings.kafka.decisions_topic])
        try:
            while not self.stopping.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                body = orjson.loads(msg.value())
                self.decisions.append(body)
                self.first_seen.setdefault(body["decision_id"], time.time())
        finally:
            consumer.close()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def burst_events(rows: list[Interaction], cycle: int, rng: random.Random) -> list[Event]:
    """The slice as contract events stamped now, a third of its users' purchases left out."""
    users = sorted({r.user_id for r in rows})
    abandon = set(rng.sample(users, len(users) // 3))
    now = int(time.time() * 1000)
    return [Event(f"soak-{cycle}-{n}", r.user_id, r.event_type, r.item_id, now + n // 50,
                  price=r.price, quantity=r.quantity)
            for n, r in enumerate(rows)
            if not (r.event_type == "purchase" and r.user_id in abandon)]


def produce(settings: Settings, events: list[Event], rate: float) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         "compression.type": "lz4"})
    started = time.monotonic()
    for n, event in enumerate(events):
        ahead = n / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        while True:
            try:
                producer.produce(settings.kafka.events_topic, value=event.to_json(),
                                 key=event.user_id.encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("librdkafka did not deliver the burst")


def expectations(bursts: list[list[Event]], abandon_s: float
                 ) -> tuple[dict[tuple[str, int], set[str]], dict[tuple[str, str], float]]:
    """What must have been decided, from the events alone.

    (user, burst) -> the ids of the user's cart adds in that burst (each group must lead to at
    least one decision triggered by one of them), and (user, id of the cart add that opened
    it) -> deadline of every cart still open at the end of a burst (each gets exactly one
    reminder in the silence).
    """
    cart_adds: dict[tuple[str, int], set[str]] = defaultdict(set)
    reminders: dict[tuple[str, str], float] = {}
    states: dict[str, user_state.UserState] = defaultdict(user_state.UserState)
    for number, events in enumerate(bursts):
        by_user: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_user[event.user_id].append(event)
            if event.type == "add_to_cart":
                cart_adds[(event.user_id, number)].add(event.event_id)
        for user, mine in by_user.items():
            s = states[user]
            applied, _ = user_state.apply_events(s, mine)
            opened = user_state.open_cart_event(s, applied)
            if s.cart_open and not s.cart_reminded and opened is not None:
                reminders[(user, opened.event_id)] = s.cart_ts_ms / 1000 + abandon_s
                s.cart_reminded = True
    return cart_adds, reminders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the soak lasts")
    parser.add_argument("--burst-events", type=int, default=4_000,
                        help="real events per burst")
    parser.add_argument("--rate", type=float, default=2_000.0, help="events/s within a burst")
    parser.add_argument("--silence", type=float, nargs=2, default=(10.0, 50.0),
                        metavar=("MIN", "MAX"), help="seconds of silence after each burst")
    parser.add_argument("--transaction-timeout", type=float, default=20.0,
                        help="the worker's worker.transaction_timeout_seconds")
    parser.add_argument("--cart-abandon", type=float, default=8.0,
                        help="policy.cart_abandon_seconds (shorter than every silence)")
    parser.add_argument("--seed", type=int, default=0)
    add_worker_options(parser)
    parser.add_argument("--quick", action="store_true",
                        help="one short burst and one silence past twice the timeout")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.burst_events, args.transaction_timeout = 0.0, 800, 5.0
        args.silence, args.cart_abandon = (12.0, 12.0), 3.0
    summary = summary_path(args)
    out = args.out_dir / ("soak_quick.json" if args.quick else "soak.json")
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="promo-soak-") as tmp, \
            broker(Path(tmp), args.partitions, args.bootstrap_servers) as base:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or quick_checkpoint(workdir)
        settings = with_topics(base, "soak")
        settings = dataclasses.replace(
            settings,
            worker=dataclasses.replace(settings.worker, processing_guarantee="exactly_once",
                                       transaction_timeout_seconds=args.transaction_timeout),
            policy=dataclasses.replace(settings.policy, cart_abandon_seconds=args.cart_abandon,
                                       cart_check_seconds=1.0, quiet_start_hour=0,
                                       quiet_end_hour=0))
        asyncio.run(ensure_topics(settings.kafka))
        worker = start_worker(settings, workdir, checkpoint, "soak-worker")
        worker.wait_ready()
        reader = CommittedDecisions(settings)
        reader.start()
        rows = real_events(10**6)
        restarts, rss, bursts, silences = 0, [], [], []
        started = time.monotonic()
        stop_at = started + args.minutes * 60

        def watch(seconds: float) -> None:
            nonlocal worker, restarts
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                if worker.proc.poll() is not None:
                    restarts += 1
                    print(f"worker exited ({worker.proc.returncode}); restarting",
                          file=sys.stderr)
                    worker = start_worker(settings, workdir, checkpoint,
                                          f"soak-worker-{restarts}")
                    worker.wait_ready()
                sample = rss_mb(worker.proc.pid)
                if sample is not None:
                    rss.append((time.monotonic() - started, sample))
                time.sleep(1.0)

        cycle = 0
        while True:
            chunk = rows[cycle * args.burst_events:(cycle + 1) * args.burst_events]
            events = burst_events(chunk, cycle, rng)
            print(f"burst {cycle}: {len(events):,} events", file=sys.stderr)
            produce(settings, events, args.rate)
            bursts.append(events)
            silence = rng.uniform(*args.silence)
            silences.append(silence)
            watch(silence)
            cycle += 1
            if time.monotonic() >= stop_at:
                break
        watch(args.cart_abandon + 10)  # the last silence's reminders, with margin
        reader.stopping.set()
        reader.join(30)
        log_text = "".join(p.read_text(errors="replace")
                           for p in workdir.glob("soak-worker*.log"))
        worker.stop()

    cart_adds, reminders = expectations(bursts, args.cart_abandon)
    decided_by: dict[str, set[str]] = defaultdict(set)
    reminded: dict[tuple[str, str], str] = {}
    for d in reader.decisions:
        decided_by[d["user_id"]].add(d["trigger_event_id"])
        if d["trigger_event_id"].startswith("cart:"):
            reminded[(d["user_id"], d["trigger_event_id"][len("cart:"):])] = d["decision_id"]
    lost_triggers = sum(1 for (user, _), ids in cart_adds.items()
                        if not ids & decided_by[user])
    lost_reminders = [key for key in reminders if key not in reminded]
    duplicated = sum(n - 1 for n in Counter(d["decision_id"] for d in reader.decisions).values())
    delays = np.asarray([reader.first_seen[reminded[key]] - deadline
                         for key, deadline in reminders.items() if key in reminded])
    after_warmup = [mb for t, mb in rss if t >= 30] or [mb for _, mb in rss]
    quarter = max(1, len(after_warmup) // 4)
    growth = float(np.median(after_warmup[-quarter:]) - np.median(after_warmup[:quarter]))
    p99 = float(np.percentile(delays, 99)) if len(delays) else None
    result = {
        "benchmark": "soak", "machine": stream_facts(),
        "config": {"minutes": args.minutes, "burst_events": args.burst_events,
                   "rate": args.rate, "silence": list(args.silence),
                   "transaction_timeout_seconds": args.transaction_timeout,
                   "cart_abandon_seconds": args.cart_abandon, "partitions": args.partitions,
                   "seed": args.seed, "quick": args.quick},
        "bursts": len(bursts), "events": sum(len(b) for b in bursts),
        "silences_seconds": [round(s, 1) for s in silences],
        "silences_over_twice_the_timeout": sum(s > 2 * args.transaction_timeout
                                               for s in silences),
        "decisions_committed": len(reader.decisions), "reminders_expected": len(reminders),
        "worker_restarts": restarts, "producer_fenced_in_log": "ProducerFenced" in log_text,
        "decisions_lost": lost_triggers + len(lost_reminders),
        "lost_cart_add_groups": lost_triggers, "lost_reminders": len(lost_reminders),
        "decisions_duplicated": duplicated,
        "reminder_delay_seconds": {
            "p50": float(np.percentile(delays, 50)) if len(delays) else None,
            "p99": p99, "max": float(delays.max()) if len(delays) else None},
        "rss_mb": {"samples": [[round(t, 1), round(mb, 1)] for t, mb in rss],
                   "growth": round(growth, 1)},
    }
    write_json(out, result)
    if summary is not None:
        merge_summary(summary, soak_worker_restarts=restarts,
                      soak_decisions_lost=result["decisions_lost"],
                      soak_decisions_duplicated=duplicated, soak_rss_growth_mb=round(growth, 1),
                      soak_reminder_p99_seconds=None if p99 is None else round(p99, 2))
    print(f"{len(bursts)} bursts, {result['events']:,} events, "
          f"{result['silences_over_twice_the_timeout']} silences > 2x the "
          f"{args.transaction_timeout:g} s transaction timeout; "
          f"{len(reader.decisions):,} decisions committed, {len(reminders)} reminders due")
    print(f"soak: restarts {restarts}, lost {result['decisions_lost']}, duplicated "
          f"{duplicated}, rss growth {growth:+.1f} MB, reminder p99 "
          f"{'n/a' if p99 is None else f'{p99:.2f} s'}")


if __name__ == "__main__":
    main()
