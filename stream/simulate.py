"""Offline decision simulator (`promo simulate`): decisions judged by what users really did next.

The data are cut in time. The encoder learns from the part before the cut (or a given checkpoint
is used: it must not have seen the part after it), every user's state is warmed up on that part,
and the rest is replayed in time order through the worker's own code: ``state.apply_events``,
``policy.event_triggers`` / ``policy.cart_abandoned`` and ``policy.decide``. At every decision
moment each policy decides, and a decision is a *hit* when the user converted on an offered
item (a pushed item, a coupon's target item or category) within their next ``horizon`` events.
Conversions are purchases; in a log without purchases, any event.

The policies differ only in what ranks items, so caps, quiet hours, budgets, pacing, exposure
caps and propensity tiers are the same code for all:

- ``ours``: the encoder, as the worker runs it;
- ``random``: random item scores;
- ``popularity``: items ranked by conversions before the cut;
- ``holdout``: ours' decisions at the same moments (same caps, same budget reservations), sent
  to nobody and costing nothing: how often users bought what we would have offered anyway;
- ``ours_without_propensity_gate``: ours with the "likely to buy anyway" tiers switched off, to
  show where the gate moves coupons;
- ``ours_without_repeat_prior``: ours ranking pushes by the encoder alone
  (``push_repeat_weight`` 0), to show what the prior from each user's own history adds;
- ``repeat``: no model at all: the user's own recent items, most frequent first, then
  popularity. The classic strong baseline for baskets that repeat (groceries): it says how much
  the encoder adds beyond "what you bought before".

``ours`` ranks pushes by the encoder's score plus ``push_repeat_weight * log(1 + n)`` for an item
seen n times in the user's recent events. The weight is chosen on the data before the cut
(unless ``tune_repeat_weight`` is off, which judges the configured one): the last eighth of the
events before the cut is replayed as a validation period, with state warmed on the rest, and
the weight with the best push hit rate there is used after the cut (the report gives the
validation table; put the chosen value in ``policy.push_repeat_weight``). The encoder has seen
the validation period in training, so that choice leans toward trusting the encoder.

A logged dataset holds no coupons: every purchase in it happened without one. So offline, ours
and the holdout see the same real future, their hit rates are equal, the incremental purchases
are zero and the cost per incremental purchase is undefined (null): every discount granted
offline went to a purchase that happened anyway. The simulator measures targeting (hit rate),
spend, and whether caps and budgets hold; uplift needs the live holdout arm (decisions with
``arm: holdout``), which the worker records for exactly that.

Decision moments are the policy's triggers (cart adds, repeated views, abandoned carts). A log
without cart adds (a purchase or rating log) has hardly any: there every event is a moment
(trigger ``visit``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.data import Interaction
from encoder.vocab import item_key
from stream import state as user_state
from stream.config import PolicyConfig
from stream.contracts import Coupon, Decision, Event, Trigger, TriggerKind
from stream.policy import (
    Context,
    CouponBudget,
    ItemModel,
    ServingModel,
    calibrated,
    cart_abandoned,
    decide,
    event_triggers,
    partition_budget,
    propensity,
)
from stream.state import CHANNELS, ChannelState, UserState

POLICIES = ("ours", "random", "popularity", "repeat", "holdout",
            "ours_without_propensity_gate", "ours_without_repeat_prior")
#: Reason codes that say a cap, a budget, quiet hours or the propensity gate held a send back.
BINDING_CODES = ("push_daily_cap", "push_min_interval", "coupon_daily_cap",
                 "coupon_min_interval", "quiet_hours", "budget_exhausted", "budget_paced",
                 "exposure_cap", "likely_to_buy_anyway", "half_discount_propensity")


@dataclass(frozen=True)
class SimulationConfig:
    train_fraction: float = 0.8  # events before this quantile of time train and warm up
    horizon: int = 30  # a decision hits if the user converts on an offered item this soon
    campaigns: int = 8  # generated campaigns, when no catalog is given
    items_per_campaign: int = 3
    seed: int = 0
    quiet_hours: bool = True  # off for logs whose times are synthesised from order alone
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Choose policy.push_repeat_weight on a validation period before the cut (else: as set).
    tune_repeat_weight: bool = True
    repeat_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    validation_fraction: float = 0.125  # of the events before the cut


# --- splitting and the catalog -------------------------------------------------------------

def time_split(rows: Sequence[Interaction],
               fraction: float) -> tuple[list[Interaction], list[Interaction], int]:
    """(before, after, cut_ms): rows before the ``fraction`` quantile of time, and the rest.
    ``rows`` must be in time order (as the loaders return them)."""
    if not rows:
        raise ValueError("no interactions to simulate")
    if not 0 < fraction < 1:
        raise ValueError(f"train fraction must be in (0, 1), got {fraction}")
    cut = rows[min(len(rows) - 1, int(len(rows) * fraction))].ts_ms
    before = [r for r in rows if r.ts_ms < cut]
    after = [r for r in rows if r.ts_ms >= cut]
    if not before or not after:
        raise ValueError("the time cut leaves one side empty: the data need more than one "
                         "distinct timestamp")
    return before, after, cut


def conversion_types(rows: Iterable[Interaction]) -> frozenset[str]:
    types = {r.event_type for r in rows}
    return frozenset({"purchase"}) if "purchase" in types else frozenset(types)


def generated_catalog(before: Sequence[Interaction], start_ms: int, end_ms: int,
                      test_users: int, config: SimulationConfig) -> list[Coupon]:
    """Campaigns on items users converted on before the cut, in random groups (so no policy
    gets campaigns built for it), valid over the replayed period. Budgets allow about 5% of
    the replayed users a coupon each; the first campaign also has an exposure cap, so the
    report shows caps and budgets binding."""
    converts = conversion_types(before)
    counts = Counter(r.item_id for r in before if r.event_type in converts)
    wanted = config.campaigns * config.items_per_campaign
    pool = [item for item, _ in counts.most_common(wanted * 3)]
    rng = np.random.default_rng(config.seed)
    picked = [pool[i] for i in rng.permutation(len(pool))[:wanted]]
    values = (1.0, 2.0, 3.0, 5.0)
    allowance = max(3, round(test_users * 0.05))
    coupons = []
    for c in range(config.campaigns):
        items = tuple(picked[c * config.items_per_campaign:(c + 1) * config.items_per_campaign])
        if not items:
            break
        value = values[c % len(values)]
        coupons.append(Coupon(
            f"campaign-{c}", value=value, budget=value * allowance, valid_from_ms=start_ms,
            valid_to_ms=end_ms + 1, items=items,
            max_exposures=max(2, allowance // 3) if c == 0 else 0))
    return coupons


# --- baselines: the same policy, other item rankings ----------------------------------------

class BaselineItems:
    """An :class:`~stream.policy.ItemModel` that ranks items by a fixed score per item (or a
    random one) instead of the user's vector; ids and item vectors come from the encoder."""

    def __init__(self, encoder: ServingModel, name: str, item_scores: np.ndarray | None,
                 seed: int = 0, history_first: bool = False) -> None:
        self.encoder = encoder
        self.model_version = name
        self.n_items = int(encoder.config.n_items)
        self.item_scores = item_scores  # (vocab_size,) or None for random scores
        self.rng = np.random.default_rng(seed)
        # Rank the user's own items (the policy's repeat boost) above every other item.
        self.history_first = history_first

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.encoder.item_indices(item_ids)

    def item_indices_from_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.encoder.item_indices_from_keys(keys)

    def item_id(self, index: int) -> str | None:
        return self.encoder.item_id(index)

    def item_vectors(self, indices: np.ndarray) -> np.ndarray:
        return self.encoder.item_vectors(indices)

    def _all_scores(self, rows: int) -> np.ndarray:
        size = int(self.encoder.config.vocab_size)
        if self.item_scores is None:
            return self.rng.random((rows, size))
        return np.broadcast_to(self.item_scores, (rows, size))

    def score_items(self, vectors: np.ndarray,
                    candidates: np.ndarray | None = None) -> np.ndarray:
        scores = self._all_scores(len(vectors))
        if candidates is None:
            return np.asarray(scores[:, 1:1 + self.n_items], dtype=np.float32)
        c = np.asarray(candidates, dtype=np.int64)
        if c.ndim == 1:
            return np.asarray(scores[:, c], dtype=np.float32)
        return np.asarray(np.take_along_axis(scores, c, axis=1), dtype=np.float32)

    def top_items(self, vectors: np.ndarray, k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  boost: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        # Only the "repeat" baseline uses ``boost`` (the user's own history, the policy's
        # repeat prior), and lexicographically: its items first, then the item scores.
        scores = self.score_items(vectors).astype(np.float64)
        for row, (indices, values) in enumerate(boost or () if self.history_first else ()):
            cols = np.asarray(indices, dtype=np.int64) - 1
            known = (cols >= 0) & (cols < self.n_items)
            scores[row, cols[known]] += 1e6 * np.asarray(values, dtype=np.float64)[known]
        for row, banned in enumerate(exclude or ()):
            cols = np.asarray(banned, dtype=np.int64) - 1
            scores[row, cols[(cols >= 0) & (cols < self.n_items)]] = -np.inf
        k = min(k, self.n_items)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return top.astype(np.int64) + 1, np.take_along_axis(scores, top, axis=1)

    def popular_items(self, k: int) -> np.ndarray:
        return np.asarray(self.top_items(np.zeros((1, 1), np.float32), k)[0][0])


def popularity_scores(encoder: ServingModel, before: Sequence[Interaction]) -> np.ndarray:
    """Conversions per vocabulary index before the cut (never the checkpoint's counts, which
    may include later data)."""
    converts = conversion_types(before)
    indices = encoder.item_indices([r.item_id for r in before if r.event_type in converts])
    return np.bincount(indices, minlength=int(encoder.config.vocab_size)).astype(np.float64)


# --- decision moments ------------------------------------------------------------------------

@dataclass(frozen=True)
class Moment:
    user_id: str
    trigger: Trigger
    now_ms: int
    state: bytes  # the user's encoded state at the moment (channels are per policy)
    future: tuple[int, int]  # the user's replayed events [start, end) that judge it
    propensity: float  # the behavioural score, uncalibrated
    n_events: int  # the user's events so far (activity level)


def _event(row: int, it: Interaction) -> Event:
    return Event(event_id=f"sim-{row}", user_id=it.user_id, type=it.event_type,
                 item_id=it.item_id, ts=it.ts_ms, price=it.price, quantity=it.quantity,
                 category=it.category, session_id=it.session_id)


def collect_moments(before: Sequence[Interaction], after: Sequence[Interaction],
                    config: SimulationConfig) -> tuple[list[Moment], dict[str, list[Interaction]]]:
    """Warm every user's state on ``before``, replay ``after`` and return the decision moments
    in time order, with each user's replayed events (to judge the moments by)."""
    cfg, max_len = config.policy, user_state.DEFAULT_MAX_LEN
    states: dict[str, UserState] = defaultdict(UserState)
    history: dict[str, list[Event]] = defaultdict(list)
    for row, it in enumerate(before):
        history[it.user_id].append(_event(row, it))
    carts: dict[str, Event] = {}  # the worker keeps these in its open-carts table
    for user_id, events in history.items():
        applied, _ = user_state.apply_events(states[user_id], events, max_len=max_len)
        opened = user_state.open_cart_event(states[user_id], applied)
        if opened is not None:
            carts[user_id] = opened
    every_event = not any(r.event_type == "add_to_cart" for r in (*before, *after))
    future: dict[str, list[Interaction]] = defaultdict(list)
    moments: list[Moment] = []

    def add(user_id: str, st: UserState, trigger: Trigger, now_ms: int, start: int) -> None:
        moments.append(Moment(user_id, trigger, now_ms, user_state.encode(st), (start, -1),
                              propensity(st, now_ms), st.n_events))

    for row, it in enumerate(after, start=len(before)):
        st = states[it.user_id]
        position = len(future[it.user_id])
        if cart_abandoned(st, it.ts_ms, cfg):
            at = st.cart_ts_ms + int(cfg.cart_abandon_seconds * 1000)
            cart = carts.get(it.user_id)
            add(it.user_id, st, Trigger(TriggerKind.CART_ABANDONED,
                                        f"cart:{cart.event_id if cart else ''}",
                                        (cart.item_id,) if cart else (), at), at, position)
            st.cart_reminded = True
        future[it.user_id].append(it)
        event = _event(row, it)
        applied, _ = user_state.apply_events(st, [event], max_len=max_len)
        if not applied:
            continue
        opened = user_state.open_cart_event(st, applied)
        if opened is not None:
            carts[it.user_id] = opened
        triggers = ([Trigger(TriggerKind.VISIT, event.event_id, (event.item_id,), event.ts)]
                    if every_event else event_triggers(st, applied, cfg))
        for trigger in triggers[:1]:  # the worker decides a user's strongest trigger only
            add(it.user_id, st, trigger, it.ts_ms, position + 1)
    horizon = config.horizon
    judged = [dataclasses.replace(m, future=(m.future[0], min(m.future[0] + horizon,
                                                               len(future[m.user_id]))))
              for m in moments]
    return judged, future


def user_vectors(encoder: ServingModel, moments: Sequence[Moment], batch: int = 512) -> np.ndarray:
    """The encoder's vector for each moment's user state, in batched forward passes."""
    out = np.zeros((len(moments), int(encoder.config.d_model)), dtype=np.float16)
    for start in range(0, len(moments), batch):
        chunk = [user_state.decode(m.state) for m in moments[start:start + batch]]
        items = [encoder.item_indices_from_keys(s.items) for s in chunk]
        types = [s.types.astype(np.int64) for s in chunk]
        out[start:start + len(chunk)] = encoder.user_vectors(items, types)
    return out


# --- running one policy ----------------------------------------------------------------------

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
        if decision.action == "none":
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
            if decision.arm == "holdout":  # reserve as if sent: the holdout mirrors ours' mix
                budgets[decision.coupon["coupon_id"]].issue(decision.coupon["discount"])
            result.coupons += 1
            result.exposures[decision.coupon["coupon_id"]] += 1
            result.coupon_hits += hit
            if decision.arm == "treatment":
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


# --- propensity calibration ------------------------------------------------------------------

def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, bias) of ``sigmoid(scale * logit(score) + bias)`` by Newton's method on the log
    loss (a little L2 keeps it finite when the labels are all one class)."""
    x = _logit(scores)
    y = labels.astype(np.float64)
    w = np.zeros(2)
    features = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(features @ w)))
        gradient = features.T @ (p - y) + 1e-3 * w
        hessian = (features * (p * (1 - p))[:, None]).T @ features + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def _logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def apply_platt(scores: np.ndarray, scale: float, bias: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(scale * _logit(scores) + bias)))


def brier(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((predicted - labels) ** 2)) if len(labels) else float("nan")


def reliability_bins(predicted: np.ndarray, labels: np.ndarray,
                     bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of predicted probability: mean prediction, observed rate, count."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                        "predicted": float(predicted[mask].mean()),
                        "observed": float(labels[mask].mean()), "count": int(mask.sum())})
    return out


def propensity_report(moments: Sequence[Moment], future: Mapping[str, Sequence[Interaction]],
                      converts: frozenset[str]) -> dict[str, Any]:
    """Is the "likely to buy anyway" score a probability? Label: the user converted on
    anything within the horizon. Fit Platt calibration on the first half of the moments (in
    time), report Brier scores and reliability bins on the second half."""
    scores = np.asarray([m.propensity for m in moments])
    labels = np.asarray([any(r.event_type in converts
                             for r in future[m.user_id][m.future[0]:m.future[1]])
                         for m in moments], dtype=np.float64)
    half = len(moments) // 2
    if half == 0:
        return {"moments": len(moments)}
    scale, bias = fit_platt(scores[:half], labels[:half])
    held_scores, held_labels = scores[half:], labels[half:]
    fitted = apply_platt(held_scores, scale, bias)
    return {
        "moments_fit": half, "moments_held_out": len(held_labels),
        "positive_rate_held_out": float(held_labels.mean()),
        "brier_raw": brier(held_scores, held_labels),
        "brier_calibrated": brier(fitted, held_labels),
        "brier_base_rate": brier(np.full_like(held_labels, labels[:half].mean()), held_labels),
        "platt": {"propensity_logit_scale": scale, "propensity_logit_bias": bias},
        "bins_raw": reliability_bins(held_scores, held_labels),
        "bins_calibrated": reliability_bins(fitted, held_labels),
    }


# --- the whole simulation ----------------------------------------------------------------------

def simulate(rows: Sequence[Interaction], encoder: ServingModel, config: SimulationConfig,
             coupons: Sequence[Coupon] | None = None,
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every policy over the replayed part of ``rows``; return the report (JSON-ready)."""
    before, after, cut = time_split(rows, config.train_fraction)
    converts = conversion_types(rows)
    users_after = len({r.user_id for r in after})
    catalog = list(coupons) if coupons is not None else generated_catalog(
        before, cut, after[-1].ts_ms, users_after, config)
    by_id = {c.coupon_id: c for c in catalog}
    policy_cfg = config.policy
    if not config.quiet_hours:
        policy_cfg = dataclasses.replace(policy_cfg, quiet_start_hour=0, quiet_end_hour=0)
    repeat_tuning: dict[str, Any] = {"configured": policy_cfg.push_repeat_weight}
    if config.tune_repeat_weight:
        progress("choosing the repeat weight on a validation period before the cut")
        repeat_tuning |= choose_repeat_weight(before, encoder, dataclasses.replace(
            config, policy=policy_cfg), converts)
        policy_cfg = dataclasses.replace(policy_cfg,
                                         push_repeat_weight=repeat_tuning["chosen"])
    treated = dataclasses.replace(policy_cfg, holdout_percent=0.0)
    progress(f"replaying {len(after):,} events after the cut ({len(before):,} before)")
    moments, future = collect_moments(before, after, dataclasses.replace(config,
                                                                         policy=policy_cfg))
    progress(f"{len(moments):,} decision moments; computing user vectors")
    vectors = user_vectors(encoder, moments)
    d = vectors.shape[1]
    blank = np.zeros((len(moments), d), dtype=np.float16)
    popular = popularity_scores(encoder, before)
    runs = {
        "ours": (encoder, treated, vectors),
        "random": (BaselineItems(encoder, "random", None, config.seed), treated, blank),
        "popularity": (BaselineItems(encoder, "popularity", np.log1p(popular)), treated, blank),
        "repeat": (BaselineItems(encoder, "repeat", np.log1p(popular), history_first=True),
                   dataclasses.replace(treated, push_repeat_weight=1.0), blank),
        "holdout": (encoder, dataclasses.replace(policy_cfg, holdout_percent=100.0), vectors),
        "ours_without_propensity_gate": (encoder, dataclasses.replace(
            treated, no_coupon_propensity=math.inf, half_discount_propensity=math.inf),
            vectors),
        "ours_without_repeat_prior": (encoder, dataclasses.replace(
            treated, push_repeat_weight=0.0), vectors),
    }
    buckets = activity_buckets(moments)
    results: dict[str, PolicyResult] = {}
    for name, (model, cfg, vecs) in runs.items():
        progress(f"policy {name}")
        results[name] = run_policy(model, cfg, moments, vecs, by_id, future, converts,
                                   buckets, gate=treated)
    holdout_rate = results["holdout"].hit_rate
    policies = {name: _policy_summary(r, holdout_rate) for name, r in results.items()}
    budget_exceeded = any(r.spent.get(c.coupon_id, 0.0) > c.budget + 1e-9
                          for name, r in results.items() if name != "holdout" for c in catalog)
    ours, gate_off = results["ours"], results["ours_without_propensity_gate"]
    # With binding budgets the gate does not lower total spend, it moves it: the coupons the
    # ungated policy gave to users likely to buy anyway (and how often they did) is the saving.
    gate = {
        "threshold": treated.no_coupon_propensity,
        "coupons_with_gate": ours.coupons, "coupons_without_gate": gate_off.coupons,
        "without_gate_to_likely_buyers": gate_off.likely_coupons,
        "without_gate_likely_buyers_discount": round(gate_off.likely_granted, 2),
        "without_gate_likely_buyers_hit_rate": (
            round(gate_off.likely_hits / gate_off.likely_coupons, 4)
            if gate_off.likely_coupons else None),
        "with_gate_to_likely_buyers": ours.likely_coupons,
        "held_back": ours.binding["likely_to_buy_anyway"],
        "halved": ours.binding["half_discount_propensity"],
    }
    report: dict[str, Any] = {
        "events_before_cut": len(before), "events_replayed": len(after),
        "users_replayed": users_after, "cut_ms": cut, "moments": len(moments),
        "moment_kinds": dict(Counter(m.trigger.kind for m in moments)),
        "horizon_events": config.horizon, "conversion_types": sorted(converts),
        "model_version": encoder.model_version,
        "policies": policies,
        "ratios": {
            "ours_over_random": _ratio(results["ours"].hit_rate, results["random"].hit_rate),
            "ours_over_popularity": _ratio(results["ours"].hit_rate,
                                           results["popularity"].hit_rate),
            "ours_over_repeat": _ratio(results["ours"].hit_rate, results["repeat"].hit_rate),
            "ours_without_repeat_prior_over_popularity": _ratio(
                results["ours_without_repeat_prior"].hit_rate, results["popularity"].hit_rate),
        },
        "budget_exceeded": budget_exceeded,
        "repeat_weight": repeat_tuning,
        "propensity": propensity_report(moments, future, converts) | {"gate": gate},
        "fairness": _fairness(results, catalog),
        "catalog": [{"coupon_id": c.coupon_id, "value": c.value, "budget": c.budget,
                     "items": list(c.items), "categories": list(c.categories),
                     "max_exposures": c.max_exposures} for c in catalog],
    }
    return report


