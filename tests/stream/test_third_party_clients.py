"""A shop's integration, with a client we did not write: librdkafka (confluent-kafka) produces
events with each compression codec and its own default partitioner (CRC32, not murmur2),
another library (aiokafka) produces the consent records, and the decisions are read by a
``read_committed`` librdkafka consumer from an exactly-once worker, through quiet periods
longer than twice the transaction timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from deploy.kafka.launcher import free_port
from stream.config import Settings
from stream.contracts import Event, Preferences
from stream.policy import daytime_timezone
from stream.topics import ensure_topics, expected_partition
from tests.reliability.harness import committed_everything
from tests.support import PromoProcess, produce_raw, sample, scrape, wait_until
from tests.workers import accounted, worker_env

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")
# One codec's users put an item with a long multi-byte id in the cart: the reminder must name
# it whole (the first state codec cut it at 64 bytes, mid-character).
LONG_ITEM = "x" + "\u00fc" * 40 + "-" + "\u20ac" * 150
TRANSACTION_TIMEOUT_S = 10
CART_ABANDON_S = 10  # long enough for the burst's own transactions to commit first


def now_ms() -> int:
    return int(time.time() * 1000)


def librdkafka_produce(settings: Settings, records: list[tuple[str, bytes | None]],
                       topic: str, codec: str = "none") -> list[int]:
    """Produce with librdkafka's defaults (partitioner consistent_random = CRC32), idempotent,
    acks=all; return the partition each record landed on."""
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                         "enable.idempotence": True, "acks": "all",
                         "compression.type": codec, "linger.ms": 5})
    landed: list[int] = []
    errors: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            landed.append(msg.partition())

    for key, value in records:
        producer.produce(topic, value=value, key=key.encode(), on_delivery=delivered)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything"
    assert not errors, errors
    return landed


class CommittedReader:
    """A librdkafka consumer with isolation.level=read_committed on one topic."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                                  "group.id": f"reader-{topic}", "auto.offset.reset": "earliest",
                                  "isolation.level": "read_committed",
                                  "enable.auto.commit": False})
        self.consumer.subscribe([topic])
        self.records: list[dict[str, Any]] = []
        self.seen_at: dict[str, float] = {}

    def poll(self, seconds: float = 0.5) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            body = orjson.loads(msg.value())
            self.records.append(body)
            self.seen_at.setdefault(body["decision_id"], time.time())
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.mark.slow(seconds=50)
def test_librdkafka_producers_and_a_read_committed_consumer_under_exactly_once(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    settings = dataclasses.replace(
        settings, kafka=dataclasses.replace(settings.kafka, partitions=4),
        worker=dataclasses.replace(settings.worker, processing_guarantee="exactly_once",
                                   transaction_timeout_seconds=TRANSACTION_TIMEOUT_S))
    asyncio.run(ensure_topics(settings.kafka))
    kafka = settings.kafka
    users = [f"shopper-{n}" for n in range(40)]
    opted_out = users[:8]
    # Consent from a CRM on aiokafka (murmur2) for half, on librdkafka (CRC32) for the rest:
    # both must reach the partition the user's events are decided on.
    no = Preferences(False, False).to_json()
    asyncio.run(produce_raw(kafka.bootstrap_servers, kafka.preferences_topic,
                            [(u.encode(), no) for u in opted_out[:4]]))
    crm_partitions = librdkafka_produce(settings, [(u, no) for u in opted_out[4:]],
                                        kafka.preferences_topic)

    port = free_port()
    env = worker_env(settings, port, checkpoints["v1"]) | {
        "PROMO_POLICY_CART_ABANDON_SECONDS": str(CART_ABANDON_S),
        "PROMO_POLICY_HOLDOUT_PERCENT": "0", "PROMO_POLICY_PUSH_MIN_INTERVAL_SECONDS": "0",
        "PROMO_POLICY_DEFAULT_TIMEZONE": daytime_timezone(now_ms())}
    worker = PromoProcess(["worker"], env, tmp_path / "worker.log")
    reader = CommittedReader(settings, kafka.decisions_topic)
    try:
        worker.wait_for_log("worker ready", timeout=120)

        # --- a burst: every codec, librdkafka's own partitioner
        t = now_ms()
        landed: list[int] = []
        sent: list[Event] = []
        cart_item: dict[str, str] = {}
        for n, codec in enumerate(CODECS):
            for u in users[n::len(CODECS)]:
                cart_item[u] = LONG_ITEM if codec == "lz4" else "24852"
            events = [Event(f"{codec}-{u}", u, "add_to_cart", cart_item[u], t + n)
                      for u in users[n::len(CODECS)]]
            landed += librdkafka_produce(settings, [(e.user_id, e.to_json()) for e in events],
                                         kafka.events_topic, codec)
            sent += events
        misplaced = sum(p != expected_partition(e.user_id.encode(), 4)
                        for e, p in zip(sent, landed, strict=True))
        assert misplaced > 0, "the test needs events off their murmur2 partition"
        assert any(p != expected_partition(u.encode(), 4)
                   for u, p in zip(opted_out[4:], crm_partitions, strict=True))
        wait_until(lambda: accounted(port) >= len(sent), timeout=90,
                   what="the worker to account for every librdkafka event")
        metrics = scrape(port)
        assert sample(metrics, "promo_stream_records_repartitioned_total") >= misplaced
        # Everything the burst wrote is committed before any cart is due: what the reminders
        # need to become visible is their own commit, not a later batch's.
        wait_until(lambda: committed_everything(settings), timeout=30, what="burst committed")
        burst_done = time.time()
        cart_deadline = (t + CART_ABANDON_S * 1000) / 1000
        assert burst_done < cart_deadline - 1, "the burst took too long for this test"

        # --- a quiet period over twice the transaction timeout: the carts are abandoned, and
        # their reminders must become visible to read_committed readers while nothing arrives
        deadline = cart_deadline + 2.2 * TRANSACTION_TIMEOUT_S
        while time.time() < deadline:
            reader.poll(1.0)
        decisions = reader.records
        by_kind = Counter(d["reasons"][0]["code"] for d in decisions)
        consenting = set(users) - set(opted_out)
        assert {d["user_id"] for d in decisions} == consenting, \
            f"consent broken or decisions missing: {by_kind}"
        reminders = [d for d in decisions if d["reasons"][0]["code"] == "cart_abandoned"]
        assert {d["user_id"] for d in reminders} == consenting
        assert all(d["push"]["items"][0] == cart_item[d["user_id"]] for d in reminders)
        assert any(cart_item[d["user_id"]] == LONG_ITEM for d in reminders)
        delays = sorted(reader.seen_at[d["decision_id"]] - cart_deadline for d in reminders)
        print(f"reminders committed {delays[0]:.1f}-{delays[-1]:.1f} s after their deadline")
        assert delays[-1] < TRANSACTION_TIMEOUT_S, delays  # committed, not left to abort

        # --- after the silence the worker is alive and its producers are not fenced
        later = [Event(f"late-{u}", u, "add_to_cart", "13176", now_ms()) for u in users]
        librdkafka_produce(settings, [(e.user_id, e.to_json()) for e in later],
                           kafka.events_topic, "zstd")
        wait_until(lambda: accounted(port) >= len(sent) + len(later), timeout=90,
                   what="the events after the silence")

        def second_round() -> bool:
            reader.poll(1.0)
            return {d["user_id"] for d in reader.records
                    if d["trigger_event_id"].startswith("late-")} == consenting

        wait_until(second_round, timeout=60, interval=0.1, what="committed decisions")
        ids = [d["decision_id"] for d in reader.records]
        assert len(ids) == len(set(ids)), "a decision was committed twice"
        assert worker.alive(), worker.log_tail()
        assert "ProducerFenced" not in worker.log_path.read_text()
    finally:
        reader.close()
        assert worker.stop() == 0, worker.log_tail()
