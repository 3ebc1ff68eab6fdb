"""One policy over the decision moments, judged: every moment through the worker's
:func:`stream.policy.decide` with the policy's own budgets and channel history, and a decision
hits when the user converted on an offered item within the horizon."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from encoder.data import Interaction
from encoder.vocab import item_key
from stream import state as user_state
from stream.config import PolicyConfig
from stream.contracts import Action, Arm, Coupon, Decision
from stream.offline.moments import Moment
from stream.policy import (
    Context,
    CouponBudget,
    ItemModel,
    calibrated,
    decide,
    partition_budget,
)
from stream.state import CHANNELS, ChannelState, UserState

#: Reason codes that say a cap, a budget, quiet hours or the propensity gate held a send back.
BINDING_CODES = ("push_daily_cap", "push_min_interval", "coupon_daily_cap",
                 "coupon_min_interval", "quiet_hours", "budget_exhausted", "budget_paced",
                 "exposure_cap", "likely_to_buy_anyway", "half_discount_propensity")


@dataclass
class PolicyResult:
    moments: int = 0
    decisions: int = 0  # coupon or push decided (sent, except in the holdout)
    coupons: int = 0
    pushes: int = 0
    hits: int = 0
    new_item_hits: int = 0  # push hits on an item not in the user's recent events
    coupon_hits: int = 0
    coupon_granted: float = 0.0  # discounts handed out
    coupon_cost: float = 0.0  # discounts on purchases that happened (redeemed)
    binding: Counter[str] = field(default_factory=Counter)  # moments each code held back
    bound: int = 0  # moments where any cap, budget, quiet hours or the gate held a send back
    likely_coupons: int = 0  # coupons to users the propensity gate would have held back
    likely_granted: float = 0.0
    likely_hits: int = 0
    exposures: Counter[str] = field(default_factory=Counter)
    spent: dict[str, float] = field(default_factory=dict)
    by_activity: dict[str, list[int]] = field(default_factory=dict)  # [moments, decisions]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.decisions if self.decisions else 0.0


def activity_buckets(moments: Sequence[Moment]) -> list[tuple[int, str]]:
    """Quartiles of the users' event counts at the moments: (upper bound, label) per bucket,
    so "light" and "heavy" users mean something on any dataset."""
    counts = np.asarray([m.n_events for m in moments] or [0])
    edges = sorted({int(q) for q in np.quantile(counts, [0.25, 0.5, 0.75, 1.0])})
    buckets, low = [], 0
    for high in edges:
        buckets.append((high, f"{low}-{high} events"))
        low = high + 1
    return buckets


def _activity(n_events: int, buckets: Sequence[tuple[int, str]]) -> str:
    return next((name for high, name in buckets if n_events <= high), buckets[-1][1])


def _hit(decision: Decision, coupons: Mapping[str, Coupon],
         future: Sequence[Interaction], converts: frozenset[str]) -> bool:
    bought = [r for r in future if r.event_type in converts]
    if decision.coupon is not None:
        coupon = coupons[decision.coupon["coupon_id"]]
        if not coupon.items and not coupon.categories:
            return bool(bought)
        return any(r.item_id in coupon.items or (r.category is not None
                                                 and r.category in coupon.categories)
                   for r in bought)
    offered = set((decision.push or {}).get("items", ()))
    return any(r.item_id in offered for r in bought)


def _new_item_hit(decision: Decision, state: UserState, future: Sequence[Interaction],
                  converts: frozenset[str]) -> bool:
    """A pushed item the user had not touched in their recent events, bought: what a
    "buy it again" list cannot offer."""
    seen = set(state.items.tolist())
    new = {item for item in (decision.push or {}).get("items", ()) if item_key(item) not in seen}
    return any(r.item_id in new for r in future if r.event_type in converts)


def run_policy(model: ItemModel | None, config: PolicyConfig, moments: Sequence[Moment],
               vectors: np.ndarray | None, coupons: Mapping[str, Coupon],
               future: Mapping[str, Sequence[Interaction]], converts: frozenset[str],
               buckets: Sequence[tuple[int, str]], gate: PolicyConfig | None = None
               ) -> PolicyResult:
    """Every moment through :func:`stream.policy.decide`, with this policy's own budgets and
    channel history (a send, real or held out, counts against the user's caps, so every
    policy is judged at the same moments under the same caps). ``gate``: the configuration
    whose propensity threshold counts coupons that went to likely buyers."""
    budgets: dict[str, CouponBudget] = {cid: partition_budget(c, 0, 1)
                                        for cid, c in coupons.items()}
    channels: dict[str, dict[str, ChannelState]] = defaultdict(
        lambda: {name: ChannelState() for name in CHANNELS})
    result = PolicyResult(by_activity={name: [0, 0] for _, name in buckets})
    for i, moment in enumerate(moments):
        st = user_state.decode(moment.state)
        st.channels = channels[moment.user_id]
        ctx = Context(config=config, coupons=coupons, budgets=budgets, model=model,
                      now_ms=moment.now_ms)
        vector = None if vectors is None else vectors[i]
        decision = decide(moment.user_id, st, vector, moment.trigger, None, ctx)
        result.moments += 1
        bucket = result.by_activity[_activity(moment.n_events, buckets)]
        bucket[0] += 1
        if decision is None:
            continue
        codes = {r["code"] for r in decision.reasons} & set(BINDING_CODES)
        result.binding.update(codes)
        result.bound += bool(codes)
        if decision.action == Action.NONE:
            continue
        st.channels[decision.action].record_send(moment.now_ms)
        bucket[1] += 1
        result.decisions += 1
        start, end = moment.future
        hit = _hit(decision, coupons, future[moment.user_id][start:end], converts)
        result.hits += hit
        result.new_item_hits += hit and _new_item_hit(
            decision, st, future[moment.user_id][start:end], converts)
        if decision.coupon is not None:
            if decision.arm == Arm.HOLDOUT:  # reserve as if sent: the holdout mirrors ours' mix
                budgets[decision.coupon["coupon_id"]].issue(decision.coupon["discount"])
            result.coupons += 1
            result.exposures[decision.coupon["coupon_id"]] += 1
            result.coupon_hits += hit
            if decision.arm == Arm.TREATMENT:
                result.coupon_granted += decision.coupon["discount"]
                result.coupon_cost += decision.coupon["discount"] if hit else 0.0
            if gate is not None and calibrated(moment.propensity, gate) >= \
                    gate.no_coupon_propensity:
                result.likely_coupons += 1
                result.likely_granted += decision.coupon["discount"]
                result.likely_hits += hit
        else:
            result.pushes += 1
    result.spent = {cid: b.spent for cid, b in budgets.items()}
    return result
