"""Per-user state: bounded, compact, de-duplicated, and a pure function of the arrival order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoder.vocab import item_key
from stream.contracts import Action, Arm, Event
from stream.state import (
    DEDUP_WINDOW,
    MAX_PENDING,
    TYPE_ID,
    PendingWindow,
    StateFormatError,
    UserState,
    apply_events,
    decode,
    encode,
    encoded_size_bound,
    open_cart_event,
)
from tests.strategies import events, ids

T0 = 1_760_000_000_000


def ev(n: int, kind: str = "view", item: str | None = None, ts: int | None = None,
       price: float | None = None, event_id: str | None = None) -> Event:
    return Event(event_id=event_id or f"e{n}", user_id="u", type=kind, item_id=item or f"i{n}",
                 ts=T0 + n * 1000 if ts is None else ts, price=price)


def test_events_are_kept_in_time_order_with_types() -> None:
    s = UserState()
    applied, dups = apply_events(s, [ev(1), ev(2, "add_to_cart"), ev(3, "purchase")])
    assert (len(applied), dups) == (3, [])
    assert list(s.items) == [item_key("i1"), item_key("i2"), item_key("i3")]
    assert list(s.types) == [TYPE_ID["view"], TYPE_ID["add_to_cart"], TYPE_ID["purchase"]]
    assert list(s.ts_s) == [(T0 + k * 1000) // 1000 for k in (1, 2, 3)]


def test_a_late_event_is_inserted_where_its_time_belongs() -> None:
    s = UserState()
    apply_events(s, [ev(1), ev(5)])
    apply_events(s, [ev(3)])
    assert list(s.items) == [item_key("i1"), item_key("i3"), item_key("i5")]


def test_duplicate_event_ids_are_reported_and_not_applied() -> None:
    s = UserState()
    apply_events(s, [ev(1), ev(2)])
    applied, dups = apply_events(s, [ev(2), ev(3), ev(3)])
    assert [e.event_id for e in applied] == ["e3"]
    assert [e.event_id for e in dups] == ["e2", "e3"]
    assert s.views == 3


def test_the_sequence_and_dedup_memory_are_bounded() -> None:
    s = UserState()
    apply_events(s, [ev(n) for n in range(200)], max_len=50)
    assert len(s.items) == len(s.types) == len(s.ts_s) == 50
    assert s.items[-1] == item_key("i199")
    assert len(s.recent_event_ids) == DEDUP_WINDOW
    assert s.views == 200  # counters count everything


def test_counters_spend_and_the_open_cart() -> None:
    s = UserState()
    applied, _ = apply_events(s, [ev(1, "add_to_cart", "a"), ev(2, "click")])
    opened = open_cart_event(s, applied)
    assert (s.cart_open, s.cart_ts_ms, opened and opened.item_id) == (True, T0 + 1000, "a")
    apply_events(s, [ev(3, "purchase", "a", price=12.5)])
    assert not s.cart_open
    assert (s.carts, s.clicks, s.purchases, s.spend) == (1, 1, 1, 12.5)


def test_spend_is_the_order_value_when_the_purchase_names_one() -> None:
    # A producer may send the order's value and no price: the policy's margin reads spend.
    s = UserState()
    apply_events(s, [replace(ev(1, "purchase", "a"), value=40.0, quantity=3),
                     replace(ev(2, "purchase", "b", price=2.0), quantity=3)])
    assert (s.purchases, s.spend) == (2, 46.0)


def test_a_purchase_older_than_the_cart_does_not_close_it() -> None:
    s = UserState()
    apply_events(s, [ev(5, "add_to_cart", "b")])
    applied, _ = apply_events(s, [ev(2, "purchase", "x")])
    assert s.cart_open
    assert open_cart_event(s, applied) is None  # opened by the batch before


def test_a_new_cart_add_rearms_the_abandonment_reminder() -> None:
    s = UserState()
    apply_events(s, [ev(1, "add_to_cart", "a")])
    s.cart_reminded = True
    applied, _ = apply_events(s, [ev(2, "add_to_cart", "b")])
    opened = open_cart_event(s, applied)
    assert (s.cart_open, s.cart_reminded, opened and opened.item_id) == (True, False, "b")


def test_the_open_cart_is_the_latest_cart_add_not_the_last_to_arrive() -> None:
    s = UserState()
    applied, _ = apply_events(s, [ev(5, "add_to_cart", "new"), ev(3, "add_to_cart", "late")])
    opened = open_cart_event(s, applied)
    assert opened is not None and opened.item_id == "new" and s.cart_ts_ms == T0 + 5000


def test_encoding_round_trips_every_field() -> None:
    s = UserState()
    apply_events(s, [ev(n, kind) for n, kind in enumerate(["view", "add_to_cart", "click"])])
    s.vector = np.linspace(-1, 1, 64).astype(np.float16)
    s.model_version = "abc123def4567890"
    s.vector_events = 3
    s.cart_reminded = True
    s.last_offset = 2**40 + 7
    s.last_repartition_offset = 12
    s.channels["push"].record_send(T0)
    back = decode(encode(s))
    assert (back.last_offset, back.last_repartition_offset) == (2**40 + 7, 12)
    assert encode(back) == encode(s)
    assert back.cart_open and back.cart_reminded
    assert back.model_version == "abc123def4567890"
    assert np.array_equal(back.vector, s.vector)
    assert back.channels["push"].sends_on(T0 // 86_400_000) == 1
    assert list(back.items) == list(s.items) and list(back.ts_s) == list(s.ts_s)


def test_a_full_record_is_under_one_kilobyte() -> None:
    s = UserState()
    apply_events(s, [ev(n, "add_to_cart", item=f"sku-{n:012d}") for n in range(300)])
    s.vector = np.ones(64, np.float16)
    s.model_version = "abcdefabcdef0123"
    size = len(encode(s))
    assert size <= encoded_size_bound() < 1024, size


def test_a_full_record_with_every_attribution_window_is_under_one_kilobyte() -> None:
    s = UserState()
    apply_events(s, [ev(n, "add_to_cart", item=f"sku-{n:012d}") for n in range(300)])
    s.vector = np.ones(64, np.float16)
    s.model_version = "abcdefabcdef0123"
    s.pending = [PendingWindow(f"{n:016x}", 1_780_000_000 + n, arm, action)
                 for n, (arm, action) in enumerate([(Arm.TREATMENT, Action.COUPON),
                                                    (Arm.HOLDOUT, Action.NONE),
                                                    (Arm.TREATMENT, Action.PUSH),
                                                    (Arm.HOLDOUT, Action.PUSH)])]
    data = encode(s)
    assert len(data) <= encoded_size_bound() < 1024, len(data)
    assert decode(data).pending == s.pending
    assert len(s.pending) == MAX_PENDING


def test_a_format_3_record_still_reads_with_no_windows() -> None:
    s = UserState()
    apply_events(s, [ev(n, "view") for n in range(5)])
    s.vector = np.ones(8, np.float16)
    v4 = encode(s)
    v3 = bytes([3]) + v4[1:5] + v4[6:]  # format 3 had no window count in its header
    back = decode(v3)
    assert back.pending == [] and encode(back) == v4


def test_a_multibyte_cart_item_never_breaks_the_record() -> None:
    # 41 characters, 81 UTF-8 bytes: the first version cut it at 64 bytes, mid-character,
    # and the next decode raised UnicodeDecodeError on every restart.
    s = UserState()
    item = "x" + "\u00fc" * 40
    applied, _ = apply_events(s, [ev(1, "add_to_cart", item)])
    back = decode(encode(s))
    assert back.cart_open and encode(back) == encode(s)
    opened = open_cart_event(s, applied)
    assert opened is not None and opened.item_id == item  # whole, for the open-carts table


@pytest.mark.parametrize("damage", [b"", b"\x02" + bytes(120), b"\x03" + bytes(10)])
def test_a_record_of_another_format_or_size_is_a_clear_error(damage: bytes) -> None:
    with pytest.raises(StateFormatError, match="user state"):
        decode(damage)
    full = encode(UserState())
    with pytest.raises(StateFormatError, match="bytes"):
        decode(full + b"\0")


@settings(max_examples=200, deadline=None)
@given(history=st.lists(events(user_id=st.just("u")), max_size=70),
       vector=st.booleans(), version=st.sampled_from(["", "0123456789abcdef", "not-hex"]))
def test_any_contract_events_round_trip_within_the_bound(history: list[Event], vector: bool,
                                                         version: str) -> None:
    s = UserState()
    for start in range(0, len(history), 7):  # several batches, as the worker applies them
        applied, _ = apply_events(s, history[start:start + 7])
        opened = open_cart_event(s, applied)
        assert opened is None or opened in applied
    if vector:
        s.vector = np.linspace(-3, 3, 64).astype(np.float16)
        s.model_version = version
    data = encode(s)
    assert len(data) <= encoded_size_bound() < 1024
    back = decode(data)
    assert encode(back) == data
    assert (back.views, back.clicks, back.carts, back.purchases, back.spend) == (
        s.views, s.clicks, s.carts, s.purchases, s.spend)
    assert (back.cart_open, back.cart_ts_ms) == (s.cart_open, s.cart_ts_ms)
    assert list(back.items) == list(s.items) and list(back.ts_s) == list(s.ts_s)
    assert back.recent_event_ids == s.recent_event_ids


@settings(max_examples=50, deadline=None)
@given(item=ids())
def test_any_cart_item_id_is_reported_whole(item: str) -> None:
    s = UserState()
    applied, _ = apply_events(s, [ev(1, "add_to_cart", item)])
    opened = open_cart_event(decode(encode(s)), applied)
    assert opened is not None and opened.item_id == item


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_state_does_not_depend_on_batch_boundaries(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 80))
    kinds = data.draw(st.lists(st.sampled_from(["view", "click", "add_to_cart", "purchase"]),
                               min_size=n, max_size=n))
    jitter = data.draw(st.lists(st.integers(-5000, 5000), min_size=n, max_size=n))
    repeats = data.draw(st.lists(st.integers(0, n - 1), max_size=10))
    events = [ev(k, kinds[k], item=f"i{k % 7}", ts=T0 + k * 1000 + jitter[k]) for k in range(n)]
    events += [events[r] for r in repeats]  # redeliveries
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=6)))
    whole = UserState()
    apply_events(whole, events)
    pieces = UserState()
    start = 0
    for cut in [*cuts, len(events)]:
        apply_events(pieces, events[start:cut])
        pieces = decode(encode(pieces))  # each batch ends with a write and a read
        start = cut
    assert encode(pieces) == encode(whole)
