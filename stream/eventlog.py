"""The `events` topic as training data: `promo train --from-kafka` and `promo export-events`.

Reads every partition of the events topic from the beginning up to the end offsets taken when
reading starts (a snapshot: events arriving meanwhile wait for the next retraining), with
``read_committed`` so aborted transactions never become training data. Each record goes through
the same contract parser as the worker; records the worker would dead-letter are skipped and
counted, and an event id seen twice (a producer retry) is kept once. The result is in time
order, as the dataset loaders return it, so the same leave-one-out split applies.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from encoder.data import DataError, Interaction
from stream.config import ContractSettings, KafkaSettings
from stream.contracts import Event, Limits, Rejection, parse_event
from stream.topics import client_kwargs


@dataclass
class EventLog:
    interactions: list[Interaction]
    end_offsets: dict[int, int]  # partition -> the offset reading stopped at
    skipped: Counter[str] = field(default_factory=Counter)  # rejection reason -> records

    def source(self, topic: str) -> dict[str, object]:
        """What a checkpoint records about where its training data came from."""
        return {"kafka_topic": topic, "end_offsets": self.end_offsets,
                "skipped": dict(self.skipped), "interactions_loaded": len(self.interactions)}


def to_interaction(event: Event) -> Interaction:
    return Interaction(event.user_id, event.item_id, event.type, event.ts, price=event.price,
                       quantity=event.quantity, category=event.category,
                       session_id=event.session_id)


async def read_events(kafka: KafkaSettings, contract: ContractSettings, *,
                      timeout: float = 600.0,
                      on_progress: Callable[[int, int], None] | None = None) -> EventLog:
    """Every event in the topic up to its current end, parsed by the contract, in time order.
    ``on_progress(read, total)`` is called after each fetch."""
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(kafka.events_topic)
        if not partitions:
            await consumer._client.force_metadata_update()  # a fresh client may not know yet
            partitions = consumer.partitions_for_topic(kafka.events_topic)
        if not partitions:
            raise DataError(f"topic {kafka.events_topic!r} not found on "
                            f"{kafka.bootstrap_servers}")
        tps = [TopicPartition(kafka.events_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        start = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        total = sum(end[tp] - start[tp] for tp in tps)
        pending = {tp for tp in tps if end[tp] > start[tp]}
        rule = Limits.from_contract(contract)
        now_ms = int(time.time() * 1000)
        seen: set[str] = set()
        events: list[Event] = []
        skipped: Counter[str] = Counter()
        read = 0
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {kafka.events_topic} took over {timeout:.0f} s")
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    read += 1
                    parsed = parse_event(record.value, record.key, now_ms=now_ms, limits=rule)
                    if isinstance(parsed, Rejection):
                        skipped[parsed.reason.value] += 1
                    elif parsed.event_id in seen:
                        skipped["duplicate_event"] += 1
                    else:
                        seen.add(parsed.event_id)
                        events.append(parsed)
            for tp in list(pending):
                # Under read_committed, transaction markers take offsets too: position decides.
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if on_progress:
                on_progress(read, total)
    finally:
        await consumer.stop()
    events.sort(key=lambda e: e.ts)  # stable: a user's events keep their log order on ties
    return EventLog([to_interaction(e) for e in events],
                    {tp.partition: end[tp] for tp in tps}, skipped)


def load(kafka: KafkaSettings, contract: ContractSettings, *,
         progress: bool = True) -> EventLog:
    """:func:`read_events` with a progress bar (on stderr)."""
    from tqdm import tqdm

    with tqdm(unit="ev", desc=f"reading {kafka.events_topic}", disable=not progress) as bar:
        def show(read: int, total: int) -> None:
            bar.total = total
            bar.n = read
            bar.refresh()

        return asyncio.run(read_events(kafka, contract, on_progress=show))


CSV_COLUMNS = ("user_id", "item_id", "timestamp", "type", "price", "quantity", "category",
               "session_id")


def write_csv(interactions: Sequence[Interaction], path: Path) -> None:
    """The interactions as a CSV that `promo train --interactions FILE --type-col type` reads
    (timestamps in epoch milliseconds)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for it in interactions:
            writer.writerow((it.user_id, it.item_id, it.ts_ms, it.event_type,
                             "" if it.price is None else it.price,
                             "" if it.quantity is None else it.quantity,
                             it.category or "", it.session_id or ""))
