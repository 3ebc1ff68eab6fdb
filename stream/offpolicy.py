"""Judging a policy on the log before it serves: inverse propensity and doubly robust.

Every decision logs the probability of each offer it could have made (``choices``; the holdout
share adds "nothing" for its users), so the log says how likely each user was to get what they
got. A candidate policy's value is then estimable from the log alone: the rows where the
candidate would have done what was done, weighted by one over that probability (inverse
propensity, IPS; self-normalized, as it is steadier), or a model's prediction for the
candidate's offer corrected by the same weighted residuals (doubly robust, DR: unbiased if
either the propensities or the model are right, and with far less variance than IPS). Both
come with a 95% normal interval over rows.

The value of a decision is its **incremental profit**: the margin of a conversion
(``margin_rate`` x the user's average order, as the policy computes it), less the coupon's
discount when it was redeemed and ``push_cost`` for a push. Since a policy that does nothing
earns the same baseline on every row, differences between policies are differences in
incremental profit.

A candidate decides as the worker would: the offer worth most among those the decision could
have made (the keys of ``choices``). The log does not keep the discount of coupon offers that
were not made; the candidate values them at the median discount each tier was granted in the
log (documented in docs/uplift.md).

A candidate trained on this log is judged only on the decisions it held out
(:func:`unseen_by`): on its own training rows it would look better than it is. `promo publish`
asks the paired gain over the live policy (:class:`Comparison`) to be above zero with 95%
confidence, not only on average.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stream import policy
from stream.config import PolicyConfig
from stream.contracts import Arm, Closure, Outcome
from stream.uplift_model import CONTROL, UpliftModel

Z95 = 1.959964


@dataclass(frozen=True)
class Estimate:
    value: float  # incremental profit per decision, in the shop's money
    low: float
    high: float

    @classmethod
    def of(cls, terms: np.ndarray) -> Estimate:
        mean = float(terms.mean())
        half = Z95 * float(terms.std(ddof=1)) / math.sqrt(len(terms)) if len(terms) > 1 else 0.0
        return cls(mean, mean - half, mean + half)


@dataclass(frozen=True)
class Judgement:
    name: str
    ips: Estimate
    dr: Estimate
    matched: int  # rows where the policy would have done what was done
    dr_terms: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))


@dataclass(frozen=True)
class Log:
    """The outcomes topic as arrays, one row per closed (not evicted) decision."""

    outcomes: list[Outcome]
    got: np.ndarray  # the offer each user actually got (holdout: none)
    probability: np.ndarray  # the chance they got it
    reward: np.ndarray  # incremental profit terms: margin if converted, less costs
    margin: np.ndarray
    columns: dict[str, list[object]]  # the uplift model's inputs
    discount: dict[str, float]  # median discount granted per coupon tier

    @property
    def options(self) -> list[list[str]]:
        return [sorted((o.choices or {o.offer: 1.0}).keys()) for o in self.outcomes]


def margin_of(features: dict[str, float], config: PolicyConfig) -> float:
    """What one conversion of this user earns: as :func:`stream.policy` computes it."""
    purchases, spend = features.get("purchases", 0.0), features.get("spend", 0.0)
    order = spend / purchases if purchases > 0 else config.default_order_value
    return config.margin_rate * order


def realized(outcomes: Sequence[Outcome], got: Sequence[str],
             config: PolicyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each decision's margin of a conversion, and its value given what the user ``got``: the
    margin if it converted, less what was actually paid (a redeemed coupon's discount, a
    push's cost)."""
    margin = np.asarray([margin_of(o.features, config) for o in outcomes])
    cost = np.asarray([policy.offer_cost(offer, o.discount, float(o.redeemed), config)
                       for o, offer in zip(outcomes, got, strict=True)])
    converted = np.asarray([o.converted for o in outcomes], dtype=np.float64)
    return margin, margin * converted - cost


def read_log(outcomes: Sequence[Outcome], config: PolicyConfig) -> Log:
    """The log's complete rows: closed, not evicted, and old enough that a row which did not
    convert has closed too. A conversion closes its window at once, a window without one only
    when it runs out; the decisions of the last window's length would otherwise be there
    mostly when they converted, and every offer would look like it works. Windows run out in
    the order they opened, so the rows kept are those opened no later than the newest window
    that ran out."""
    closed = [o for o in outcomes if not o.evicted]
    if not closed:
        raise ValueError("no closed decisions in the log yet")
    ran_out = [o.window_start for o in closed if o.closed_by == Closure.WINDOW]
    if not ran_out:
        raise ValueError("no decision's window has run out yet, so the log holds only the "
                         "ones that converted; wait one attribution window")
    kept = [o for o in closed if o.window_start <= max(ran_out)]
    share = config.holdout_percent / 100
    got = [CONTROL if o.arm == Arm.HOLDOUT else o.offer for o in kept]
    probability = np.asarray([
        share * (offer == CONTROL) + (1 - share) * (o.choices or {o.offer: 1.0}).get(offer, 0.0)
        for o, offer in zip(kept, got, strict=True)])
    if (probability <= 0).any():
        raise ValueError("a decision's offer has probability 0 under the settings: the log was "
                         "written with another policy.holdout_percent than the one set now")
    margin, reward = realized(kept, got, config)
    discount: dict[str, float] = {}
    for tier in policy.COUPON_TIERS:
        granted = [o.discount for o, offer in zip(kept, got, strict=True) if offer == tier]
        if granted:
            discount[tier] = float(np.median(granted))
    # A tier never granted is valued from the other one; with neither, coupon offers have no
    # known cost and a candidate cannot choose them (greedy_of skips them).
    known = [(discount[t] / f) for t, f in policy.COUPON_TIERS.items() if t in discount]
    if known:
        value = float(np.median(known))
        for tier, share_of_value in policy.COUPON_TIERS.items():
            discount.setdefault(tier, value * share_of_value)
    columns = policy.uplift_columns([o.features for o in kept], [o.trigger for o in kept])
    return Log(kept, np.asarray(got), probability, reward, margin, columns, discount)


