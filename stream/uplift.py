"""Lift of the treatment arm over the holdout, with intervals that stay valid when watched.

People look at a campaign report every few minutes and stop when it "looks significant". A
fixed-horizon 95% interval checked that way excludes zero far more often than 5% of the time
when nothing works (bench/uplift_intervals.py measures how often). The intervals here are
**always valid**: a confidence sequence from the normal-mixture sequential probability ratio
test (mSPRT; Robbins 1970, as Johari, Koomen, Pekelis and Walsh use it for "always valid
p-values" in A/B testing). For an estimate ``d`` with variance ``V`` and a normal mixture of
spread ``tau`` over the true effect, the set of effects not yet rejected at level ``alpha`` is

    d +- sqrt( V (V + tau^2) / tau^2 * ( ln((V + tau^2) / V) + 2 ln(1 / alpha) ) )

and it covers the true effect at *every* look with probability ``1 - alpha``: reading it after
each new outcome costs nothing. ``tau`` tunes where the test is quickest (effects of about that
size), never its validity. The fixed-horizon interval is computed beside it only to show the
difference, labelled as such.

Rates use the add-one (Agresti-Caffo) estimate of each arm's variance, so an arm with no
conversion yet does not claim certainty. Relative lift is the ratio of rates, on the log scale
(where the normal approximation holds far sooner). Everything is a pure function of the counts
in :class:`stream.outcomes.Tally`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

from stream.config import UpliftSettings
from stream.outcomes import ArmTally, Group, Tally, merged

DEFAULT_SETTINGS = UpliftSettings()


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def scaled(self, factor: float) -> Interval:
        low, high = self.low * factor, self.high * factor
        return Interval(min(low, high), max(low, high))


def mixture_half_width(variance: float, tau: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence (see the module docstring)."""
    if variance <= 0:
        return 0.0
    spread = variance + tau * tau
    return math.sqrt(variance * spread / (tau * tau)
                     * (math.log(spread / variance) + 2 * math.log(1 / alpha)))


def always_valid(estimate: float, variance: float, tau: float, alpha: float) -> Interval:
    half = mixture_half_width(variance, tau, alpha)
    return Interval(estimate - half, estimate + half)


def fixed_horizon(estimate: float, variance: float, alpha: float) -> Interval:
    """The textbook interval: valid for one look at a sample size fixed in advance only."""
    half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(max(variance, 0.0))
    return Interval(estimate - half, estimate + half)


def rate_variance(converted: int, n: int) -> float:
    """Variance of a conversion rate's estimate, add-one smoothed (never 0 for n > 0)."""
    if n <= 0:
        return math.inf
    smoothed = (converted + 1) / (n + 2)
    return smoothed * (1 - smoothed) / n


def log_ratio_variance(converted: int, n: int) -> float:
    """Variance of the log of a conversion rate (delta method), add-one smoothed."""
    if n <= 0:
        return math.inf
    smoothed = (converted + 1) / (n + 2)
    return (1 - smoothed) / (n * smoothed)


@dataclass(frozen=True)
class Lift:
    """One group's (or campaign's) result: both arms, the lift and what it is worth."""

    treatment: ArmTally
    holdout: ArmTally
    treatment_rate: float
    holdout_rate: float
    treatment_interval: Interval
    holdout_interval: Interval
    lift: float  # treatment rate - holdout rate (conversion-rate points, as a share)
    lift_interval: Interval  # always valid
    lift_interval_fixed: Interval  # fixed horizon: shown beside, not to be acted upon
    relative_lift: float  # treatment rate / holdout rate - 1
    relative_interval: Interval  # always valid
    incremental_conversions: float  # lift x treated decisions
    incremental_interval: Interval
    incremental_revenue: float | None  # where conversions carry values
    revenue_interval: Interval | None
    cost: float  # money off of redeemed coupons in the treatment arm
    cost_per_incremental_conversion: float | None  # None while there is no increment

    @property
    def verdict(self) -> Literal["better", "worse", "not yet"]:
        """What the always-valid interval says: act on this, at any time."""
        if self.lift_interval.low > 0:
            return "better"
        if self.lift_interval.high < 0:
            return "worse"
        return "not yet"

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["verdict"] = self.verdict
        return body


