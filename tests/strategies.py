"""Hypothesis strategies built from the event contract's own limits (stream/contracts.py), not
from the datasets: any Unicode in ids up to their limits, boundary timestamps, every event
type, optional fields present or not, unknown extra fields."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from stream.contracts import EVENT_TYPES, MAX_ID_LENGTH, SCHEMA_VERSION, Event, Limits

NOW_MS = 1_780_000_000_000
LIMITS = Limits()

# JSON text carries any code point but lone surrogates (which no UTF-8 producer can send).
_any_char = st.characters(exclude_categories=("Cs",))


def ids(max_size: int = MAX_ID_LENGTH) -> st.SearchStrategy[str]:
    """A valid id: 1..max_size characters of any Unicode, not only whitespace."""
    return st.text(_any_char, min_size=1, max_size=max_size).filter(lambda s: not s.isspace())


def timestamps() -> st.SearchStrategy[int]:
    oldest, newest = LIMITS.min_event_time_ms, NOW_MS + LIMITS.max_future_skew_ms
    return st.one_of(st.sampled_from([oldest, newest, NOW_MS]), st.integers(oldest, newest))


def event_bodies(user_id: st.SearchStrategy[str] | None = None,
                 item_id: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[
                     dict[str, Any]]:
    """JSON objects the contract accepts (keyed by their ``user_id``)."""
    required = st.fixed_dictionaries({
        "event_id": ids(), "user_id": ids() if user_id is None else user_id,
        "type": st.sampled_from(EVENT_TYPES),
        "item_id": ids() if item_id is None else item_id, "ts": timestamps()})
    optional = st.fixed_dictionaries({}, optional={
        "price": st.one_of(st.integers(0, 10**9),
                           st.floats(0, 1e12, allow_nan=False, allow_infinity=False)),
        "quantity": st.integers(1, 2**63 - 1),
        "category": ids(), "session_id": ids(), "schema_version": st.just(SCHEMA_VERSION)})
    unknown = st.dictionaries(st.text(min_size=1, max_size=12).map(lambda k: "x-" + k),
                              st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1),
                                        st.text(max_size=20)),
                              max_size=3)
    return st.builds(lambda r, o, u: {**u, **r, **o}, required, optional, unknown)


def events(user_id: st.SearchStrategy[str] | None = None,
           item_id: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Event]:
    """Events as the contract parses them (what :func:`stream.contracts.parse_event` returns)."""
    return event_bodies(user_id, item_id).map(lambda b: Event(
        event_id=b["event_id"], user_id=b["user_id"], type=b["type"], item_id=b["item_id"],
        ts=b["ts"], price=None if b.get("price") is None else float(b["price"]),
        quantity=b.get("quantity"), category=b.get("category"),
        session_id=b.get("session_id")))