def choose_repeat_weight(before: Sequence[Interaction], encoder: ServingModel,
                         config: SimulationConfig, converts: frozenset[str]) -> dict[str, Any]:
    """The push_repeat_weight with the best push hit rate on the last ``validation_fraction``
    of ``before``, replayed with state warmed on the rest (no coupons: it judges pushes).
    Ties go to the smaller weight."""
    keep = {"chosen": config.policy.push_repeat_weight, "validation_moments": 0,
            "validation_hit_rate": {}}
    try:
        warm, valid, _ = time_split(before, 1.0 - config.validation_fraction)
    except ValueError:  # too few distinct times before the cut to validate on: keep the setting
        return keep
    moments, future = collect_moments(warm, valid, config)
    if not moments:
        return keep
    vectors = user_vectors(encoder, moments)
    treated = dataclasses.replace(config.policy, holdout_percent=0.0)
    buckets = activity_buckets(moments)
    rates = {w: run_policy(encoder, dataclasses.replace(treated, push_repeat_weight=w),
                           moments, vectors, {}, future, converts, buckets).hit_rate
             for w in sorted(config.repeat_weights)}
    best = max(rates.values())
    return {"chosen": min(w for w, r in rates.items() if r == best),
            "validation_moments": len(moments), "validation_events": len(valid),
            "validation_hit_rate": {str(w): round(r, 4) for w, r in rates.items()}}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _policy_summary(r: PolicyResult, holdout_rate: float) -> dict[str, Any]:
    # Rounded: ours and the holdout hit equally offline, and float noise is not a purchase.
    incremental = round(r.hits - holdout_rate * r.decisions, 6)
    return {
        "hit_rate": round(r.hit_rate, 4), "decisions": r.decisions, "hits": r.hits,
        "new_item_hit_rate": round(r.new_item_hits / r.decisions, 4) if r.decisions else 0.0,
        "coupons": r.coupons, "pushes": r.pushes, "coupon_hits": r.coupon_hits,
        "coupon_cost": round(r.coupon_cost, 2), "coupon_granted": round(r.coupon_granted, 2),
        "incremental_purchases": round(incremental, 2),
        "cost_per_incremental_purchase": (round(r.coupon_cost / incremental, 3)
                                          if incremental > 0 else None),
        "binding": {code: r.binding[code] for code in BINDING_CODES if r.binding[code]},
        "bound": r.bound, "bound_rate": round(r.bound / r.moments, 4) if r.moments else 0.0,
    }