def lift(tally: Tally, settings: UpliftSettings = DEFAULT_SETTINGS) -> Lift:
    t, h = tally.treatment, tally.holdout
    alpha, tau = settings.alpha, settings.mixture_tau
    rate_t = t.converted / t.decisions if t.decisions else 0.0
    rate_h = h.converted / h.decisions if h.decisions else 0.0
    var_t, var_h = rate_variance(t.converted, t.decisions), rate_variance(h.converted,
                                                                          h.decisions)
    difference = rate_t - rate_h
    variance = var_t + var_h
    lift_interval = _bounded(always_valid(difference, variance, tau, alpha), -1.0, 1.0)
    smoothed_t = (t.converted + 1) / (t.decisions + 2)
    smoothed_h = (h.converted + 1) / (h.decisions + 2)
    log_ratio = math.log(smoothed_t / smoothed_h)
    log_interval = always_valid(log_ratio, log_ratio_variance(t.converted, t.decisions)
                                + log_ratio_variance(h.converted, h.decisions),
                                settings.mixture_tau_relative, alpha)
    relative = Interval(_expm1(log_interval.low), _expm1(log_interval.high))
    revenue, revenue_interval = _incremental_revenue(t, h, settings)
    incremental = difference * t.decisions
    return Lift(
        treatment=t, holdout=h, treatment_rate=rate_t, holdout_rate=rate_h,
        treatment_interval=_bounded(always_valid(rate_t, var_t, tau, alpha), 0.0, 1.0),
        holdout_interval=_bounded(always_valid(rate_h, var_h, tau, alpha), 0.0, 1.0),
        lift=difference, lift_interval=lift_interval,
        lift_interval_fixed=_bounded(fixed_horizon(difference, variance, alpha), -1.0, 1.0),
        relative_lift=rate_t / rate_h - 1 if rate_h > 0 else math.inf if rate_t > 0 else 0.0,
        relative_interval=relative,
        incremental_conversions=incremental,
        incremental_interval=lift_interval.scaled(t.decisions),
        incremental_revenue=revenue, revenue_interval=revenue_interval,
        cost=t.cost,
        cost_per_incremental_conversion=t.cost / incremental if incremental > 0 else None)


def _incremental_revenue(t: ArmTally, h: ArmTally, settings: UpliftSettings
                         ) -> tuple[float | None, Interval | None]:
    """(mean worth per treated decision - per holdout decision) x treated decisions."""
    if not (t.value or h.value) or t.decisions < 2 or h.decisions < 2:
        return None, None
    mean_t, mean_h = t.value / t.decisions, h.value / h.decisions
    var_t = max(0.0, t.value_sq / t.decisions - mean_t ** 2) / t.decisions
    var_h = max(0.0, h.value_sq / h.decisions - mean_h ** 2) / h.decisions
    # The mixture's spread in money: the relative tau of the holdout's mean worth.
    scale = settings.mixture_tau_relative * max(mean_h, mean_t, 1e-9)
    interval = always_valid(mean_t - mean_h, var_t + var_h, scale, settings.alpha)
    return (mean_t - mean_h) * t.decisions, interval.scaled(t.decisions)


def _bounded(interval: Interval, low: float, high: float) -> Interval:
    return Interval(max(low, interval.low), min(high, interval.high))


def _expm1(x: float) -> float:
    return math.expm1(min(x, 50.0))


# --- reports -----------------------------------------------------------------------------------

By = Literal["campaign", "version"]


def report(groups: Mapping[Group, Tally], by: By = "campaign",
           settings: UpliftSettings = DEFAULT_SETTINGS) -> list[tuple[str, Lift]]:
    """Lift per campaign (``by="campaign"``: all versions together) or per campaign, model
    and policy version, then every decision together (``all``), largest first."""
    by_label = merged(groups, lambda group: _label(group, by))
    rows = sorted(by_label.items(), key=lambda kv: -(kv[1].treatment.decisions
                                                     + kv[1].holdout.decisions))
    everything = _sum(groups.values())
    return [(label, lift(t, settings)) for label, t in rows] + [("all", lift(everything,
                                                                             settings))]


def _label(group: Group, by: By) -> str:
    label = group.campaign  # "none" for `none` decisions: they promote nothing
    if by == "version":
        label += f" (model {group.model_version[:8]}, {group.policy_version})"
    return label


def _sum(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total = total.merge(tally)
    return total
