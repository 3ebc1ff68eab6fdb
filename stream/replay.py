"""Replay a real interaction dataset into the `events` topic as contract events.

Datasets are read in place (``encoder.data``), turned into :class:`~stream.contracts.Event`s keyed
by user id, and produced in the dataset's time order, so each user's events arrive in that user's
order. With ``clock="now"`` every event is stamped with the wall-clock time at which it is sent
(the stream then looks live, and event-time latency means something); ``clock="dataset"`` keeps
the dataset's own timestamps (for retraining from the log).

Event ids are ``<id_prefix>-<row>``: replaying the same rows twice produces the same ids, which
the worker de-duplicates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from encoder.data import Interaction
from stream.config import KafkaSettings
from stream.contracts import Event
from stream.topics import client_kwargs, ensure_topics


def to_events(interactions: Iterable[Interaction], *, id_prefix: str,
              clock: Callable[[], int] | None = None) -> Iterator[Event]:
    """Contract events for ``interactions``; ``clock`` (epoch ms) replaces their timestamps."""
    for row, it in enumerate(interactions):
        yield Event(
            event_id=f"{id_prefix}-{row}", user_id=it.user_id, type=it.event_type,
            item_id=it.item_id, ts=clock() if clock else it.ts_ms, price=it.price,
            quantity=it.quantity, category=it.category, session_id=it.session_id)


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ReplayResult:
    produced: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else 0.0


async def produce(
    kafka: KafkaSettings,
    interactions: Sequence[Interaction],
    *,
    id_prefix: str,
    limit: int | None = None,
    rate: float = 0.0,
    clock: str = "now",
    progress: bool = True,
) -> ReplayResult:
    """Produce ``interactions[:limit]`` to the events topic; return how many were acknowledged.

    The producer is idempotent with ``acks=all``: a retried batch is neither duplicated nor
    reordered, so per-user order survives broker hiccups.
    """
    from tqdm import tqdm

    await ensure_topics(kafka)
    rows = interactions if limit is None else interactions[:limit]
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", enable_idempotence=True,
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    bar = tqdm(total=len(rows), unit="ev", desc=f"replay {id_prefix}", disable=not progress,
               smoothing=0.1)
    started = time.monotonic()
    pending: list[asyncio.Future[object]] = []
    produced = 0
    try:
        events = to_events(rows, id_prefix=id_prefix,
                           clock=wall_clock_ms if clock == "now" else None)
        for sent, event in enumerate(events, start=1):
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            key = event.user_id.encode()
            pending.append(await producer.send(kafka.events_topic, event.to_json(), key=key))
            if len(pending) >= 5000:
                produced += await _settle(pending, bar)
        await producer.flush()
        produced += await _settle(pending, bar)
    finally:
        bar.close()
        await producer.stop()
    return ReplayResult(produced=produced, seconds=time.monotonic() - started)


async def _settle(pending: list[asyncio.Future[object]], bar: object) -> int:
    """Wait for delivery reports; a failed delivery raises (nothing is dropped silently)."""
    await asyncio.gather(*pending)
    n = len(pending)
    bar.update(n)  # type: ignore[attr-defined]
    pending.clear()
    return n
