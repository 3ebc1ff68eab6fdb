"""The event contract: bytes from `events` become an :class:`Event` or a :class:`Rejection`.

Producers send one JSON object per record, keyed by ``user_id`` (UTF-8)::

    {"event_id": "e-1", "user_id": "u42", "type": "add_to_cart", "item_id": "sku-7",
     "ts": 1732000000000, "price": 9.99, "quantity": 1, "category": "snacks",
     "session_id": "s-1", "schema_version": 1}

Required: ``event_id``, ``user_id``, ``type``, ``item_id`` (non-empty strings) and ``ts`` (event
time, integer epoch milliseconds). Optional: ``price`` (number >= 0), ``quantity`` (integer >= 1),
``category``, ``session_id`` (strings), ``schema_version`` (integer, default 1). Unknown fields
are ignored, so producers can add fields before consumers know them.

Parsing never raises: every way a record can be wrong has a named :class:`Reason`, so a bad
record is routed to the dead-letter topic with that reason and counted, and the worker goes on.
The order of the checks is the order of the reasons below; the first failure is reported.
"""

from __future__ import annotations

import base64
import enum
import math
from dataclasses import dataclass
from typing import Any

import orjson

from encoder.data import EVENT_TYPES
from stream.config import ContractSettings

SCHEMA_VERSION = 1
MAX_ID_LENGTH = 256


