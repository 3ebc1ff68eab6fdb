"""What travels on every topic, and the vocabularies the records use: one home for the contract.

- ``events`` (in): :func:`parse_event` turns bytes into an :class:`Event` or a :class:`Rejection`
  whose :class:`Reason` goes to the dead-letter topic with :func:`dead_letter`.
- ``coupons`` and ``user-preferences`` (in, compacted): :class:`Coupon`, :class:`Preferences`.
- ``decisions`` (out): :class:`Decision`, fired by a :class:`Trigger`; its ``action``, ``arm``
  and trigger ``kind`` are the :class:`Action`, :class:`Arm` and :class:`TriggerKind` values.
- ``outcomes`` (out, compacted): :class:`Outcome`, one per decision, once its attribution
  window closed (:mod:`stream.outcomes`).

Event types are the model's vocabulary (:data:`encoder.vocab.EVENT_TYPES`), re-exported here.

Events
------
Producers send one JSON object per record, keyed by ``user_id`` (UTF-8)::

    {"event_id": "e-1", "user_id": "u42", "type": "add_to_cart", "item_id": "sku-7",
     "ts": 1732000000000, "price": 9.99, "quantity": 1, "category": "snacks",
     "session_id": "s-1", "schema_version": 1}

Required: ``event_id``, ``user_id``, ``type``, ``item_id`` (non-empty strings) and ``ts`` (event
time, integer epoch milliseconds). Optional: ``price`` (number >= 0), ``quantity`` (integer >= 1),
``category``, ``session_id`` (strings), ``schema_version`` (integer, default 1), and on a
purchase ``coupon_id`` (the coupon redeemed, a string) and ``value`` (the order's value, a
number >= 0; without it a conversion is worth ``price`` x ``quantity``). Unknown fields are
ignored, so producers can add fields before consumers know them.

Parsing never raises: every way a record can be wrong has a named :class:`Reason`, so a bad
record is routed to the dead-letter topic with that reason and counted, and the worker goes on.
The order of the checks is the order of the reasons below; the first failure is reported.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
import sys
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from encoder.vocab import EVENT_TYPES
from stream.config import ContractSettings

__all__ = ["EVENT_TYPES", "Action", "Arm", "Closure", "Coupon", "Decision", "Event", "Limits",
           "Outcome", "Preferences", "Reason", "Rejection", "Trigger", "TriggerKind",
           "check_event", "dead_letter", "parse_event"]

DAY_MS = 86_400_000

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
    coupon_id: str | None = None  # on a purchase: the coupon redeemed
    value: float | None = None  # on a purchase: the order's value

    @property
    def worth(self) -> float:
        """What the event is worth as a conversion: its value, else price x quantity."""
        if self.value is not None:
            return self.value
        return (self.price or 0.0) * (self.quantity or 1)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "event_id": self.event_id, "user_id": self.user_id, "type": self.type,
            "item_id": self.item_id, "ts": self.ts, "schema_version": self.schema_version,
        }
        for name in ("price", "quantity", "category", "session_id", "coupon_id", "value"):
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
_OPTIONAL_STRINGS = ("category", "session_id", "coupon_id")
_TYPES = frozenset(EVENT_TYPES)


def parse_event(raw: bytes | None, key: bytes | None, *, now_ms: int,
                limits: Limits = Limits()) -> Event | Rejection:
    """Decode and validate one record. ``key`` is the Kafka record key and must equal user_id.

    msgspec decodes the JSON and checks its types in the same pass (in C: several times faster
    than loading a dict and checking it in Python), and the values are then checked against
    the contract. A record that fails anything at all is handed to
    :func:`check_event`, which names its first problem in the documented order: valid records
    take the fast path, and every rejection's reason and message are the reference checker's.
    """
    if raw is not None and len(raw) <= limits.max_record_bytes:
        try:
            wire = _decode_wire(raw)
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            event = Event(*msgspec.structs.astuple(wire))
            if _honours_contract(event, key, now_ms, limits):
                return event
    return check_event(raw, key, now_ms=now_ms, limits=limits)


def check_event(raw: bytes | None, key: bytes | None, *, now_ms: int,
                limits: Limits = Limits()) -> Event | Rejection:
    """The reference checker: :func:`parse_event`'s result, one check at a time in Python."""
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
    amounts: dict[str, float | None] = {}
    for name in ("price", "value"):
        amount = body.get(name)
        if amount is not None:
            if not (_is_int(amount) or isinstance(amount, float)):
                return Rejection(Reason.WRONG_TYPE,
                                 f"{name} must be a number, not {type(amount).__name__}")
            if amount < 0 or not math.isfinite(amount):
                return Rejection(Reason.INVALID_VALUE, f"{name} must be >= 0, got {amount}")
            amount = float(amount)
        amounts[name] = amount
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
        ts=ts, price=amounts["price"], quantity=quantity, category=body.get("category"),
        session_id=body.get("session_id"), schema_version=version,
        coupon_id=body.get("coupon_id"), value=amounts["value"],
    )


