"""The pipeline in-process (stream.testing): errors are policy, repartitioning, cart reminders,
and a handler that never raises on any input the contract allows or forbids."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import contracts, policy, state
from stream import pipeline as pipeline_module
from stream.config import PolicyConfig
from stream.contracts import Coupon, Event
from stream.pipeline import TIMER_SOURCE
from stream.testing import TOPICS, Consumed, Harness, MemoryStore, tiny_encoder
from stream.topics import expected_partition
from tests.strategies import NOW_MS, event_bodies, ids

ITEMS = [f"sku-{n}" for n in range(40)]
CART = PolicyConfig(cart_abandon_seconds=60, holdout_percent=0, default_timezone="UTC",
                    quiet_start_hour=0, quiet_end_hour=0)
NOON = 1_780_056_000_000  # 12:00 UTC: outside any quiet hours


def cart_add(user: str, n: int = 0, item: str = "sku-1", ts: int = NOON) -> Event:
    return Event(f"{user}-{n}", user, "add_to_cart", item, ts)


def records(h: Harness, events: Sequence[Event]) -> list[Consumed]:
    return [h.record(e.user_id, e.to_json()) for e in events]


def failing_on_users(store: MemoryStore, bad: set[str], times: int | None = None) -> None:
    """Make ``store`` raise when the pipeline reads a state of one of ``bad`` (``times``
    times, or always): a stand-in for any bug a particular record can trigger."""
    get_users = store.get_users
    left = [times]

    def failing(partition: int, user_ids: Sequence[str]) -> dict[str, bytes]:
        if bad & set(user_ids) and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            raise RuntimeError(f"injected failure reading {sorted(bad & set(user_ids))}")
        return get_users(partition, user_ids)

    store.get_users = failing  # type: ignore[method-assign]


def test_a_record_whose_processing_raises_is_dead_lettered_and_the_rest_processed() -> None:
    h = Harness(policy=CART, now_ms=NOON)
    failing_on_users(h.store, {"poison"})
    batch = records(h, [cart_add(f"user-{n}") for n in range(9)] + [cart_add("poison")])
    result = h.run(batch)
    [letter] = h.dead_letters()
    poison = batch[-1]
    assert letter["reason"] == "processing_error"
    assert letter["exception"] == "RuntimeError" and "injected failure" in letter["error"]
    assert letter["source"] == {"topic": "events", "partition": poison.partition,
                                "offset": poison.offset}
    assert base64.b64decode(letter["raw"]) == poison.value
    assert result.events == 9 and result.rejected == 1
    assert {d["user_id"] for d in h.decisions()} == {f"user-{n}" for n in range(9)}
    stored = {uid for mine in h.store.users.values() for uid in mine}
    assert stored == {f"user-{n}" for n in range(9)}


def test_a_transient_failure_is_retried_before_anything_is_dead_lettered() -> None:
    h = Harness(policy=CART, now_ms=NOON, retries=2)
    failing_on_users(h.store, {"flaky"}, times=2)
    result = h.run(records(h, [cart_add("flaky"), cart_add("steady")]))
    assert h.dead_letters() == []
    assert result.events == 2 and len(h.decisions()) == 2


def test_only_the_record_that_raises_is_lost_to_its_user(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_events = state.apply_events

    def fragile(s: state.UserState, events: list[Event], **kwargs: Any) -> Any:
        if any(e.event_id == "u-bad" for e in events):
            raise ValueError("cannot apply u-bad")
        return apply_events(s, events, **kwargs)

    monkeypatch.setattr(pipeline_module.state, "apply_events", fragile)
    h = Harness(policy=CART, now_ms=NOON)
    views = [Event(f"u-{n}", "u", "view", f"sku-{n}", NOON + n) for n in range(6)]
    views[3] = Event("u-bad", "u", "view", "sku-3", NOON + 3)
    batch = records(h, views)
    h.run(batch)
    [letter] = h.dead_letters()
    assert letter["source"]["offset"] == batch[3].offset
    [stored] = h.store.users[batch[0].partition].values()
    assert state.decode(stored).views == 5
    assert state.decode(stored).last_offset == batch[-1].offset


def test_an_abandoned_cart_is_reminded_of_its_whole_item_however_long() -> None:
    h = Harness(policy=CART, now_ms=NOON)
    items = {"ascii": "sku-" + "7" * 250, "multibyte": "x" + "\u00fc" * 40,
             "emoji": "\U0001f6d2" * 256}
    h.run(records(h, [cart_add(user, item=item) for user, item in items.items()]))
    h.now_ms += 61_000
    result = h.check_carts()
    reminders = {d["user_id"]: d for d in h.decisions() if d["trigger_event_id"].startswith(
        "cart:")}
    assert set(reminders) == set(items)
    for user, decision in reminders.items():
        assert decision["push"]["template"] == "cart_reminder"
        assert decision["push"]["items"][0] == items[user]
        assert decision["reasons"][0] == {"code": "cart_abandoned", "items": [items[user]]}
    assert result.partitions  # an exactly-once worker commits these transactions now
    h.check_carts()
    assert len([d for d in h.decisions() if d["trigger_event_id"].startswith("cart:")]) == 3
    assert h.store.due_carts(h.now_ms) == []


def reminders(h: Harness) -> list[dict[str, Any]]:
    return [d for d in h.decisions() if d["reasons"][0]["code"] == "cart_abandoned"]


def test_a_cart_is_reminded_once_when_due_and_not_before() -> None:
    h = Harness(policy=dataclasses.replace(CART, coupon_daily_cap=0), now_ms=NOON)
    h.run(records(h, [cart_add("abandoner")]))
    h.now_ms += 59_000
    h.check_carts()
    assert reminders(h) == []
    h.now_ms += 2_000
    h.check_carts()
    h.now_ms += 3_600_000
    h.check_carts()
    assert [(d["user_id"], d["action"]) for d in reminders(h)] == [("abandoner", "push")]


def test_an_opt_out_while_a_reminder_is_pending_silences_it() -> None:
    h = Harness(policy=CART, now_ms=NOON)
    h.run(records(h, [cart_add("changed-mind")]))
    h.set_preferences("changed-mind", contracts.Preferences(False, False))
    h.now_ms += 61_000
    h.check_carts()
    assert reminders(h) == []
    assert h.store.due_carts(h.now_ms) == []  # handled, not left to fire later


def test_a_cart_added_again_at_the_same_millisecond_is_a_new_reminder() -> None:
    # Found by the property test below: reminders were named by the cart's time, so a cart
    # re-added after its reminder, stamped with the same millisecond, repeated a decision id.
    h = Harness(policy=CART, now_ms=NOON + 120_000)
    h.run(records(h, [Event("first", "u", "add_to_cart", "sku-1", NOON)]))
    h.check_carts()
    h.run(records(h, [Event("again", "u", "add_to_cart", "sku-1", NOON)]))
    h.check_carts()
    reminders = [d for d in h.decisions() if d["reasons"][0]["code"] == "cart_abandoned"]
    assert [d["trigger_event_id"] for d in reminders] == ["cart:first", "cart:again"]
    assert len({d["decision_id"] for d in h.decisions()}) == len(h.decisions())


def test_a_purchase_in_time_closes_the_cart_and_its_entry() -> None:
    h = Harness(policy=CART, now_ms=NOON)
    h.run(records(h, [cart_add("buyer")]))
    assert len(h.store.due_carts(NOON)) == 1
    h.run(records(h, [Event("buyer-p", "buyer", "purchase", "sku-1", NOON + 5_000)]))
    assert h.store.due_carts(NOON + 10**9) == []
    h.now_ms += 61_000
    h.check_carts()
    assert not [d for d in h.decisions() if d["trigger_event_id"].startswith("cart:")]


def test_a_timer_decision_that_raises_is_dead_lettered_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    decide = policy.decide

    def broken(user_id: str, s: Any, vector: Any, trigger: contracts.Trigger, *args: Any,
               **kwargs: Any) -> Any:
        if trigger.kind == "cart_abandoned" and user_id == "unlucky":
            raise KeyError("broken reminder")
        return decide(user_id, s, vector, trigger, *args, **kwargs)

    monkeypatch.setattr(pipeline_module.policy, "decide", broken)
    h = Harness(policy=CART, now_ms=NOON)
    h.run(records(h, [cart_add("unlucky"), cart_add("lucky")]))
    h.now_ms += 61_000
    h.check_carts()
    h.now_ms += 5_000
    h.check_carts()  # the next tick does not fail again
    [letter] = h.dead_letters()
    assert letter["reason"] == "processing_error" and letter["exception"] == "KeyError"
    assert letter["source"]["topic"] == TIMER_SOURCE
    assert orjson.loads(base64.b64decode(letter["raw"]))["item"] == "sku-1"
    assert [d["user_id"] for d in h.decisions()
            if d["trigger_event_id"].startswith("cart:")] == ["lucky"]


def test_an_event_on_another_partition_is_forwarded_to_its_users_partition() -> None:
    h = Harness(policy=CART, now_ms=NOON, partitions=4)
    event = cart_add("crc32-placed")
    home = expected_partition(b"crc32-placed", 4)
    elsewhere = (home + 1) % 4
    result = h.run([h.record(event.user_id, event.to_json(), partition=elsewhere)])
    assert result.repartitioned == 1 and result.events == 0
    [forwarded] = h.sink.sent
    assert (forwarded.topic, forwarded.partition, forwarded.key) == (
        TOPICS.repartition, home, b"crc32-placed")
    assert h.store.users == {} and h.decisions() == []

    h.redeliver_forwarded()
    assert list(h.store.users[home]) == ["crc32-placed"]
    assert [d["user_id"] for d in h.decisions()] == ["crc32-placed"]
    # The repartition topic's offsets are tracked apart from `events`: a redelivered copy
    # (a crash before the commit) is recognised, however many there are.
    again = Consumed(TOPICS.repartition, home, 0, forwarded.key, forwarded.value)
    assert h.run([again]).events == 0
    assert h.metrics.records_redelivered._value.get() == 1
    assert h.dead_letters() == []


def test_events_of_a_user_from_both_topics_apply_once_each() -> None:
    h = Harness(policy=CART, now_ms=NOON, partitions=4)
    home = expected_partition(b"two-clients", 4)
    direct = [Event(f"d{n}", "two-clients", "view", "sku-2", NOON + n) for n in range(3)]
    placed_elsewhere = [Event(f"o{n}", "two-clients", "view", "sku-3", NOON + n)
                        for n in range(3)]
    h.run([h.record("two-clients", e.to_json()) for e in direct]
          + [h.record("two-clients", e.to_json(), partition=(home + 2) % 4)
             for e in placed_elsewhere])
    h.redeliver_forwarded()
    stored = state.decode(h.store.users[home]["two-clients"])
    assert stored.views == 6
    assert (stored.last_offset, stored.last_repartition_offset) == (2, 2)


# --- the handler never raises -----------------------------------------------------------------

ENCODER = tiny_encoder(ITEMS)
COUPONS = [Coupon("c1", value=2.0, budget=20.0, items=("sku-1", "sku-2")),
           Coupon("any", value=1.0, budget=5.0, max_exposures=3)]


def _garbage() -> st.SearchStrategy[tuple[bytes | None, bytes | None]]:
    """Records the contract rejects: any bytes, JSON of the wrong shape, null keys."""
    wrong = st.one_of(
        st.binary(max_size=64),
        st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                     | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=8).map(orjson.dumps),
        event_bodies().map(lambda b: orjson.dumps({**b, "ts": str(b["ts"])})),
        event_bodies().map(lambda b: orjson.dumps({k: v for k, v in b.items()
                                                   if k != "item_id"})),
        st.just(b"x").map(lambda b: b * 20_000))
    return st.tuples(st.one_of(st.none(), st.binary(max_size=8)), st.one_of(st.none(), wrong))


def _valid(users: list[str]) -> st.SearchStrategy[tuple[bytes, bytes]]:
    return event_bodies(user_id=st.sampled_from(users),
                        item_id=st.one_of(st.sampled_from(ITEMS), ids())).map(
        lambda b: (b["user_id"].encode(), orjson.dumps(b)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_handler_never_raises_and_accounts_for_every_record(data: st.DataObject) -> None:
    users = data.draw(st.lists(ids(40), min_size=1, max_size=6, unique=True))
    h = Harness(policy=CART, encoder=ENCODER, coupons=COUPONS, now_ms=NOW_MS, partitions=3)
    for user in users[: data.draw(st.integers(0, len(users)))]:
        h.set_preferences(user, data.draw(st.builds(
            contracts.Preferences, st.booleans(), st.booleans(),
            st.sampled_from([None, "Europe/Berlin", "Not/AZone"]))))
    for _batch in range(data.draw(st.integers(1, 4))):
        raw = data.draw(st.lists(st.one_of(_valid(users), _garbage()), max_size=25))
        misplace = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
        batch = [h.record(key, value, partition=(
            (expected_partition(key, 3) + 1) % 3 if key and wrong else None))
            for (key, value), wrong in zip(raw, misplace, strict=True)]
        result = h.run(batch)
        forwarded = h.redeliver_forwarded()
        assert result.events + result.rejected + result.repartitioned == len(batch)
        assert forwarded.events + forwarded.rejected == result.repartitioned
        h.now_ms += data.draw(st.integers(0, 3_600_000))
        h.check_carts()
    assert not [d for d in h.dead_letters() if d["reason"] == "processing_error"]
    for mine in h.store.users.values():
        for raw_state in mine.values():
            assert len(raw_state) <= state.encoded_size_bound()
            assert state.encode(state.decode(raw_state)) == raw_state
    ids_seen = [d["decision_id"] for d in h.decisions()]
    assert len(ids_seen) == len(set(ids_seen))


def test_a_holdout_user_is_capped_as_if_the_decisions_had_been_sent() -> None:
    # Both arms must be decided under the same caps, or a campaign's holdout decisions would
    # be every trigger while its treatment decisions are the first of each day.
    everyone_held_out = dataclasses.replace(CART, holdout_percent=100)
    outcomes_by_arm: dict[str, tuple[str, str, list[str]]] = {}
    for name, config in (("holdout", everyone_held_out), ("treatment", CART)):
        h = Harness(policy=config, now_ms=NOON, coupons=[Coupon("c", 1.0, 100.0)])
        h.run(records(h, [cart_add("u", 0)]))
        h.now_ms += 60_000
        h.run(records(h, [cart_add("u", 1, ts=NOON + 60_000)]))
        first, second = h.decisions()
        assert first["arm"] == second["arm"] == name
        outcomes_by_arm[name] = (first["action"], second["action"],
                                 [r["code"] for r in second["reasons"]])
    assert outcomes_by_arm["holdout"] == outcomes_by_arm["treatment"]
    assert outcomes_by_arm["holdout"][0] == "coupon"
    assert "coupon_daily_cap" in outcomes_by_arm["holdout"][2]


# --- the pull API's preview and claim (stream/api.py serves them) -----------------------------

WELCOME = Coupon("welcome", 5.0, budget=10.0)  # two coupons' worth, store-wide


def known_users(h: Harness, n: int) -> list[str]:
    """``n`` users with a few views each, applied (no triggers fired: views of distinct items)."""
    users = [f"shopper-{i}" for i in range(n)]
    h.run(records(h, [Event(f"{u}-v{k}", u, "view", ITEMS[k], NOON - 60_000 + k)
                      for u in users for k in range(4)]))
    return users


def test_a_preview_is_what_decide_returns_for_the_same_state_and_changes_nothing() -> None:
    h = Harness(policy=CART, now_ms=NOON, encoder=tiny_encoder(ITEMS), coupons=[WELCOME])
    users = known_users(h, 6)
    before = (dict(h.store.users), dict(h.store.budgets), len(h.sink.sent))
    for user in [*users, "never-seen"]:
        partition = expected_partition(user.encode(), h.partitions)
        preview = h.pipeline.preview(user, partition)
        raw = h.store.users.get(partition, {}).get(user)
        s = state.decode(raw) if raw else state.UserState()
        # The vector the serving model made (a vector of another model is not used).
        vector = s.vector if s.model_version == h.model.encoder.model_version else None
        ctx = policy.Context(config=CART, coupons={"welcome": WELCOME},
                             budgets={"welcome": policy.partition_budget(WELCOME, partition, 2)},
                             model=h.model.encoder, now_ms=NOON)
        expected = policy.decide(user, s, vector, contracts.Trigger(
            contracts.TriggerKind.ON_SITE, "preview", (), NOON), None, ctx,
            vector_stale=vector is not None and s.vector_stale)
        assert preview.decision == expected
        assert preview.known == (raw is not None)
    assert (dict(h.store.users), dict(h.store.budgets), len(h.sink.sent)) == before


def test_a_claim_publishes_one_decision_per_idempotency_key_and_spends_budget_once() -> None:
    h = Harness(policy=CART, now_ms=NOON, encoder=tiny_encoder(ITEMS), coupons=[WELCOME])
    [user] = known_users(h, 1)
    partition = expected_partition(user.encode(), h.partitions)
    claim = pipeline_module.Claim(partition, user, "order-1")
    first = asyncio_run(h.pipeline.claim(claim, remember_ms=86_400_000))
    again = asyncio_run(h.pipeline.claim(claim, remember_ms=86_400_000))
    assert first.decision is not None and not first.replayed
    assert again.replayed and again.decision == first.decision
    published = [d for d in h.decisions() if d["trigger_event_id"] == "claim:order-1"]
    assert published == [first.decision]
    assert first.decision["action"] == "coupon"
    assert orjson.loads(h.store.budgets[partition]["welcome"])["exposures"] == 1
    assert first.decision["decision_id"] in {o for o in _pending_ids(h)}  # attribution opened


def test_claims_never_spend_more_than_the_budget() -> None:
    h = Harness(policy=dataclasses.replace(CART, coupon_min_interval_seconds=0,
                                           coupon_daily_cap=100),
                now_ms=NOON, encoder=tiny_encoder(ITEMS), coupons=[WELCOME])
    users = known_users(h, 12)
    coupons = 0
    for n, user in enumerate(users):
        partition = expected_partition(user.encode(), h.partitions)
        answer = asyncio_run(h.pipeline.claim(pipeline_module.Claim(partition, user, f"k{n}"),
                                              remember_ms=86_400_000))
        coupons += answer.decision is not None and answer.decision["action"] == "coupon"
    spent = sum(orjson.loads(b["welcome"])["spent"] for b in h.store.budgets.values()
                if "welcome" in b)
    assert spent <= WELCOME.budget and coupons == spent / WELCOME.value >= 1


def test_a_claim_after_the_key_is_forgotten_decides_again_under_the_same_id() -> None:
    h = Harness(policy=CART, now_ms=NOON, encoder=tiny_encoder(ITEMS))
    [user] = known_users(h, 1)
    claim = pipeline_module.Claim(expected_partition(user.encode(), 2), user, "k")
    first = asyncio_run(h.pipeline.claim(claim, remember_ms=60_000))
    h.now_ms += 61_000
    later = asyncio_run(h.pipeline.claim(claim, remember_ms=60_000))
    assert not later.replayed
    assert later.decision is not None and first.decision is not None
    assert later.decision["decision_id"] == first.decision["decision_id"]


def _pending_ids(h: Harness) -> set[str]:
    return {orjson.loads(raw)["decision_id"] for mine in h.store.pending.values()
            for raw in mine.values()}


def asyncio_run(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)