class Reason(enum.StrEnum):
    """Why a record was rejected. The values are metric labels and DLQ fields: keep them stable."""

    RECORD_TOO_LARGE = "record_too_large"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    FUTURE_TIMESTAMP = "future_timestamp"
    ANCIENT_TIMESTAMP = "ancient_timestamp"
    KEY_MISMATCH = "key_mismatch"
    # Decided by the user's state, not by the record alone: an event_id already applied.
    DUPLICATE_EVENT = "duplicate_event"
    # Valid, but processing it raised (retried first): kept here instead of crashing, with
    # the exception's type, so the worker never stops or loops on one record.
    PROCESSING_ERROR = "processing_error"


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    type: str
    item_id: str
    ts: int
    price: float | None = None
    quantity: int | None = None
    category: str | None = None
    session_id: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "event_id": self.event_id, "user_id": self.user_id, "type": self.type,
            "item_id": self.item_id, "ts": self.ts, "schema_version": self.schema_version,
        }
        for name in ("price", "quantity", "category", "session_id"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    error: str  # for people: which field, what was wrong


@dataclass(frozen=True, slots=True)
class Limits:
    max_record_bytes: int = 16 * 1024
    max_future_skew_ms: int = 300_000
    min_event_time_ms: int = 631_152_000_000  # 1990-01-01

    @classmethod
    def from_contract(cls, contract: ContractSettings) -> Limits:
        return cls(max_record_bytes=contract.max_record_bytes,
                   max_future_skew_ms=int(contract.max_future_skew_seconds * 1000),
                   min_event_time_ms=contract.min_event_time_ms)


_REQUIRED_STRINGS = ("event_id", "user_id", "type", "item_id")
_OPTIONAL_STRINGS = ("category", "session_id")
_TYPES = frozenset(EVENT_TYPES)


def parse_event(raw: bytes | None, key: bytes | None, *, now_ms: int,
                limits: Limits = Limits()) -> Event | Rejection:
    """Decode and validate one record. ``key`` is the Kafka record key and must equal user_id."""
    if raw is None:
        return Rejection(Reason.NOT_JSON, "record has no value (tombstone)")
    if len(raw) > limits.max_record_bytes:
        return Rejection(Reason.RECORD_TOO_LARGE,
                         f"{len(raw)} bytes > limit {limits.max_record_bytes}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection(Reason.NOT_JSON, str(exc)[:200])
    if not isinstance(body, dict):
        return Rejection(Reason.NOT_AN_OBJECT, f"top-level JSON is {type(body).__name__}")

    for name in (*_REQUIRED_STRINGS, "ts"):
        if body.get(name) is None:
            return Rejection(Reason.MISSING_FIELD, f"{name} is missing")
    for name in _REQUIRED_STRINGS:
        problem = _string_problem(body[name], name)
        if problem is not None:
            return problem
    for name in _OPTIONAL_STRINGS:
        if body.get(name) is not None:
            problem = _string_problem(body[name], name)
            if problem is not None:
                return problem

    ts = body["ts"]
    if not _is_int(ts):
        return Rejection(Reason.WRONG_TYPE, f"ts must be integer epoch milliseconds, "
                                            f"not {type(ts).__name__}")
    price = body.get("price")
    if price is not None:
        if not (_is_int(price) or isinstance(price, float)):
            return Rejection(Reason.WRONG_TYPE,
                             f"price must be a number, not {type(price).__name__}")
        if price < 0 or not math.isfinite(price):
            return Rejection(Reason.INVALID_VALUE, f"price must be >= 0, got {price}")
        price = float(price)
    quantity = body.get("quantity")
    if quantity is not None:
        if not _is_int(quantity):
            return Rejection(Reason.WRONG_TYPE,
                             f"quantity must be an integer, not {type(quantity).__name__}")
        if quantity < 1:
            return Rejection(Reason.INVALID_VALUE, f"quantity must be >= 1, got {quantity}")
    version = body.get("schema_version", SCHEMA_VERSION)
    if not _is_int(version):
        return Rejection(Reason.WRONG_TYPE, "schema_version must be an integer")

    if body["type"] not in _TYPES:
        return Rejection(Reason.UNKNOWN_EVENT_TYPE,
                         f"type {body['type'][:40]!r} is not one of {', '.join(EVENT_TYPES)}")
    if version != SCHEMA_VERSION:
        return Rejection(Reason.UNSUPPORTED_SCHEMA_VERSION,
                         f"schema_version {version} (this worker reads {SCHEMA_VERSION})")
    if ts > now_ms + limits.max_future_skew_ms:
        return Rejection(Reason.FUTURE_TIMESTAMP,
                         f"ts {ts} is {(ts - now_ms) / 1000:.0f}s ahead of the worker's clock")
    if ts < limits.min_event_time_ms:
        return Rejection(Reason.ANCIENT_TIMESTAMP,
                         f"ts {ts} is before {limits.min_event_time_ms} (seconds sent as ms?)")
    user_id = body["user_id"]
    if key is None or key != user_id.encode():
        shown = "null" if key is None else repr(key[:40])
        return Rejection(Reason.KEY_MISMATCH, f"record key {shown} must equal user_id")

    return Event(
        event_id=body["event_id"], user_id=user_id, type=body["type"], item_id=body["item_id"],
        ts=ts, price=price, quantity=quantity, category=body.get("category"),
        session_id=body.get("session_id"), schema_version=version,
    )


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python, but `true` is not a timestamp.
    return isinstance(value, int) and not isinstance(value, bool)


def _string_problem(value: object, name: str) -> Rejection | None:
    if not isinstance(value, str):
        return Rejection(Reason.WRONG_TYPE, f"{name} must be a string, not {type(value).__name__}")
    if not value or value.isspace():
        return Rejection(Reason.INVALID_VALUE, f"{name} is empty")
    if len(value) > MAX_ID_LENGTH:
        return Rejection(Reason.INVALID_VALUE, f"{name} is {len(value)} chars > {MAX_ID_LENGTH}")
    return None


def dead_letter(rejection: Rejection, *, raw: bytes | None, key: bytes | None, topic: str,
                partition: int, offset: int, at_ms: int, exception: str | None = None) -> bytes:
    """The `events.dlq` record for a rejected input: enough to diagnose and replay it.

    ``exception`` names the exception type of a ``processing_error``.
    """
    body: dict[str, Any] = {
        "reason": rejection.reason.value,
        "error": rejection.error,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "key": None if key is None else base64.b64encode(key).decode(),
        "raw": None if raw is None else base64.b64encode(raw).decode(),
        "at": at_ms,
    }
    if exception is not None:
        body["exception"] = exception
    return orjson.dumps(body)
