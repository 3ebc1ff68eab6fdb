"""Faults injected into a running pipeline on real brokers: nothing lost, nothing doubled,
no budget overspent, the worker never down for good. Each test prints a RELIABILITY line
(fault, count injected, events, lost, duplicated, overspend) that the README's table quotes.

Sizes are bounded for CI; PROMO_SOAK=1 multiplies events and faults for a longer soak.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from deploy.kafka import launcher
from encoder.data import load_dataset
from stream.config import Settings
from stream.contracts import Coupon, Event, Reason
from stream.replay import to_events
from stream.shop import clock_events
from stream.topics import ensure_topics
from tests.reliability.harness import (
    BackgroundReplay,
    committed_everything,
    decision_counts,
    events_in_log_order,
    overspend,
    report,
    state_mismatches,
)
from tests.support import PromoProcess, consume_all, produce_raw, sample, scrape, wait_until
from tests.workers import accounted, read_decisions, send_coupons, send_events, worker_env

pytestmark = pytest.mark.kafka

SOAK = int(os.environ.get("PROMO_SOAK", "0") or 0) > 0
SCALE = 5 if SOAK else 1
BROKER_DOWN_SECONDS = 3.0
COUPONS = [Coupon("fresh", value=2.0, budget=30.0, items=("24852", "13176", "21137")),
           Coupon("anything", value=1.0, budget=20.0, max_exposures=15)]


def live_events(n: int, prefix: str, offset: int = 0) -> list[Event]:
    """n real Instacart events, stamped with the wall clock when they are built."""
    now = int(time.time() * 1000)
    rows = load_dataset("instacart")[offset:offset + n]
    return list(to_events(rows, id_prefix=prefix, clock=lambda: now))


def with_guarantee(settings: Settings, guarantee: str) -> Settings:
    return dataclasses.replace(settings, worker=dataclasses.replace(
        settings.worker, processing_guarantee=guarantee))


def start_worker(settings: Settings, checkpoint: Path, log: Path,
                 port: int | None = None) -> tuple[PromoProcess, int]:
    port = port or launcher.free_port()
    proc = PromoProcess(["worker"], worker_env(settings, port, checkpoint), log)
    proc.wait_for_log("worker ready", timeout=180)
    return proc, port


def kill(proc: PromoProcess) -> None:
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(30)
    proc.stop()


@pytest.mark.slow(seconds=270)
def test_repeated_sigkill_loses_and_doubles_nothing_under_exactly_once(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    settings = with_guarantee(settings, "exactly_once")
    # One-minute windows, so that every decision's outcome is due by the end.
    settings = dataclasses.replace(settings, attribution=dataclasses.replace(
        settings.attribution, window_seconds=60.0, grace_seconds=0.0))
    asyncio.run(ensure_topics(settings.kafka))
    send_coupons(settings, COUPONS)
    events = live_events(6000 * SCALE, "kill")
    kills = 10 * SCALE  # each restart rebuilds state from the changelogs: ~20 s a kill
    rng = random.Random(7)
    replay = BackgroundReplay(settings, events, rate=len(events) / (7.0 * kills))
    proc, _ = start_worker(settings, checkpoints["v1"], tmp_path / "worker-0.log")
    replay.start()
    for k in range(kills):
        time.sleep(rng.uniform(1.0, 5.0))
        kill(proc)  # mid-batch, mid-transaction, wherever it happens to be
        proc, _ = start_worker(settings, checkpoints["v1"], tmp_path / f"worker-{k + 1}.log")
    replay.finish()
    try:
        wait_until(lambda: committed_everything(settings), timeout=240,
                   what="the last worker to commit every event")
        # Event time past every window, on every partition: each decision's outcome is due.
        closing = max(e.ts for e in events) + 120_000
        clocks = clock_events(settings.kafka.partitions, closing, "kill")
        send_events(settings, clocks)
        wait_until(lambda: committed_everything(settings), timeout=120,
                   what="the clock events to be committed")
        by_user = events_in_log_order(settings, len(events) + len(clocks))
        wrong = state_mismatches(settings, by_user, isolation_level="read_committed")
        decisions = read_decisions(settings, isolation_level="read_committed")
        distinct, doubled = decision_counts(decisions)
        spent_over = overspend(decisions, COUPONS)
        results = asyncio.run(consume_all(
            settings.kafka.bootstrap_servers, settings.kafka.outcomes_topic, idle=2.0,
            isolation_level="read_committed"))
        per_decision = Counter(r.key.decode() for r in results)
        report("worker SIGKILL mid-stream (exactly-once)", injected=kills, events=len(events),
               lost=len(wrong), duplicated=doubled, overspend=spent_over, decisions=distinct,
               outcomes=len(results),
               outcomes_missing=len({d["decision_id"] for d in decisions} - set(per_decision)),
               outcomes_duplicated=sum(n - 1 for n in per_decision.values()))
        assert wrong == [], f"state differs from the offline recomputation for {wrong[:5]}"
        assert set(per_decision) == {d["decision_id"] for d in decisions}, "an outcome lost"
        assert max(per_decision.values()) == 1, "an outcome published twice"
        twice = [d for d in decisions
                 if sum(o["decision_id"] == d["decision_id"] for o in decisions) > 1]
        assert doubled == 0, f"decisions delivered twice: {twice}"
        assert spent_over == 0
        carted = {u for u, evs in by_user.items() if any(e.type == "add_to_cart" for e in evs)}
        assert carted <= {d["user_id"] for d in decisions}, "a cart add lost its decision"
    finally:
        proc.stop()


@pytest.mark.slow(seconds=40)
def test_a_broker_restart_mid_stream_loses_nothing(tmp_path: Path, settings: Settings,
                                                   checkpoints: dict[str, Path]) -> None:
    cluster = launcher.start(tmp_path / "broker", nodes=1)
    settings = dataclasses.replace(settings, kafka=dataclasses.replace(
        settings.kafka, bootstrap_servers=cluster.bootstrap_servers))
    proc = None
    try:
        asyncio.run(ensure_topics(settings.kafka))
        events = live_events(3000 * SCALE, "bounce")
        proc, port = start_worker(settings, checkpoints["v1"], tmp_path / "worker.log")
        send_events(settings, events[: len(events) // 2])
        wait_until(lambda: accounted(port) > 0, timeout=120, what="processing to start")
        launcher.stop_node(tmp_path / "broker", 1)  # SIGTERM, mid-processing
        time.sleep(BROKER_DOWN_SECONDS)  # the fault itself: no broker for this long
        launcher.start_node(tmp_path / "broker", 1)
        send_events(settings, events[len(events) // 2:])
        wait_until(lambda: committed_everything(settings), timeout=240,
                   what="the worker to reconnect and commit every event")
        wrong = state_mismatches(settings, events_in_log_order(settings, len(events)))
        decisions = read_decisions(settings)
        distinct, doubled = decision_counts(decisions)
        report("broker restart (at-least-once)", injected=1, events=len(events),
               lost=len(wrong), duplicated=doubled, overspend=0, decisions=distinct)
        assert wrong == []
        assert proc.alive(), "the worker must ride out a broker restart"
        assert proc.log_path.read_text().count("worker ready") == 1
    finally:
        if proc is not None:
            proc.stop()
        launcher.stop(tmp_path / "broker")


def replication_of(settings: Settings, topic: str) -> tuple[int, str]:
    """(replicas of partition 0, min.insync.replicas) of a topic, as the cluster reports them
    to librdkafka's admin client."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    # A topic just created may be known to the broker that answers before its partitions are:
    # metadata reaches the three brokers one by one.
    wait_until(lambda: 0 in admin.list_topics(topic, timeout=30).topics[topic].partitions,
               timeout=30, what=f"partition 0 of {topic} in the cluster's metadata")
    partition = admin.list_topics(topic, timeout=30).topics[topic].partitions[0]
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return len(partition.replicas), entries["min.insync.replicas"].value


