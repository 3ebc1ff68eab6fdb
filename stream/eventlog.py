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
from typing import TYPE_CHECKING

from encoder.data import DataError, Interaction
from stream.config import ContractSettings, KafkaSettings
from stream.contracts import Event, Limits, Rejection, parse_event
from stream.topics import TopicMissing, read_snapshot

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord


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
    rule = Limits.from_contract(contract)
    now_ms = int(time.time() * 1000)
    seen: set[str] = set()
    events: list[Event] = []
    skipped: Counter[str] = Counter()

    def keep(record: ConsumerRecord[bytes, bytes]) -> None:
        parsed = parse_event(record.value, record.key, now_ms=now_ms, limits=rule)
        if isinstance(parsed, Rejection):
            skipped[parsed.reason.value] += 1
        elif parsed.event_id in seen:
            skipped["duplicate_event"] += 1
        else:
            seen.add(parsed.event_id)
            events.append(parsed)

    try:
        end = await read_snapshot(kafka, kafka.events_topic, keep, timeout=timeout,
                                  on_progress=on_progress)
    except TopicMissing as exc:
        raise DataError(str(exc)) from exc
    events.sort(key=lambda e: e.ts)  # stable: a user's events keep their log order on ties
    return EventLog([to_interaction(e) for e in events], end, skipped)


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
