"""Lift and its always-valid intervals (stream.uplift) against hand-computed cases, and the
report that shows them (stream.report)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stream import outcomes, uplift
from stream.config import UpliftSettings
from stream.outcomes import ArmTally, Group, Tally
from stream.report import render_uplift, uplift_table


def test_the_mixture_boundary_matches_a_hand_computation() -> None:
    # V = 1e-4, tau = 0.02, alpha = 0.05:
    # V (V + tau^2) / tau^2 = 1e-4 * 5e-4 / 4e-4 = 1.25e-4
    # ln((V + tau^2) / V) + 2 ln(1 / alpha) = ln 5 + 2 ln 20 = 1.6094 + 5.9915 = 7.6009
    # sqrt(1.25e-4 * 7.6009) = 0.030824
    assert uplift.mixture_half_width(1e-4, 0.02, 0.05) == pytest.approx(0.030824, abs=1e-6)
    assert uplift.fixed_horizon(0.0, 1e-4, 0.05).high == pytest.approx(0.0195996, abs=1e-6)
    assert uplift.mixture_half_width(0.0, 0.02, 0.05) == 0.0


def test_the_always_valid_interval_is_wider_than_one_look_and_shrinks_with_data() -> None:
    widths = [uplift.mixture_half_width(0.25 / n, 0.02, 0.05) for n in (100, 1_000, 100_000)]
    assert widths[0] > widths[1] > widths[2]
    for n, width in zip((100, 1_000, 100_000), widths, strict=True):
        assert width > uplift.fixed_horizon(0.0, 0.25 / n, 0.05).high


def test_rate_variance_is_add_one_smoothed() -> None:
    assert uplift.rate_variance(1, 8) == pytest.approx(0.2 * 0.8 / 8)  # (1+1)/(8+2) = 0.2
    assert uplift.rate_variance(0, 50) > 0  # no conversion yet is not certainty
    assert math.isinf(uplift.rate_variance(0, 0))


def tally(t: tuple[int, int], h: tuple[int, int], **treated: float) -> Tally:
    return Tally(ArmTally(decisions=t[0], converted=t[1], **treated),  # type: ignore[arg-type]
                 ArmTally(decisions=h[0], converted=h[1]))


def test_a_clear_lift_is_better_and_its_figures_add_up() -> None:
    result = uplift.lift(tally((20_000, 6_000), (2_000, 400), cost=1_500.0, redeemed=300))
    assert (result.treatment_rate, result.holdout_rate) == (0.3, 0.2)
    assert result.lift == pytest.approx(0.1)
    assert result.relative_lift == pytest.approx(0.5)
    assert result.verdict == "better"
    assert result.lift_interval.covers(0.1) and result.lift_interval.low > 0
    fixed, valid = result.lift_interval_fixed, result.lift_interval
    assert valid.low < fixed.low and valid.high > fixed.high
    assert result.incremental_conversions == pytest.approx(2_000)
    assert result.incremental_interval.low == pytest.approx(valid.low * 20_000)
    assert result.cost_per_incremental_conversion == pytest.approx(0.75)
    assert result.relative_interval.covers(0.5)


def test_a_harmful_campaign_is_worse_and_nothing_yet_is_not_yet() -> None:
    assert uplift.lift(tally((20_000, 3_000), (2_000, 400))).verdict == "worse"
    early = uplift.lift(tally((90, 30), (10, 2)))
    assert early.verdict == "not yet"
    losing = uplift.lift(tally((100, 10), (10, 2), cost=5.0))
    assert losing.cost_per_incremental_conversion is None  # no increment to pay for
    empty = uplift.lift(Tally())
    assert empty.verdict == "not yet" and empty.incremental_conversions == 0


def test_revenue_lift_appears_only_where_conversions_have_values() -> None:
    assert uplift.lift(tally((100, 30), (100, 20))).incremental_revenue is None
    valued = Tally(ArmTally(decisions=100, converted=30, value=3_000.0, value_sq=300_000.0),
                   ArmTally(decisions=100, converted=20, value=2_000.0, value_sq=200_000.0))
    result = uplift.lift(valued)
    assert result.incremental_revenue == pytest.approx(1_000.0)  # (30 - 20) x 100
    assert result.revenue_interval is not None and result.revenue_interval.covers(1_000.0)


def test_the_report_merges_versions_per_campaign_and_adds_everything() -> None:
    groups = {Group("coupon", "five-off", "m1", "p"): tally((100, 30), (10, 2)),
              Group("coupon", "five-off", "m2", "p"): tally((100, 40), (10, 3)),
              Group("push", "recommendation", "m1", "p"): tally((50, 5), (5, 1)),
              Group("none", "none", "m1", "p"): tally((500, 50), (50, 5))}
    rows = dict(uplift.report(groups))
    assert set(rows) == {"five-off", "recommendation", "none", "all"}
    assert rows["five-off"].treatment.decisions == 200
    assert rows["all"].treatment.decisions == 750 and rows["all"].holdout.decisions == 75
    by_version = dict(uplift.report(groups, by="version"))
    assert len(by_version) == 5


def test_the_table_and_the_png_show_the_always_valid_interval_first(tmp_path: Path) -> None:
    rows = uplift.report({Group("coupon", "five-off", "m", "p"):
                          tally((20_000, 6_000), (2_000, 400), cost=10.0)},
                         settings=UpliftSettings(alpha=0.1))
    text = uplift_table(rows, 0.1)
    assert "90% intervals are always valid" in text and "fixed horizon, extra" in text
    assert "five-off" in text and "-> better" in text and "per incremental" in text
    render_uplift(rows, tmp_path / "lift.png", 0.1)
    assert (tmp_path / "lift.png").read_bytes()[:4] == b"\x89PNG"


def test_counts_sum_over_partitions_by_their_keys() -> None:
    group = Group("push", "cart_reminder", "m", "p")
    counts = {outcomes.tally_key(p, group): tally((10, p), (1, 0)).to_json() for p in range(3)}
    [(found, summed)] = outcomes.totals(counts).items()
    assert found == group and summed.treatment.decisions == 30
    assert summed.treatment.converted == 0 + 1 + 2
