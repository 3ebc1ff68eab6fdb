"""Shared machinery of the fault tests: a background replay, the worker's committed progress,
and the checks that nothing was lost, doubled or overspent."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from stream import state as user_state
from stream.config import Settings
from stream.contracts import Coupon, Event
from stream.topics import client_kwargs
from tests.support import consume_all


class BackgroundReplay(threading.Thread):
    """Produce events at a steady rate from another thread while the test injects faults."""

    def __init__(self, settings: Settings, events: Sequence[Event], rate: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.events, self.rate = settings, list(events), rate
        self.produced = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by finish()
            self.error = exc

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**client_kwargs(self.settings.kafka), acks="all",
                                    enable_idempotence=True, linger_ms=5)
        await producer.start()
        started = time.monotonic()
        try:
            for n, event in enumerate(self.events, start=1):
                ahead = n / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                await producer.send(self.settings.kafka.events_topic, event.to_json(),
                                    key=event.user_id.encode())
                self.produced = n
            await producer.flush()
        finally:
            await producer.stop()

    def finish(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the replay did not finish"
        if self.error:
            raise self.error


def committed_everything(settings: Settings) -> bool:
    """The worker's group has committed offsets at the end of every events partition."""
    async def check() -> bool:
        kafka = settings.kafka
        admin = AIOKafkaAdminClient(**client_kwargs(kafka))
        await admin.start()
        try:
            committed: dict[TopicPartition, OffsetAndMetadata] = \
                await admin.list_consumer_group_offsets(settings.worker.app_id)
        finally:
            await admin.close()
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            tps = [TopicPartition(kafka.events_topic, p) for p in range(kafka.partitions)]
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        return all(tp in committed and committed[tp].offset >= ends[tp] for tp in tps)

    return asyncio.run(check())


def events_in_log_order(settings: Settings, n: int) -> dict[str, list[Event]]:
    """Every event of the topic, per user, in the order the worker reads them."""
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                      settings.kafka.events_topic, expect=n, timeout=120))
    by_user: dict[str, list[Event]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        body = orjson.loads(record.value)
        by_user[body["user_id"]].append(Event(
            event_id=body["event_id"], user_id=body["user_id"], type=body["type"],
            item_id=body["item_id"], ts=body["ts"], price=body.get("price"),
            quantity=body.get("quantity"), category=body.get("category"),
            session_id=body.get("session_id")))
    return by_user


def stored_states(settings: Settings, isolation_level: str) -> dict[str, user_state.UserState]:
    topic = f"{settings.worker.app_id}-users-changelog"
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers, topic, idle=3.0,
                                      isolation_level=isolation_level))
    final: dict[bytes, bytes | None] = {}
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        final[r.key] = r.value
        partitions[r.key].add(r.partition)
    split = {k: p for k, p in partitions.items() if len(p) > 1}
    assert not split, f"users whose state lives in several partitions: {split}"
    return {k.decode(): user_state.decode(v) for k, v in final.items() if v is not None}


def state_mismatches(settings: Settings, by_user: dict[str, list[Event]],
                     isolation_level: str = "read_uncommitted") -> list[str]:
    """Users whose stored state differs from an offline recomputation of their events, each
    with what differs (event counts stored vs recomputed)."""
    stored = stored_states(settings, isolation_level)
    wrong = [f"{u}: missing" for u in sorted(set(by_user) ^ set(stored))]
    for user_id, events in by_user.items():
        got = stored.get(user_id)
        if got is None:
            continue
        want = user_state.UserState()
        user_state.apply_events(want, events)
        if (list(got.items), list(got.types), list(got.ts_s), got.views, got.clicks,
                got.carts, got.purchases, got.cart_open) != (
                list(want.items), list(want.types), list(want.ts_s), want.views, want.clicks,
                want.carts, want.purchases, want.cart_open):
            wrong.append(f"{user_id}: stored {got.n_events} events, recomputed "
                         f"{want.n_events}")
    return wrong


def decision_counts(decisions: Sequence[dict]) -> tuple[int, int]:  # type: ignore[type-arg]
    """(distinct decision ids, decisions delivered more than once)."""
    ids = Counter(d["decision_id"] for d in decisions)
    return len(ids), sum(n - 1 for n in ids.values())


def overspend(decisions: Sequence[dict], coupons: Sequence[Coupon]) -> float:  # type: ignore[type-arg]
    """Money issued beyond budgets, counting each decision id once."""
    issued: Counter[str] = Counter()
    seen: set[str] = set()
    for d in decisions:
        if d["decision_id"] in seen or d["action"] != "coupon" or d["arm"] != "treatment":
            continue
        seen.add(d["decision_id"])
        issued[d["coupon"]["coupon_id"]] += d["coupon"]["discount"]
    return sum(max(0.0, issued[c.coupon_id] - c.budget) for c in coupons)


def report(fault: str, **figures: object) -> None:
    """One machine-readable line per fault test (pytest -s shows it; the README quotes it)."""
    print("RELIABILITY " + json.dumps({"fault": fault, **figures}), flush=True)
