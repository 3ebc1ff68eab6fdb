"""Every policy judged at the same moments, under the same caps and budgets; the judging rule
pinned on a hand-made case."""

from __future__ import annotations

import dataclasses

import pytest

from encoder.data import Interaction
from encoder.inference import Encoder
from stream.contracts import Coupon, Decision
from stream.offline.judge import _hit
from stream.offline.moments import time_split
from stream.offline.run import simulate
from tests.stream.offline.conftest import CONFIG, interaction

pytestmark = pytest.mark.slow


def test_every_policy_is_judged_at_the_same_moments(report: dict) -> None:
    assert report["moments"] > 1000
    assert report["moment_kinds"].keys() <= {"cart_add", "repeat_views", "cart_abandoned"}
    for name in ("ours", "random", "popularity", "holdout"):
        policy = report["policies"][name]
        assert 0 < policy["decisions"] <= report["moments"]
        assert 0.0 <= policy["hit_rate"] <= 1.0
        assert policy["hits"] == round(policy["hit_rate"] * policy["decisions"])


def test_the_holdout_is_ours_sent_to_nobody(report: dict) -> None:
    ours, holdout = report["policies"]["ours"], report["policies"]["holdout"]
    assert holdout["decisions"] == ours["decisions"]
    assert holdout["hit_rate"] == ours["hit_rate"]  # a log holds no coupons: no uplift offline
    assert holdout["coupon_cost"] == 0.0 and holdout["coupon_granted"] == 0.0
    assert ours["cost_per_incremental_purchase"] is None


def test_budgets_hold_and_caps_bind_visibly(report: dict) -> None:
    assert report["budget_exceeded"] is False
    ours = report["fairness"]["ours"]["coupon_exposure"]
    for coupon in report["catalog"]:
        row = ours[coupon["coupon_id"]]
        assert row["spent"] <= coupon["budget"] + 1e-9
        if coupon["max_exposures"]:
            assert row["issued"] <= coupon["max_exposures"]
    binding = report["policies"]["ours"]["binding"]
    assert binding.get("push_min_interval", 0) > 0 or binding.get("push_daily_cap", 0) > 0


def test_a_tight_catalog_binds_budgets_and_exposure_caps(rows: list[Interaction],
                                                         encoder: Encoder) -> None:
    before, after, cut = time_split(rows, 0.8)
    popular = [r.item_id for r in before if r.event_type == "purchase"][:40]
    tight = [Coupon("tiny-budget", value=2.0, budget=6.0, valid_from_ms=cut,
                    valid_to_ms=after[-1].ts_ms + 1, items=tuple(popular[:20])),
             Coupon("capped", value=1.0, budget=1000.0, valid_from_ms=cut,
                    valid_to_ms=after[-1].ts_ms + 1, items=tuple(popular[20:]),
                    max_exposures=2)]
    cfg = dataclasses.replace(CONFIG, policy=dataclasses.replace(
        CONFIG.policy, no_coupon_propensity=2.0, half_discount_propensity=2.0))
    report = simulate(rows, encoder, cfg, coupons=tight)
    assert report["budget_exceeded"] is False
    for name in ("ours", "random", "popularity"):
        exposure = report["fairness"][name]["coupon_exposure"]
        assert exposure["tiny-budget"]["spent"] <= 6.0
        assert exposure["capped"]["issued"] <= 2
    binding = report["policies"]["ours"]["binding"]
    assert binding.get("budget_exhausted", 0) + binding.get("budget_paced", 0) > 0
    assert binding.get("exposure_cap", 0) > 0


def test_a_hit_is_a_purchase_of_an_offered_item_within_the_horizon() -> None:
    later = [interaction("u", "x", "add_to_cart", 1), interaction("u", "a", "purchase", 2),
             interaction("u", "b", "purchase", 3)]
    push = Decision("d", "u", "push", "treatment", 0.0, [], "m", "p", "e", 0,
                        push={"items": ["b"]})
    converts = frozenset({"purchase"})
    assert _hit(push, {}, later, converts)
    assert not _hit(push, {}, later[:2], converts)  # b came after the horizon
    carted = Decision("d", "u", "push", "treatment", 0.0, [], "m", "p", "e", 0,
                          push={"items": ["x"]})
    assert not _hit(carted, {}, later, converts)  # a cart add is not a purchase
    coupon = Coupon("c", value=1.0, budget=10.0, items=("a",))
    offered = Decision("d", "u", "coupon", "treatment", 0.0, [], "m", "p", "e", 0,
                           coupon={"coupon_id": "c", "discount": 1.0})
    assert _hit(offered, {"c": coupon}, later, converts)
