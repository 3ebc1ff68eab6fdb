"""Per-user state: a bounded, compact record kept in a faust Table (RocksDB + changelog).

What a user's record holds (DESIGN §4):

- the last ``max_len`` events, oldest first: item key (64-bit hash of the item id, so the
  record does not depend on any model's vocabulary), event type, and event time in seconds;
- the offset of the last record applied from each of the two topics a user's events can come
  from (`events`, and the worker's repartition topic for events a producer put on another
  partition), so records redelivered after a crash or a rebalance are never applied twice;
- hashes of the most recent event ids, to ignore an event a producer sent twice;
- counters (views, clicks, carts, purchases) and spend;
- whether a cart is open (the last item added and not yet bought), its time, and whether its
  abandonment reminder was decided. The open cart's raw item id is not kept here: item ids may
  be up to 256 characters (1 KB of UTF-8), so it lives in the worker's ``open-carts`` table,
  which the abandonment timer scans anyway (:func:`open_cart_event` finds it in a batch);
- per channel: last-sent time, sends today, and the day that count belongs to;
- the user vector (fp16) and the model version that computed it;
- the user's open attribution windows (:class:`PendingWindow`, at most
  :data:`MAX_PENDING`): which decisions still wait for a conversion. Each is 13 bytes: a
  reference to the decision, when its window opened, its arm and action. The rest of the
  decision (coupon id, template, versions, features: text, up to kilobytes) lives in the
  worker's ``pending-outcomes`` table, as the open cart's item id lives in ``open-carts``.

Everything here is a pure function of the user's events in arrival (log) order, whatever the
micro-batch boundaries, so a user's state can be recomputed offline and compared (tests do).
Encoded, a full record stays under 1 KB (:func:`encoded_size_bound`, tests/stream/test_state.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from encoder.vocab import item_key
from stream.contracts import DAY_MS, EVENT_TYPES, Action, Arm, Event

FORMAT_VERSION = 4  # 4: attribution windows (format 3 records are still read)
DEFAULT_MAX_LEN = 50
#: Event-id hashes kept for de-duplication of events a producer sent twice (redelivered
#: records are caught by offset, however many). Producer retries come within seconds, i.e.
#: within a user's last couple of dozen events; each more costs 4 bytes in every record.
DEDUP_WINDOW = 22
CHANNELS = ("push", "coupon")
TYPE_ID = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}  # 0 is the model's padding
#: Open attribution windows a record can hold (AttributionSettings.max_pending is at most this).
MAX_PENDING = 4
_ACTIONS = tuple(Action)
_U32_MAX = 2**32 - 1


class StateFormatError(ValueError):
    """A stored record this worker cannot read (another format version, or damaged bytes)."""


def event_id_hash(event_id: str) -> int:
    """32-bit hash of an event id; a false duplicate needs a collision within 32 events."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=4).digest(), "little")


@dataclass
class ChannelState:
    last_sent_ms: int = 0
    day: int = 0  # days since the epoch that ``sent_today`` counts
    sent_today: int = 0

    def sends_on(self, day: int) -> int:
        return self.sent_today if self.day == day else 0

    def record_send(self, at_ms: int) -> None:
        day = at_ms // DAY_MS
        self.sent_today = self.sends_on(day) + 1
        self.day = day
        self.last_sent_ms = at_ms


@dataclass(frozen=True, slots=True)
class PendingWindow:
    """A decision waiting for its user's conversion (stream/outcomes.py closes it)."""

    ref: str  # the decision id's first 16 hex digits: its key in ``pending-outcomes``
    start_s: int  # event time the window opened at (the trigger's), epoch seconds
    arm: Arm
    action: Action


@dataclass
class UserState:
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    types: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    ts_s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # epoch seconds
    recent_event_ids: list[int] = field(default_factory=list)  # oldest first
    views: int = 0
    clicks: int = 0
    carts: int = 0
    purchases: int = 0
    spend: float = 0.0
    cart_open: bool = False  # the last item added to the cart is not bought yet
    cart_ts_ms: int = 0  # event time of that cart add
    cart_reminded: bool = False  # the abandonment push for this cart has been decided
    channels: dict[str, ChannelState] = field(
        default_factory=lambda: {name: ChannelState() for name in CHANNELS})
    vector: np.ndarray | None = None  # float16 (d,)
    model_version: str = ""
    vector_events: int = 0  # events seen when ``vector`` was computed
    last_offset: int = -1  # offset in `events` of the last record applied
    last_repartition_offset: int = -1  # the same in the repartition topic
    pending: list[PendingWindow] = field(default_factory=list)  # oldest first

    @property
    def n_events(self) -> int:
        return self.views + self.clicks + self.carts + self.purchases

    @property
    def last_ts_s(self) -> int:
        return int(self.ts_s[-1]) if len(self.ts_s) else 0

    @property
    def vector_stale(self) -> bool:
        return self.vector is None or self.vector_events != self.n_events