def _wire_struct() -> type[msgspec.Struct]:
    """:class:`Event`'s fields as a msgspec Struct, which msgspec reads on the fast path.

    Unknown fields send a record to the reference checker: msgspec would skip them without
    checking their UTF-8 or whether their numbers fit a double, where orjson rejects such a
    record as not JSON. A producer that adds fields costs the reference path, not a change of
    verdict. Built from :class:`Event` so that the two cannot drift apart.
    """
    hints = typing.get_type_hints(Event)
    fields = [(f.name, hints[f.name]) if f.default is dataclasses.MISSING
              else (f.name, hints[f.name], f.default) for f in dataclasses.fields(Event)]
    return msgspec.defstruct("WireEvent", fields, forbid_unknown_fields=True)


_decode_wire = msgspec.json.Decoder(_wire_struct()).decode
#: orjson reads integers up to 2**64 - 1 as integers, larger ones as floats (a wrong type).
_MAX_JSON_INT = 2**64 - 1
_MAX_FLOAT = sys.float_info.max


def _honours_contract(event: Event, key: bytes | None, now_ms: int, limits: Limits) -> bool:
    """Every check of :func:`check_event` that msgspec's typed decoding left to do."""
    return (_fine_id(event.event_id) and _fine_id(event.user_id) and _fine_id(event.item_id)
            and event.type in _TYPES and event.schema_version == SCHEMA_VERSION
            and limits.min_event_time_ms <= event.ts <= now_ms + limits.max_future_skew_ms
            and (event.category is None or _fine_id(event.category))
            and (event.session_id is None or _fine_id(event.session_id))
            and (event.coupon_id is None or _fine_id(event.coupon_id))
            and (event.price is None or 0 <= event.price <= _MAX_FLOAT)
            and (event.value is None or 0 <= event.value <= _MAX_FLOAT)
            and (event.quantity is None or 1 <= event.quantity <= _MAX_JSON_INT)
            and key is not None and key == event.user_id.encode())


def _fine_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and not value.isspace()


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


# --- coupons and user-preferences ------------------------------------------------------------

#: Valid-window bounds: epoch milliseconds; ``valid_to`` this far out means "no end".
FOREVER_MS = 2**62