def _fairness(results: Mapping[str, PolicyResult],
              catalog: Sequence[Coupon]) -> dict[str, Any]:
    """Exposure per coupon (against its cap and budget) and decision rates by activity."""
    out: dict[str, Any] = {}
    for name in ("ours", "random", "popularity", "repeat", "ours_without_propensity_gate"):
        r = results[name]
        counts = [r.exposures[c.coupon_id] for c in catalog]
        out[name] = {
            "coupon_exposure": {c.coupon_id: {
                "issued": r.exposures[c.coupon_id], "cap": c.max_exposures or None,
                "spent": round(r.spent.get(c.coupon_id, 0.0), 2), "budget": c.budget}
                for c in catalog},
            "exposure_max_over_mean": (round(max(counts) / (sum(counts) / len(counts)), 3)
                                       if counts and sum(counts) else None),
            "decision_rate_by_activity": {
                bucket: {"moments": m, "decisions": d,
                         "rate": round(d / m, 4) if m else None}
                for bucket, (m, d) in r.by_activity.items()},
        }
    return out


def report_png(report: Mapping[str, Any]) -> bytes:
    """Hit rate per policy, the propensity reliability diagram, and coupons per campaign."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hits, ax_cal, ax_exp) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [n for n in POLICIES if n in report["policies"]]
    rates = [report["policies"][n]["hit_rate"] for n in names]
    ax_hits.bar(range(len(names)), rates, color="tab:blue")
    ax_hits.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax_hits.set(ylabel=f"hit rate (next {report['horizon_events']} events)",
                title="hit rate per policy")
    prop = report["propensity"]
    ax_cal.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for key, label in (("bins_raw", "raw"), ("bins_calibrated", "Platt-calibrated")):
        bins = prop.get(key, [])
        ax_cal.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o",
                    label=f"{label} (Brier {prop.get('brier_' + key[5:], float('nan')):.3f})")
    ax_cal.set(xlabel="predicted propensity", ylabel="observed conversion rate",
               title="propensity reliability (held out)", xlim=(0, 1), ylim=(0, 1.02))
    ax_cal.legend(fontsize=8)
    shown = [("ours", "tab:green"), ("ours_without_propensity_gate", "tab:olive")]
    ids = [c["coupon_id"] for c in report["catalog"]]
    width = 0.8 / len(shown)
    for k, (name, color) in enumerate(shown):
        exposure = report["fairness"].get(name, {}).get("coupon_exposure", {})
        ax_exp.bar([i + (k - 0.5) * width for i in range(len(ids))],
                   [exposure.get(c, {}).get("issued", 0) for c in ids], width, color=color,
                   label=name.replace("_", " "))
    caps = [(i, c["max_exposures"]) for i, c in enumerate(report["catalog"])
            if c["max_exposures"]]
    if caps:
        ax_exp.scatter([i for i, _ in caps], [cap for _, cap in caps], color="red", marker="_",
                       s=400, label="exposure cap")
    ax_exp.set_xticks(range(len(ids)), ids, rotation=45, fontsize=7)
    ax_exp.set(title="coupons issued per campaign")
    ax_exp.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The table `promo simulate` prints (and the README shows)."""
    lines = [f"{'policy':<30} {'decisions':>9} {'hit rate':>9} {'new items':>9} "
             f"{'coupons':>8} {'coupon cost':>11} {'cost/incr.':>10} {'caps+budgets bound':>18}"]
    for name, p in report["policies"].items():
        per = p["cost_per_incremental_purchase"]
        lines.append(f"{name:<30} {p['decisions']:>9} {p['hit_rate']:>9.4f} "
                     f"{p['new_item_hit_rate']:>9.4f} {p['coupons']:>8} "
                     f"{p['coupon_cost']:>11.2f} {'-' if per is None else f'{per:.2f}':>10} "
                     f"{p['bound']:>18}")
    ratios = report["ratios"]
    lines.append(f"ours/random {ratios['ours_over_random']}  "
                 f"ours/popularity {ratios['ours_over_popularity']}  "
                 f"ours/repeat {ratios['ours_over_repeat']}  "
                 f"budget exceeded: {report['budget_exceeded']}")
    tuning = report["repeat_weight"]
    if "validation_hit_rate" in tuning:
        lines.append(f"push_repeat_weight {tuning['chosen']:g} chosen on "
                     f"{tuning['validation_moments']} validation moments before the cut "
                     f"(hit rate by weight: {tuning['validation_hit_rate']}); configured "
                     f"{tuning['configured']:g}")
    prop = report["propensity"]
    if "brier_raw" in prop:
        lines.append(f"propensity Brier (held out): raw {prop['brier_raw']:.4f}, calibrated "
                     f"{prop['brier_calibrated']:.4f}, base rate {prop['brier_base_rate']:.4f}; "
                     f"without the gate, {prop['gate']['without_gate_to_likely_buyers']} "
                     f"coupons ({prop['gate']['without_gate_likely_buyers_discount']:.2f}) "
                     "go to likely buyers")
    return lines


def train_before_cut(before: Sequence[Interaction], out: Path, *, minutes: float, seed: int,
                     progress: bool = True,
                     log: Callable[[str], None] = print) -> ServingModel:
    """Train the default encoder on the events before the cut, save it in ``out`` and load it
    back as the worker would (so its model_version is the checkpoint's)."""
    from encoder import checkpoint
    from encoder import train as training
    from encoder.config import EncoderConfig, TrainConfig
    from encoder.inference import Encoder

    config = TrainConfig(max_minutes=minutes, seed=seed)
    result = training.train(before, EncoderConfig(), config, progress=progress, log=log)
    meta = training.metadata(result, config, {"simulation": "events before the cut",
                                              "interactions_loaded": len(before)})
    png = training.training_curve_png(result.history, result.best_epoch, "before the cut")
    checkpoint.save(out, result.model, result.vocab, result.split.popularity, meta, png)
    return Encoder.load(out)
