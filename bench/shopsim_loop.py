"""The closed learning loop on the simulated shop: 14 days, starting from no uplift model.

Four runs of the same shop (same users, same seed; `stream.shop`), each through the worker's
own pipeline in-process (:class:`stream.testing.Harness`: the code a worker runs, on the shop's
clock), side by side in one run:

- **static**: today's propensity tiers (no coupon to likely buyers, half to fairly likely
  ones, a push when no coupon goes), no exploration;
- **learned**: the product's learning loop. It starts from no uplift model: Thompson sampling
  (`policy.thompson_sampling`, :mod:`stream.bandit`) chooses, and logged exploration
  (``--exploration``) and the holdout collect the data. From ``--first-retrain-days``, every
  ``--retrain-days`` it does what an operator's cron would: `promo train-uplift --from-kafka`
  on the outcomes closed so far (:func:`stream.uplift_train.from_outcomes` and ``train``),
  `promo evaluate-policy` (:func:`stream.offpolicy.compare`, on decisions the candidate held
  out), and `promo publish`'s rule: the candidate serves only if its paired gain over the
  live policy is above zero with 95% confidence. The worker then swaps it in, as the model
  watcher does;
- **ungated**: the same retraining without Thompson sampling, serving every candidate: what
  each candidate then achieves is measured against what off-policy evaluation said of it;
- **oracle**: decides by incremental profit with the simulator's true effects (each user's
  segment, rhythm and recent pushes), under the same rules, caps and budgets.

What each run changed is read from the shop's truth, not estimated: the orders decisions
brought (``extra``) less those pushes put off (``skipped``), the discounts actually redeemed
(``coupon_spend``), and the incremental profit ``margin_rate`` x (value brought - value put
off) - spend - ``push_cost`` x pushes.

Headlines (merged into summary.json):

- ``shopsim_incremental_per_cost_vs_static``: the learned run's incremental conversions per
  unit of coupon spend over the static tiers' (goal >= 1.5);
- ``shopsim_vs_oracle``: the learned run's incremental profit over the oracle's, both over the
  14 days (goal >= 0.8). Profit, not conversions per spend: a policy that gives almost
  nothing has a high ratio and earns little; the oracle maximizes profit, as the policy does.

It also checks what must hold whatever the figures: no campaign spends over its budget, no
holdout user is ever sent anything; and whether off-policy evaluation is honest: each
served candidate's DR estimate of its incremental profit per decision over the holdout, made
from the log before it served, against what it then achieved over the holdout of the days it
served.

Why in-process and not through a broker: a live worker decides on the wall clock (caps,
quiet hours, days idle) and an accelerated shop lives on its own, so features would be skewed
between the two (see `stream.shop`); `tests/stream/test_learning_loop.py` proves the same loop
(explore, train from the topic, publish, hot swap) on the real broker at small scale.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_output_options, merge_summary, summary_path, write_json

from encoder.data import load_dataset
from stream import offpolicy, shop, uplift_train
from stream.config import PolicyConfig
from stream.contracts import DAY_MS, Action, Arm, Coupon, Decision, Outcome
from stream.outcomes import Rules
from stream.policy import (
    COUPON_TIERS,
    OFFER_NONE,
    OFFER_PUSH,
    USER_COLUMN,
    in_holdout,
)
from stream.testing import Harness, tiny_encoder
from stream.uplift_model import UpliftModel

START_MS = 1_780_000_000_000
STEP_MS = shop.HOUR_MS


@dataclass
class Oracle:
    """A conversion model that knows the shop: what each offer truly does to each user."""

    shop: shop.Shop
    window_ms: int
    now_ms: int = 0
    actions: tuple[str, ...] = (OFFER_NONE, *COUPON_TIERS, OFFER_PUSH)
    base_rate: float = 0.5
    version: str = "oracle"

    def conversion(self, columns: Mapping[str, Sequence[Any]]) -> np.ndarray:
        rows = []
        for user_id in columns[USER_COLUMN]:
            user = self.shop.users[self.shop.by_id[str(user_id)]]
            gaps = sorted(o.gap_ms for o in user.orders[1:]) or [user.orders[0].gap_ms]
            p_none = 1 - math.exp(-self.window_ms / gaps[len(gaps) // 2])
            effects = self.shop.effects
            recent = sum(1 for t in user.pushes if t > self.now_ms - 7 * DAY_MS)
            coupon = p_none + (1 - p_none) * effects.uplift(user.segment, Action.COUPON, 0)
            push = p_none + (1 - p_none) * effects.uplift(user.segment, Action.PUSH, recent)
            if user.segment == "do_not_disturb":
                push = p_none * (1 - effects.put_off_rate)
            rows.append([p_none, coupon, coupon, push])
        return np.asarray(rows)


@dataclass
class Run:
    name: str
    decisions: list[Decision] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    stats: shop.ShopStats = field(default_factory=shop.ShopStats)
    seconds: float = 0.0


def simulate(name: str, templates: Sequence[list[shop.Order]], args: argparse.Namespace,
             policy: PolicyConfig, coupons: Sequence[Coupon], rules: Rules, *,
             learn: bool = False, gate: bool = True, oracle: bool = False,
             work_dir: Path | None = None) -> Run:
    """One policy on the shop for ``args.days``; then every attribution window is closed, so
    every decision has its outcome."""
    began = time.perf_counter()
    the_shop = shop.Shop(templates, users=args.users, start_ms=START_MS,
                         effects=shop.Effects(), seed=args.seed)
    items = sorted({item for orders in templates for o in orders for item in o.items})
    harness = Harness(policy=policy, encoder=tiny_encoder(items, d_model=16), coupons=coupons,
                      partitions=4, now_ms=START_MS, attribution=rules)
    truth = Oracle(the_shop, rules.window_ms) if oracle else None
    harness.model.uplift = truth  # type: ignore[assignment]  # duck-typed ConversionModel
    run = Run(name)
    end = START_MS + int(args.days * DAY_MS)
    next_retrain = START_MS + int(args.first_retrain_days * DAY_MS)
    now = START_MS
    while now < end:
        now = min(now + STEP_MS, end)
        if truth is not None:
            truth.now_ms = now
        batch = the_shop.until(now)
        harness.now_ms = now
        result = harness.run([harness.record(e.user_id, e.to_json()) for e in batch])
        result.add(harness.check_carts())  # abandoned carts, as the worker's timer finds them
        harness.sink.sent.clear()
        for decision in result.decisions:
            coupon = decision.coupon or {}
            the_shop.answer(decision.user_id, decision.arm, decision.action,
                            coupon.get("coupon_id"), now, float(coupon.get("discount") or 0.0))
        run.decisions += result.decisions
        run.outcomes.update((o.decision_id, o) for o in result.outcomes)
        if learn and now >= next_retrain and now < end:
            assert work_dir is not None
            run.published.append(retrain(harness, run, policy, now, work_dir, gate))
            next_retrain = now + int(args.retrain_days * DAY_MS)
    closing = the_shop.closing_time(rules)
    harness.now_ms = closing
    result = harness.run([harness.record(e.user_id, e.to_json())
                          for e in shop.clock_events(4, closing, "end")])
    run.outcomes.update((o.decision_id, o) for o in result.outcomes)
    run.stats = the_shop.stats
    run.seconds = time.perf_counter() - began
    return run


def retrain(harness: Harness, run: Run, policy: PolicyConfig, now: int, work_dir: Path,
            gate: bool) -> dict[str, Any]:
    """`promo train-uplift --from-kafka`, `promo evaluate-policy`, and `promo publish`'s rule
    (or, with ``gate`` off, serving every candidate: to see what it then achieves)."""
    outcomes = list(run.outcomes.values())
    day = (now - START_MS) / DAY_MS
    try:
        table = uplift_train.from_outcomes(outcomes, policy)
    except uplift_train.TableError as exc:  # too early: the command would refuse the same
        return {"day": day, "served": False, "skipped": str(exc)}
    candidate = uplift_train.train(table, work_dir / f"uplift-day{day:.0f}", progress=False)
    live: UpliftModel | None = harness.model.uplift
    log = offpolicy.read_log(outcomes, policy)
    comparison = offpolicy.compare(candidate, live, log, policy)
    judged = {j.name: j for j in comparison.judged}
    # The candidate's value over the holdout's, both on the rows it is judged on: what serving
    # it should then achieve over the holdout of the days it serves (the difference removes
    # what changes with time for everyone, as the shop's users settle into their rhythm).
    rows = offpolicy.unseen_by(candidate, log)
    holdout = rows.reward[np.asarray([o.arm == Arm.HOLDOUT for o in rows.outcomes])]
    dr = judged["candidate"].dr_terms
    value = float(dr.mean() - holdout.mean())
    half = 1.959964 * math.sqrt(dr.var(ddof=1) / len(dr) + holdout.var(ddof=1) / len(holdout))
    serves = comparison.gain.low > 0 or not gate
    if serves:
        harness.model.uplift = candidate
    return {"day": day, "rows": len(table.converted), "judged_rows": comparison.rows,
            "version": candidate.version, "served": serves, "gain": asdict(comparison.gain),
            "candidate_dr_over_holdout": {"value": value, "low": value - half,
                                          "high": value + half},
            "qini": candidate.metrics.get("held_out", {}).get("qini")}


def truth_of(run: Run, policy: PolicyConfig, coupons: Sequence[Coupon]) -> dict[str, Any]:
    """What the run changed, from the shop's own ledger; and the rules that must hold."""
    s = run.stats
    incremental = s.extra_orders - s.skipped_orders
    profit = (policy.margin_rate * (s.extra_value - s.skipped_value) - s.coupon_spend
              - policy.push_cost * s.pushes)
    issued: dict[str, float] = defaultdict(float)
    offers: dict[str, int] = defaultdict(int)
    holdout_sent = 0
    for d in run.decisions:
        if d.arm == Arm.TREATMENT:
            offers[d.offer] += 1
            if d.coupon is not None:
                issued[d.coupon["coupon_id"]] += float(d.coupon["discount"])
        if in_holdout(d.user_id, policy.holdout_percent) and d.arm != Arm.HOLDOUT:
            holdout_sent += 1
    over_budget = {c.coupon_id: round(issued[c.coupon_id], 2) for c in coupons
                   if issued[c.coupon_id] > c.budget + 1e-6}
    return {"decisions": len(run.decisions), "offers": dict(offers),
            "extra_orders": s.extra_orders, "skipped_orders": s.skipped_orders,
            "incremental_conversions": incremental, "coupon_spend": round(s.coupon_spend, 2),
            "pushes": s.pushes, "redeemed": s.redeemed,
            "incremental_per_coupon_spend": incremental / s.coupon_spend
            if s.coupon_spend else None,
            "incremental_profit": round(profit, 2), "issued": dict(issued),
            "over_budget": over_budget, "holdout_users_sent_anything": holdout_sent,
            "seconds": round(run.seconds, 1)}


