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
    check_event,
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


# --- the fast decoder and the reference checker agree on everything --------------------------


def body_bytes(*, drop: str | None = None, tail: bytes = b"", **fields: object) -> bytes:
    """GOOD with ``fields`` over it, without ``drop``, and raw JSON text ``tail`` spliced in
    before the closing brace (for literals orjson would not write: a duplicate key, a number
    past 64 bits or past a double, a lone surrogate escape)."""
    body = {name: value for name, value in {**GOOD, **fields}.items() if name != drop}
    return orjson.dumps(body)[:-1] + tail + b"}"


# Every way the contract rejects a record, with the reason and message it had before msgspec
# decoded the fast path (orjson's own messages by their stem: the column varies by version).
REJECTIONS = [
    ("tombstone", None, b"u1", Reason.NOT_JSON, "record has no value (tombstone)"),
    ("too large", body_bytes(category="c" * 20000), b"u1", Reason.RECORD_TOO_LARGE,
     "20104 bytes > limit 16384"),
    ("truncated JSON", b'{"event_id": "e1"', b"u1", Reason.NOT_JSON, "unexpected end of data"),
    ("not UTF-8", b'{"event_id": "\xff"}', b"u1", Reason.NOT_JSON, "str is not valid UTF-8"),
    ("lone surrogate", body_bytes(tail=b',"category":"\\ud800"'), b"u1", Reason.NOT_JSON,
     "no low surrogate in string"),
    ("nested past orjson's depth", body_bytes(tail=b',"x":' + b"[" * 2000 + b"]" * 2000),
     b"u1", Reason.NOT_JSON, "depth limit exceeded"),
    ("a number past a double", body_bytes(tail=b',"price":1e400'), b"u1", Reason.NOT_JSON,
     "number is infinity when parsed as double"),
    ("not UTF-8 in an unknown field", body_bytes(tail=b',"x":"\xff"'), b"u1", Reason.NOT_JSON,
     "str is not valid UTF-8"),
    ("an unknown field past a double", body_bytes(tail=b',"x":1e400'), b"u1", Reason.NOT_JSON,
     "number is infinity when parsed as double"),
    ("array", b"[1, 2]", b"u1", Reason.NOT_AN_OBJECT, "top-level JSON is list"),
    ("string", b'"event"', b"u1", Reason.NOT_AN_OBJECT, "top-level JSON is str"),
    ("missing event_id", body_bytes(drop="event_id"), b"u1", Reason.MISSING_FIELD,
     "event_id is missing"),
    ("missing ts", body_bytes(drop="ts"), b"u1", Reason.MISSING_FIELD, "ts is missing"),
    ("null user_id", body_bytes(user_id=None), b"u1", Reason.MISSING_FIELD,
     "user_id is missing"),
    ("numeric user_id", body_bytes(user_id=7), b"7", Reason.WRONG_TYPE,
     "user_id must be a string, not int"),
    ("empty event_id", body_bytes(event_id=""), b"u1", Reason.INVALID_VALUE,
     "event_id is empty"),
    ("blank item_id", body_bytes(item_id="   "), b"u1", Reason.INVALID_VALUE,
     "item_id is empty"),
    ("item_id too long", body_bytes(item_id="i" * 257), b"u1", Reason.INVALID_VALUE,
     "item_id is 257 chars > 256"),
    ("numeric category", body_bytes(category=5), b"u1", Reason.WRONG_TYPE,
     "category must be a string, not int"),
    ("empty coupon_id", body_bytes(coupon_id=""), b"u1", Reason.INVALID_VALUE,
     "coupon_id is empty"),
    ("list session_id", body_bytes(session_id=["s"]), b"u1", Reason.WRONG_TYPE,
     "session_id must be a string, not list"),
    ("float ts", body_bytes(ts=1.5e12), b"u1", Reason.WRONG_TYPE,
     "ts must be integer epoch milliseconds, not float"),
    ("boolean ts", body_bytes(ts=True), b"u1", Reason.WRONG_TYPE,
     "ts must be integer epoch milliseconds, not bool"),
    ("string ts", body_bytes(ts="1760000000000"), b"u1", Reason.WRONG_TYPE,
     "ts must be integer epoch milliseconds, not str"),
    ("ts past 64 bits", body_bytes(tail=b',"ts":18446744073709551616'), b"u1",
     Reason.WRONG_TYPE, "ts must be integer epoch milliseconds, not float"),
    ("string price", body_bytes(price="9.99"), b"u1", Reason.WRONG_TYPE,
     "price must be a number, not str"),
    ("negative price", body_bytes(price=-1), b"u1", Reason.INVALID_VALUE,
     "price must be >= 0, got -1"),
    ("negative value", body_bytes(value=-0.5), b"u1", Reason.INVALID_VALUE,
     "value must be >= 0, got -0.5"),
    ("boolean value", body_bytes(value=False), b"u1", Reason.WRONG_TYPE,
     "value must be a number, not bool"),
    ("float quantity", body_bytes(quantity=1.0), b"u1", Reason.WRONG_TYPE,
     "quantity must be an integer, not float"),
    ("zero quantity", body_bytes(quantity=0), b"u1", Reason.INVALID_VALUE,
     "quantity must be >= 1, got 0"),
    ("quantity past 64 bits", body_bytes(tail=b',"quantity":18446744073709551616'), b"u1",
     Reason.WRONG_TYPE, "quantity must be an integer, not float"),
    ("string schema_version", body_bytes(schema_version="1"), b"u1", Reason.WRONG_TYPE,
     "schema_version must be an integer"),
    ("null schema_version", body_bytes(schema_version=None), b"u1", Reason.WRONG_TYPE,
     "schema_version must be an integer"),
    ("unknown type", body_bytes(type="buy"), b"u1", Reason.UNKNOWN_EVENT_TYPE,
     "type 'buy' is not one of view, click, add_to_cart, purchase"),
    ("schema_version 2", body_bytes(schema_version=2), b"u1", Reason.UNSUPPORTED_SCHEMA_VERSION,
     "schema_version 2 (this worker reads 1)"),
    ("future ts", body_bytes(ts=NOW + 301_000), b"u1", Reason.FUTURE_TIMESTAMP,
     "ts 1760000301000 is 301s ahead of the worker's clock"),
    ("ts in seconds", body_bytes(ts=1_760_000_000), b"u1", Reason.ANCIENT_TIMESTAMP,
     "ts 1760000000 is before 631152000000 (seconds sent as ms?)"),
    ("no key", body_bytes(), None, Reason.KEY_MISMATCH, "record key null must equal user_id"),
    ("another user's key", body_bytes(), b"u2", Reason.KEY_MISMATCH,
     "record key b'u2' must equal user_id"),
    ("empty key", body_bytes(), b"", Reason.KEY_MISMATCH, "record key b'' must equal user_id"),
]