def apply_events(state: UserState, events: list[Event], *,
                 max_len: int = DEFAULT_MAX_LEN) -> tuple[list[Event], list[Event]]:
    """Apply one user's events, in arrival order, to ``state``; return (applied, duplicates).

    Each event goes into the sequence by event time at one-second resolution (a late event is
    inserted where it belongs, ties keep arrival order), so the result depends only on the
    arrival order, never on how events were cut into batches. Duplicates of recently seen event
    ids are skipped. A purchase closes the open cart only if it is not older than the cart add.
    """
    applied: list[Event] = []
    duplicates: list[Event] = []
    recent = state.recent_event_ids  # a sliding window, trimmed per event: batch-independent
    items = list(state.items)
    types = list(state.types)
    times = list(state.ts_s)
    for event in events:
        h = event_id_hash(event.event_id)
        if h in recent:
            duplicates.append(event)
            continue
        recent.append(h)
        if len(recent) > DEDUP_WINDOW:
            del recent[0]
        applied.append(event)
        second = event.ts // 1000
        position = len(times)
        while position > 0 and times[position - 1] > second:
            position -= 1
        items.insert(position, item_key(event.item_id))
        types.insert(position, TYPE_ID[event.type])
        times.insert(position, second)
        _count(state, event)
    if applied:
        state.items = np.asarray(items[-max_len:], dtype=np.int64)
        state.types = np.asarray(types[-max_len:], dtype=np.uint8)
        state.ts_s = np.asarray(times[-max_len:], dtype=np.int64)
    return applied, duplicates


def _count(state: UserState, event: Event) -> None:
    if event.type == "view":
        state.views += 1
    elif event.type == "click":
        state.clicks += 1
    elif event.type == "add_to_cart":
        state.carts += 1
        if event.ts >= state.cart_ts_ms:
            state.cart_open = True
            state.cart_ts_ms = event.ts
            state.cart_reminded = False
    elif event.type == "purchase":
        state.purchases += 1
        state.spend += event.worth  # the order's value, else price x quantity
        if state.cart_open and event.ts >= state.cart_ts_ms:
            state.cart_open = False


def open_cart_event(state: UserState, applied: list[Event]) -> Event | None:
    """The cart add that opened the cart ``applied`` (a batch just applied) left open, or None
    if the open cart, if any, was opened by an earlier batch. Its event id names the cart (two
    cart adds can share a timestamp) and its item id is what a reminder shows.

    The cart belongs to the last cart add not older than the cart before it: the last
    ``add_to_cart`` of the batch stamped with the cart's time.
    """
    if not state.cart_open:
        return None
    for event in reversed(applied):
        if event.type == "add_to_cart" and event.ts == state.cart_ts_ms:
            return event
    return None


# --- encoding -----------------------------------------------------------------------------
#
# Little-endian, versioned. Header, then the variable parts whose lengths the header gives:
#   B version | B n events | B n event-id hashes | B vector dims | B flags | B n windows
#   q base time (epoch seconds of the oldest event)
#   I views | I clicks | I carts | I purchases | d spend | q cart time (ms)
#   per channel: q last sent (ms) | H day | B sent that day
#   8s model version (16 hex digits as bytes) | I events when the vector was computed
#   q offset of the last record applied from `events` | q the same from the repartition topic
# then: n x q item key | n x B type | n x I seconds since base | m x I event-id hash
#       | d x e vector | w x (8s decision ref | I window start (epoch s) | B arm, action)
# Seconds since the oldest event fit 136 years in 32 bits; counters saturate at 2^32 - 1 and
# sends per day at 255 (caps are far lower), so no value the contract admits fails to encode.
# Every field is fixed-size or counted: no text, so no character can be cut in half.

_HEADER = struct.Struct("<BBBBBBq" + "IIIIdq" + "qHB" * len(CHANNELS) + "8sIqq")
_HEADER_V3 = struct.Struct("<BBBBBq" + "IIIIdq" + "qHB" * len(CHANNELS) + "8sIqq")
_WINDOW = struct.Struct("<8sIB")
_HOLDOUT_BIT = 0x80
_CART_REMINDED = 1
_CART_OPEN = 2


