"""The decision policy, as pure functions: consent, holdout, caps, quiet hours, budgets,
propensity tiers, cold start, and the decision contract."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from encoder.inference import item_key
from stream.bandit import OfferStats
from stream.config import PolicyConfig
from stream.contracts import (
    Action,
    Arm,
    Closure,
    Coupon,
    Decision,
    Event,
    Outcome,
    Preferences,
    Trigger,
    TriggerKind,
)
from stream.policy import (
    POLICY_VERSION,
    Context,
    cart_abandoned,
    decide,
    event_triggers,
    in_holdout,
    in_quiet_hours,
    partition_budget,
)
from stream.state import UserState, apply_events
from stream.uplift_model import FeatureSpec, UpliftModel
from tests.strategies import ids

NOON = 1_760_011_200_000  # 2025-10-09 12:00 UTC
DAY = 86_400_000
ITEMS = [f"i{n}" for n in range(20)]


class TableModel:
    """A fixed embedding table standing in for the encoder (the policy only reads scores)."""

    model_version = "test-model-1"

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.table = rng.normal(size=(len(ITEMS) + 1, 8)).astype(np.float32)
        self.table[0] = 0
        self.index = {item: n + 1 for n, item in enumerate(ITEMS)}
        self.by_key = {item_key(item): n for item, n in self.index.items()}

    def popular_items(self, k: int) -> np.ndarray:
        return np.arange(len(ITEMS), 0, -1)[:k]  # i19 (index 20) most popular

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.asarray([self.index.get(i, 0) for i in item_ids], dtype=np.int64)

    def item_indices_from_keys(self, keys: np.ndarray) -> np.ndarray:
        return np.asarray([self.by_key.get(int(k), 0) for k in keys], dtype=np.int64)

    def item_id(self, index: int) -> str | None:
        return ITEMS[index - 1] if 1 <= index <= len(ITEMS) else None

    def item_vectors(self, indices: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(indices)]

    def score_items(self, vectors: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        if candidates is None:
            return vectors @ self.table[1:].T
        return np.einsum("bd,bcd->bc", vectors, self.table[candidates])

    def top_items(self, vectors: np.ndarray, k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  boost: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score_items(vectors)
        for row, (indices, values) in enumerate(boost or []):
            scores[row, np.asarray(indices) - 1] += values
        for row, excluded in enumerate(exclude or []):
            for index in excluded:
                if index > 0:
                    scores[row, index - 1] = -np.inf
        top = np.argsort(-scores, axis=1)[:, :k]
        return top + 1, np.take_along_axis(scores, top, axis=1)


def user_with(events: list[Event]) -> UserState:
    s = UserState()
    apply_events(s, events)
    return s


def ev(n: int, kind: str, item: str, ts: int = NOON - 60_000) -> Event:
    return Event(event_id=f"e{n}", user_id="u", type=kind, item_id=item, ts=ts + n)


def active_user() -> UserState:
    return user_with([ev(n, "view", ITEMS[n]) for n in range(5)]
                     + [ev(9, "add_to_cart", "i3")])


def coupon(**changes: object) -> Coupon:
    base = Coupon(coupon_id="c1", value=5.0, budget=1000.0, items=("i3", "i4"))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def ctx(coupons: list[Coupon] | None = None, config: PolicyConfig | None = None,
        partitions: int = 1, now: int = NOON) -> Context:
    coupons = [coupon()] if coupons is None else coupons
    return Context(config=config or PolicyConfig(holdout_percent=0),
                   coupons={c.coupon_id: c for c in coupons},
                   budgets={c.coupon_id: partition_budget(c, 0, partitions) for c in coupons},
                   model=TableModel(), now_ms=now)


CART = Trigger("cart_add", "e9", ("i3",), NOON)
VECTOR = np.ones(8, np.float16)


def test_a_cart_add_gets_the_coupon_for_that_item_with_reasons() -> None:
    d = decide("u1", active_user(), VECTOR, CART, None, ctx())
    assert d is not None and d.action == "coupon" and d.arm == "treatment"
    assert d.coupon == {"coupon_id": "c1", "discount": 5.0, "min_spend": 0.0,
                        "expires_at": coupon().valid_to_ms}
    codes = [r["code"] for r in d.reasons]
    assert codes[0] == "cart_add" and "coupon_match" in codes
    assert d.model_version == "test-model-1" and d.policy_version == POLICY_VERSION
    body = orjson.loads(d.to_json())
    assert set(body) == {"decision_id", "user_id", "action", "coupon", "push", "score",
                         "reasons", "arm", "model_version", "policy_version",
                         "trigger_event_id", "created_at", "offer", "propensity", "choices"}


def test_decision_ids_are_deterministic_per_user_trigger_and_policy() -> None:
    a = decide("u1", active_user(), VECTOR, CART, None, ctx())
    b = decide("u1", active_user(), VECTOR, CART, None, ctx())
    c = decide("u2", active_user(), VECTOR, CART, None, ctx())
    assert a is not None and b is not None and c is not None
    assert a.decision_id == b.decision_id != c.decision_id


def test_users_opted_out_of_everything_get_no_record_at_all() -> None:
    prefs = Preferences(push_opt_in=False, coupon_opt_in=False)
    assert decide("u1", active_user(), VECTOR, CART, prefs, ctx()) is None


@pytest.mark.parametrize("default", [True, False])
def test_a_flag_a_record_leaves_out_is_the_default_exactly_as_with_no_record(
        default: bool) -> None:
    config = PolicyConfig(holdout_percent=0, default_push_opt_in=default)
    silent = Preferences(push_opt_in=None, coupon_opt_in=False)  # says nothing about pushes
    with_record = decide("u1", active_user(), VECTOR, CART, silent, ctx([], config))
    without = decide("u1", active_user(), VECTOR, CART,
                     None, ctx([], dataclasses.replace(config, default_coupon_opt_in=False)))
    sent = [d is not None and d.action == "push" for d in (with_record, without)]
    assert sent == [default, default]


def test_coupon_opt_out_leaves_a_push() -> None:
    prefs = Preferences(push_opt_in=True, coupon_opt_in=False)
    d = decide("u1", active_user(), VECTOR, CART, prefs, ctx())
    assert d is not None and d.action == "push"
    assert d.push is not None and len(d.push["items"]) == 3
    assert "coupon_opted_out" in [r["code"] for r in d.reasons]


def test_a_stored_record_with_an_unknown_time_zone_keeps_its_consent() -> None:
    raw = orjson.dumps({"push_opt_in": False, "coupon_opt_in": False, "timezone": "Not/AZone"})
    kept = Preferences.from_json(raw)
    assert (kept.push_opt_in, kept.coupon_opt_in, kept.timezone) == (False, False, None)
    with pytest.raises(ValueError, match="not an IANA time zone"):
        Preferences.from_json(raw, strict=True)


def test_holdout_is_a_deterministic_tenth_and_spends_nothing() -> None:
    share = np.mean([in_holdout(f"user-{n}", 10.0) for n in range(20_000)])
    assert 0.09 < share < 0.11
    holdout_user = next(f"user-{n}" for n in range(1000) if in_holdout(f"user-{n}", 10.0))
    context = ctx(config=PolicyConfig(holdout_percent=10.0))
    d = decide(holdout_user, active_user(), VECTOR, CART, None, context)
    assert d is not None and d.arm == "holdout" and not d.to_send
    assert context.budgets["c1"].spent == 0 and context.budgets["c1"].exposures == 0


def test_daily_caps_and_minimum_intervals_block_a_channel() -> None:
    s = active_user()
    s.channels["coupon"].record_send(NOON - 3_600_000)  # one coupon today already
    d = decide("u1", s, VECTOR, CART, None, ctx())
    assert d is not None and d.action == "push"
    assert "coupon_daily_cap" in [r["code"] for r in d.reasons]
    s.channels["push"].record_send(NOON - 60_000)  # a push a minute ago
    d = decide("u1", s, VECTOR, CART, None, ctx())
    assert d is not None and d.action == "none"
    assert "push_min_interval" in [r["code"] for r in d.reasons]


def test_quiet_hours_follow_the_users_time_zone() -> None:
    config = PolicyConfig()
    assert not in_quiet_hours(NOON, "UTC", config)
    assert in_quiet_hours(NOON, "Pacific/Auckland", config)  # 01:00 the next day there
    prefs = Preferences(push_opt_in=True, coupon_opt_in=True, timezone="Pacific/Auckland")
    d = decide("u1", active_user(), VECTOR, CART, prefs, ctx())
    assert d is not None and d.action == "none"
    assert "quiet_hours" in [r["code"] for r in d.reasons]


def test_a_budget_is_never_exceeded_even_with_many_eligible_users_in_one_batch() -> None:
    c = coupon(budget=52.0, value=5.0)
    context = ctx([c])
    issued = 0.0
    for n in range(100):
        d = decide(f"user-{n}", active_user(), VECTOR, CART, None, context)
        if d is not None and d.action == "coupon":
            assert d.coupon is not None
            issued += d.coupon["discount"]
    assert issued <= 52.0
    assert issued == 50.0  # ten coupons fit, the eleventh would overspend
    assert context.budgets["c1"].spent == 50.0


def test_partition_shares_sum_to_the_budget_and_the_exposure_cap() -> None:
    c = coupon(budget=100.0, max_exposures=10)
    shares = [partition_budget(c, p, 4) for p in range(4)]
    assert sum(b.share for b in shares) == pytest.approx(100.0)
    assert sum(b.exposure_share for b in shares) == 10


def test_exposure_caps_limit_a_coupon() -> None:
    context = ctx([coupon(max_exposures=2)])
    actions = [decide(f"user-{n}", active_user(), VECTOR, CART, None, context) for n in range(5)]
    assert [d.action for d in actions if d is not None].count("coupon") == 2


def test_pacing_releases_a_campaign_budget_over_its_window() -> None:
    c = coupon(budget=100.0, value=5.0, valid_from_ms=NOON, valid_to_ms=NOON + 10 * 86_400_000)
    context = ctx([c], now=NOON + 3_600_000)  # an hour into ten days: a tenth released
    sent = [decide(f"user-{n}", active_user(), VECTOR, CART, None, context) for n in range(40)]
    assert [d.action for d in sent if d is not None].count("coupon") == 2  # 10.0 / 5.0


def test_expired_or_future_coupons_are_not_offered() -> None:
    for c in (coupon(valid_to_ms=NOON - 1), coupon(valid_from_ms=NOON + 1)):
        d = decide("u1", active_user(), VECTOR, CART, None, ctx([c]))
        assert d is not None and d.action == "push"


def test_users_likely_to_buy_anyway_get_no_coupon() -> None:
    loyal = user_with([ev(n, "purchase", ITEMS[n % 10]) for n in range(30)]
                      + [ev(99, "add_to_cart", "i3")])
    d = decide("u1", loyal, VECTOR, CART, None, ctx())
    assert d is not None and d.action == "push"
    assert "likely_to_buy_anyway" in [r["code"] for r in d.reasons]


def test_cold_start_users_get_popular_items_marked_in_the_reasons() -> None:
    newcomer = user_with([ev(1, "add_to_cart", "new-item")])
    trigger = Trigger("cart_add", "e1", ("new-item",), NOON)
    d = decide("u1", newcomer, None, trigger, Preferences(True, False), ctx())
    assert d is not None and d.action == "push" and d.push is not None
    assert d.push["items"][0] == "i19"  # the most popular
    assert {"cold_start", "popular_items"} <= {r["code"] for r in d.reasons}


def test_without_a_model_decisions_fall_back_with_a_reason() -> None:
    context = ctx()
    context.model = None
    d = decide("u1", active_user(), None, CART, Preferences(True, False), context)
    assert d is not None and d.model_version == "none"
    assert "model_unavailable" in [r["code"] for r in d.reasons]


def test_triggers_are_cart_adds_and_repeated_views() -> None:
    config = PolicyConfig(repeat_view_threshold=3)
    views = [ev(n, "view", "i7") for n in range(3)]
    s = user_with(views)
    assert [t.kind for t in event_triggers(s, views[-1:], config)] == ["repeat_views"]
    assert event_triggers(s, [], config) == []
    cart = [ev(10, "add_to_cart", "i2")]
    apply_events(s, cart)
    assert [t.kind for t in event_triggers(s, cart, config)] == ["cart_add"]


def test_a_cart_is_abandoned_after_the_delay_only_once() -> None:
    config = PolicyConfig(cart_abandon_seconds=60)
    s = user_with([ev(1, "add_to_cart", "i2", ts=NOON)])
    assert not cart_abandoned(s, NOON + 30_000, config)
    assert cart_abandoned(s, NOON + 61_000, config)
    s.cart_reminded = True
    assert not cart_abandoned(s, NOON + 120_000, config)
    bought = user_with([ev(1, "add_to_cart", "i2", ts=NOON), ev(2, "purchase", "i2", ts=NOON)])
    assert not cart_abandoned(bought, NOON + 61_000, config)


def test_push_reasons_name_recent_items_that_drove_the_choice() -> None:
    prefs = Preferences(push_opt_in=True, coupon_opt_in=False)
    d = decide("u1", active_user(), VECTOR, CART, prefs, ctx())
    assert d is not None
    named = next(r for r in d.reasons if r["code"] == "similar_to_recent")["items"]
    assert named and set(named) <= {"i0", "i1", "i2", "i3", "i4"}


def test_a_missing_or_stale_vector_is_named_in_the_reasons() -> None:
    prefs = Preferences(push_opt_in=True, coupon_opt_in=False)
    missing = decide("u1", active_user(), None, CART, prefs, ctx())
    stale = decide("u1", active_user(), VECTOR, CART, prefs, ctx(), vector_stale=True)
    assert missing is not None and stale is not None
    assert "vector_unavailable" in [r["code"] for r in missing.reasons]
    assert missing.push is not None and missing.push["items"][0] == "i19"  # popularity
    assert "stale_vector" in [r["code"] for r in stale.reasons]


def test_push_candidates_ranked_for_a_whole_batch_give_the_same_decisions() -> None:
    from stream.policy import push_exclusions, rank_push_items, repeat_boost

    config = PolicyConfig(holdout_percent=0)
    model = TableModel()
    # Views from two days ago (pushable again, so the repeat prior counts) and a cart add now.
    users = [user_with([ev(n, "view", ITEMS[(n % 3 + shift) % 20], ts=NOON - 2 * DAY)
                        for n in range(6)]
                       + [ev(9, "add_to_cart", ITEMS[shift])]) for shift in range(8)]
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(users), 8)).astype(np.float16)
    exclusions = [push_exclusions(u, model, NOON, config) for u in users]
    boosts = [repeat_boost(u, model, config) for u in users]
    ranked = rank_push_items(model, vectors, exclusions, boosts, config, chunk=3)
    for user, vector, ranking in zip(users, vectors, ranked, strict=True):
        trigger = Trigger("cart_add", "e9", ("i0",), NOON)
        alone = decide("u", user, vector, trigger, Preferences(True, False), ctx(config=config))
        batched_ctx = ctx(config=config)
        batched_ctx.push_ranking = ranking
        batched = decide("u", user, vector, trigger, Preferences(True, False), batched_ctx)
        assert alone is not None and batched is not None
        assert batched.push == alone.push
        assert batched.score == pytest.approx(alone.score, rel=1e-5)  # matmul rounding
        assert batched.reasons == alone.reasons


def test_the_repeat_prior_lifts_items_the_user_had_before() -> None:
    from stream.policy import repeat_boost

    # i7 viewed three times two days ago: no longer excluded, so it may be pushed again.
    user = user_with([ev(n, "view", "i7", ts=NOON - 2 * DAY) for n in range(3)]
                     + [ev(9, "add_to_cart", "i3")])
    model = TableModel()
    vector = -model.table[8].astype(np.float16)  # the encoder alone ranks i7 last
    prefs = Preferences(push_opt_in=True, coupon_opt_in=False)
    indices, values = repeat_boost(user, model, PolicyConfig(push_repeat_weight=100.0))
    assert indices.tolist() == [4, 8] and values.tolist() == pytest.approx(
        [100 * np.log(2), 100 * np.log(4)])
    without = decide("u", user, vector, CART, prefs,
                     ctx(config=PolicyConfig(holdout_percent=0, push_repeat_weight=0.0)))
    lifted = decide("u", user, vector, CART, prefs,
                    ctx(config=PolicyConfig(holdout_percent=0, push_repeat_weight=100.0)))
    assert without is not None and without.push is not None and lifted is not None
    assert "i7" not in without.push["items"]
    assert "repeat_item" not in [r["code"] for r in without.reasons]
    assert lifted.push is not None and lifted.push["items"][0] == "i7"
    assert {"code": "repeat_item", "items": ["i7"]} in lifted.reasons


def test_an_abandoned_cart_item_is_not_reported_as_lifted_by_the_repeat_prior() -> None:
    # i3 leads the push because it was left in the cart, whatever the prior's weight.
    user = user_with([ev(n, "view", "i7", ts=NOON - 2 * DAY) for n in range(3)]
                     + [ev(9, "add_to_cart", "i3")])
    model = TableModel()
    vector = -model.table[8].astype(np.float16)
    abandoned = Trigger("cart_abandoned", "cart-u-1", ("i3",), NOON)
    decision = decide("u", user, vector, abandoned,
                      Preferences(push_opt_in=True, coupon_opt_in=False),
                      ctx(config=PolicyConfig(holdout_percent=0, push_repeat_weight=100.0)))
    assert decision is not None and decision.push is not None
    assert decision.push["items"][:2] == ["i3", "i7"]
    assert {"code": "repeat_item", "items": ["i7"]} in decision.reasons


# --- logged exploration and the uplift policy ---------------------------------------------

def triggers(n: int) -> list[Trigger]:
    return [Trigger(TriggerKind.CART_ADD, f"e{k}", ("i3",), NOON) for k in range(n)]


def test_every_decision_logs_its_offers_probability_and_the_probabilities_sum_to_one() -> None:
    config = PolicyConfig(holdout_percent=0, exploration_share=0.2)
    explored = 0
    for trigger in triggers(400):
        d = decide("u1", active_user(), VECTOR, trigger, None, ctx(config=config))
        assert d is not None and d.choices is not None
        assert set(d.choices) == {"none", "coupon_full", "coupon_half", "push"}
        assert sum(d.choices.values()) == pytest.approx(1.0, abs=1e-5)
        assert d.propensity == d.choices[d.offer]
        # The greedy offer has 1 - share + share / 4, every other share / 4.
        choices = d.choices
        greedy = max(choices, key=lambda offer: choices[offer])
        assert d.choices[greedy] == pytest.approx(0.8 + 0.05, abs=1e-5)
        codes = [r["code"] for r in d.reasons]
        if "explored" in codes:
            explored += 1
            assert d.offer != greedy
    # A share of 0.2 over 4 options explores 20% and lands on another option 15% of the time.
    assert 0.10 * 400 <= explored <= 0.20 * 400


def test_the_exploration_draw_is_the_same_when_a_trigger_is_decided_again() -> None:
    config = PolicyConfig(holdout_percent=0, exploration_share=0.5)
    first = [decide("u1", active_user(), VECTOR, t, None, ctx(config=config)) for t in triggers(50)]
    again = [decide("u1", active_user(), VECTOR, t, None, ctx(config=config)) for t in triggers(50)]
    assert [d.offer for d in first if d] == [d.offer for d in again if d]
    assert len({d.offer for d in first if d}) > 1


def test_on_site_offers_never_explore_so_a_claim_delivers_what_its_preview_showed() -> None:
    config = PolicyConfig(holdout_percent=0, exploration_share=1.0)
    for k in range(20):
        d = decide("u1", active_user(), VECTOR, Trigger(TriggerKind.ON_SITE, f"claim:{k}", (),
                                                        NOON), None, ctx(config=config))
        assert d is not None and d.propensity == 1.0 and d.choices == {d.offer: 1.0}


def test_without_exploration_the_offer_is_certain() -> None:
    d = decide("u1", active_user(), VECTOR, CART, None,
               ctx(config=PolicyConfig(holdout_percent=0, exploration_share=0)))
    assert d is not None and d.offer == "coupon_full" and d.choices == {"coupon_full": 1.0}


def test_the_holdout_arm_is_never_treated_even_by_exploration_or_an_uplift_model() -> None:
    config = PolicyConfig(holdout_percent=100, exploration_share=1.0)
    for model in (None, constant_uplift({"none": 0.1, "coupon_full": 0.9, "push": 0.5})):
        for trigger in triggers(50):
            context = ctx(config=config)
            context.uplift = model
            d = decide("u1", active_user(), VECTOR, trigger, None, context)
            assert d is not None and d.arm == "holdout" and not d.to_send
            # What treatment would have drawn from is logged; nothing was drawn or sent.
            assert d.propensity == 1.0 and "explored" not in [r["code"] for r in d.reasons]
            assert d.choices is not None and sum(d.choices.values()) == pytest.approx(1.0)
            assert context.budgets["c1"].spent == 0


def constant_uplift(rates: dict[str, float], base_rate: float = 0.5) -> UpliftModel:
    """An uplift model whose conversion rates per action are ``rates`` for every user, trained
    on rows that converted ``base_rate`` of the time with nothing done."""
    def logit(p: float) -> float:
        return float(np.log(p / (1 - p)))

    actions = ("none", *[a for a in rates if a != "none"])
    return UpliftModel(actions, FeatureSpec(()), np.zeros(0), np.ones(0),
                       np.asarray([logit(rates[a]) - logit(rates["none"]) for a in actions[1:]]),
                       logit(rates["none"]), 1.0,
                       {"conversion_per_action": {"none": base_rate}})


# margin 30 per conversion (no purchases yet: default order value 30, margin rate 1); the coupon
# grants 5.0 in full or 2.5 at half, paid only when it converts.
WORTH = PolicyConfig(holdout_percent=0, exploration_share=0, margin_rate=1.0,
                     default_order_value=30.0, push_cost=0.5)


def decide_with(rates: dict[str, float]) -> tuple[Decision, Context]:
    context = ctx(config=WORTH)
    context.uplift = constant_uplift(rates)
    d = decide("u1", active_user(), VECTOR, CART, None, context)
    assert d is not None
    return d, context


@pytest.mark.parametrize(("rates", "offer", "segment"), [
    # full: 0.3 x 30 - 5 x 0.4 = 7.0; half: 0.2 x 30 - 2.5 x 0.3 = 5.25; push: 1.5 - 0.5 = 1.0
    ({"none": 0.1, "coupon_full": 0.4, "coupon_half": 0.3, "push": 0.15}, "coupon_full",
     "persuadable"),
    # full: 0.2 x 30 - 5 x 0.3 = 4.5; half: 0.18 x 30 - 2.5 x 0.28 = 4.7: half the money, more
    ({"none": 0.1, "coupon_full": 0.3, "coupon_half": 0.28, "push": 0.1}, "coupon_half",
     "persuadable"),
    # push: 0.1 x 30 - 0.5 = 2.5; full: 0.02 x 30 - 5 x 0.12 = 0
    ({"none": 0.1, "coupon_full": 0.12, "coupon_half": 0.1, "push": 0.2}, "push",
     "persuadable"),
    # Buys anyway: nothing pays (full: 0 - 4.5); converts more than the treated average.
    ({"none": 0.9, "coupon_full": 0.9, "coupon_half": 0.9, "push": 0.9}, "none", "sure_thing"),
    ({"none": 0.02, "coupon_full": 0.021, "coupon_half": 0.02, "push": 0.02}, "none",
     "lost_cause"),
    ({"none": 0.3, "coupon_full": 0.25, "coupon_half": 0.28, "push": 0.1}, "none",
     "do_not_disturb"),
])
def test_the_uplift_policy_picks_the_most_incremental_profit_and_names_the_segment(
        rates: dict[str, float], offer: str, segment: str) -> None:
    d, context = decide_with(rates)
    assert d.offer == offer
    reason = next(r for r in d.reasons if r["code"] == segment)
    assert reason["p_none"] == pytest.approx(rates["none"], abs=1e-4)
    assert context.uplift is not None
    assert d.policy_version == f"{POLICY_VERSION}+{context.uplift.version}"
    assert context.budgets["c1"].spent == (5.0 if offer == "coupon_full"
                                           else 2.5 if offer == "coupon_half" else 0.0)


def test_a_budget_is_priced_above_face_value_only_as_it_runs_short() -> None:
    budget = partition_budget(coupon(), 0, 1)  # 1,000, released at once (no end date)
    assert budget.shadow_price(coupon(), 5.0, NOON) == pytest.approx(5 / 995)
    budget.spent = 990.0  # 10 left: this coupon would take half of it
    assert budget.shadow_price(coupon(), 5.0, NOON) == pytest.approx(1.0)
    budget.spent = 995.0
    assert budget.shadow_price(coupon(), 5.0, NOON) == float("inf")


def test_a_budget_running_short_goes_to_the_users_a_coupon_earns_most_per_unit_of_money(
        ) -> None:
    # Face value, margin 30: the coupon earns 0.3 x 30 = 9 for 5 x 0.4 = 2 of money (4.5 per
    # unit) from one user, 0.8 x 30 = 24 for 5 x 0.9 = 4.5 (5.3 per unit) from the other; a
    # push earns 0.05 x 30 - 0.5 = 1.0 from either.
    modest = {"none": 0.1, "coupon_full": 0.4, "push": 0.15}
    keen = {"none": 0.1, "coupon_full": 0.9, "push": 0.15}

    def decided(rates: dict[str, float], spent: float) -> Decision:
        context = ctx(config=WORTH)
        context.uplift = constant_uplift(rates)
        context.budgets["c1"].spent = spent
        d = decide("u1", active_user(), VECTOR, CART, None, context)
        assert d is not None
        return d

    assert decided(modest, 0.0).offer == "coupon_full"  # plenty left: worth 7.0 against 1.0
    assert decided(modest, 900.0).offer == "coupon_full"  # room for many: price 0.05
    # Nearly at the limit: 5 / 3.5 left after this coupon, so each unit of money is priced at
    # 3.5 more. The modest coupon is worth 7 - 3.5 x 2 = 0 and the push goes instead; the keen
    # user's coupon still pays (19.5 - 3.5 x 4.5 = 3.75).
    near = 1000.0 - 5.0 - 5.0 / 3.5
    short = decided(modest, near)
    assert short.offer == "push"
    reason = next(r for r in short.reasons if r["code"] == "persuadable")
    assert reason["budget_shadow_price"] == {"instead_of": "coupon_full", "price": 3.5}
    assert decided(keen, near).offer == "coupon_full"


def test_an_offer_the_uplift_model_never_saw_is_not_chosen_for_it() -> None:
    d, _ = decide_with({"none": 0.1, "push": 0.11})  # a model trained without coupons
    assert d.offer == "none"  # push: 0.01 x 30 - 0.5 < 0; coupons: no estimate


@hyp_settings(max_examples=150, deadline=None)
@given(user=ids(), history=st.lists(st.tuples(st.sampled_from(["view", "click", "add_to_cart",
                                                               "purchase"]),
                                              st.sampled_from(ITEMS)), max_size=12),
       share=st.floats(0, 1), holdout=st.sampled_from([0.0, 10.0, 100.0]),
       budget=st.floats(0, 20), push_opt_in=st.booleans(), coupon_opt_in=st.booleans(),
       mode=st.sampled_from(["tiers", "uplift", "thompson"]),
       kind=st.sampled_from(list(TriggerKind)))
def test_any_user_and_settings_get_probabilities_that_sum_to_one_and_the_holdout_nothing(
        user: str, history: list[tuple[str, str]], share: float, holdout: float,
        budget: float, push_opt_in: bool, coupon_opt_in: bool, mode: str,
        kind: TriggerKind) -> None:
    state = user_with([ev(n, t, i) for n, (t, i) in enumerate(history)])
    config = PolicyConfig(holdout_percent=holdout, exploration_share=share,
                          default_push_opt_in=push_opt_in, default_coupon_opt_in=coupon_opt_in)
    context = ctx(coupons=[coupon(budget=budget)], config=config)
    if mode == "uplift":
        context.uplift = constant_uplift({"none": 0.1, "coupon_full": 0.3, "coupon_half": 0.2,
                                          "push": 0.15})
    elif mode == "thompson":
        context.bandit = OfferStats()
        for n, (offer, converted) in enumerate([("none", False), ("push", True),
                                                ("coupon_half", True), ("coupon_full", False)]):
            context.bandit.add(Outcome(
                decision_id=f"d{n}", user_id="v", arm=Arm.TREATMENT, action=Action.NONE,
                coupon_id=None, discount=0.0, template=None, trigger=kind, model_version="m",
                policy_version="p", created_at=0, window_start=0, window_ms=1,
                features={"purchases": 1.0}, closed_by=Closure.WINDOW, converted=converted,
                offer=offer))
    d = decide(user, state, VECTOR, Trigger(kind, "t1", ("i3",), NOON), None, context)
    if not (push_opt_in or coupon_opt_in):
        assert d is None  # no consent: not even a record
        return
    assert d is not None and d.choices is not None
    assert sum(d.choices.values()) == pytest.approx(1.0, abs=1e-5)
    assert d.offer in d.choices and d.action == ("coupon" if d.offer.startswith("coupon")
                                                 else d.offer)
    assert context.budgets["c1"].spent <= budget + 1e-9
    if d.arm == "holdout":
        assert d.propensity == 1.0 and not d.to_send and context.budgets["c1"].spent == 0
    else:
        assert d.propensity == d.choices[d.offer]
