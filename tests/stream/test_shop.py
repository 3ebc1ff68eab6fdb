"""The simulated shop (stream.shop): real rhythms, valid events, a known response to decisions,
and a ground truth that a long randomized run of the real pipeline recovers."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest

from encoder.data import Interaction, load_dataset
from stream import shop, uplift
from stream.config import PolicyConfig
from stream.contracts import Coupon, Event, parse_event
from stream.outcomes import Rules
from stream.testing import tiny_encoder

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
        assert estimate.lift_interval.covers(truth[campaign]["true_lift"]), (
            campaign, estimate.lift_interval, truth[campaign])
        assert estimate.verdict == "better"
