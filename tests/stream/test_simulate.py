"""The offline simulator: decisions judged by what users really did next, beside baselines.

Most tests run on a slice of real Instacart histories with a briefly trained encoder; the
judging rule and the calibration maths are pinned on hand-made cases.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from encoder.data import Interaction, load_dataset
from encoder.inference import Encoder
from stream import simulate as sim
from stream.config import PolicyConfig
from stream.contracts import Coupon, Decision
from stream.eventlog import write_csv
from tests.support import PROMO, first_users

pytestmark = pytest.mark.slow

USERS = 80
CONFIG = sim.SimulationConfig(policy=PolicyConfig(quiet_start_hour=0, quiet_end_hour=0))


@pytest.fixture(scope="module")
def rows() -> list[Interaction]:
    """Whole histories of the first USERS Instacart users, in time order."""
    return first_users(load_dataset("instacart"), USERS)


@pytest.fixture(scope="module")
def encoder(rows: list[Interaction], tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    before, _, _ = sim.time_split(rows, CONFIG.train_fraction)
    return sim.train_before_cut(before, tmp_path_factory.mktemp("sim") / "model", minutes=0.4,
                                seed=0, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def report(rows: list[Interaction], encoder: Encoder) -> dict:
    return sim.simulate(rows, encoder, CONFIG)


def test_the_cut_is_in_time_and_loses_no_event(rows: list[Interaction]) -> None:
    before, after, cut = sim.time_split(rows, 0.8)
    assert len(before) + len(after) == len(rows)
    assert max(r.ts_ms for r in before) < cut <= min(r.ts_ms for r in after)
    assert 0.7 < len(before) / len(rows) <= 0.8


def test_every_policy_is_judged_at_the_same_moments(report: dict) -> None:
    assert report["moments"] > 1000
    assert report["moment_kinds"].keys() <= {"cart_add", "repeat_views", "cart_abandoned"}
    for name in ("ours", "random", "popularity", "holdout"):
        policy = report["policies"][name]
        assert 0 < policy["decisions"] <= report["moments"]
        assert 0.0 <= policy["hit_rate"] <= 1.0
        assert policy["hits"] == round(policy["hit_rate"] * policy["decisions"])


def test_the_encoder_beats_random_and_popularity_beats_random(report: dict) -> None:
    rates = {name: p["hit_rate"] for name, p in report["policies"].items()}
    assert rates["ours"] > 3 * rates["random"]
    assert rates["popularity"] > 3 * rates["random"]


def test_the_repeat_weight_is_the_best_on_a_validation_period_before_the_cut(
        report: dict) -> None:
    tuning = report["repeat_weight"]
    rates = {float(w): r for w, r in tuning["validation_hit_rate"].items()}
    assert set(rates) == set(CONFIG.repeat_weights)
    assert tuning["validation_moments"] > 100
    best = max(rates.values())
    assert tuning["chosen"] == min(w for w, r in rates.items() if r == best)
    assert tuning["configured"] == CONFIG.policy.push_repeat_weight


def test_too_short_a_history_to_validate_on_keeps_the_configured_repeat_weight(
        encoder: Encoder) -> None:
    # One distinct time before the cut: there is no validation period to choose on.
    before = [_row("u", f"i{n}", "purchase", 0) for n in range(5)]
    tuning = sim.choose_repeat_weight(before, encoder, CONFIG, frozenset({"purchase"}))
    assert tuning["chosen"] == CONFIG.policy.push_repeat_weight
    assert tuning["validation_moments"] == 0


def test_the_repeat_baseline_offers_the_users_own_items_first(encoder: Encoder) -> None:
    baseline = sim.BaselineItems(encoder, "repeat", np.arange(encoder.config.vocab_size,
                                                              dtype=np.float64),
                                 history_first=True)
    vectors = np.zeros((2, encoder.config.d_model), np.float32)
    own = (np.array([5, 9]), np.array([np.log1p(1), np.log1p(3)]))
    top, _ = baseline.top_items(vectors, 3, boost=[own, (np.zeros(0, np.int64), np.zeros(0))])
    assert top[0].tolist()[:2] == [9, 5]  # most frequent first, above any item score
    assert top[1].tolist() == baseline.top_items(vectors[1:], 3)[0][0].tolist()
    plain = sim.BaselineItems(encoder, "popularity", np.arange(encoder.config.vocab_size,
                                                                dtype=np.float64))
    assert plain.top_items(vectors[:1], 3, boost=[own])[0][0].tolist() == \
        plain.top_items(vectors[:1], 3)[0][0].tolist()  # other baselines ignore the history


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
    before, after, cut = sim.time_split(rows, 0.8)
    popular = [r.item_id for r in before if r.event_type == "purchase"][:40]
    tight = [Coupon("tiny-budget", value=2.0, budget=6.0, valid_from_ms=cut,
                    valid_to_ms=after[-1].ts_ms + 1, items=tuple(popular[:20])),
             Coupon("capped", value=1.0, budget=1000.0, valid_from_ms=cut,
                    valid_to_ms=after[-1].ts_ms + 1, items=tuple(popular[20:]),
                    max_exposures=2)]
    cfg = dataclasses.replace(CONFIG, policy=dataclasses.replace(
        CONFIG.policy, no_coupon_propensity=2.0, half_discount_propensity=2.0))
    report = sim.simulate(rows, encoder, cfg, coupons=tight)
    assert report["budget_exceeded"] is False
    for name in ("ours", "random", "popularity"):
        exposure = report["fairness"][name]["coupon_exposure"]
        assert exposure["tiny-budget"]["spent"] <= 6.0
        assert exposure["capped"]["issued"] <= 2
    binding = report["policies"]["ours"]["binding"]
    assert binding.get("budget_exhausted", 0) + binding.get("budget_paced", 0) > 0
    assert binding.get("exposure_cap", 0) > 0


def test_decision_rates_are_reported_by_user_activity(report: dict) -> None:
    by_activity = report["fairness"]["ours"]["decision_rate_by_activity"]
    assert 2 <= len(by_activity) <= 4
    assert sum(b["moments"] for b in by_activity.values()) == report["moments"]
    assert sum(b["decisions"] for b in by_activity.values()) == \
        report["policies"]["ours"]["decisions"]


def test_the_propensity_report_fits_on_early_moments_and_scores_later_ones(report: dict) -> None:
    prop = report["propensity"]
    assert prop["moments_fit"] + prop["moments_held_out"] == report["moments"]
    assert 0 <= prop["brier_calibrated"] <= 1
    assert sum(b["count"] for b in prop["bins_calibrated"]) == prop["moments_held_out"]
    assert {"propensity_logit_scale", "propensity_logit_bias"} == prop["platt"].keys()


def test_platt_scaling_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.02, 0.98, 20_000)
    truth = sim.apply_platt(scores, 2.0, -1.0)
    labels = (rng.random(scores.size) < truth).astype(float)
    scale, bias = sim.fit_platt(scores, labels)
    assert scale == pytest.approx(2.0, abs=0.15) and bias == pytest.approx(-1.0, abs=0.15)
    assert sim.brier(sim.apply_platt(scores, scale, bias), labels) < sim.brier(scores, labels)


def _row(user: str, item: str, kind: str, minute: int) -> Interaction:
    return Interaction(user, item, kind, 1_600_000_000_000 + minute * 60_000)


def test_a_hit_is_a_purchase_of_an_offered_item_within_the_horizon() -> None:
    later = [_row("u", "x", "add_to_cart", 1), _row("u", "a", "purchase", 2),
             _row("u", "b", "purchase", 3)]
    push = Decision("d", "u", "push", "treatment", 0.0, [], "m", "p", "e", 0,
                        push={"items": ["b"]})
    converts = frozenset({"purchase"})
    assert sim._hit(push, {}, later, converts)
    assert not sim._hit(push, {}, later[:2], converts)  # b came after the horizon
    carted = Decision("d", "u", "push", "treatment", 0.0, [], "m", "p", "e", 0,
                          push={"items": ["x"]})
    assert not sim._hit(carted, {}, later, converts)  # a cart add is not a purchase
    coupon = Coupon("c", value=1.0, budget=10.0, items=("a",))
    offered = Decision("d", "u", "coupon", "treatment", 0.0, [], "m", "p", "e", 0,
                           coupon={"coupon_id": "c", "discount": 1.0})
    assert sim._hit(offered, {"c": coupon}, later, converts)


def test_promo_simulate_reads_any_interactions_csv_and_prints_the_json(
        rows: list[Interaction], tmp_path: Path) -> None:
    csv_path = tmp_path / "slice.csv"
    write_csv(rows[: len(rows) // 2], csv_path)
    done = subprocess.run(
        [PROMO, "simulate", "--interactions", str(csv_path), "--type-col", "type",
         "--train-minutes", "0.2", "--out-dir", str(tmp_path / "out"), "--no-quiet-hours",
         "--json", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result["policies"]) >= {"ours", "random", "popularity", "holdout"}
    for policy in result["policies"].values():
        assert {"hit_rate", "decisions", "coupon_cost"} <= policy.keys()
    assert result["budget_exceeded"] is False
    assert (tmp_path / "out" / "simulation.json").is_file()
    assert (tmp_path / "out" / "simulation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_log_without_cart_adds_makes_every_event_a_moment(
        rows: list[Interaction], encoder: Encoder) -> None:
    purchases = [r for r in rows if r.event_type == "purchase"]
    report = sim.simulate(purchases, encoder, CONFIG)
    assert report["moment_kinds"].keys() == {"visit"}
    assert report["moments"] == report["events_replayed"]
    assert report["policies"]["ours"]["decisions"] > 0
