"""The streaming core on the real broker: state, vectors, decisions, model swaps and
exactly-once. Cart reminders are specified in-process (tests/stream/test_pipeline.py) and seen
from a librdkafka reader under exactly-once in tests/stream/test_third_party_clients.py."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from deploy.kafka.launcher import free_port
from encoder.data import load_dataset
from encoder.inference import Encoder
from stream import state as user_state
from stream.config import PolicyConfig, Settings
from stream.contracts import Coupon, Event, Preferences
from stream.policy import in_holdout, in_quiet_hours
from stream.replay import to_events
from stream.topics import ensure_topics
from tests.support import PromoProcess, consume_all, sample, scrape, wait_until
from tests.workers import (
    accounted,
    read_decisions,
    send_coupons,
    send_events,
    send_preferences,
    table_contents,
    wait_for_decisions,
    worker_env,
)

pytestmark = pytest.mark.kafka

DECISION_KEYS = {"decision_id", "user_id", "action", "coupon", "push", "score", "reasons", "arm",
                 "model_version", "policy_version", "trigger_event_id", "created_at", "offer",
                 "propensity", "choices"}


def now_ms() -> int:
    return int(time.time() * 1000)


def test_state_vectors_and_decisions_on_real_events(settings: Settings, run_worker,
                                                    checkpoints: dict[str, Path]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    coupons = [Coupon("bananas", value=2.0, budget=6.0, items=("24852", "13176")),
               Coupon("pantry", value=1.5, budget=4.5, max_exposures=3)]
    send_coupons(settings, coupons)
    rows = load_dataset("instacart")[:4000]
    users = sorted({r.user_id for r in rows})
    opted_out = users[:15]
    push_only = users[15:30]
    night_owl = users[30]
    prefs = {u: Preferences(False, False) for u in opted_out}
    prefs |= {u: Preferences(True, False) for u in push_only}
    night = next(tz for tz in ("Pacific/Auckland", "Asia/Tokyo", "America/Los_Angeles", "UTC")
                 if in_quiet_hours(now_ms(), tz, PolicyConfig()))
    prefs[night_owl] = Preferences(True, True, timezone=night)
    send_preferences(settings, prefs)
    _, port = run_worker(checkpoints["v1"])
    # No wait needed: a starting worker reads the preferences to their end before any event.

    events = list(to_events(rows, id_prefix="core", clock=now_ms))
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=180, what="all events processed")
    decisions = read_decisions(settings)
    assert decisions, "real cart adds must trigger decisions"

    # --- state equals an offline recomputation from the same events, in log order
    log = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                  settings.kafka.events_topic, expect=len(events)))
    by_user: dict[str, list[Event]] = defaultdict(list)
    index = {e.event_id: e for e in events}
    for record in sorted(log, key=lambda r: (r.partition, r.offset)):
        event = index[orjson.loads(record.value)["event_id"]]
        by_user[event.user_id].append(event)
    stored = {k.decode(): user_state.decode(v) for k, v in table_contents(settings,
                                                                           "users").items()}
    assert set(stored) == set(by_user)
    encoder = Encoder.load(checkpoints["v1"])
    for user_id, user_events in by_user.items():
        offline = user_state.UserState()
        user_state.apply_events(offline, user_events)
        got = stored[user_id]
        assert list(got.items) == list(offline.items), user_id
        assert list(got.types) == list(offline.types), user_id
        assert list(got.ts_s) == list(offline.ts_s), user_id
        assert (got.views, got.clicks, got.carts, got.purchases, got.cart_open) == (
            offline.views, offline.clicks, offline.carts, offline.purchases, offline.cart_open)
        assert got.model_version == encoder.model_version
        [expected] = encoder.user_vectors([encoder.item_indices_from_keys(offline.items)],
                                          [offline.types.astype(np.int64)])
        assert got.vector is not None
        np.testing.assert_allclose(got.vector.astype(np.float32), expected.astype(np.float32),
                                   atol=2e-3, err_msg=user_id)

    # --- every decision honours the contract and the policy
    for d in decisions:
        assert set(d) == DECISION_KEYS
        assert d["action"] in ("coupon", "push", "none") and d["arm"] in ("treatment", "holdout")
        assert d["model_version"] == encoder.model_version
        assert d["reasons"] and d["reasons"][0]["code"] in ("cart_add", "repeat_views")
    ids = [d["decision_id"] for d in decisions]
    assert len(ids) == len(set(ids))
    assert not [d for d in decisions if d["user_id"] in opted_out]
    for d in decisions:
        assert d["arm"] == ("holdout" if in_holdout(d["user_id"], 10.0) else "treatment")
    assert not [d for d in decisions if d["user_id"] in push_only and d["action"] == "coupon"]
    for d in (d for d in decisions if d["user_id"] == night_owl):
        assert d["action"] == "none" and "quiet_hours" in [r["code"] for r in d["reasons"]]
    sent = [d for d in decisions if d["arm"] == "treatment" and d["action"] != "none"]
    spent: Counter[str] = Counter()
    issued: Counter[str] = Counter()
    for d in sent:
        if d["action"] == "coupon":
            spent[d["coupon"]["coupon_id"]] += d["coupon"]["discount"]
            issued[d["coupon"]["coupon_id"]] += 1
    assert spent["bananas"] <= 6.0 and spent["pantry"] <= 4.5
    assert issued["pantry"] <= 3
    reasons = Counter(r["code"] for d in decisions for r in d["reasons"])
    assert sum(issued.values()) > 0, f"some coupon must have gone out; reasons: {reasons}"
    per_user_coupons = Counter(d["user_id"] for d in sent if d["action"] == "coupon")
    assert max(per_user_coupons.values()) <= 1  # coupon_daily_cap
    per_user_pushes = Counter(d["user_id"] for d in sent if d["action"] == "push")
    assert max(per_user_pushes.values(), default=0) <= 3  # push_daily_cap
    samples = scrape(port)
    assert sample(samples, "promo_decisions_published_total", action="coupon",
                  arm="treatment") == sum(issued.values())


def test_a_model_swap_mid_stream_needs_no_restart(settings: Settings, run_worker,
                                                  checkpoints: dict[str, Path],
                                                  tmp_path: Path) -> None:
    current = tmp_path / "current"
    current.symlink_to(checkpoints["v1"])
    proc, port = run_worker(current, holdout_percent="0")
    versions = {name: Encoder.load(path).model_version for name, path in checkpoints.items()}

    def cart(user: str, n: int) -> Event:
        return Event(f"{user}-{n}", user, "add_to_cart", "24852", now_ms())

    send_events(settings, [cart(f"before-{n}", 0) for n in range(5)])
    wait_until(lambda: accounted(port) >= 5, timeout=60, what="first events")
    tmp = tmp_path / "next"
    tmp.symlink_to(checkpoints["v2"])
    os.replace(tmp, current)  # publish v2 atomically
    proc.wait_for_log(f"model_version={versions['v2']}", timeout=30)
    send_events(settings, [cart(f"after-{n}", 0) for n in range(5)])
    wait_until(lambda: accounted(port) >= 10, timeout=60, what="second events")
    decisions = read_decisions(settings)
    assert {d["model_version"] for d in decisions if d["user_id"].startswith("before")} == {
        versions["v1"]}
    assert {d["model_version"] for d in decisions if d["user_id"].startswith("after")} == {
        versions["v2"]}
    assert proc.alive() and proc.log_path.read_text().count("worker ready") == 1


def test_a_missing_or_corrupt_checkpoint_leaves_decisions_without_a_model(
        settings: Settings, run_worker, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    # Popularity lives in the checkpoint, so without one there is no push candidate at all:
    # the decision says so (model_unavailable, no_candidates) instead of guessing.
    missing = tmp_path / "no-such-model"
    proc, port = run_worker(missing, holdout_percent="0")
    send_events(settings, [Event("m1", "user-m", "add_to_cart", "24852", now_ms())])
    wait_until(lambda: accounted(port) >= 1, timeout=60, what="event processed")
    [decision] = wait_for_decisions(settings, 1)
    without_model = ["cart_add", "model_unavailable", "no_eligible_coupon", "no_candidates"]
    assert decision["model_version"] == "none" and decision["action"] == "none"
    assert [r["code"] for r in decision["reasons"]] == without_model
    assert sample(scrape(port), "promo_encoder_model_loaded") == 0

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in checkpoints["v1"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    missing.symlink_to(corrupt)  # the watched path now names a damaged checkpoint
    wait_until(lambda: sample(scrape(port), "promo_encoder_failures_total", stage="load") >= 1,
               timeout=30, what="the load failure to be counted")
    send_events(settings, [Event("m2", "user-n", "add_to_cart", "24852", now_ms())])
    wait_until(lambda: accounted(port) >= 2, timeout=60, what="second event processed")
    second = next(d for d in wait_for_decisions(settings, 2) if d["user_id"] == "user-n")
    assert second["model_version"] == "none"
    assert [r["code"] for r in second["reasons"]] == without_model
    assert proc.alive()
    assert sample(scrape(port), "promo_encoder_model_loaded") == 0


def test_exactly_once_publishes_decisions_in_committed_transactions(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    settings = dataclasses.replace(settings, worker=dataclasses.replace(
        settings.worker, processing_guarantee="exactly_once"))
    port = free_port()
    proc = PromoProcess(["worker"], worker_env(settings, port, checkpoints["v1"]),
                        tmp_path / "worker.log")
    try:
        proc.wait_for_log("worker ready", timeout=120)
        events = list(to_events(load_dataset("instacart")[:1500], id_prefix="eos",
                                clock=now_ms))
        send_events(settings, events)
        wait_until(lambda: accounted(port) >= len(events), timeout=120, what="events processed")
        published = sum(sample(scrape(port), "promo_decisions_published_total", action=a,
                               arm=arm)
                        for a in ("coupon", "push", "none") for arm in ("treatment", "holdout"))
        assert published > 0
        # Transactions commit with the offsets, every broker_commit_interval (2.8 s).
        committed: list[dict] = []

        def all_committed() -> bool:
            records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                              settings.kafka.decisions_topic, idle=2.0,
                                              isolation_level="read_committed"))
            committed[:] = [orjson.loads(r.value) for r in records]
            return len(committed) >= published

        wait_until(all_committed, timeout=60, what="decisions to be committed")
        ids = [d["decision_id"] for d in committed]
        assert len(ids) == len(set(ids)) == published
    finally:
        assert proc.stop() == 0, proc.log_tail()
    assert (Path(settings.worker.data_dir) / "clean-shutdown").exists()