@dataclass(frozen=True)
class Coupon:
    """A campaign from the compacted `coupons` topic (value = JSON, key = coupon_id).

    ``value`` and ``budget`` are money in the shop's currency; ``valid_from`` / ``valid_to``
    are epoch milliseconds (a file for `promo coupons publish` may give ISO-8601 text,
    converted on the way in); no ``valid_to`` means no end, and then no pacing.
    """

    coupon_id: str
    value: float  # money off per coupon; also what one issued coupon reserves from the budget
    budget: float  # total money the campaign may give away
    valid_from_ms: int = 0
    valid_to_ms: int = FOREVER_MS
    min_spend: float = 0.0
    items: tuple[str, ...] = ()  # target items; with no items and no categories: any purchase
    categories: tuple[str, ...] = ()
    max_exposures: int = 0  # coupons that may be issued in total; 0 = no cap

    def is_valid(self, now_ms: int) -> bool:
        return self.valid_from_ms <= now_ms < self.valid_to_ms

    @classmethod
    def from_json(cls, coupon_id: str, raw: bytes, *, strict: bool = False) -> Coupon:
        """Parse and check a campaign; ValueError says which field breaks which rule.

        ``strict`` (what `promo coupons publish` uses) also refuses fields it does not know,
        the likeliest typo; the worker reads leniently, so a newer producer's extra field
        never stops a campaign.
        """
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("a campaign must be a JSON object")
        return cls.from_fields(coupon_id, body, strict=strict)

    @classmethod
    def from_fields(cls, coupon_id: str, body: Mapping[str, Any], *,
                    strict: bool = False) -> Coupon:
        known = {"coupon_id", "value", "budget", "valid_from", "valid_to", "min_spend", "items",
                 "categories", "max_exposures"}
        if strict and set(body) - known:
            raise ValueError(f"unknown fields {sorted(set(body) - known)} (known: "
                             f"{', '.join(sorted(known))})")
        if not coupon_id or len(coupon_id) > MAX_ID_LENGTH or coupon_id.isspace():
            raise ValueError(f"coupon_id must be 1-{MAX_ID_LENGTH} characters")
        if "value" not in body or "budget" not in body:
            raise ValueError("value and budget are required")
        value = _money(body["value"], "value", positive=True)
        budget = _money(body["budget"], "budget", positive=True)
        if budget < value:
            raise ValueError(f"budget {budget:g} is below one coupon's value {value:g}")
        valid_from = _epoch_ms(body.get("valid_from", 0), "valid_from")
        valid_to = _epoch_ms(body.get("valid_to", FOREVER_MS), "valid_to")
        if valid_to <= valid_from:
            raise ValueError("valid_to must be after valid_from")
        exposures = body.get("max_exposures", 0)
        if not isinstance(exposures, int) or isinstance(exposures, bool) or exposures < 0:
            raise ValueError(f"max_exposures must be a whole number >= 0, not {exposures!r}")
        return cls(coupon_id=coupon_id, value=value, budget=budget, valid_from_ms=valid_from,
                   valid_to_ms=valid_to,
                   min_spend=_money(body.get("min_spend", 0.0), "min_spend", positive=False),
                   items=_ids(body.get("items", ()), "items"),
                   categories=_ids(body.get("categories", ()), "categories"),
                   max_exposures=exposures)

    def to_json(self) -> bytes:
        return orjson.dumps({
            "value": self.value, "budget": self.budget, "valid_from": self.valid_from_ms,
            "valid_to": self.valid_to_ms, "min_spend": self.min_spend, "items": self.items,
            "categories": self.categories, "max_exposures": self.max_exposures})


def _money(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'above' if positive else 'at least'} 0, got {value}")
    return float(value)


