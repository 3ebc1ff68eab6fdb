"""Are the lift intervals honest when people keep looking? Simulated campaigns with known lift.

    .venv/bin/python bench/uplift_intervals.py           # 250 + 250 campaigns, about 2 minutes
    .venv/bin/python bench/uplift_intervals.py --quick   # 40 + 40, seconds (the test's run)

Each campaign draws a holdout conversion rate (uniform 5%..50%) and a true lift (uniform
-5..+10 points; exactly 0 for the null campaigns), then makes ``--outcomes`` decisions, 10% of
them in the holdout arm as the worker's default. Every decision goes through the product's own
attribution code (:mod:`stream.outcomes`: a window opened, a purchase inside it or none, the
window closed by event time, the outcome built from the stored decision) into a
:class:`~stream.outcomes.Tally`, and the report's interval code (:mod:`stream.uplift`) is read
**after every 100 outcomes**, as someone refreshing a dashboard would. Reported:

- ``uplift_interval_coverage``: share of campaigns whose always-valid 95% interval held the
  true lift at *every* look (goal >= 0.95);
- ``uplift_false_positive_rate_monitored``: with no true effect, share of campaigns the
  always-valid interval ever called significant (goal <= 0.05);
- ``uplift_false_positive_rate_fixed_horizon``: the same for the textbook interval read the
  same way (the point: it is far above 5%), and its coverage at every look.

Writes bench/results/uplift_intervals.json (+ _quick) and merges the headlines into
summary.json (not in --quick unless --summary).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import add_output_options, merge_summary, summary_path, write_json

from stream import outcomes, uplift
from stream.config import UpliftSettings
from stream.contracts import Action, Arm, Decision, Event, Trigger, TriggerKind

DAY_MS = 86_400_000
START_MS = 1_780_000_000_000
RULES = outcomes.Rules(window_ms=7 * DAY_MS, grace_ms=0)


@dataclass
class Campaign:
    base: float
    true_lift: float
    looks: int = 0
    always_valid_covered: bool = True
    fixed_covered: bool = True
    always_valid_significant: bool = False
    fixed_significant: bool = False


def _decision(arm: Arm, n: int) -> Decision:
    trigger = Trigger(TriggerKind.CART_ADD, f"e{n}", ("sku",), START_MS)
    return Decision(decision_id=f"{n:024x}", user_id=f"u{n}", action=Action.COUPON, arm=arm,
                    score=0.0, reasons=[], model_version="m", policy_version="p",
                    trigger_event_id=trigger.event_id, created_at=START_MS,
                    coupon={"coupon_id": "c", "discount": 1.0}, features={"spend": 1.0},
                    trigger=trigger)


def run_campaign(campaign: Campaign, n_outcomes: int, holdout_share: float, every: int,
                 settings: UpliftSettings, rng: np.random.Generator) -> Campaign:
    holdout = rng.random(n_outcomes) < holdout_share
    p_treated = min(max(campaign.base + campaign.true_lift, 0.0), 1.0)
    converts = rng.random(n_outcomes) < np.where(holdout, campaign.base, p_treated)
    delays = rng.integers(0, 7 * DAY_MS, n_outcomes)
    stored = {arm: outcomes.pending_record(_decision(arm, 0), START_MS) for arm in Arm}
    tally = outcomes.Tally()
    for n in range(n_outcomes):
        arm = Arm.HOLDOUT if holdout[n] else Arm.TREATMENT
        window = outcomes.open_window(_decision(arm, n), START_MS)
        steps: list[outcomes.Seen | outcomes.Opened] = [outcomes.Opened(window)]
        if converts[n]:
            ts = START_MS + int(delays[n])
            steps.append(outcomes.Seen(Event(f"p{n}", f"u{n}", "purchase", "sku", ts,
                                             value=10.0), START_MS))
        still, closed = outcomes.attribute([], steps, RULES)
        _, expired = outcomes.expire(still, START_MS + 8 * DAY_MS, RULES)
        [closing] = closed + expired
        tally.add(outcomes.outcome(stored[arm], closing, RULES))
        if (n + 1) % every == 0 or n + 1 == n_outcomes:
            result = uplift.lift(tally, settings)
            campaign.looks += 1
            truth = campaign.true_lift if 0 < p_treated < 1 else p_treated - campaign.base
            campaign.always_valid_covered &= result.lift_interval.covers(truth)
            campaign.fixed_covered &= result.lift_interval_fixed.covers(truth)
            campaign.always_valid_significant |= result.lift_interval.excludes_zero
            campaign.fixed_significant |= result.lift_interval_fixed.excludes_zero
    return campaign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 + 40 campaigns")
    parser.add_argument("--campaigns", type=int, default=None,
                        help="campaigns with an effect, and as many without [250; quick 40]")
    parser.add_argument("--outcomes", type=int, default=None,
                        help="decisions per campaign [5000; quick 2000]")
    parser.add_argument("--every", type=int, default=100, help="outcomes between looks")
    parser.add_argument("--holdout", type=float, default=0.10, help="holdout share")
    parser.add_argument("--seed", type=int, default=0)
    add_output_options(parser)
    args = parser.parse_args()
    n_campaigns = args.campaigns or (40 if args.quick else 250)
    n_outcomes = args.outcomes or (2000 if args.quick else 5000)
    settings = UpliftSettings()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    effect = [run_campaign(Campaign(float(rng.uniform(0.05, 0.5)),
                                    float(rng.uniform(-0.05, 0.10))),
                           n_outcomes, args.holdout, args.every, settings, rng)
              for _ in range(n_campaigns)]
    null = [run_campaign(Campaign(float(rng.uniform(0.05, 0.5)), 0.0),
                         n_outcomes, args.holdout, args.every, settings, rng)
            for _ in range(n_campaigns)]
    seconds = time.perf_counter() - started

    def share(flags: list[bool]) -> float:
        return round(sum(flags) / len(flags), 4)

    results = {
        "campaigns_with_effect": n_campaigns, "campaigns_without": n_campaigns,
        "outcomes_per_campaign": n_outcomes, "looks_per_campaign": effect[0].looks,
        "look_every_outcomes": args.every, "holdout_share": args.holdout,
        "alpha": settings.alpha, "mixture_tau": settings.mixture_tau,
        "uplift_interval_coverage": share([c.always_valid_covered for c in effect]),
        "fixed_horizon_coverage_every_look": share([c.fixed_covered for c in effect]),
        "uplift_false_positive_rate_monitored": share(
            [c.always_valid_significant for c in null]),
        "uplift_false_positive_rate_fixed_horizon": share([c.fixed_significant for c in null]),
        "power_always_valid": share([c.always_valid_significant for c in effect
                                     if abs(c.true_lift) >= 0.03]),
        "seconds": round(seconds, 1),
    }
    suffix = "_quick" if args.quick else ""
    write_json(args.out_dir / f"uplift_intervals{suffix}.json", results)
    summary = summary_path(args)
    if summary is not None:
        merge_summary(summary, **{key: results[key] for key in (
            "uplift_interval_coverage", "uplift_false_positive_rate_monitored",
            "uplift_false_positive_rate_fixed_horizon")})
    for key, value in results.items():
        print(f"{key:45s} {value}")


if __name__ == "__main__":
    main()
