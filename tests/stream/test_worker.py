"""`promo worker` on the real broker: every good event counted, every bad record dead-lettered
with the right reason, and the worker still up afterwards."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka.launcher import free_port
from encoder.data import load_dataset
from stream.config import Settings
from stream.contracts import Event, Preferences, Reason
from stream.replay import to_events
from stream.topics import TABLES, changelog_topic, ensure_topics, repartition_topic
from tests.support import (
    FIXTURE_DATASETS,
    PromoProcess,
    consume_all,
    produce_raw,
    sample,
    scrape,
    settings_env,
    wait_until,
)
from tests.workers import accounted, send_events, wait_for_decisions

pytestmark = pytest.mark.kafka


def now_ms() -> int:
    return int(time.time() * 1000)


def malformed_records() -> list[tuple[bytes | None, bytes | None, Reason]]:
    """One or more records for every rejection reason the contract names."""
    good = {"event_id": "bad-x", "user_id": "mallory", "type": "view", "item_id": "i",
            "ts": now_ms()}

    def body(**changes: object) -> bytes:
        return orjson.dumps({k: v for k, v in {**good, **changes}.items() if v is not ...})

    k = b"mallory"
    return [
        (k, b"x" * 20_000, Reason.RECORD_TOO_LARGE),
        (k, b"{broken json", Reason.NOT_JSON),
        (k, b"\xff\xfe\x00", Reason.NOT_JSON),
        (k, None, Reason.NOT_JSON),
        (k, b"[1,2,3]", Reason.NOT_AN_OBJECT),
        (k, body(item_id=...), Reason.MISSING_FIELD),
        (k, body(ts="yesterday"), Reason.WRONG_TYPE),
        (k, body(user_id=7), Reason.WRONG_TYPE),
        (k, body(price=-3), Reason.INVALID_VALUE),
        (k, body(type="wishlist"), Reason.UNKNOWN_EVENT_TYPE),
        (k, body(schema_version=99), Reason.UNSUPPORTED_SCHEMA_VERSION),
        (k, body(ts=now_ms() + 86_400_000), Reason.FUTURE_TIMESTAMP),
        (k, body(ts=12), Reason.ANCIENT_TIMESTAMP),
        (None, body(event_id="bad-k1"), Reason.KEY_MISMATCH),
        (b"eve", body(event_id="bad-k2"), Reason.KEY_MISMATCH),
        (k, body(item_id="\u202e\u0000\U0001f600"), None),  # odd but valid unicode: accepted
    ]


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[tuple[PromoProcess, int]]:
    port = free_port()
    env = settings_env(settings) | {"PROMO_WORKER_METRICS_PORT": str(port)}
    proc = PromoProcess(["worker"], env, tmp_path / "worker.log")
    try:
        proc.wait_for_log("worker ready", timeout=120)
        yield proc, port
    finally:
        assert proc.stop() == 0, proc.log_tail()


def test_mixed_stream_good_counted_bad_dead_lettered(settings: Settings, worker) -> None:
    proc, port = worker
    # A site log's shape (views, carts, purchases with prices and categories) and real carts.
    rows = load_dataset("rees46", FIXTURE_DATASETS) + load_dataset("instacart")[:900]
    good = list(to_events(rows, id_prefix="mixed", clock=now_ms))
    bad = malformed_records()
    records: list[tuple[bytes | None, bytes | None]] = []
    step = len(good) // len(bad)
    for i, event in enumerate(good):  # interleave the bad among the good
        records.append((event.user_id.encode(), event.to_json()))
        if i % step == 0 and i // step < len(bad):
            key, value, _ = bad[i // step]
            records.append((key, value))
    assert len(records) == len(good) + len(bad)
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.events_topic,
                            records))

    rejected = [b for b in bad if b[2] is not None]
    expected_types = Counter(e.type for e in good) + Counter({"view": 1})  # the unicode one

    def all_accounted() -> bool:
        samples = scrape(port)
        consumed = sum(sample(samples, "promo_stream_events_consumed_total", type=t)
                       for t in ("view", "click", "add_to_cart", "purchase"))
        dead = sum(sample(samples, "promo_stream_records_rejected_total", reason=r.value)
                   for r in Reason)
        return consumed + dead >= len(records)

    wait_until(all_accounted, timeout=120, what="the worker to process every record")
    samples = scrape(port)
    for event_type, n in expected_types.items():
        assert sample(samples, "promo_stream_events_consumed_total", type=event_type) == n
    expected_reasons = Counter(reason.value for _, _, reason in rejected)
    for reason in Reason:
        assert sample(samples, "promo_stream_records_rejected_total", reason=reason.value) == \
            expected_reasons.get(reason.value, 0), reason

    dlq = asyncio.run(consume_all(settings.kafka.bootstrap_servers, settings.kafka.dlq_topic,
                                  expect=len(rejected)))
    assert len(dlq) == len(rejected)
    by_raw = {}
    for record in dlq:
        body = orjson.loads(record.value)
        raw = None if body["raw"] is None else base64.b64decode(body["raw"])
        by_raw[raw] = body
        assert body["source"]["topic"] == settings.kafka.events_topic
        assert body["error"]
    for key, value, reason in rejected:
        assert value in by_raw, f"{reason} record missing from the DLQ"
        assert by_raw[value]["reason"] == reason.value
        assert by_raw[value]["key"] == (None if key is None else base64.b64encode(key).decode())
    assert proc.alive(), "the worker must survive every kind of bad input"
    assert sample(samples, "promo_worker_heartbeat_age_seconds") < 10
    assert sample(samples, "promo_worker_ready") == 1
    # Users in state is a count, not RocksDB's key estimate (once read 6,322 for 594 users).
    users = {e.user_id for e in good} | {orjson.loads(value)["user_id"]
                                          for _, value, reason in bad if reason is None}
    wait_until(lambda: sample(scrape(port), "promo_state_users") == len(users), timeout=30,
               what=f"promo_state_users to read {len(users)}")


def test_consent_published_before_a_worker_starts_holds_from_its_first_event(
        settings: Settings, run_worker, checkpoints: dict[str, Path]) -> None:
    # A large backlog of opt-outs the worker has never read, and events of those users
    # waiting behind it. Events, and readiness, wait until the preferences table has caught up
    # (the first version read consent in an agent racing the events: opted-out users got
    # coupons).
    opted_out = [f"quiet-{n}" for n in range(20_000)]
    no = Preferences(False, False).to_json()
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.preferences_topic,
                            [(u.encode(), no) for u in opted_out]))
    consenting = [f"loud-{n}" for n in range(20)]
    early = opted_out[::67] + consenting
    send_events(settings, [Event(f"c-{u}", u, "add_to_cart", "24852", now_ms())
                           for u in early])
    _, port = run_worker(checkpoints["v1"], holdout_percent="0")
    late = opted_out[1::67]
    send_events(settings, [Event(f"d-{u}", u, "add_to_cart", "24852", now_ms())
                           for u in late])
    wait_until(lambda: accounted(port) >= len(early) + len(late), timeout=60,
               what="the cart adds")
    decided = {d["user_id"] for d in wait_for_decisions(settings, len(consenting))}
    assert decided == set(consenting)


def test_the_worker_creates_its_internal_topics_before_it_joins(settings: Settings) -> None:
    app_id = settings.worker.app_id
    asyncio.run(ensure_topics(settings.kafka, app_id=app_id))

    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            names = [changelog_topic(app_id, t) for t in TABLES] + [
                repartition_topic(app_id, s) for s in ("events", "preferences")]
            return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)
                    if t["error_code"] == 0}
        finally:
            await admin.close()

    found = asyncio.run(describe())
    assert len(found) == len(TABLES) + 2
    assert set(found.values()) == {settings.kafka.partitions}


def test_a_record_that_raises_is_dead_lettered_and_the_worker_goes_on(
        settings: Settings, run_worker, checkpoints: dict[str, Path]) -> None:
    # A damaged state record in the changelog (here: written by hand) makes every event of its
    # user raise. Before the poison-pill policy, the exception escaped the batch handler and
    # the worker crash-looped on that batch.
    asyncio.run(ensure_topics(settings.kafka, app_id=settings.worker.app_id))
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers,
                            changelog_topic(settings.worker.app_id, "users"),
                            [(b"damaged", b"\x03" + b"\xff" * 40)]))
    proc, port = run_worker(checkpoints["v1"], holdout_percent="0")
    users = [f"fine-{n}" for n in range(30)]
    events = [Event(f"p-{u}", u, "add_to_cart", "24852", now_ms()) for u in users[:15]]
    events += [Event("p-damaged", "damaged", "add_to_cart", "24852", now_ms())]
    events += [Event(f"p-{u}", u, "add_to_cart", "24852", now_ms()) for u in users[15:]]
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=60, what="every record")
    [letter] = [orjson.loads(r.value) for r in asyncio.run(consume_all(
        settings.kafka.bootstrap_servers, settings.kafka.dlq_topic, expect=1))]
    assert letter["reason"] == "processing_error"
    assert letter["exception"] == "StateFormatError"
    assert orjson.loads(base64.b64decode(letter["raw"]))["event_id"] == "p-damaged"
    assert isinstance(letter["source"]["offset"], int) and letter["source"]["offset"] >= 0
    assert {d["user_id"] for d in wait_for_decisions(settings, len(users))} == set(users)
    assert proc.alive()
    assert sample(scrape(port), "promo_stream_records_rejected_total",
                  reason="processing_error") == 1