@pytest.mark.parametrize(("raw", "key", "reason", "error"),
                         [case[1:] for case in REJECTIONS], ids=[case[0] for case in REJECTIONS])
def test_every_rejection_keeps_its_documented_reason_and_message(
        raw: bytes | None, key: bytes | None, reason: Reason, error: str) -> None:
    result = parse_event(raw, key, now_ms=NOW)
    assert isinstance(result, Rejection)
    assert (result.reason, result.error[:len(error)]) == (reason, error)
    assert result == check_event(raw, key, now_ms=NOW)


def test_the_table_names_every_reason_a_record_alone_can_have() -> None:
    decided_by_state = {Reason.DUPLICATE_EVENT, Reason.PROCESSING_ERROR}
    assert {case[3] for case in REJECTIONS} == set(Reason) - decided_by_state


@pytest.mark.parametrize("raw", [
    body_bytes(tail=b',"user_id":"u2","user_id":"u1"'),  # a repeated key: the last one counts
    body_bytes(tail=b',"user\\u005fid":"u1"'),  # an escaped field name
    body_bytes(price=3, quantity=2**64 - 1, value=-0.0),  # an integer price is a float
    body_bytes(tail=b',"x":{"a":[1,{"b":null}],"c":"\\u00e9"}'),
], ids=["repeated key", "escaped name", "number edges", "nested unknown field"])
def test_edge_cases_of_json_decode_the_same_on_both_paths(raw: bytes) -> None:
    result = parse_event(raw, b"u1", now_ms=NOW)
    assert isinstance(result, Event)
    assert result == check_event(raw, b"u1", now_ms=NOW)


# JSON literals orjson would not write from Python values, spliced into a good body, in known
# fields and in unknown ones (which msgspec skips more leniently than orjson reads them).
raw_literals = st.sampled_from([
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775809", b"1e400",
    b"-0.0", b"1.0", b"0", b"1", b"true", b"null", b'"\\ud800"', b'"\\u0000"', b'"  "',
    b'""', b"[]", b"{}", b'"view"', b"1760000000000", b'"\xff"', b'"\xc3\xa9"', b"1E+308",
    b"1e308", b"2e-400", b"1" + b"0" * 400, b"[1e400]", b'{"a":"\xfe"}',
])


@settings(max_examples=600, deadline=None)
@given(overrides=st.dictionaries(st.sampled_from([*GOOD, "price", "quantity", "category",
                                                  "session_id", "schema_version", "coupon_id",
                                                  "value"]), json_values, max_size=4),
       spliced=st.lists(st.tuples(st.sampled_from([*GOOD, "price", "quantity", "value",
                                                   "schema_version", "category", "x-extra"]),
                                  raw_literals), max_size=2),
       key=st.sampled_from([b"u1", b"u2", None]))
def test_the_fast_decoder_returns_exactly_what_the_reference_checker_does(
        overrides: dict[str, object], spliced: list[tuple[str, bytes]],
        key: bytes | None) -> None:
    try:
        raw = body_bytes(**overrides)
    except TypeError:  # integers beyond 64 bits are not JSON orjson writes: spliced instead
        return
    raw = raw[:-1] + b"".join(b',"%s":%s' % (name.encode(), text) for name, text in spliced) + b"}"
    assert parse_event(raw, key, now_ms=NOW) == check_event(raw, key, now_ms=NOW)
