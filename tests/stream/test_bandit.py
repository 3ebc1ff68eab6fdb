"""Thompson sampling over offers (stream.bandit): counts from outcomes, once per decision and
only recent ones, read by every worker from the real topic; draws that favour what earns more
and still try what is uncertain; logged odds that sum to one and include the offer made; and
the policy using it within its rules."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from stream import bandit
from stream.config import PolicyConfig, Settings
from stream.contracts import DAY_MS, Action, Arm, Closure, Outcome, Trigger, TriggerKind
from stream.policy import decide
from stream.topics import ensure_topics
from tests.stream.test_policy import VECTOR, active_user, ctx, triggers
from tests.support import produce_raw


def outcome(n: int, offer: str, converted: bool, *, arm: Arm = Arm.TREATMENT,
            purchases: float = 0.0, created_at: int = 0) -> Outcome:
    return Outcome(
        decision_id=f"d{n}", user_id=f"u{n}", arm=arm,
        action=Action.NONE if offer == "none" else Action.PUSH if offer == "push"
        else Action.COUPON, coupon_id=None, discount=0.0, template=None,
        trigger=TriggerKind.CART_ADD, model_version="m", policy_version="p",
        created_at=created_at, window_start=created_at, window_ms=DAY_MS,
        features={"purchases": purchases}, closed_by=Closure.WINDOW, converted=converted,
        offer=offer)


def stats_with(rates: dict[str, tuple[int, int]], bucket_purchases: float = 0.0
               ) -> bandit.OfferStats:
    """Counts where each offer has (decisions, converted) in the cart_add bucket."""
    stats, n = bandit.OfferStats(), 0
    for offer, (decisions, converted) in rates.items():
        for k in range(decisions):
            stats.add(outcome(n, offer, k < converted, purchases=bucket_purchases))
            n += 1
    return stats


def test_buckets_are_the_trigger_and_whether_the_user_bought_before() -> None:
    assert bandit.bucket_of({"purchases": 0.0}, "cart_add") == "cart_add/new"
    assert bandit.bucket_of({"purchases": 3.0}, "repeat_views") == "repeat_views/returning"
    assert bandit.bucket_of({}, "cart_abandoned") == "cart_abandoned/new"


def test_a_decision_counts_once_the_holdout_as_nothing_and_evictions_not_at_all() -> None:
    stats = bandit.OfferStats()
    stats.add(outcome(1, "push", True))
    stats.add(outcome(1, "push", True))  # the same decision read again (a restart, a replay)
    stats.add(outcome(2, "push", False, arm=Arm.HOLDOUT))  # logged as push, got nothing
    stats.add(dataclasses.replace(outcome(3, "push", True), closed_by=Closure.EVICTION))
    assert stats.get("cart_add/new", "push") == bandit.Counts(1, 1)
    assert stats.get("cart_add/new", "none") == bandit.Counts(1, 0)


def test_decisions_older_than_the_window_are_forgotten() -> None:
    stats = bandit.OfferStats(window_ms=7 * DAY_MS)
    stats.add(outcome(1, "push", True, created_at=0))
    stats.add(outcome(2, "push", False, created_at=5 * DAY_MS))
    assert stats.get("cart_add/new", "push") == bandit.Counts(2, 1)
    stats.add(outcome(3, "none", False, created_at=8 * DAY_MS))
    assert stats.get("cart_add/new", "push") == bandit.Counts(1, 0)
    stats.add(outcome(1, "push", True, created_at=0))  # forgotten, and too old to count again
    assert stats.get("cart_add/new", "push").decisions <= 2


@hyp_settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 20), st.booleans(),
                          st.sampled_from(["none", "push", "coupon_half"]), st.booleans()),
                max_size=60))
def test_counts_are_the_recent_distinct_decisions_whatever_the_order_or_repeats(
        arrivals: list[tuple[int, int, bool, str, bool]]) -> None:
    window = 7 * DAY_MS
    stats = bandit.OfferStats(window_ms=window)
    first_seen: dict[int, Outcome] = {}
    for n, day, converted, offer, holdout in arrivals:
        # A decision's record is the same each time it is read again.
        row = first_seen.setdefault(n, outcome(
            n, offer, converted, arm=Arm.HOLDOUT if holdout else Arm.TREATMENT,
            created_at=day * DAY_MS))
        stats.add(row)
    newest = max((row.created_at for row in first_seen.values()), default=0)
    expected: dict[tuple[str, str], bandit.Counts] = {}
    for row in first_seen.values():
        if row.created_at >= newest - window:
            key = ("cart_add/new", "none" if row.arm == Arm.HOLDOUT else row.offer)
            counts = expected.setdefault(key, bandit.Counts())
            counts.decisions += 1
            counts.converted += row.converted
    assert {k: v for k, v in stats.counts.items() if v.decisions} == expected


def worth_at(margin: float, costs: dict[str, float]
             ) -> Callable[[str, np.ndarray, np.ndarray], np.ndarray]:
    def worth(offer: str, rate: np.ndarray, rate_none: np.ndarray) -> np.ndarray:
        return (rate - rate_none) * margin - costs.get(offer, 0.0)
    return worth


def test_sampling_favours_the_offer_that_earns_more_and_logs_odds_that_sum_to_one() -> None:
    # Pushes convert 30% against 10% with nothing, on 2,000 decisions each: a push nearly
    # always wins; with no evidence at all, every offer gets its turn.
    known = stats_with({"none": (2000, 200), "push": (2000, 600), "coupon_full": (2000, 220)})
    fresh = bandit.OfferStats()
    worth = worth_at(10.0, {"coupon_full": 0.5})
    offers = ["none", "push", "coupon_full"]
    chosen = [bandit.sample(known, "cart_add/new", offers, worth, f"x{k}") for k in range(200)]
    assert sum(c[0] == "push" for c in chosen) >= 195
    for offer, odds, rates in chosen[:5]:
        assert sum(odds.values()) == pytest.approx(1.0) and odds[offer] > 0
        assert odds["push"] > 0.95 and rates["push"] == pytest.approx(601 / 2002)
    tried = {bandit.sample(fresh, "cart_add/new", offers, worth, f"y{k}")[0] for k in range(60)}
    assert tried == set(offers)


def test_the_same_decision_on_the_same_counts_draws_the_same() -> None:
    stats = stats_with({"none": (20, 2), "push": (20, 5)})
    worth = worth_at(10.0, {})
    draws = [bandit.sample(stats, "cart_add/new", ["none", "push"], worth, f"z{k}")
             for k in range(30)]
    assert draws == [bandit.sample(stats, "cart_add/new", ["none", "push"], worth, f"z{k}")
                     for k in range(30)]
    assert len({d[0] for d in draws}) == 2


def test_the_policy_samples_among_feasible_offers_and_logs_the_odds_it_drew_from() -> None:
    config = PolicyConfig(holdout_percent=0, exploration_share=0.1, thompson_sampling=True)
    # Half coupons convert as well as full ones on this bucket: the cheaper one should win.
    stats = stats_with({"none": (3000, 300), "coupon_full": (3000, 1500),
                        "coupon_half": (3000, 1500), "push": (3000, 330)})
    offers = []
    for trigger in triggers(200):
        context = ctx(config=config)
        context.bandit = stats
        d = decide("u1", active_user(), VECTOR, trigger, None, context)
        assert d is not None and d.choices is not None
        assert sum(d.choices.values()) == pytest.approx(1.0, abs=1e-5)
        assert d.propensity == d.choices[d.offer] > 0
        reason = next(r for r in d.reasons if r["code"] == "thompson_sampling")
        assert reason["bucket"] == "cart_add/new"
        offers.append(d.offer)
    assert offers.count("coupon_half") >= 0.8 * len(offers)
    # The budget is only spent on what was offered, within pacing: the rules stay in charge.
    assert context.budgets["c1"].spent <= context.budgets["c1"].share


def test_the_holdout_is_never_treated_by_sampling() -> None:
    config = PolicyConfig(holdout_percent=100, exploration_share=0.5, thompson_sampling=True)
    stats = stats_with({"none": (100, 1), "push": (100, 90)})
    for trigger in triggers(30):
        context = ctx(config=config)
        context.bandit = stats
        d = decide("u1", active_user(), VECTOR, trigger, None, context)
        assert d is not None and d.arm == "holdout" and not d.to_send
        assert context.budgets["c1"].spent == 0


def test_on_site_offers_do_not_sample() -> None:
    config = PolicyConfig(holdout_percent=0, exploration_share=0.0, thompson_sampling=True)
    context = ctx(config=config)
    context.bandit = bandit.OfferStats()
    d = decide("u1", active_user(), VECTOR, Trigger(TriggerKind.ON_SITE, "claim:1", (), 0),
               None, context)
    assert d is not None and d.choices == {d.offer: 1.0}
    assert "thompson_sampling" not in [r["code"] for r in d.reasons]


@pytest.mark.kafka
def test_every_worker_reads_the_same_counts_from_the_outcomes_topic(settings: Settings) -> None:
    """Two workers' readers follow the real topic: each decision counts once however often it
    is written, an unreadable record is skipped, later outcomes arrive, and a reader started
    afresh (a restarted worker) rebuilds the same counts."""
    first = [outcome(n, "push" if n % 2 else "none", n % 3 == 0) for n in range(40)]
    later = [outcome(100 + n, "coupon_half", True, purchases=2.0) for n in range(5)]

    def records(rows: list[Outcome]) -> list[tuple[bytes | None, bytes | None]]:
        return [(o.decision_id.encode(), o.to_json()) for o in rows]

    async def scenario() -> list[dict[tuple[str, str], bandit.Counts]]:
        await ensure_topics(settings.kafka)
        topic, bootstrap = settings.kafka.outcomes_topic, settings.kafka.bootstrap_servers
        await produce_raw(bootstrap, topic, records(first) + records(first[:10])
                          + [(b"bad", b"{not json")])
        readers = [bandit.OutcomeFollower(settings.kafka, 14 * DAY_MS) for _ in range(2)]
        tasks = [asyncio.create_task(r.run()) for r in readers]

        async def counted(reader: bandit.OutcomeFollower, n: int) -> None:
            while sum(c.decisions for c in reader.stats.counts.values()) < n:
                await asyncio.sleep(0.2)

        try:
            await asyncio.wait_for(asyncio.gather(*(counted(r, 40) for r in readers)), 60)
            await produce_raw(bootstrap, topic, records(later))
            await asyncio.wait_for(asyncio.gather(*(counted(r, 45) for r in readers)), 60)
            await asyncio.sleep(1.0)  # nothing more may arrive: the duplicates were not counted
            fresh = bandit.OutcomeFollower(settings.kafka, 14 * DAY_MS)
            tasks.append(asyncio.create_task(fresh.run()))
            await asyncio.wait_for(counted(fresh, 45), 60)
            return [r.stats.counts for r in (*readers, fresh)]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    counts = asyncio.run(scenario())
    assert counts[0] == counts[1] == counts[2]
    assert counts[0][("cart_add/new", "push")] == bandit.Counts(20, 7)
    assert counts[0][("cart_add/new", "none")] == bandit.Counts(20, 7)
    assert counts[0][("cart_add/returning", "coupon_half")] == bandit.Counts(5, 5)
