"""Attribution (stream.outcomes), alone and in the pipeline: every decision gets exactly one
outcome, in event time, whatever the batches, redeliveries and evictions."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from stream import outcomes, state
from stream.config import AttributionSettings, PolicyConfig
from stream.contracts import Action, Arm, Closure, Coupon, Event
from stream.outcomes import Opened, Rules, Seen
from stream.state import PendingWindow
from stream.testing import Consumed, Harness
from tests.strategies import ids

DAY = 86_400_000
NOON = 1_780_056_000_000  # 12:00 UTC
RULES = Rules(window_ms=7 * DAY, grace_ms=0, conversion_types=frozenset({"purchase"}),
              max_pending=3)
OPEN = PolicyConfig(holdout_percent=0, default_timezone="UTC", quiet_start_hour=0,
                    quiet_end_hour=0, cart_abandon_seconds=10**9)


def window(ref: str, start_ms: int = NOON, action: Action = Action.PUSH,
           arm: Arm = Arm.TREATMENT) -> PendingWindow:
    return PendingWindow(ref.ljust(16, "0"), start_ms // 1000, arm, action)


def purchase(ts: int, n: int = 0, user: str = "u", **fields: object) -> Event:
    return Event(f"{user}-buy-{n}-{ts}", user, "purchase", "sku-1", ts, **fields)  # type: ignore[arg-type]


def view(ts: int, n: int = 0, user: str = "u") -> Event:
    return Event(f"{user}-view-{n}-{ts}", user, "view", "sku-1", ts)


# --- the rules, pure ---------------------------------------------------------------------------

def test_a_conversion_in_the_window_converts_every_open_window_of_the_user() -> None:
    a, b = window("a"), window("b", NOON + 1000)
    buy = purchase(NOON + DAY)
    still, closed = outcomes.attribute([a, b], [Seen(buy, NOON + DAY)], RULES)
    assert still == []
    assert [(c.window, c.closed_by, c.conversion) for c in closed] == [
        (a, Closure.CONVERSION, buy), (b, Closure.CONVERSION, buy)]


def test_only_conversion_types_inside_the_window_convert() -> None:
    early = purchase(NOON - 1000)  # stamped before the trigger: a late-arriving old purchase
    late = purchase(NOON + 7 * DAY + 1)
    browsing = view(NOON + DAY)
    still, closed = outcomes.attribute(
        [window("a")], [Seen(e, NOON) for e in (early, browsing, late)],
        Rules(window_ms=7 * DAY, grace_ms=DAY, max_pending=3))
    assert closed == [] and still == [window("a")]


def test_a_window_closes_unconverted_once_event_time_passes_its_end_and_grace() -> None:
    rules = Rules(window_ms=7 * DAY, grace_ms=60_000, max_pending=3)
    end = NOON + 7 * DAY
    assert outcomes.expire([window("a")], end + 60_000, rules) == ([window("a")], [])
    still, closed = outcomes.expire([window("a")], end + 60_001, rules)
    assert still == [] and closed == [outcomes.Closing(window("a"), Closure.WINDOW)]
    # A purchase in the window that arrives after the partition's time moved past it is late.
    _, closed = outcomes.attribute([window("a")], [Seen(purchase(end - 1), end + 60_001)], rules)
    assert [c.closed_by for c in closed] == [Closure.WINDOW]


def test_one_window_too_many_evicts_the_oldest_none_decision_else_the_oldest() -> None:
    push, none, coupon = (window("1"), window("2", action=Action.NONE),
                          window("3", action=Action.COUPON))
    newest = window("4")
    still, closed = outcomes.attribute([push, none, coupon], [Opened(newest)], RULES)
    assert still == [push, coupon, newest]
    assert closed == [outcomes.Closing(none, Closure.EVICTION)]
    still, closed = outcomes.attribute(still, [Opened(window("5"))], RULES)
    assert still == [coupon, newest, window("5")] and closed[0].window == push


def test_a_decision_after_the_purchase_is_not_converted_by_it() -> None:
    buy = purchase(NOON)
    still, closed = outcomes.attribute([], [Seen(buy, NOON), Opened(window("a"))], RULES)
    assert closed == [] and still == [window("a")]


steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.integers(0, 20), st.booleans()),  # (days after, purchase)
    st.tuples(st.just("decide"), st.integers(0, 20), st.sampled_from(list(Action)))),
    max_size=40)


def _walk(spec: list[tuple[str, int, object]]) -> tuple[list[Seen | Opened], int]:
    walked: list[Seen | Opened] = []
    mark = 0
    for n, (kind, days, extra) in enumerate(spec):
        ts = NOON + days * DAY // 2
        if kind == "event":
            event = purchase(ts, n) if extra else view(ts, n)
            walked.append(Seen(event, mark))
            mark = max(mark, ts)
        else:
            assert isinstance(extra, Action)
            walked.append(Opened(window(f"{n:x}", ts, extra)))
    return walked, mark


@settings(max_examples=1000, deadline=None)
@given(spec=steps, cuts=st.lists(st.integers(0, 40), max_size=5))
def test_every_window_closes_once_and_batches_do_not_change_the_result(
        spec: list[tuple[str, int, object]], cuts: list[int]) -> None:
    walked, final = _walk(spec)
    opened = [s.window for s in walked if isinstance(s, Opened)]
    whole, closed = outcomes.attribute([], walked, RULES)
    whole, expired = outcomes.expire(whole, final, RULES)
    closed += expired
    # Exactly once: every window is either still open or closed once, never both.
    refs = [c.window.ref for c in closed] + [w.ref for w in whole]
    assert sorted(refs) == sorted(w.ref for w in opened)
    assert len(whole) <= RULES.max_pending
    # The worker cuts the log into batches and expires by each batch's watermark in between.
    pieces, still, mark, chunked = sorted(set(cuts)), [], 0, []
    for start, end in zip([0, *pieces], [*pieces, len(walked)], strict=True):
        part = walked[start:end]
        still, closed_here = outcomes.attribute(still, part, RULES, mark)
        mark = max([mark] + [s.event.ts for s in part if isinstance(s, Seen)])
        still, expired = outcomes.expire(still, mark, RULES)
        chunked += closed_here + expired
    assert still == whole
    assert ({(c.window, c.closed_by, c.conversion) for c in chunked}
            == {(c.window, c.closed_by, c.conversion) for c in closed})


# --- in the pipeline ---------------------------------------------------------------------------

def harness(**kwargs: object) -> Harness:
    kwargs.setdefault("policy", OPEN)
    return Harness(now_ms=NOON, partitions=1, **kwargs)  # type: ignore[arg-type]


def send(h: Harness, *events: Event) -> list[Consumed]:
    return [h.record(e.user_id, e.to_json()) for e in events]


def cart(user: str, ts: int = NOON, n: int = 0) -> Event:
    return Event(f"{user}-cart-{n}-{ts}", user, "add_to_cart", "sku-1", ts)


def test_a_decision_then_a_purchase_is_one_converted_outcome_with_its_features() -> None:
    h = harness(coupons=[Coupon("five-off", 5.0, 500.0, items=("sku-1",))])
    h.run(send(h, cart("u")))
    [decision] = h.decisions()
    assert decision["action"] == "coupon"
    assert h.outcomes() == []  # pending: the window is open
    h.now_ms = NOON + DAY
    result = h.run(send(h, purchase(NOON + DAY, coupon_id="five-off", value=42.5)))
    [outcome] = h.outcomes()
    assert outcome["decision_id"] == decision["decision_id"]
    assert outcome["converted"] and outcome["redeemed"] and outcome["value"] == 42.5
    assert outcome["closed_by"] == "conversion" and outcome["converted_at"] == NOON + DAY
    assert outcome["coupon_id"] == "five-off" and outcome["discount"] == 5.0
    assert outcome["arm"] == "treatment" and outcome["trigger"] == "cart_add"
    assert outcome["window_start"] == NOON and outcome["window_ms"] == 7 * DAY
    assert outcome["features"]["carts"] == 1.0 and "propensity" in outcome["features"]
    key = h.sink.sent[-1].key if h.sink.sent[-1].topic == "outcomes" else None
    assert key is None or key == decision["decision_id"].encode()
    assert result.outcomes[0].decision_id == decision["decision_id"]
    [tally] = outcomes.totals(h.store.all_counts()).values()
    assert (tally.treatment.decisions, tally.treatment.converted, tally.treatment.redeemed,
            tally.treatment.cost, tally.treatment.value) == (1, 1, 1, 5.0, 42.5)
    sample = h.metrics.registry.get_sample_value(
        "promo_outcomes_total", {"campaign": "five-off", "action": "coupon",
                                 "arm": "treatment", "converted": "true"})
    assert sample == 1.0
    [s] = [state.decode(raw) for mine in h.store.users.values() for raw in mine.values()]
    assert s.pending == [] and h.store.all_pending_refs() == set()


def test_a_user_who_never_returns_is_closed_by_other_users_event_time() -> None:
    h = harness()
    h.run(send(h, cart("gone")))
    [decision] = h.decisions()
    h.now_ms = NOON + 6 * DAY
    h.run(send(h, view(NOON + 6 * DAY, user="other")))
    assert h.outcomes() == []  # not yet: 6 days of event time
    h.now_ms = NOON + 8 * DAY
    h.run(send(h, view(NOON + 8 * DAY, user="other")))
    [outcome] = h.outcomes()
    assert outcome["decision_id"] == decision["decision_id"]
    assert outcome["closed_by"] == "window" and not outcome["converted"]


def test_holdout_and_none_decisions_get_outcomes_too() -> None:
    h = harness(policy=PolicyConfig(holdout_percent=100, default_timezone="UTC",
                                    quiet_start_hour=0, quiet_end_hour=0))
    h.run(send(h, cart("h")))
    h.now_ms = NOON + DAY
    h.run(send(h, purchase(NOON + DAY, user="h")))
    [outcome] = h.outcomes()
    assert outcome["arm"] == "holdout" and outcome["action"] == "none" and outcome["converted"]


def test_redelivered_records_never_produce_a_second_outcome() -> None:
    h = harness()
    h.run(send(h, cart("u")))
    h.now_ms = NOON + DAY
    batch = send(h, purchase(NOON + DAY))
    h.run(batch)
    h.run(batch)  # the same records again, as after a crash before the commit
    assert len(h.outcomes()) == 1


def test_a_conversion_without_an_open_window_is_counted_not_attributed() -> None:
    h = harness()
    result = h.run(send(h, purchase(NOON, user="walk-in")))
    assert result.outcomes == [] and result.unattributed == 1
    assert h.metrics.registry.get_sample_value(
        "promo_outcomes_unattributed_conversions_total") == 1.0


def test_an_evicted_decision_gets_its_outcome_at_once_and_counts_in_no_rate() -> None:
    h = harness(attribution=Rules(window_ms=7 * DAY, max_pending=1))
    h.run(send(h, cart("u", n=1)))
    h.now_ms += 1000
    h.run(send(h, cart("u", NOON + 1000, n=2)))
    first, _ = h.decisions()
    [outcome] = h.outcomes()
    assert outcome["decision_id"] == first["decision_id"] and outcome["evicted"]
    [tally] = outcomes.totals(h.store.all_counts()).values()
    assert tally.treatment.decisions == 0 and tally.treatment.evicted == 1


def test_the_deadline_index_is_rebuilt_from_the_store_after_a_rebalance() -> None:
    h = harness()
    h.run(send(h, cart("u")))
    h.pipeline.forget_partitions()  # as after a rebalance: the index is gone, the table stays
    h.now_ms = NOON + 8 * DAY
    h.run(send(h, view(NOON + 8 * DAY, user="other")))
    assert [o["closed_by"] for o in h.outcomes()] == ["window"]


def test_a_model_swap_keeps_each_decision_s_own_versions() -> None:
    h = harness()
    h.run(send(h, cart("u")))
    [decision] = h.decisions()
    h.model.encoder = None  # whatever serves now, the outcome is the decision's
    h.now_ms = NOON + DAY
    h.run(send(h, purchase(NOON + DAY)))
    [outcome] = h.outcomes()
    assert (outcome["model_version"], outcome["policy_version"]) == (
        decision["model_version"], decision["policy_version"])


def test_attribution_off_keeps_no_windows() -> None:
    h = harness(attribution=None)
    h.run(send(h, cart("u")))
    h.run(send(h, purchase(NOON)))
    assert h.outcomes() == [] and h.store.pending == {}


@settings(max_examples=40, deadline=None)
@given(users=st.lists(ids(), min_size=1, max_size=4, unique=True),
       plan=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["cart", "purchase", "view"]),
                               st.integers(0, 20)), max_size=30),
       batch=st.integers(1, 6))
def test_every_decision_gets_exactly_one_outcome_once_windows_close(
        users: list[str], plan: Sequence[tuple[int, str, int]], batch: int) -> None:
    h = harness()
    events = []
    for n, (who, kind, days) in enumerate(sorted(plan, key=lambda p: p[2])):
        user = users[who % len(users)]
        ts = NOON + days * DAY // 2
        events.append(Event(f"e{n}", user, {"cart": "add_to_cart"}.get(kind, kind),
                            "sku-1", ts))
    for start in range(0, len(events), batch):
        part = events[start:start + batch]
        h.now_ms = max(e.ts for e in part)
        h.run(send(h, *part))
    h.now_ms = NOON + 30 * DAY
    h.run(send(h, view(h.now_ms, user="clock")))  # event time moves past every window
    decided = [d["decision_id"] for d in h.decisions()]
    closed = [o["decision_id"] for o in h.outcomes()]
    assert sorted(closed) == sorted(decided)
    assert h.store.all_pending_refs() == set()


def test_attribution_settings_make_rules() -> None:
    rules = Rules.from_settings(AttributionSettings(window_seconds=3600,
                                                    conversion_types=("purchase", "click")))
    assert rules.window_ms == 3_600_000 and rules.conversion_types == {"purchase", "click"}