def encode(state: UserState) -> bytes:
    n = len(state.items)
    base = int(state.ts_s[0]) if n else 0
    vector = state.vector if state.vector is not None else np.zeros(0, np.float16)
    channel_fields: list[int] = []
    for name in CHANNELS:
        ch = state.channels[name]
        channel_fields += [ch.last_sent_ms, ch.day, min(ch.sent_today, 255)]
    flags = (_CART_REMINDED if state.cart_reminded else 0) | (_CART_OPEN if state.cart_open
                                                                else 0)
    pending = state.pending[-MAX_PENDING:]
    header = _HEADER.pack(
        FORMAT_VERSION, n, len(state.recent_event_ids), len(vector), flags, len(pending), base,
        *(min(c, _U32_MAX) for c in (state.views, state.clicks, state.carts, state.purchases)),
        state.spend, state.cart_ts_ms, *channel_fields, _version_bytes(state.model_version),
        min(state.vector_events, _U32_MAX), state.last_offset, state.last_repartition_offset)
    seconds = (state.ts_s - base).astype("<u4")
    return b"".join((
        header, state.items.astype("<i8").tobytes(), state.types.astype("u1").tobytes(),
        seconds.tobytes(), np.asarray(state.recent_event_ids, "<u4").tobytes(),
        vector.astype("<f2").tobytes(), *(_encode_window(w) for w in pending)))


def _encode_window(window: PendingWindow) -> bytes:
    flags = _ACTIONS.index(window.action) | (_HOLDOUT_BIT if window.arm == Arm.HOLDOUT else 0)
    return _WINDOW.pack(bytes.fromhex(window.ref), min(max(window.start_s, 0), _U32_MAX),
                        flags)


def _decode_window(raw: bytes) -> PendingWindow:
    ref, start_s, flags = _WINDOW.unpack(raw)
    return PendingWindow(ref.hex(), start_s, Arm.HOLDOUT if flags & _HOLDOUT_BIT
                         else Arm.TREATMENT, _ACTIONS[flags & 0x7F])


def decode(data: bytes) -> UserState:
    """Raises :class:`StateFormatError` for a record of another version or the wrong size."""
    version = data[0] if data else None
    header = {FORMAT_VERSION: _HEADER, 3: _HEADER_V3}.get(version)  # type: ignore[arg-type]
    if header is None or len(data) < header.size:
        found = "empty" if version is None else version
        raise StateFormatError(f"user state format {found} ({len(data)} bytes), this worker "
                               f"reads formats 3 and {FORMAT_VERSION}")
    fields = list(header.unpack_from(data))
    if header is _HEADER_V3:
        fields.insert(5, 0)  # no attribution windows yet
    _, n, m, d, flags, w, base = fields[:7]
    expected = header.size + n * (8 + 1 + 4) + m * 4 + d * 2 + w * _WINDOW.size
    if len(data) != expected:
        raise StateFormatError(f"user state record is {len(data)} bytes; its header "
                               f"describes {expected}")
    views, clicks, carts, purchases, spend, cart_ts = fields[7:13]
    channel_fields = fields[13:13 + 3 * len(CHANNELS)]
    model_version, vector_events, last_offset, last_repartition_offset = \
        fields[13 + 3 * len(CHANNELS):]
    offset = header.size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array

    items = take("<i8", n).astype(np.int64)
    types = take("u1", n).astype(np.uint8)
    seconds = take("<u4", n).astype(np.int64)
    hashes = take("<u4", m)
    vector = take("<f2", d).astype(np.float16) if d else None
    pending = [_decode_window(data[offset + i * _WINDOW.size:offset + (i + 1) * _WINDOW.size])
               for i in range(w)]
    channels = {name: ChannelState(*channel_fields[3 * i:3 * i + 3])
                for i, name in enumerate(CHANNELS)}
    return UserState(
        items=items, types=types, ts_s=base + seconds,
        recent_event_ids=[int(h) for h in hashes], views=views, clicks=clicks, carts=carts,
        purchases=purchases, spend=spend, cart_open=bool(flags & _CART_OPEN),
        cart_ts_ms=cart_ts, cart_reminded=bool(flags & _CART_REMINDED),
        channels=channels, vector=vector,
        model_version=model_version.hex() if model_version.strip(b"\0") else "",
        vector_events=vector_events, last_offset=last_offset,
        last_repartition_offset=last_repartition_offset, pending=pending)


def _version_bytes(version: str) -> bytes:
    """Model versions are 16 hex digits; anything else is not stored (the vector then counts
    as stale and is recomputed, which is always safe)."""
    try:
        raw = bytes.fromhex(version)
    except ValueError:
        return b""
    return raw if len(raw) == 8 else b""


def encoded_size_bound(max_len: int = DEFAULT_MAX_LEN, dims: int = 64) -> int:
    """Bytes of a full record: every slot used, a vector and every attribution window."""
    return (_HEADER.size + max_len * (8 + 1 + 4) + DEDUP_WINDOW * 4 + dims * 2
            + MAX_PENDING * _WINDOW.size)