def greedy_of(model: UpliftModel, log: Log, config: PolicyConfig) -> np.ndarray:
    """The offer the model's policy would make on each row, among the row's options."""
    conversion = model.conversion(log.columns)
    chosen = []
    for row, options in enumerate(log.options):
        rates = dict(zip(model.actions, conversion[row].tolist(), strict=True))
        best, best_worth = CONTROL, 0.0
        for offer in options:
            if offer in policy.COUPON_TIERS and offer not in log.discount:
                continue  # no coupon was ever granted in the log: its cost is unknown
            worth = policy.offer_worth(offer, log.discount.get(offer, 0.0), rates,
                                       log.margin[row], config)
            if worth > best_worth:
                best, best_worth = offer, worth
        chosen.append(best)
    return np.asarray(chosen)


def logged_greedy(log: Log) -> np.ndarray:
    """What the policy that wrote the log preferred on each row (its most likely offer; the
    holdout records it as its offer)."""
    def preferred(o: Outcome) -> str:
        if o.arm == Arm.HOLDOUT or not o.choices:
            return o.offer
        choices = o.choices
        return max(choices, key=lambda offer: (choices[offer], offer))

    return np.asarray([preferred(o) for o in log.outcomes])


def judge(name: str, chosen: np.ndarray, log: Log,
          expected_reward: Callable[[np.ndarray], np.ndarray]) -> Judgement:
    """IPS and DR estimates of the policy that makes ``chosen`` on each row.
    ``expected_reward(offers)`` is the reward model's prediction per row for those offers."""
    match = (chosen == log.got).astype(np.float64)
    weight = match / log.probability
    # Self-normalized IPS, as per-row terms whose mean is the estimate and whose spread is
    # its delta-method variance (the normalization's own uncertainty included).
    if weight.sum() > 0:
        value = float(np.sum(weight * log.reward) / weight.sum())
        ips_terms = value + weight * (log.reward - value) / weight.mean()
    else:
        ips_terms = np.zeros(len(weight))
    predicted_chosen = expected_reward(chosen)
    predicted_got = expected_reward(log.got)
    dr_terms = predicted_chosen + weight * (log.reward - predicted_got)
    return Judgement(name, Estimate.of(ips_terms), Estimate.of(dr_terms), int(match.sum()),
                     dr_terms)


def reward_model(model: UpliftModel, log: Log,
                 config: PolicyConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Expected incremental profit of given offers per row, from ``model``'s conversion rates
    (0 for an offer the model does not know: no evidence it does anything)."""
    conversion = model.conversion(log.columns)
    index = {a: i for i, a in enumerate(model.actions)}

    def expected(offers: np.ndarray) -> np.ndarray:
        out = np.zeros(len(offers))
        for row, offer in enumerate(offers.tolist()):
            p = conversion[row, index.get(offer, 0)]
            out[row] = p * log.margin[row] - policy.offer_cost(
                offer, log.discount.get(offer, 0.0), p, config)
        return out

    return expected


def unseen_by(model: UpliftModel, log: Log) -> Log:
    """The rows of ``log`` the model did not train on. A model trained on this log (`promo
    train-uplift --from-kafka`) held out decisions by a hash of their id; judged on its own
    training rows it would look better than it is. A model trained elsewhere saw none."""
    split = model.metrics.get("split")
    if not isinstance(split, dict) or split.get("kind") != "decision_id_hash":
        return log
    keep = np.asarray([held_out(o.decision_id, float(split["held_out_share"]),
                                int(split["seed"])) for o in log.outcomes])
    if not keep.any():
        raise ValueError("the candidate trained on every decision in the log: train it with "
                         "--held-out-share above 0 to judge it on decisions it did not see")
    rows = np.flatnonzero(keep)
    return Log([log.outcomes[i] for i in rows], log.got[rows], log.probability[rows],
               log.reward[rows], log.margin[rows],
               {name: [values[i] for i in rows] for name, values in log.columns.items()},
               log.discount)


def held_out(decision_id: str, share: float, seed: int) -> bool:
    """Whether a decision is among the ``share`` a --from-kafka training run keeps out."""
    digest = hashlib.sha256(f"{seed}:{decision_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(frozen=True)
class Comparison:
    judged: list[Judgement]  # candidate, live, nothing
    gain: Estimate  # candidate minus live, DR, paired row by row
    rows: int


def compare(candidate: UpliftModel, live: UpliftModel | None, log: Log,
            config: PolicyConfig) -> Comparison:
    """The candidate, the live policy (the live model's, else what wrote the log) and doing
    nothing, judged on the rows the candidate did not train on, with the candidate as the
    reward model; and the candidate's gain over the live policy, paired row by row."""
    log = unseen_by(candidate, log)
    expected = reward_model(candidate, log, config)
    live_choice = greedy_of(live, log, config) if live is not None else logged_greedy(log)
    judged = [judge("candidate", greedy_of(candidate, log, config), log, expected),
              judge("live", live_choice, log, expected),
              judge("nothing", np.full(len(log.got), CONTROL), log, expected)]
    return Comparison(judged, Estimate.of(judged[0].dr_terms - judged[1].dr_terms),
                      len(log.got))
