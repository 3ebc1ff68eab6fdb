"""The event contract: what is accepted, and the named reason for everything that is not."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.contracts import (
    Event,
    Limits,
    Reason,
    Rejection,
    dead_letter,
    parse_event,
)

NOW = 1_760_000_000_000
GOOD = {"event_id": "e1", "user_id": "u1", "type": "add_to_cart", "item_id": "sku-1",
        "ts": NOW - 1000}


DEFAULT_LIMITS = Limits()


def parse(body: object, key: bytes | None = b"u1",
          limits: Limits = DEFAULT_LIMITS) -> Event | Rejection:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_event(raw, key, now_ms=NOW, limits=limits)


def reason_of(body: object, key: bytes | None = b"u1", limits: Limits = DEFAULT_LIMITS) -> Reason:
    result = parse(body, key, limits)
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    return result.reason


def test_a_well_formed_event_parses_with_all_fields() -> None:
    body = {**GOOD, "price": 9.5, "quantity": 2, "category": "snacks", "session_id": "s1",
            "schema_version": 1}
    event = parse(body)
    assert event == Event(event_id="e1", user_id="u1", type="add_to_cart", item_id="sku-1",
                          ts=NOW - 1000, price=9.5, quantity=2, category="snacks",
                          session_id="s1", schema_version=1)


def test_unknown_fields_are_ignored_and_optional_fields_default() -> None:
    event = parse({**GOOD, "colour": "red", "nested": {"a": [1, 2]}})
    assert isinstance(event, Event)
    assert (event.price, event.quantity, event.category, event.schema_version) == (
        None, None, None, 1)


def test_integer_prices_are_accepted_as_floats() -> None:
    event = parse({**GOOD, "price": 3})
    assert isinstance(event, Event) and event.price == 3.0 and isinstance(event.price, float)


def test_to_json_round_trips() -> None:
    event = parse({**GOOD, "price": 1.25, "category": "c"})
    assert isinstance(event, Event)
    assert parse(event.to_json()) == event


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", Reason.NOT_JSON),
    (b"", Reason.NOT_JSON),
    (b"\xff\xfe garbage", Reason.NOT_JSON),
    (b'{"event_id": "\xed\xa0\x80"}', Reason.NOT_JSON),  # a lone surrogate is not UTF-8
    (b"[1, 2]", Reason.NOT_AN_OBJECT),
    (b'"text"', Reason.NOT_AN_OBJECT),
    (b"null", Reason.NOT_AN_OBJECT),
])
def test_bytes_that_are_not_a_json_object_are_rejected(raw: bytes, reason: Reason) -> None:
    assert reason_of(raw) is reason


def test_a_tombstone_is_rejected_not_crashed_on() -> None:
    result = parse_event(None, b"u1", now_ms=NOW)
    assert isinstance(result, Rejection) and result.reason is Reason.NOT_JSON


def test_records_over_the_size_limit_are_rejected_before_parsing() -> None:
    body = {**GOOD, "padding": "x" * 200}
    assert reason_of(body, limits=Limits(max_record_bytes=100)) is Reason.RECORD_TOO_LARGE
    assert isinstance(parse(body), Event)


@pytest.mark.parametrize("field", ["event_id", "user_id", "type", "item_id", "ts"])
def test_each_missing_required_field_is_named(field: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != field}
    result = parse(body)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.MISSING_FIELD and field in result.error
    assert reason_of({**GOOD, field: None}) is Reason.MISSING_FIELD


@pytest.mark.parametrize(("field", "value"), [
    ("user_id", 42), ("event_id", ["e"]), ("item_id", {"id": 1}), ("type", 3),
    ("ts", "1760000000000"), ("ts", 1.76e12), ("ts", True),
    ("price", "9.99"), ("price", True), ("quantity", 1.5), ("quantity", "2"),
    ("category", 7), ("session_id", False), ("schema_version", "1"),
    ("coupon_id", 5), ("coupon_id", ["c"]), ("value", "42"), ("value", False),
])
def test_wrong_types_are_rejected(field: str, value: object) -> None:
    result = parse({**GOOD, field: value})
    assert isinstance(result, Rejection)
    assert result.reason is Reason.WRONG_TYPE and field in result.error


@pytest.mark.parametrize(("field", "value"), [
    ("event_id", ""), ("user_id", "   "), ("item_id", "x" * 300),
    ("price", -1), ("quantity", 0), ("coupon_id", ""), ("coupon_id", "c" * 257),
    ("value", -0.01),
])
def test_invalid_values_are_rejected(field: str, value: object) -> None:
    assert reason_of({**GOOD, field: value}) is Reason.INVALID_VALUE


def test_a_purchase_may_name_its_coupon_and_its_value() -> None:
    event = parse({**GOOD, "type": "purchase", "coupon_id": "five-off", "value": 42,
                   "price": 3.0, "quantity": 2})
    assert isinstance(event, Event)
    assert (event.coupon_id, event.value, event.worth) == ("five-off", 42.0, 42.0)
    without = parse({**GOOD, "type": "purchase", "price": 3.0, "quantity": 2})
    assert isinstance(without, Event) and without.worth == 6.0
    assert parse(event.to_json()) == event  # what the simulator and tests produce reads back


def test_unknown_event_types_are_rejected() -> None:
    assert reason_of({**GOOD, "type": "remove_from_cart"}) is Reason.UNKNOWN_EVENT_TYPE


@pytest.mark.parametrize("event_type", ["view", "click", "add_to_cart", "purchase"])
def test_every_contract_event_type_is_accepted(event_type: str) -> None:
    assert isinstance(parse({**GOOD, "type": event_type}), Event)


def test_newer_schema_versions_are_rejected() -> None:
    assert reason_of({**GOOD, "schema_version": 2}) is Reason.UNSUPPORTED_SCHEMA_VERSION


def test_timestamps_beyond_the_allowed_skew_are_rejected() -> None:
    limits = Limits(max_future_skew_ms=60_000)
    assert isinstance(parse({**GOOD, "ts": NOW + 59_000}, limits=limits), Event)
    assert reason_of({**GOOD, "ts": NOW + 61_000}, limits=limits) is Reason.FUTURE_TIMESTAMP


def test_timestamps_in_seconds_or_before_the_floor_are_ancient() -> None:
    assert reason_of({**GOOD, "ts": NOW // 1000}) is Reason.ANCIENT_TIMESTAMP
    assert reason_of({**GOOD, "ts": -5}) is Reason.ANCIENT_TIMESTAMP


@pytest.mark.parametrize("key", [None, b"u2", b""])
def test_the_record_key_must_equal_the_user_id(key: bytes | None) -> None:
    assert reason_of(GOOD, key=key) is Reason.KEY_MISMATCH


def test_dead_letter_records_carry_reason_source_and_raw_bytes() -> None:
    raw = b"\x00not json"
    rejection = parse_event(raw, b"k", now_ms=NOW)
    assert isinstance(rejection, Rejection)
    record = orjson.loads(dead_letter(rejection, raw=raw, key=b"k", topic="events", partition=3,
                                      offset=17, at_ms=NOW))
    assert record["reason"] == "not_json" and record["error"]
    assert record["source"] == {"topic": "events", "partition": 3, "offset": 17}
    assert base64.b64decode(record["raw"]) == raw
    assert base64.b64decode(record["key"]) == b"k"
    assert record["at"] == NOW


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                      max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), key=st.none() | st.binary(max_size=20))
def test_arbitrary_bytes_never_raise(raw: bytes, key: bytes | None) -> None:
    assert isinstance(parse_event(raw, key, now_ms=NOW), Event | Rejection)


@settings(max_examples=300, deadline=None)
@given(overrides=st.dictionaries(st.sampled_from([*GOOD, "price", "quantity", "category",
                                                  "session_id", "schema_version"]),
                                 json_values, max_size=4))
def test_arbitrary_field_values_never_raise_and_valid_results_honour_the_contract(
        overrides: dict[str, object]) -> None:
    body = {**GOOD, **overrides}
    key = body["user_id"].encode() if isinstance(body.get("user_id"), str) else b"u1"
    try:
        raw = orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits are not JSON orjson writes
        return
    result = parse_event(raw, key, now_ms=NOW)
    if isinstance(result, Event):
        assert result.type in ("view", "click", "add_to_cart", "purchase")
        assert isinstance(result.ts, int) and result.ts <= NOW + Limits().max_future_skew_ms
        assert result.price is None or result.price >= 0