def achieved_after(run: Run, policy: PolicyConfig, version: str, since_day: float,
                   until_day: float) -> dict[str, Any] | None:
    """What a served model achieved on-policy, in the quantity its DR estimate named
    (incremental profit per decision): the mean reward of the treatment decisions it made
    greedily less that of the holdout's decisions in the same days, with a 95% interval."""
    lo, hi = START_MS + since_day * DAY_MS, START_MS + until_day * DAY_MS
    rows = [o for o in run.outcomes.values() if lo <= o.created_at < hi and not o.evicted]
    served = [o for o in rows if o.arm == Arm.TREATMENT and o.policy_version.endswith(version)
              and (o.choices or {}).get(o.offer, 1.0) >= 0.5]
    holdout = [o for o in rows if o.arm == Arm.HOLDOUT]
    if len(served) < 30 or len(holdout) < 30:
        return None

    _, a = offpolicy.realized(served, [o.offer for o in served], policy)
    _, b = offpolicy.realized(holdout, [OFFER_NONE] * len(holdout), policy)
    value = float(a.mean() - b.mean())
    half = 1.959964 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return {"value": value, "low": value - half, "high": value + half,
            "served_rows": len(a), "holdout_rows": len(b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="instacart", help="interactions the users copy")
    parser.add_argument("--users", type=int, default=None, help="simulated users [6000; quick 800]")
    parser.add_argument("--days", type=float, default=None, help="shop days [14; quick 8]")
    parser.add_argument("--first-retrain-days", type=float, default=None,
                        help="first retrain after this many days [5; quick 4.5]")
    parser.add_argument("--retrain-days", type=float, default=3.0,
                        help="then every this many days")
    parser.add_argument("--exploration", type=float, default=0.10,
                        help="policy.exploration_share of the learned run")
    parser.add_argument("--holdout-percent", type=float, default=10.0)
    parser.add_argument("--window-days", type=float, default=3.0,
                        help="attribution window (the shop's extra orders come within 3 days)")
    parser.add_argument("--coupon-value", type=float, default=4.0)
    parser.add_argument("--budget", type=float, default=None,
                        help="campaign budget [2 x users x days / 14]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small, short shop")
    add_output_options(parser)
    args = parser.parse_args()
    args.users = args.users or (800 if args.quick else 6000)
    args.days = args.days or (8.0 if args.quick else 14.0)
    args.first_retrain_days = args.first_retrain_days or (4.5 if args.quick else 5.0)
    budget = args.budget or 2.0 * args.users * args.days / 14

    templates = shop.histories(load_dataset(args.dataset))
    rules = Rules(window_ms=int(args.window_days * DAY_MS))
    coupons = [Coupon(coupon_id="store-wide", value=args.coupon_value, budget=budget,
                      valid_from_ms=START_MS, valid_to_ms=START_MS + int(args.days * DAY_MS))]
    base = PolicyConfig(holdout_percent=args.holdout_percent, exploration_share=0.0)
    results: dict[str, Any] = {"users": args.users, "days": args.days, "seed": args.seed,
                               "dataset": args.dataset, "window_days": args.window_days,
                               "coupon": asdict(coupons[0]), "policy": asdict(base),
                               "exploration": args.exploration, "runs": {}}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["static"] = simulate("static", templates, args, base, coupons, rules)
        explore = replace(base, exploration_share=args.exploration)
        runs["ungated"] = simulate("ungated", templates, args, explore, coupons, rules,
                                   learn=True, gate=False, work_dir=Path(tmp) / "ungated")
        runs["learned"] = simulate("learned", templates, args,
                                   replace(explore, thompson_sampling=True), coupons, rules,
                                   learn=True, work_dir=Path(tmp) / "learned")
        runs["oracle"] = simulate("oracle", templates, args, base, coupons, rules, oracle=True)
    for name, run in runs.items():
        results["runs"][name] = truth_of(run, base, coupons)
        print(f"{name:>8}: {results['runs'][name]}")
    results["retrains"] = {}
    for name in ("ungated", "learned"):
        learned = runs[name]
        results["retrains"][name] = learned.published
        for i, step in enumerate(learned.published):
            if step["served"]:
                until = next((s["day"] for s in learned.published[i + 1:] if s["served"]),
                             args.days)
                step["achieved"] = achieved_after(learned, base, step["version"], step["day"],
                                                  until)
                est, got = step["candidate_dr_over_holdout"], step["achieved"]
                step["ope_within_interval"] = None if got is None else \
                    est["low"] <= got["value"] <= est["high"]
            print(f"{name} retrain day {step['day']:.1f}: {step}")
    r = results["runs"]
    per_cost = {k: r[k]["incremental_per_coupon_spend"] for k in r}
    results["shopsim_incremental_per_cost_vs_static"] = (
        per_cost["learned"] / per_cost["static"]
        if per_cost["learned"] is not None and per_cost["static"] else None)
    results["shopsim_vs_oracle"] = (r["learned"]["incremental_profit"]
                                    / r["oracle"]["incremental_profit"]
                                    if r["oracle"]["incremental_profit"] > 0 else None)
    results["profit_vs_oracle"] = {
        k: r[k]["incremental_profit"] / r["oracle"]["incremental_profit"]
        if r["oracle"]["incremental_profit"] > 0 else None for k in r}
    results["incremental_per_cost_vs_static"] = {
        k: per_cost[k] / per_cost["static"] if per_cost[k] is not None and per_cost["static"]
        else None for k in r}
    print({k: results[k] for k in ("shopsim_incremental_per_cost_vs_static",
                                   "shopsim_vs_oracle", "profit_vs_oracle",
                                   "incremental_per_cost_vs_static")})
    write_json(args.out_dir / f"shopsim_loop{'_quick' if args.quick else ''}.json", results)
    summary = summary_path(args)
    if summary is not None:
        merge_summary(summary, **{key: results[key] for key in (
            "shopsim_incremental_per_cost_vs_static", "shopsim_vs_oracle")})


if __name__ == "__main__":
    main()
