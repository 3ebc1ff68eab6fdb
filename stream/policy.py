"""The decision policy: who gets a coupon or a push, which one, and why. Pure functions.

Nothing here touches Kafka, faust or the clock: every input is an argument (the user's state
and vector, the coupon catalog, the user's preferences, budgets, ``now``), so the worker, the
offline simulator and the tests run the same code.

For a user with a trigger, :func:`decide` applies, in this order (DESIGN §7):

1. consent: a user who opted out of both channels gets nothing at all, not even a record;
2. holdout: a deterministic hash of the user id puts ``holdout_percent`` of users in the
   holdout arm; their decisions are recorded (``arm="holdout"``) but never sent, and consume
   no budget. They do count against the user's caps, as if sent (the worker records a ghost
   send), so both arms are decided under the same caps and compare like for like;
3. frequency caps and minimum intervals per channel;
4. quiet hours in the user's time zone;
5. coupon validity, budget pacing (a partition never reserves more than its paced share of a
   campaign's budget, so the sum over partitions never exceeds the budget) and exposure caps;
6. discount tier from purchase propensity: users very likely to buy anyway get no coupon.

Triggers: a cart add, repeated views of one item (purchase intent), and cart abandonment (an
open cart older than ``cart_abandon_seconds``, found by the worker's timer).
"""

from __future__ import annotations

import hashlib
import math
import zoneinfo
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from encoder.vocab import item_key
from stream import bandit
from stream.bandit import OfferStats
from stream.config import PolicyConfig
from stream.contracts import (
    FOREVER_MS,
    Action,
    Arm,
    Coupon,
    Decision,
    Event,
    Preferences,
    Trigger,
    TriggerKind,
)
from stream.state import TYPE_ID, UserState
from stream.uplift_model import CONTROL

POLICY_VERSION = "policy-3"  # 3: offers by incremental profit, logged exploration

# What the policy can do for a trigger, as the uplift model names its actions.
OFFER_NONE, OFFER_PUSH = CONTROL, "push"
COUPON_TIERS = {"coupon_full": 1.0, "coupon_half": 0.5}  # share of the coupon's value granted
USER_COLUMN = "user_id"  # see _by_incremental_profit


# --- inputs ------------------------------------------------------------------------------------

@dataclass
class CouponBudget:
    """What one partition has reserved of a campaign; mutated as coupons are issued."""

    share: float  # this partition's part of the budget
    exposure_share: int  # this partition's part of the exposure cap (0 = no cap)
    spent: float = 0.0
    exposures: int = 0

    def paced_allowance(self, coupon: Coupon, now_ms: int) -> float:
        """Spend allowed by ``now``: the share, released linearly over the validity window
        (with a tenth up front so a campaign can start), never more than the share."""
        if coupon.valid_to_ms >= FOREVER_MS // 2 or coupon.valid_to_ms <= coupon.valid_from_ms:
            return self.share
        elapsed = (now_ms - coupon.valid_from_ms) / (coupon.valid_to_ms - coupon.valid_from_ms)
        return self.share * min(1.0, 0.1 + 0.9 * max(0.0, elapsed))

    def shadow_price(self, coupon: Coupon, amount: float, now_ms: int) -> float:
        """What each unit of ``amount`` is worth beyond its face value now: ``amount`` over the
        paced allowance left after it. Negligible while the allowance has room for many such
        coupons, 1 when this one would take half of what is left, unbounded at the limit. At
        the pacing wall, where first come first served would decide, the coupons that earn
        most per unit of money pass first; with room, the price is near 0 and nothing changes.
        """
        left = self.paced_allowance(coupon, now_ms) - self.spent - amount
        return math.inf if left <= 0 else amount / left

    def can_issue(self, coupon: Coupon, amount: float, now_ms: int) -> str | None:
        """None if ``amount`` may be reserved now, else the reason code why not."""
        if self.exposure_share and self.exposures >= self.exposure_share:
            return "exposure_cap"
        if self.spent + amount > self.share + 1e-9:
            return "budget_exhausted"
        if self.spent + amount > self.paced_allowance(coupon, now_ms) + 1e-9:
            return "budget_paced"
        return None

    def issue(self, amount: float) -> None:
        self.spent += amount
        self.exposures += 1


def partition_budget(coupon: Coupon, partition: int, partitions: int) -> CouponBudget:
    """Split a campaign's budget and exposure cap evenly over partitions (remainder of the cap
    to the lowest partitions): each partition paces its share, and the shares sum to the total.
    """
    caps = coupon.max_exposures // partitions + (
        1 if partition < coupon.max_exposures % partitions else 0)
    return CouponBudget(share=coupon.budget / partitions,
                        exposure_share=caps if coupon.max_exposures else 0)


