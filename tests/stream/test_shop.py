"""The simulated shop (stream.shop): real rhythms, valid events, a known response to decisions,
and a ground truth that a long randomized run of the real pipeline recovers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from encoder.data import Interaction, load_dataset
from stream import outcomes, shop, uplift
from stream.config import PolicyConfig, Settings
from stream.contracts import Action, Arm, Coupon, Event, parse_event
from stream.outcomes import Rules
from stream.state import PendingWindow
from stream.testing import tiny_encoder
from tests.support import PROMO, PromoProcess, consume_all, scrape, settings_env
from tests.workers import send_coupons

DAY = 86_400_000
START = 1_780_000_000_000
REHEARSAL = PolicyConfig(**shop.REHEARSAL_POLICY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def templates() -> list[list[shop.Order]]:
    return shop.histories(load_dataset("instacart"))


def test_histories_are_any_users_purchase_sessions_with_their_real_gaps() -> None:
    rows = [Interaction("a", "x", "purchase", 0, session_id="s1"),
            Interaction("a", "y", "purchase", 0, session_id="s1"),
            Interaction("a", "z", "view", 1_000),
            Interaction("a", "x", "purchase", 3 * DAY),  # no session: its time groups it
            Interaction("once", "x", "purchase", 0)]
    [orders] = shop.histories(rows)
    assert [o.items for o in orders] == [("x", "y"), ("x",)]
    assert orders[1].gap_ms == 3 * DAY
    with pytest.raises(ValueError, match="two purchases"):
        shop.histories(rows[-1:])


def test_events_are_valid_time_ordered_and_seeded(templates: list[list[shop.Order]]) -> None:
    def run(seed: int) -> list[Event]:
        s = shop.Shop(templates, users=200, start_ms=START, seed=seed)
        return s.until(START + 20 * DAY)

    events = run(3)
    assert events == run(3) and events != run(4)
    assert len({e.user_id for e in events}) > 150
    by_user: dict[str, list[int]] = defaultdict(list)
    for event in events:
        parsed = parse_event(event.to_json(), event.user_id.encode(),
                             now_ms=START + 30 * DAY)
        assert parsed == event
        by_user[event.user_id].append(event.ts)
    assert all(ts == sorted(ts) for ts in by_user.values())
    assert {e.type for e in events} == {"view", "add_to_cart", "purchase"}
    assert all(e.value and e.value > 0 for e in events if e.type == "purchase")


def test_the_closing_time_is_past_every_window_a_produced_event_can_open(
        templates: list[list[shop.Order]]) -> None:
    s = shop.Shop(templates, users=1000, start_ms=START, seed=3)  # a session ends late
    end = START + 5 * DAY
    last = max(e.ts for e in s.until(end))
    assert last > end  # a session that starts by the end runs a few minutes past it
    rules = Rules(window_ms=2 * DAY, grace_ms=300_000)
    assert s.closing_time(rules) > last + rules.window_ms + rules.grace_ms


def _persuadable(templates: list[list[shop.Order]], effects: shop.Effects,
                 segment: str = "persuadable") -> tuple[shop.Shop, str]:
    s = shop.Shop(templates, users=300, start_ms=START, effects=effects, seed=1)
    user = next(u.user_id for u in s.users if u.segment == segment)
    return s, user


def test_a_coupon_sent_to_a_persuadable_brings_an_order_that_redeems_it(
        templates: list[list[shop.Order]]) -> None:
    effects = shop.Effects(coupon_uplift=1.0, redeem_rate=1.0, browse_per_order=0)
    s, user = _persuadable(templates, effects)
    s.until(START)
    s.answer(user, "treatment", "coupon", "five-off", START)
    purchases = [e for e in s.until(START + 3 * DAY) if e.user_id == user
                 and e.type == "purchase"]
    assert purchases and purchases[0].coupon_id == "five-off"
    assert s.stats.extra_orders >= 1 and s.stats.redeemed >= 1


def test_holdout_and_none_decisions_change_nothing(templates: list[list[shop.Order]]) -> None:
    effects = shop.Effects(coupon_uplift=1.0, push_uplift=1.0)
    quiet, user = _persuadable(templates, effects)
    nudged, _ = _persuadable(templates, effects)
    nudged.answer(user, "holdout", "coupon", "five-off", START)
    nudged.answer(user, "treatment", "none", None, START)
    assert nudged.until(START + 20 * DAY) == quiet.until(START + 20 * DAY)
    assert nudged.stats.treated == 0


def test_a_push_puts_a_do_not_disturb_user_off_their_next_order(
        templates: list[list[shop.Order]]) -> None:
    effects = shop.Effects(put_off_share=0.5, put_off_rate=1.0, browse_per_order=0)
    s, user = _persuadable(templates, effects, segment="do_not_disturb")
    s.answer(user, "treatment", "push", None, START)
    s.until(START + 60 * DAY)
    assert s.stats.skipped_orders == 1


def test_pushes_tire() -> None:
    effects = shop.Effects(push_uplift=0.4, fatigue=0.5)
    assert effects.uplift("persuadable", "push", 0) == 0.4
    assert effects.uplift("persuadable", "push", 2) == pytest.approx(0.1)
    assert effects.uplift("sure_thing", "coupon", 0) == 0.0
    assert effects.uplift("lost_cause", "coupon", 0) == pytest.approx(0.25 * 0.2)


@pytest.mark.slow(seconds=40)
def test_a_long_randomized_run_recovers_the_ground_truth(
        templates: list[list[shop.Order]]) -> None:
    items = sorted({i for t in templates for o in t for i in o.items})
    setup = shop.Setup(
        templates=templates, users=1500, days=10, start_ms=START, policy=REHEARSAL,
        coupons=[Coupon("five-off", 5.0, 1e9, items=tuple(items[:40]))],
        encoder=tiny_encoder(items[:1500]), partitions=2,
        rules=Rules(window_ms=2 * DAY, grace_ms=0),
        effects=shop.Effects(coupon_uplift=0.6, push_uplift=0.3), seed=1)
    truth = shop.ground_truth(setup)["campaigns"]
    assert truth["all"]["true_lift"] > 0.05  # the configured effect shows in the truth
    # An A/B test on other users of the same shop, half held out, read with the report's
    # always-valid interval, finds the truth inside it.
    trial = shop.rehearse(dataclasses.replace(setup, users=3000, seed=7), 50.0)
    for campaign in ("all", "five-off"):
        estimate = uplift.lift(trial.tallies[campaign])
        shown(f"in-process {campaign}", truth[campaign]["true_lift"], estimate)
        assert estimate.lift_interval.covers(truth[campaign]["true_lift"]), (
            campaign, estimate.lift_interval, truth[campaign])
        assert estimate.verdict == "better"


def shown(run: str, true_lift: float, estimate: uplift.Lift) -> None:
    """One line per comparison (pytest -s shows them; docs/outcomes.md quotes them)."""
    print("SHOP-SIM " + json.dumps({
        "run": run, "true_lift": round(true_lift, 4), "estimate": round(estimate.lift, 4),
        "interval": [round(estimate.lift_interval.low, 4),
                     round(estimate.lift_interval.high, 4)],
        "decisions": [estimate.treatment.decisions, estimate.holdout.decisions]}), flush=True)


# --- live: the real broker, a real worker, `promo shop-sim` and `promo report uplift` ---------

def recompute_outcomes(events: list[Any], decisions: list[dict[str, Any]],
                       rules: Rules) -> dict[str, outcomes.Closing]:
    """Every decision's closing, recomputed from the `events` and `decisions` topics alone:
    each partition's records in offset order, the watermark record by record, each decision
    opened right after its trigger event (stream.outcomes, run offline)."""
    by_trigger = {d["trigger_event_id"]: d for d in decisions}
    steps: dict[str, list[outcomes.Seen | outcomes.Opened]] = defaultdict(list)
    marks: dict[int, int] = defaultdict(int)
    home: dict[str, int] = {}
    for record in sorted(events, key=lambda r: (r.partition, r.offset)):
        event = parse_event(record.value, record.key, now_ms=2**62)
        assert isinstance(event, Event), event
        steps[event.user_id].append(outcomes.Seen(event, marks[record.partition]))
        marks[record.partition] = max(marks[record.partition], event.ts)
        home[event.user_id] = record.partition
        decision = by_trigger.get(event.event_id)
        if decision is not None:
            steps[event.user_id].append(outcomes.Opened(PendingWindow(
                outcomes.ref(decision["decision_id"]), event.ts // 1000, Arm(decision["arm"]),
                Action(decision["action"]))))
    closings = {}
    for user, walk in steps.items():
        still, closed = outcomes.attribute([], walk, rules)
        _, expired = outcomes.expire(still, marks[home[user]], rules)
        closings.update({c.window.ref: c for c in closed + expired})
    return closings


@pytest.mark.slow(seconds=150)
def test_live_shop_sim_report_and_counters_agree_with_the_truth_and_the_topics(
        settings: Settings, run_worker: Callable[..., tuple[PromoProcess, int]],
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    items = sorted({i for t in shop.histories(load_dataset("instacart")) for o in t
                    for i in o.items})
    send_coupons(settings, [Coupon("five-off", 5.0, 1e9, items=tuple(items[:200])),
                            Coupon("store-wide", 2.0, 1e9)])
    rehearsal = {k: str(v) for k, v in shop.REHEARSAL_POLICY.items()} | {
        "holdout_percent": "30", "default_timezone": "UTC"}
    attribution = {"PROMO_ATTRIBUTION_WINDOW_SECONDS": str(2 * 86_400)}
    _, port = run_worker(checkpoints["v1"], env=attribution, **rehearsal)
    env = settings_env(settings) | attribution | {
        f"PROMO_POLICY_{k.upper()}": v for k, v in rehearsal.items()}
    truth_file = tmp_path / "truth.json"
    sim = subprocess.run(
        [PROMO, "shop-sim", "--users", "600", "--days", "6", "--speed", "25000",
         "--truth-users", "3000", "--coupon-uplift", "0.6", "--push-uplift", "0.3",
         "--checkpoint", str(checkpoints["v1"]), "--out", str(truth_file), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert sim.returncode == 0, sim.stderr[-3000:]
    report = json.loads(truth_file.read_text())
    live, truth = report["live"], report["truth"]["campaigns"]
    assert live["decisions"] > 300 and live["missing_outcomes"] == 0
    assert live["decisions_by_arm"].get("holdout", 0) > 50 and live["extra_orders"] > 0

    # `promo report uplift` finds each campaign's true lift inside its always-valid interval.
    shown = subprocess.run([PROMO, "report", "uplift", "--json"], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = {row["campaign"]: row for row in json.loads(shown.stdout)["rows"]}
    checked = 0
    for campaign, row in rows.items():
        true_lift = truth.get(campaign, {}).get("true_lift")
        if true_lift is None or min(row["treatment"]["decisions"],
                                    row["holdout"]["decisions"]) < 30:
            continue
        interval = row["lift_interval"]
        print("SHOP-SIM " + json.dumps({
            "run": f"live {campaign}", "true_lift": round(true_lift, 4),
            "estimate": round(row["lift"], 4),
            "interval": [round(interval["low"], 4), round(interval["high"], 4)],
            "decisions": [row["treatment"]["decisions"], row["holdout"]["decisions"]]}),
            flush=True)
        assert interval["low"] <= true_lift <= interval["high"], (campaign, row, truth[campaign])
        checked += 1
    assert "all" in rows and checked >= 2

    # Every decision has exactly one outcome, and worker, topic and an offline recomputation
    # from the events and decisions topics agree on each of them.
    k = settings.kafka
    decisions = [orjson.loads(r.value) for r in asyncio.run(consume_all(
        k.bootstrap_servers, k.decisions_topic, idle=2.0, isolation_level="read_committed"))]
    published = asyncio.run(consume_all(k.bootstrap_servers, k.outcomes_topic, idle=2.0,
                                        isolation_level="read_committed"))
    by_id = {r.key.decode(): orjson.loads(r.value) for r in published}
    assert len(published) == len(by_id) == len(decisions) == live["decisions"]
    events = asyncio.run(consume_all(k.bootstrap_servers, k.events_topic, idle=2.0))
    closings = recompute_outcomes(events, decisions, Rules(window_ms=2 * DAY))
    expected: Counter[tuple[str, str, str, str]] = Counter()
    for decision in decisions:
        closing = closings[outcomes.ref(decision["decision_id"])]
        outcome = by_id[decision["decision_id"]]
        assert (outcome["closed_by"], outcome["converted"]) == (
            closing.closed_by, closing.conversion is not None), decision
        if closing.closed_by != "eviction":
            campaign = ((decision["coupon"] or {}).get("coupon_id")
                        or (decision["push"] or {}).get("template") or "none")
            expected[(campaign, decision["action"], decision["arm"],
                      "true" if closing.conversion is not None else "false")] += 1
    counted = {(labels["campaign"], labels["action"], labels["arm"], labels["converted"]): v
               for (name, pairs), v in scrape(port).items()
               if name == "promo_outcomes_total" and (labels := dict(pairs))}
    assert {key: v for key, v in counted.items() if v} == dict(expected)