def in_sync_everywhere(settings: Settings, topic: str, replicas: int) -> bool:
    """Every partition of ``topic`` has a leader and ``replicas`` in-sync replicas."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    partitions = admin.list_topics(topic, timeout=30).topics[topic].partitions.values()
    return bool(partitions) and all(p.leader >= 0 and len(p.isrs) == replicas
                                    for p in partitions)


@pytest.mark.slow(seconds=65)
def test_losing_one_of_three_brokers_keeps_processing(tmp_path: Path, settings: Settings,
                                                      checkpoints: dict[str, Path]) -> None:
    cluster = launcher.start(tmp_path / "cluster", nodes=3, heap="384m")
    assert len(cluster.bootstrap_servers.split(",")) == 3
    # Replication is not set: it follows the cluster (the first version left it at one copy,
    # a cluster that loses data when one broker dies).
    settings = dataclasses.replace(settings, kafka=dataclasses.replace(
        settings.kafka, bootstrap_servers=cluster.bootstrap_servers))
    assert settings.kafka.replication_factor == 0
    proc = None
    try:
        asyncio.run(ensure_topics(settings.kafka, app_id=settings.worker.app_id))
        copies, in_sync = replication_of(settings, settings.kafka.events_topic)
        assert (copies, in_sync) == (3, "2")
        wait_until(lambda: in_sync_everywhere(settings, settings.kafka.events_topic, 3),
                   timeout=30, what="all three replicas of every events partition in sync")
        events = live_events(3000 * SCALE, "trio")
        proc, port = start_worker(settings, checkpoints["v1"], tmp_path / "worker.log")
        send_events(settings, events[:1000])
        wait_until(lambda: accounted(port) >= 1000, timeout=120, what="first events")
        launcher.stop_node(tmp_path / "cluster", 2, kill=True)  # one broker dies
        send_events(settings, events[1000:2000])  # acks=all still has min.insync.replicas=2
        wait_until(lambda: accounted(port) >= 2000, timeout=120,
                   what="processing to continue on two brokers")
        launcher.start_node(tmp_path / "cluster", 2)
        send_events(settings, events[2000:])
        wait_until(lambda: committed_everything(settings), timeout=240, what="every commit")
        wrong = state_mismatches(settings, events_in_log_order(settings, len(events)))
        _, doubled = decision_counts(read_decisions(settings))
        report("1 of 3 brokers killed (RF 3, min ISR 2)", injected=1, events=len(events),
               lost=len(wrong), duplicated=doubled, overspend=0)
        assert wrong == []
        assert proc.alive()
    finally:
        if proc is not None:
            proc.stop()
        launcher.stop(tmp_path / "cluster")
    assert list(launcher.java_processes(tmp_path / "cluster")) == []


@pytest.mark.slow(seconds=55)
def test_a_worker_joining_and_leaving_moves_state_without_splitting_it(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    events = live_events(5000 * SCALE, "rebalance")
    replay = BackgroundReplay(settings, events, rate=len(events) / 30.0)
    first, port_a = start_worker(settings, checkpoints["v1"], tmp_path / "a.log")
    replay.start()
    wait_until(lambda: accounted(port_a) >= len(events) // 5, timeout=120,
               what="the first worker to build state alone")
    # Its own state directory, as on its own machine: RocksDB locks a directory per process.
    elsewhere = dataclasses.replace(settings, worker=dataclasses.replace(
        settings.worker, data_dir=str(tmp_path / "worker-b")))
    second, port_b = start_worker(elsewhere, checkpoints["v1"], tmp_path / "b.log")
    wait_until(lambda: accounted(port_b) >= len(events) // 20, timeout=120,
               what="the second worker to work on its share")
    assert second.stop() == 0  # leaves: its partitions and their state move back
    replay.finish()
    try:
        wait_until(lambda: committed_everything(settings), timeout=120, what="every commit")
        wrong = state_mismatches(settings, events_in_log_order(settings, len(events)))
        _, doubled = decision_counts(read_decisions(settings))
        # Every event is good and sent once: a record read twice around a rebalance must be
        # skipped, never applied again nor dead-lettered as a duplicate.
        dead_lettered = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                                settings.kafka.dlq_topic, idle=3, timeout=30))
        report("worker joins and leaves (rebalance x2)", injected=2, events=len(events),
               lost=len(wrong), duplicated=doubled, overspend=0,
               dead_lettered=len(dead_lettered))
        assert wrong == []  # harness also asserts no user's state is in two partitions
        assert dead_lettered == []
        assert first.alive()
    finally:
        first.stop()


def test_a_flood_of_hostile_records_is_dead_lettered_and_the_worker_stays_up(
        settings: Settings, run_worker, checkpoints: dict[str, Path]) -> None:
    proc, port = run_worker(checkpoints["v1"])
    good = live_events(3000, "good")
    rng = random.Random(3)
    now = int(time.time() * 1000)
    template = {"event_id": "x", "user_id": "mallory", "type": "view", "item_id": "i", "ts": now}
    makers = [
        lambda n: (b"mallory", b"{" + bytes([rng.randrange(256) for _ in range(20)])),
        lambda n: (b"mallory", b"\x00" * (17_000 + n % 100)),
        lambda n: (b"mallory", orjson.dumps({**template, "event_id": f"b{n}", "ts": str(now)})),
        lambda n: (b"mallory", orjson.dumps({**template, "event_id": f"b{n}",
                                             "item_id": "\U0001f600\u0000\u202e" * 100})),
        lambda n: (None, orjson.dumps({**template, "event_id": f"b{n}"})),
        lambda n: (b"mallory", orjson.dumps({**template, "event_id": f"b{n}", "ts": now * 1000})),
        lambda n: (b"mallory", orjson.dumps({**template, "event_id": f"b{n}", "ts": 12})),
        lambda n: (b"mallory", orjson.dumps([template] * 3)),
        lambda n: (b"mallory", orjson.dumps({**template, "event_id": f"b{n}", "type": "zap"})),
    ]
    bad = [makers[n % len(makers)](n) for n in range(10_000)]
    # Redeliveries, as a producer retry makes them: every sixth good event sent twice in a
    # row (state remembers a user's last DEDUP_WINDOW event ids; a later one would count).
    records: list[tuple[bytes | None, bytes | None]] = []
    duplicates = []
    for n, event in enumerate(good):
        records.append((event.user_id.encode(), event.to_json()))
        if n % 6 == 0:
            duplicates.append(records[-1])
            records.append(records[-1])
    for record in bad:  # hostile records land anywhere; good ones keep each user's order
        records.insert(rng.randrange(len(records) + 1), record)
    rss_before = _rss_kb(proc)
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.events_topic,
                            records))
    wait_until(lambda: accounted(port) >= len(records), timeout=300,
               what="every record accounted for")
    samples = scrape(port)
    rejected = sum(sample(samples, "promo_stream_records_rejected_total", reason=r.value)
                   for r in Reason)
    consumed = sum(sample(samples, "promo_stream_events_consumed_total", type=t)
                   for t in ("view", "click", "add_to_cart", "purchase"))
    dlq = asyncio.run(consume_all(settings.kafka.bootstrap_servers, settings.kafka.dlq_topic,
                                  expect=len(bad) + len(duplicates), timeout=120))
    reasons = {orjson.loads(r.value)["reason"] for r in dlq}
    rss_growth = _rss_kb(proc) - rss_before
    report("hostile flood", injected=len(bad) + len(duplicates), events=len(good),
           lost=len(good) - int(consumed), duplicated=0, overspend=0,
           dead_lettered=len(dlq), rss_growth_kb=rss_growth)
    assert consumed == len(good)
    assert rejected == len(dlq) == len(bad) + len(duplicates)
    assert Reason.DUPLICATE_EVENT.value in reasons and Reason.KEY_MISMATCH.value in reasons
    assert proc.alive()
    assert rss_growth < 200_000, f"RSS grew by {rss_growth} kB"


def _rss_kb(proc: PromoProcess) -> int:
    import subprocess

    children = subprocess.run(["pgrep", "-g", str(proc.proc.pid)], capture_output=True,
                              text=True, check=False).stdout.split()
    total = 0
    for pid in children:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def test_an_encoder_that_raises_never_stops_the_stream(settings: Settings, run_worker,
                                                       tmp_path: Path) -> None:
    from tests.conftest import build_checkpoint

    # A model trained on views only meets carts and purchases: its forward pass refuses them.
    views_only = tmp_path / "views-only"
    build_checkpoint(views_only, n_event_types=1)
    proc, port = run_worker(views_only, holdout_percent="0")
    events = live_events(600, "broken-encoder")
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=120, what="events processed")
    samples = scrape(port)
    failures = sample(samples, "promo_encoder_failures_total", stage="inference")
    decisions = read_decisions(settings)
    report("encoder inference raises", injected=int(failures), events=len(events), lost=0,
           duplicated=0, overspend=0, decisions=len(decisions))
    assert failures > 0
    assert decisions, "decisions must still be made, from fallbacks"
    codes = {r["code"] for d in decisions for r in d["reasons"]}
    assert codes & {"vector_unavailable", "cold_start"}
    assert proc.alive()


@pytest.mark.slow(seconds=35)
def test_deleting_local_state_rebuilds_it_from_the_changelog(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    first = live_events(2000, "disk-a")
    proc, port = start_worker(settings, checkpoints["v1"], tmp_path / "w1.log")
    send_events(settings, first)
    wait_until(lambda: accounted(port) >= len(first), timeout=120, what="first events")
    assert proc.stop() == 0
    tables = Path(settings.worker.data_dir)
    removed = [p for p in tables.rglob("*.db") if p.is_dir()]
    assert removed, "RocksDB directories expected under the worker's data dir"
    for path in removed:
        shutil.rmtree(path)
    proc, port = start_worker(settings, checkpoints["v1"], tmp_path / "w2.log")
    try:
        # Events on top of the rebuilt state: wrong unless the old state came back intact.
        second = live_events(2000, "disk-b", offset=2000)
        send_events(settings, second)
        wait_until(lambda: committed_everything(settings), timeout=180, what="every commit")
        wrong = state_mismatches(settings, events_in_log_order(settings, 4000))
        report("RocksDB state deleted while stopped", injected=1, events=4000,
               lost=len(wrong), duplicated=0, overspend=0)
        assert wrong == []
    finally:
        proc.stop()