class ItemModel(Protocol):
    """What the policy needs from the encoder (encoder.inference.Encoder provides it)."""

    model_version: str

    def item_indices_from_keys(self, keys: np.ndarray) -> np.ndarray: ...
    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray: ...
    def item_id(self, index: int) -> str | None: ...
    def score_items(self, vectors: np.ndarray,
                    candidates: np.ndarray | None = None) -> np.ndarray: ...
    def top_items(self, vectors: np.ndarray, k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  boost: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]: ...

    def item_vectors(self, indices: np.ndarray) -> np.ndarray: ...
    def popular_items(self, k: int) -> np.ndarray: ...


class ModelShape(Protocol):
    @property
    def n_items(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def max_len(self) -> int: ...


class ServingModel(ItemModel, Protocol):
    """The model the worker and the simulator serve: the policy's :class:`ItemModel` plus user
    vectors from histories (encoder.inference.Encoder provides it; stream.testing's
    ``tiny_encoder`` is one)."""

    @property
    def config(self) -> ModelShape: ...

    def user_vectors(self, items: Sequence[np.ndarray], types: Sequence[np.ndarray],
                     ts_ms: Sequence[np.ndarray] | None = None) -> np.ndarray: ...


class ConversionModel(Protocol):
    """What deciding by incremental profit needs: each user's chance to convert under each
    action (:class:`stream.uplift_model.UpliftModel` provides it)."""

    @property
    def actions(self) -> tuple[str, ...]: ...  # actions[0] is nothing done
    @property
    def base_rate(self) -> float: ...
    @property
    def version(self) -> str: ...

    def conversion(self, columns: Mapping[str, Sequence[Any]]) -> np.ndarray: ...


def decision_id(user_id: str, trigger: Trigger, policy_version: str = POLICY_VERSION) -> str:
    """Deterministic: the same trigger decided again (a replay, a retry) has the same id."""
    text = f"{user_id}\x1f{trigger.kind}\x1f{trigger.event_id}\x1f{policy_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --- the policy --------------------------------------------------------------------------------

def in_holdout(user_id: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(b"holdout:" + user_id.encode()).digest()[:8], "big")
    return (bucket % 10_000) < percent * 100


def event_triggers(state: UserState, new_events: Sequence[Event],
                   config: PolicyConfig) -> list[Trigger]:
    """Purchase-intent triggers fired by a batch of a user's new events, strongest first."""
    triggers: list[Trigger] = []
    carts = [e for e in new_events if e.type == "add_to_cart"]
    if carts:
        last = carts[-1]
        triggers.append(Trigger(TriggerKind.CART_ADD, last.event_id, (last.item_id,), last.ts))
    views = [e for e in new_events if e.type == "view"]
    if views:
        view_type = TYPE_ID["view"]
        counts = Counter(int(k) for k, t in zip(state.items, state.types, strict=True)
                         if t == view_type)
        for event in reversed(views):
            if counts.get(item_key(event.item_id), 0) >= config.repeat_view_threshold:
                triggers.append(Trigger(TriggerKind.REPEAT_VIEWS, event.event_id, (event.item_id,),
                                        event.ts))
                break
    return triggers


def cart_abandoned(state: UserState, now_ms: int, config: PolicyConfig) -> bool:
    return (state.cart_open and not state.cart_reminded
            and now_ms - state.cart_ts_ms >= config.cart_abandon_seconds * 1000)


def propensity(state: UserState, now_ms: int) -> float:
    """How likely the user is to buy soon without a nudge, from behaviour alone.

    A transparent prior, not a trained model: frequent buyers who convert most carts are
    likely buyers; recency decays it. :func:`calibrated` maps it to a probability with the
    Platt calibration `promo simulate` fits on held-out data.
    """
    if state.n_events == 0:
        return 0.0
    # Purchases per cart add; a log with purchases only (no carts) converts fully.
    conversion = state.purchases / max(1, state.carts, state.purchases)
    frequency = 1 - math.exp(-state.purchases / 5)
    days_idle = max(0.0, (now_ms / 1000 - state.last_ts_s) / 86400)
    return float(min(1.0, (0.6 * conversion + 0.4 * frequency) * math.exp(-days_idle / 30)))


def calibrated(score: float, config: PolicyConfig) -> float:
    """The propensity score mapped to a probability by the configured Platt calibration
    (``sigmoid(scale * logit(score) + bias)``; scale 1 and bias 0 are the identity)."""
    if config.propensity_logit_scale == 1.0 and config.propensity_logit_bias == 0.0:
        return score
    p = min(max(score, 1e-4), 1 - 1e-4)
    z = config.propensity_logit_scale * math.log(p / (1 - p)) + config.propensity_logit_bias
    return 1 / (1 + math.exp(-z))


def _local_hour(now_ms: int, timezone: str) -> int:
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    return datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(zone).hour


def daytime_timezone(now_ms: int) -> str:
    """A time zone where it is early afternoon now (within about two hours of 14:00).

    Demos and tests run at any hour; users without a time zone of their own get the default
    zone, and at night there every push and coupon would be held back by quiet hours.
    """
    zones = ("Pacific/Honolulu", "America/Los_Angeles", "America/New_York", "UTC",
             "Europe/Berlin", "Asia/Kolkata", "Asia/Tokyo", "Pacific/Auckland")
    return min(zones, key=lambda zone: abs(_local_hour(now_ms, zone) - 14))


def in_quiet_hours(now_ms: int, timezone: str, config: PolicyConfig) -> bool:
    hour = _local_hour(now_ms, timezone)
    start, end = config.quiet_start_hour, config.quiet_end_hour
    return start <= hour or hour < end if start > end else start <= hour < end


def _channel_block(state: UserState, channel: str, now_ms: int,
                   config: PolicyConfig) -> str | None:
    ch = state.channels[channel]
    cap = config.push_daily_cap if channel == "push" else config.coupon_daily_cap
    interval = (config.push_min_interval_seconds if channel == "push"
                else config.coupon_min_interval_seconds)
    if ch.sends_on(now_ms // 86_400_000) >= cap:
        return f"{channel}_daily_cap"
    if ch.last_sent_ms and now_ms - ch.last_sent_ms < interval * 1000:
        return f"{channel}_min_interval"
    return None


@dataclass
class Context:
    """Everything :func:`decide` reads besides the user; shared across a batch."""

    config: PolicyConfig
    coupons: Mapping[str, Coupon]
    budgets: dict[str, CouponBudget]  # this partition's, mutated when coupons are issued
    model: ItemModel | None
    now_ms: int
    coupon_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    # This user's push candidates (indices, scores) from rank_push_items, ranked with the
    # rest of the micro-batch; None: decide ranks them itself.
    push_ranking: tuple[np.ndarray, np.ndarray] | None = None
    uplift: ConversionModel | None = None  # decides by incremental profit when there is one
    # Without one: Thompson sampling on these counts (policy.thompson_sampling), else the tiers.
    bandit: OfferStats | None = None


def decide(user_id: str, state: UserState, vector: np.ndarray | None, trigger: Trigger,
           prefs: Preferences | None, ctx: Context, vector_stale: bool = False) -> Decision | None:
    """One decision for one trigger, or None when consent forbids any record at all.

    ``vector`` is the user's vector from the serving model, or None when there is none (cold
    start, or the encoder failed); ``vector_stale`` marks one computed before the user's
    latest events (the encoder failed on this batch). The reasons say which applied. The
    decision carries the :func:`features` it was made on, for its outcome.
    """
    snapshot = features(state, ctx.now_ms, ctx.config)  # before a send updates the channels
    snapshot["vector"] = 0.0 if vector is None else 1.0
    decision = _decide(user_id, state, vector, trigger, prefs, ctx, vector_stale, snapshot)
    if decision is None:
        return None
    # Known only once decided: recorded, never an input of the uplift model.
    snapshot["score"] = round(min(decision.score, 1e6), 6)
    return replace(decision, features=snapshot, trigger=trigger)


def uplift_columns(snapshots: Sequence[Mapping[str, float]],
                   triggers: Sequence[str]) -> dict[str, list[Any]]:
    """The uplift model's inputs: what the policy read (its :func:`features`, without the
    decision's own ``score``) and the kind of trigger. Training (from `outcomes`) and serving
    build them here, so they cannot drift apart."""
    names = sorted({name for row in snapshots for name in row} - {"score"})
    columns: dict[str, list[Any]] = {name: [row.get(name) for row in snapshots]
                                     for name in names}
    columns["trigger"] = [str(kind) for kind in triggers]
    return columns


def offer_cost(offer: str, amount: float, p_convert: float, config: PolicyConfig) -> float:
    """What an offer is expected to cost: a coupon's discount whenever it converts (``amount``
    is its discount), a push its ``push_cost``; doing nothing costs nothing."""
    if offer in COUPON_TIERS:
        return amount * p_convert
    return config.push_cost if offer == OFFER_PUSH else 0.0


def offer_worth(offer: str, amount: float, conversion: Mapping[str, float], margin: float,
                config: PolicyConfig) -> float:
    """Expected incremental profit of an offer: the conversions it adds times the margin of
    one, less what it costs. ``conversion`` is the uplift model's rate per offer."""
    if offer == OFFER_NONE:
        return 0.0
    if offer not in conversion:
        return -math.inf  # the model never saw it: nothing says it pays
    p = conversion[offer]
    return (p - conversion[OFFER_NONE]) * margin - offer_cost(offer, amount, p, config)


def _priced_cost(option: Option, p_convert: float, config: PolicyConfig) -> float:
    """What the option's money is worth beyond its face value, at its budget's shadow price."""
    cost = offer_cost(option.offer, option.amount, p_convert, config)
    return option.price * cost if option.price and cost else 0.0


def _by_incremental_profit(user_id: str, state: UserState, trigger: Trigger,
                           options: Sequence[Option], ctx: Context, snapshot: Mapping[str, float]
                           ) -> tuple[Option, dict[str, Any]]:
    """The option worth most (nothing, if no offer pays), and the user's segment as a reason:

    - ``persuadable``: an offer adds more than it costs;
    - ``do_not_disturb``: every offer the model knows lowers the chance to convert;
    - ``sure_thing``: nothing pays, and the user converts without an offer at least as often
      as the average user does (the base rate of the model's training rows);
    - ``lost_cause``: nothing pays, and the user converts less often than that either way.
    """
    model = ctx.uplift
    assert model is not None
    cfg = ctx.config
    columns = uplift_columns([snapshot], [trigger.kind])
    # Who it is rides along for a scorer that knows users by id (`bench/shopsim_loop.py`'s
    # oracle); a trained model reads only the columns it was trained on, and training rows
    # (uplift_columns of the outcomes) have no such column.
    columns[USER_COLUMN] = [user_id]
    p = model.conversion(columns)[0]
    conversion = dict(zip(model.actions, p.tolist(), strict=True))
    order_value = state.spend / state.purchases if state.purchases else cfg.default_order_value
    margin = cfg.margin_rate * order_value
    worth = {o.offer: offer_worth(o.offer, o.amount, conversion, margin, cfg) for o in options}
    # The budget's money priced beyond its face value (0 unless it runs short): what is left
    # goes to the offers that earn most per unit of it.
    priced = {o.offer: worth[o.offer] - _priced_cost(o, conversion.get(o.offer, 0.0), cfg)
              for o in options}
    best = max(options, key=lambda o: (priced[o.offer], o.offer == OFFER_NONE))
    at_face_value = max(options, key=lambda o: (worth[o.offer], o.offer == OFFER_NONE))
    uplift = {a: conversion[a] - conversion[OFFER_NONE] for a in model.actions[1:]}
    if at_face_value.offer != OFFER_NONE:
        segment = "persuadable"
    elif uplift and max(uplift.values()) < 0:
        segment = "do_not_disturb"
    elif conversion[OFFER_NONE] >= model.base_rate:
        segment = "sure_thing"
    else:
        segment = "lost_cause"
    reason: dict[str, Any] = {
        "code": segment, "p_none": round(conversion[OFFER_NONE], 4),
        "uplift": {a: round(u, 4) for a, u in uplift.items()},
        "worth": round(worth[best.offer], 4) if math.isfinite(worth[best.offer]) else None}
    if at_face_value.offer != best.offer:
        reason["budget_shadow_price"] = {"instead_of": at_face_value.offer,
                                         "price": round(min(at_face_value.price, 1e6), 3)}
    return best, reason


def features(state: UserState, now_ms: int, config: PolicyConfig) -> dict[str, float]:
    """What the policy reads about a user, as numbers. Recorded with each decision and its
    outcome, so that outcomes are training rows holding the values the policy served with
    (no training/serving skew); :func:`decide` adds the decision's ``score`` and whether a
    current ``vector`` was used."""
    day = now_ms // 86_400_000
    return {
        "events": float(state.n_events), "views": float(state.views),
        "clicks": float(state.clicks), "carts": float(state.carts),
        "purchases": float(state.purchases), "spend": round(state.spend, 2),
        "days_idle": round(max(0.0, now_ms / 1000 - state.last_ts_s) / 86400, 4)
        if state.n_events else -1.0,
        "cart_open": float(state.cart_open),
        "propensity": round(calibrated(propensity(state, now_ms), config), 4),
        "pushes_today": float(state.channels["push"].sends_on(day)),
        "coupons_today": float(state.channels["coupon"].sends_on(day)),
        **order_rhythm(state, now_ms),
    }


def order_rhythm(state: UserState, now_ms: int) -> dict[str, float]:
    """How long the user's kept history spans (``history_days``, to now) and how often they
    ordered in it (``orders_per_week``; the span counts as a day at least). Counts alone
    cannot tell a frequent buyer seen for a week from a rare one seen for months, and who an
    offer changes depends on the rhythm (a weekly shopper buys anyway)."""
    if not state.n_events:
        return {"history_days": 0.0, "orders_per_week": 0.0}
    days = max(0.0, now_ms / 1000 - float(state.ts_s[0])) / 86400
    orders = int(np.count_nonzero(state.types == TYPE_ID["purchase"]))
    return {"history_days": round(days, 4),
            "orders_per_week": round(7 * orders / max(1.0, days), 4)}


@dataclass
class Option:
    """One thing the policy may do for this trigger, ready to become a decision."""

    offer: str  # OFFER_NONE, OFFER_PUSH or a key of COUPON_TIERS: the uplift model's actions
    action: Action
    score: float = 0.0
    reasons: list[dict[str, Any]] = field(default_factory=list)
    coupon: Coupon | None = None
    amount: float = 0.0  # the coupon's discount at this tier
    price: float = 0.0  # the coupon budget's shadow price (CouponBudget.shadow_price)
    push: dict[str, Any] | None = None


def _decide(user_id: str, state: UserState, vector: np.ndarray | None, trigger: Trigger,
            prefs: Preferences | None, ctx: Context, vector_stale: bool,
            snapshot: dict[str, float]) -> Decision | None:
    cfg = ctx.config
    # A flag a preferences record leaves out counts as no record: the configured default.
    stated_push = prefs.push_opt_in if prefs else None
    stated_coupon = prefs.coupon_opt_in if prefs else None
    push_ok = cfg.default_push_opt_in if stated_push is None else stated_push
    coupon_ok = cfg.default_coupon_opt_in if stated_coupon is None else stated_coupon
    if not (push_ok or coupon_ok):
        return None
    holdout = in_holdout(user_id, cfg.holdout_percent)
    reasons: list[dict[str, Any]] = [{"code": trigger.kind, "items": list(trigger.items)}]
    model = ctx.model
    cold = model is None or vector is None or state.n_events < cfg.cold_start_events
    if model is None:
        reasons.append({"code": "model_unavailable"})
    elif state.n_events < cfg.cold_start_events:
        reasons.append({"code": "cold_start"})
    elif vector is None:
        reasons.append({"code": "vector_unavailable"})
    elif vector_stale:
        reasons.append({"code": "stale_vector"})

    timezone = (prefs.timezone if prefs and prefs.timezone else cfg.default_timezone)
    if in_quiet_hours(ctx.now_ms, timezone, cfg):
        reasons.append({"code": "quiet_hours"})
        return _decision(user_id, trigger, Option(OFFER_NONE, Action.NONE), reasons, holdout,
                         ctx, {OFFER_NONE: 1.0})

    # Every offer the rules allow now, each with its own reasons; `blocked` says why others
    # are not among them.
    blocked: list[str] = []
    coupons: list[Option] = []
    coupon_blocks: dict[str, list[str]] | None = None
    if coupon_ok and trigger.kind != "cart_abandoned":
        block = _channel_block(state, "coupon", ctx.now_ms, cfg)
        if block:
            blocked.append(block)
        else:
            coupons, coupon_blocks = _coupon_options(state, vector, trigger, ctx, cold)
    elif not coupon_ok:
        blocked.append("coupon_opted_out")
    push: Option | None = None
    push_block = "push_opted_out" if not push_ok else _channel_block(state, "push", ctx.now_ms,
                                                                      cfg)
    if push_block is None:
        push_reasons: list[dict[str, Any]] = []
        items, score = _push_items(state, vector, trigger, ctx, cold, push_reasons)
        if items:
            template = ("cart_reminder" if trigger.kind == TriggerKind.CART_ABANDONED
                        else "recommendation")
            push = Option(OFFER_PUSH, Action.PUSH, score, push_reasons,
                          push={"template": template, "items": items})
        else:
            push_block = "no_candidates"
    static_coupon = None
    if ctx.uplift is None and coupon_blocks is not None:  # the propensity tiers' coupon
        static_coupon = _static_coupon(state, coupons, coupon_blocks, ctx, blocked)
    nothing = Option(OFFER_NONE, Action.NONE, reasons=[{"code": code} for code in (
        *blocked, *([push_block] if push_block else []))])
    options = [nothing, *coupons, *([push] if push else [])]

    on_site = trigger.kind == TriggerKind.ON_SITE
    preferred: dict[str, float] | None = None  # the policy's own odds, when it samples
    if ctx.uplift is not None:
        greedy, segment = _by_incremental_profit(user_id, state, trigger, options, ctx,
                                                 snapshot)
        reasons.append(segment)
    elif ctx.bandit is not None and not on_site:
        greedy, preferred, sampled = _by_thompson_sampling(user_id, state, trigger, options,
                                                           ctx, snapshot)
        reasons.append(sampled)
    else:  # the propensity tiers: a coupon if one suits, else a push, else nothing
        greedy = static_coupon or push or nothing
        if push is not None and greedy is push:
            push.reasons.extend({"code": code} for code in blocked)
    # `choices` is the treatment arm's draw, logged for the holdout too: with the holdout
    # share it gives every outcome the probability of what the user actually got.
    # On-site offers never explore or sample: the page shows a preview and then claims it,
    # and the claim must deliver what was shown (each has its own decision id, hence its own
    # draw).
    share = 0.0 if on_site else cfg.exploration_share
    chosen, choices = _explore(greedy, options, decision_id(user_id, trigger), share,
                               preferred)
    if holdout:
        chosen = greedy  # recorded as what treatment would have preferred, never sent
    elif chosen.offer != greedy.offer:
        reasons.append({"code": "explored", "instead_of": greedy.offer})
    reasons.extend(chosen.reasons)
    if chosen.coupon is not None and not holdout:
        ctx.budgets[chosen.coupon.coupon_id].issue(chosen.amount)
    return _decision(user_id, trigger, chosen, reasons, holdout, ctx, choices)


def _decision(user_id: str, trigger: Trigger, option: Option, reasons: list[dict[str, Any]],
              holdout: bool, ctx: Context, choices: dict[str, float]) -> Decision:
    coupon = option.coupon
    payload = None if coupon is None else {
        "coupon_id": coupon.coupon_id, "discount": round(option.amount, 2),
        "min_spend": coupon.min_spend, "expires_at": coupon.valid_to_ms}
    return Decision(
        decision_id=decision_id(user_id, trigger), user_id=user_id, action=option.action,
        arm=Arm.HOLDOUT if holdout else Arm.TREATMENT, score=float(option.score),
        reasons=reasons, model_version=ctx.model.model_version if ctx.model else "none",
        policy_version=policy_version(ctx), trigger_event_id=trigger.event_id,
        created_at=ctx.now_ms, coupon=payload, push=option.push, offer=option.offer,
        propensity=1.0 if holdout else round(choices[option.offer], 6),
        choices={offer: round(p, 6) for offer, p in choices.items()})


def policy_version(ctx: Context) -> str:
    """The code's version, and the uplift model's when one decides."""
    return POLICY_VERSION if ctx.uplift is None else f"{POLICY_VERSION}+{ctx.uplift.version}"


def _explore(greedy: Option, options: Sequence[Option], decision: str, share: float,
             preferred: Mapping[str, float] | None = None) -> tuple[Option, dict[str, float]]:
    """With probability ``share`` an option at random, else ``greedy``; and each option's
    probability of being the one. ``preferred`` is the policy's own chance of each option
    when it samples (Thompson sampling); else it always prefers ``greedy``. The draw is a hash
    of the decision id: deciding the same trigger again (a replay, a retry) draws the same."""
    n = len(options)
    odds = dict(preferred) if preferred is not None else {greedy.offer: 1.0}
    if n == 1 or share <= 0:
        return greedy, odds
    draw = int.from_bytes(hashlib.sha256(b"explore:" + decision.encode()).digest()[:8],
                          "big") / 2**64
    drawn = options[min(n - 1, int(draw / share * n))] if draw < share else greedy
    # Offers are compared by name: the greedy option may be a copy carrying extra reasons.
    chosen = greedy if drawn.offer == greedy.offer else drawn
    return chosen, {o.offer: share / n + (1 - share) * odds.get(o.offer, 0.0)
                    for o in options}


def _by_thompson_sampling(user_id: str, state: UserState, trigger: Trigger,
                          options: Sequence[Option], ctx: Context,
                          snapshot: Mapping[str, float]
                          ) -> tuple[Option, dict[str, float], dict[str, Any]]:
    """The option whose sampled incremental profit is highest (:mod:`stream.bandit`), each
    option's chance to be the one, and the reason: the bucket and its posterior mean rates."""
    stats = ctx.bandit
    assert stats is not None
    cfg = ctx.config
    order_value = state.spend / state.purchases if state.purchases else cfg.default_order_value
    margin = cfg.margin_rate * order_value
    # A coupon's money at face value plus the budget's shadow price.
    amounts = {o.offer: o.amount * (1 + o.price) if o.amount else 0.0 for o in options}

    def worth(offer: str, rate: np.ndarray, rate_none: np.ndarray) -> np.ndarray:
        cost = amounts[offer] * rate if offer in COUPON_TIERS else np.full(
            len(rate), cfg.push_cost if offer == OFFER_PUSH else 0.0)
        return np.asarray((rate - rate_none) * margin - cost)

    bucket = bandit.bucket_of(snapshot, trigger.kind)
    chosen, odds, rates = bandit.sample(stats, bucket, [o.offer for o in options], worth,
                                        decision_id(user_id, trigger))
    option = next(o for o in options if o.offer == chosen)
    return option, odds, {"code": "thompson_sampling", "bucket": bucket,
                          "rate": {offer: round(r, 4) for offer, r in rates.items()}}


def _recent_indices(state: UserState, model: ItemModel) -> np.ndarray:
    return model.item_indices_from_keys(state.items.astype(np.int64))


def _coupon_options(state: UserState, vector: np.ndarray | None, trigger: Trigger,
                    ctx: Context, cold: bool) -> tuple[list[Option], dict[str, list[str]]]:
    """Per discount tier, the best-matching valid coupon the budget allows at that tier; and
    for a tier without one, the reasons why."""
    options, blocks = [], {}
    for offer, tier in COUPON_TIERS.items():
        candidates: list[tuple[float, Coupon, float]] = []
        budget_blocks: Counter[str] = Counter()
        for coupon in ctx.coupons.values():
            if not coupon.is_valid(ctx.now_ms):
                continue
            amount = coupon.value * tier
            budget = ctx.budgets.get(coupon.coupon_id)
            why_not = "budget_exhausted" if budget is None else budget.can_issue(
                coupon, amount, ctx.now_ms)
            if why_not:
                budget_blocks[why_not] += 1
                continue
            score = _coupon_score(coupon, state, vector, trigger, ctx, cold)
            if score is not None:
                candidates.append((score, coupon, amount))
        if not candidates:
            blocks[offer] = sorted(budget_blocks) or ["no_eligible_coupon"]
            continue
        score, coupon, amount = max(candidates, key=lambda c: (c[0], c[1].coupon_id))
        budget = ctx.budgets[coupon.coupon_id]
        options.append(Option(offer, Action.COUPON, score, [
            {"code": "coupon_match", "coupon_id": coupon.coupon_id,
             "items": _explain(state, coupon.items, ctx)}], coupon=coupon, amount=amount,
            price=budget.shadow_price(coupon, amount, ctx.now_ms)))
    return options, blocks


def _static_coupon(state: UserState, coupons: list[Option], blocks: dict[str, list[str]],
                   ctx: Context, blocked: list[str]) -> Option | None:
    """The propensity tiers' choice among the coupon options: none for a user likely to buy
    anyway, half the discount for a fairly likely one. None (with the reason appended to
    ``blocked``) if no coupon should go out."""
    cfg = ctx.config
    p = calibrated(propensity(state, ctx.now_ms), cfg)
    if p >= cfg.no_coupon_propensity:
        blocked.append("likely_to_buy_anyway")
        return None
    offer = "coupon_half" if p >= cfg.half_discount_propensity else "coupon_full"
    chosen = next((o for o in coupons if o.offer == offer), None)
    if chosen is None:
        blocked.extend(blocks[offer])
        return None
    if offer == "coupon_half":
        chosen = replace(chosen, reasons=[{"code": "half_discount_propensity",
                                           "propensity": round(p, 3)}, *chosen.reasons])
    return chosen


def _coupon_score(coupon: Coupon, state: UserState, vector: np.ndarray | None,
                  trigger: Trigger, ctx: Context, cold: bool) -> float | None:
    """Affinity of the user to the coupon's targets; None if it targets nothing relevant."""
    if not coupon.items and not coupon.categories:
        return 0.0  # a store-wide coupon: eligible for anyone, ranked below targeted ones
    if set(trigger.items) & set(coupon.items):
        return 1e6  # the very item the user is about to buy
    model = ctx.model
    if cold or model is None or vector is None or not coupon.items:
        return None
    targets = model.item_indices(list(coupon.items))
    scores = model.score_items(vector[None, :].astype(np.float32), targets[None, :])[0]
    return float(np.max(scores))


def _push_items(state: UserState, vector: np.ndarray | None, trigger: Trigger, ctx: Context,
                cold: bool, reasons: list[dict[str, Any]]) -> tuple[list[str], float]:
    cfg, model = ctx.config, ctx.model
    # The abandoned cart's item (the trigger names it) leads for its own reason, not because
    # the prior lifted it.
    lead = list(trigger.items[:1]) if trigger.kind == TriggerKind.CART_ABANDONED else []
    items = list(lead)
    score = 0.0
    if model is not None:
        exclude = push_exclusions(state, model, ctx.now_ms, cfg)
        if cold or vector is None:
            ranked = model.popular_items(cfg.push_items + len(exclude))
            picks = [int(i) for i in ranked if int(i) not in exclude][:cfg.push_items]
            reasons.append({"code": "popular_items"})
        else:
            if ctx.push_ranking is not None:  # ranked with the batch's other users
                top_row, score_row = ctx.push_ranking
            else:
                top, scores = model.top_items(vector[None, :].astype(np.float32),
                                              cfg.push_items, exclude=[exclude],
                                              boost=[repeat_boost(state, model, cfg)])
                top_row, score_row = top[0], scores[0]
            picks = [int(i) for i in top_row]
            score = float(score_row[0]) if len(score_row) else 0.0
        for index in picks:
            item = model.item_id(index)
            if item is not None and item not in items and len(items) < cfg.push_items:
                items.append(item)
        if not cold and vector is not None:
            reasons.append({"code": "similar_to_recent",
                            "items": _explain(state, tuple(items), ctx)})
            again = (_repeat_items(state, model, items[len(lead):])
                     if cfg.push_repeat_weight else [])
            if again:
                reasons.append({"code": "repeat_item", "items": again})
    return items, score


def push_exclusions(state: UserState, model: ItemModel, now_ms: int,
                    config: PolicyConfig) -> list[int]:
    """Item indices never pushed to this user now: what they touched lately (in the cart, just
    bought). Older favourites may come back, which is most of what a grocery customer buys."""
    touched = state.ts_s * 1000 >= now_ms - config.push_exclude_recent_hours * 3_600_000
    return [int(i) for i in _recent_indices(state, model)[touched]]


def repeat_boost(state: UserState, model: ItemModel,
                 config: PolicyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Push-score prior from the user's own recent events: (item indices, w * log(1 + n)) for
    each item seen n times in the sequence. Scores are logits, so this multiplies the model's
    odds of an item by (1 + n)^w: what a person bought before they tend to buy again (most
    of a grocery basket), which one user vector cannot carry for every item in a history."""
    if not config.push_repeat_weight or len(state.items) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    indices, counts = np.unique(_recent_indices(state, model), return_counts=True)
    return indices, (config.push_repeat_weight * np.log1p(counts)).astype(np.float32)


def _repeat_items(state: UserState, model: ItemModel, items: Sequence[str]) -> list[str]:
    """The pushed items the user has in their recent sequence (what the prior lifted)."""
    recent = set(_recent_indices(state, model).tolist())
    return [item for item, index in zip(items, model.item_indices(list(items)).tolist(),
                                        strict=True) if index in recent]


def push_blocked(state: UserState, now_ms: int, config: PolicyConfig) -> bool:
    """The push channel's caps or minimum interval hold any push back now."""
    return _channel_block(state, "push", now_ms, config) is not None


def rank_push_items(model: ItemModel, vectors: np.ndarray, exclusions: Sequence[Sequence[int]],
                    boosts: Sequence[tuple[np.ndarray, np.ndarray]], config: PolicyConfig,
                    chunk: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each user's best push candidates, as :func:`decide` would rank them one by one, for a
    whole micro-batch in a few matrix products (scoring the catalogue per user is the main
    cost of a decision). ``exclusions`` and ``boosts`` are each user's
    :func:`push_exclusions` and :func:`repeat_boost`. Give each user's row to :func:`decide`
    as ``Context.push_ranking``."""
    ranked: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(vectors), chunk):
        top, scores = model.top_items(
            np.asarray(vectors[start:start + chunk], dtype=np.float32), config.push_items,
            exclude=exclusions[start:start + chunk], boost=boosts[start:start + chunk])
        ranked.extend(zip(top, scores, strict=True))
    return ranked


def _explain(state: UserState, targets: Sequence[str], ctx: Context) -> list[str]:
    """The user's recent items most similar to ``targets``: what drove the choice."""
    model = ctx.model
    if model is None or not targets or len(state.items) == 0:
        return []
    recent = _recent_indices(state, model)
    target_idx = model.item_indices(list(targets))
    known = [(pos, int(i)) for pos, i in enumerate(recent) if model.item_id(int(i)) is not None]
    if not known:
        return []
    recent_vectors = model.item_vectors(np.asarray([i for _, i in known]))
    target_vectors = model.item_vectors(target_idx)
    similarity = (recent_vectors @ target_vectors.T).max(axis=1)
    order = np.argsort(-similarity, kind="stable")
    named: list[str] = []
    for j in order:
        item = model.item_id(known[int(j)][1])
        if item is not None and item not in named:
            named.append(item)
        if len(named) >= ctx.config.explain_items:
            break
    return named