def _epoch_ms(value: object, name: str) -> int:
    """Epoch milliseconds, or ISO-8601 text (files written by people); no zone means UTC."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name} {value!r} is neither epoch milliseconds nor ISO-8601 "
                             "(2026-12-24T00:00:00Z)") from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= FOREVER_MS:
        raise ValueError(f"{name} must be epoch milliseconds (a whole number, 0 to 2^62), "
                         f"not {value!r}")
    if 0 < value < 100_000_000_000:  # before 1973 in ms: seconds, surely
        raise ValueError(f"{name} {value} looks like epoch seconds; give milliseconds")
    return value


def _ids(values: object, name: str) -> tuple[str, ...]:
    if not isinstance(values, list | tuple) or not all(
            isinstance(v, str) and 0 < len(v) <= MAX_ID_LENGTH for v in values):
        raise ValueError(f"{name} must be a list of ids (strings of 1-{MAX_ID_LENGTH} chars)")
    return tuple(values)


def _is_time_zone(name: object) -> bool:
    if not isinstance(name, str):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Preferences:
    """From the compacted `user-preferences` topic (value = JSON, key = user_id).

    A flag the record leaves out (or sets to null) is not stated: the user then gets
    ``policy.default_push_opt_in`` / ``default_coupon_opt_in``, exactly as a user with no
    record at all. A stated flag always wins. A time zone that is not a known IANA name
    is an error for `promo preferences publish` (``strict``); a worker reading such a record
    keeps its flags and uses ``policy.default_timezone``.
    """

    push_opt_in: bool | None
    coupon_opt_in: bool | None
    timezone: str | None = None

    @classmethod
    def from_json(cls, raw: bytes, *, strict: bool = False) -> Preferences:
        """Parse and check a preferences record. Raises ValueError naming the field."""
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("preferences must be a JSON object")
        return cls.from_fields(body, strict=strict)

    @classmethod
    def from_fields(cls, body: Mapping[str, Any], *, strict: bool = False) -> Preferences:
        known = {"user_id", "push_opt_in", "coupon_opt_in", "timezone"}
        if strict and set(body) - known:
            raise ValueError(f"unknown fields {sorted(set(body) - known)} (known: "
                             f"{', '.join(sorted(known))})")
        flags = {}
        for name in ("push_opt_in", "coupon_opt_in"):
            value = body.get(name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be true, false or absent, not {value!r}")
            flags[name] = value
        timezone = body.get("timezone") or None
        if timezone is not None and not _is_time_zone(timezone):
            if strict:
                raise ValueError(f"timezone {timezone!r} is not an IANA time zone "
                                 "(e.g. Europe/Berlin)")
            # The worker keeps the consent flags of such a record: losing an opt-out over
            # a zone this machine's tz database does not know would be the worse error.
            timezone = None
        return cls(push_opt_in=flags["push_opt_in"], coupon_opt_in=flags["coupon_opt_in"],
                   timezone=timezone)

    def to_json(self) -> bytes:
        return orjson.dumps({"push_opt_in": self.push_opt_in,
                             "coupon_opt_in": self.coupon_opt_in, "timezone": self.timezone})


# --- decisions -------------------------------------------------------------------------------

class Action(enum.StrEnum):
    """What a decision does. The values are metric labels and `decisions` fields."""

    COUPON = "coupon"
    PUSH = "push"
    NONE = "none"  # decided and recorded, nothing sent (no eligible coupon, caps, quiet hours)


class Arm(enum.StrEnum):
    TREATMENT = "treatment"
    HOLDOUT = "holdout"  # decided like the treatment arm, recorded, never sent


class TriggerKind(enum.StrEnum):
    CART_ADD = "cart_add"
    REPEAT_VIEWS = "repeat_views"  # several views of one item: purchase intent
    CART_ABANDONED = "cart_abandoned"  # found by the worker's timer, not by an event
    VISIT = "visit"  # every event: only the offline simulator's every-event baselines
    ON_SITE = "on_site"  # the shop claimed an offer through the pull API (stream/api.py)


@dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    event_id: str  # the event (or cart) that fired it: part of the decision id
    items: tuple[str, ...]  # raw item ids involved
    ts_ms: int  # event time of what fired it


@dataclass(frozen=True)
class Decision:
    decision_id: str
    user_id: str
    action: Action
    arm: Arm
    # The ranking score of what was chosen: the coupon's affinity, or for a push the
    # top-ranked candidate's encoder score plus its repeat prior (push_repeat_weight x log(1 + n)).
    score: float
    reasons: list[dict[str, Any]]
    model_version: str
    policy_version: str
    trigger_event_id: str
    created_at: int
    coupon: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    # What the policy read to decide (policy.features): kept for the decision's outcome,
    # not published with the decision.
    features: dict[str, float] | None = None
    trigger: Trigger | None = None  # what fired it (the kind is also reasons[0]["code"])
    # What was offered in the uplift model's words (none, push, coupon_full, coupon_half),
    # the probability its arm gave it (below 1 under exploration; 1 in the holdout, which
    # records what treatment would have preferred), and the treatment arm's probability of
    # every option (logged for holdout decisions too).
    offer: str = "none"
    propensity: float = 1.0
    choices: dict[str, float] | None = None

    @property
    def to_send(self) -> bool:
        return self.arm == Arm.TREATMENT and self.action != Action.NONE

    def to_json(self) -> bytes:
        return orjson.dumps({
            "decision_id": self.decision_id, "user_id": self.user_id, "action": self.action,
            "coupon": self.coupon, "push": self.push, "score": round(self.score, 6),
            "reasons": self.reasons, "arm": self.arm, "model_version": self.model_version,
            "policy_version": self.policy_version, "trigger_event_id": self.trigger_event_id,
            "created_at": self.created_at, "offer": self.offer, "propensity": self.propensity,
            "choices": self.choices})


# --- outcomes --------------------------------------------------------------------------------

def legacy_offer(body: dict[str, Any]) -> str:
    """The offer of an outcome written before offers were logged: its action, a coupon being
    the full discount (the propensity tiers' half tier is then indistinguishable)."""
    return "coupon_full" if body["action"] == "coupon" else str(body["action"])


class Closure(enum.StrEnum):
    """How a decision's attribution window closed. The values are `outcomes` fields."""

    CONVERSION = "conversion"  # a conversion of the user within the window
    WINDOW = "window"  # the window ended (in event time) without one
    EVICTION = "eviction"  # the user had too many open windows; this one gave way


@dataclass(frozen=True)
class Outcome:
    """The `outcomes` record of one decision (key = decision_id; compacted).

    A decision's fields as it was made (``features`` is the snapshot the policy read), and
    what followed: ``converted`` within ``window_ms`` of event time after the trigger,
    ``redeemed`` if the conversion named the decision's coupon, its ``value`` and time.
    An ``evicted`` decision's window was cut short: it counts in no conversion rate.
    """

    decision_id: str
    user_id: str
    arm: Arm
    action: Action
    coupon_id: str | None
    discount: float  # money off the coupon granted (0 for a push or none)
    template: str | None
    trigger: TriggerKind
    model_version: str
    policy_version: str
    created_at: int  # when the decision was made (worker clock, ms)
    window_start: int  # event time of what triggered it (ms): the window opens there
    window_ms: int
    features: dict[str, float]
    closed_by: Closure
    converted: bool = False
    redeemed: bool = False
    value: float = 0.0  # the conversion's worth (0 without a conversion)
    converted_at: int | None = None  # event time of the conversion
    # The decision's offer, the probability the policy gave it, and every option's
    # (Decision.offer, .propensity, .choices): what off-policy evaluation weighs rows by.
    offer: str = "none"
    propensity: float = 1.0
    choices: dict[str, float] | None = None

    @property
    def evicted(self) -> bool:
        return self.closed_by == Closure.EVICTION

    @property
    def campaign(self) -> str:
        """What the decision promoted: its coupon, its push template, or ``none``."""
        return self.coupon_id or self.template or "none"

    def to_json(self) -> bytes:
        return orjson.dumps({
            "decision_id": self.decision_id, "user_id": self.user_id, "arm": self.arm,
            "action": self.action, "coupon_id": self.coupon_id, "discount": self.discount,
            "template": self.template, "trigger": self.trigger,
            "model_version": self.model_version, "policy_version": self.policy_version,
            "created_at": self.created_at, "window_start": self.window_start,
            "window_ms": self.window_ms, "features": self.features,
            "closed_by": self.closed_by, "evicted": self.evicted, "converted": self.converted,
            "redeemed": self.redeemed, "value": self.value, "converted_at": self.converted_at,
            "offer": self.offer, "propensity": self.propensity, "choices": self.choices})

    @classmethod
    def from_json(cls, raw: bytes) -> Outcome:
        body = orjson.loads(raw)
        return cls(
            decision_id=body["decision_id"], user_id=body["user_id"], arm=Arm(body["arm"]),
            action=Action(body["action"]), coupon_id=body["coupon_id"],
            discount=float(body["discount"]), template=body["template"],
            trigger=TriggerKind(body["trigger"]), model_version=body["model_version"],
            policy_version=body["policy_version"], created_at=int(body["created_at"]),
            window_start=int(body["window_start"]), window_ms=int(body["window_ms"]),
            features={k: float(v) for k, v in body["features"].items()},
            closed_by=Closure(body["closed_by"]), converted=bool(body["converted"]),
            redeemed=bool(body["redeemed"]), value=float(body["value"]),
            converted_at=body["converted_at"], offer=str(body.get("offer", legacy_offer(body))),
            propensity=float(body.get("propensity", 1.0)), choices=body.get("choices"))
