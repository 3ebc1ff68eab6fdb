"""The replayed data: the time cut, the campaigns valid over the replayed period, and the
decision moments the worker's own state and trigger code finds in it.

Decision moments are the policy's triggers (cart adds, repeated views, abandoned carts). A log
without cart adds (a purchase or rating log) has hardly any: there every event is a moment
(trigger ``visit``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from encoder.data import Interaction
from stream import state as user_state
from stream.contracts import Coupon, Event, Trigger, TriggerKind
from stream.offline.config import SimulationConfig
from stream.policy import ServingModel, cart_abandoned, event_triggers, propensity
from stream.state import UserState

# --- splitting and the catalog -------------------------------------------------------------

def time_split(rows: Sequence[Interaction],
               fraction: float) -> tuple[list[Interaction], list[Interaction], int]:
    """(before, after, cut_ms): rows before the ``fraction`` quantile of time, and the rest.
    ``rows`` must be in time order (as the loaders return them)."""
    if not rows:
        raise ValueError("no interactions to simulate")
    if not 0 < fraction < 1:
        raise ValueError(f"train fraction must be in (0, 1), got {fraction}")
    cut = rows[min(len(rows) - 1, int(len(rows) * fraction))].ts_ms
    before = [r for r in rows if r.ts_ms < cut]
    after = [r for r in rows if r.ts_ms >= cut]
    if not before or not after:
        raise ValueError("the time cut leaves one side empty: the data need more than one "
                         "distinct timestamp")
    return before, after, cut


def conversion_types(rows: Iterable[Interaction]) -> frozenset[str]:
    types = {r.event_type for r in rows}
    return frozenset({"purchase"}) if "purchase" in types else frozenset(types)


def generated_catalog(before: Sequence[Interaction], start_ms: int, end_ms: int,
                      test_users: int, config: SimulationConfig) -> list[Coupon]:
    """Campaigns on items users converted on before the cut, in random groups (so no policy
    gets campaigns built for it), valid over the replayed period. Budgets allow about 5% of
    the replayed users a coupon each; the first campaign also has an exposure cap, so the
    report shows caps and budgets binding."""
    converts = conversion_types(before)
    counts = Counter(r.item_id for r in before if r.event_type in converts)
    wanted = config.campaigns * config.items_per_campaign
    pool = [item for item, _ in counts.most_common(wanted * 3)]
    rng = np.random.default_rng(config.seed)
    picked = [pool[i] for i in rng.permutation(len(pool))[:wanted]]
    values = (1.0, 2.0, 3.0, 5.0)
    allowance = max(3, round(test_users * 0.05))
    coupons = []
    for c in range(config.campaigns):
        items = tuple(picked[c * config.items_per_campaign:(c + 1) * config.items_per_campaign])
        if not items:
            break
        value = values[c % len(values)]
        coupons.append(Coupon(
            f"campaign-{c}", value=value, budget=value * allowance, valid_from_ms=start_ms,
            valid_to_ms=end_ms + 1, items=items,
            max_exposures=max(2, allowance // 3) if c == 0 else 0))
    return coupons


# --- decision moments ------------------------------------------------------------------------

@dataclass(frozen=True)
class Moment:
    user_id: str
    trigger: Trigger
    now_ms: int
    state: bytes  # the user's encoded state at the moment (channels are per policy)
    future: tuple[int, int]  # the user's replayed events [start, end) that judge it
    propensity: float  # the behavioural score, uncalibrated
    n_events: int  # the user's events so far (activity level)


def _event(row: int, it: Interaction) -> Event:
    return Event(event_id=f"sim-{row}", user_id=it.user_id, type=it.event_type,
                 item_id=it.item_id, ts=it.ts_ms, price=it.price, quantity=it.quantity,
                 category=it.category, session_id=it.session_id)


def collect_moments(before: Sequence[Interaction], after: Sequence[Interaction],
                    config: SimulationConfig) -> tuple[list[Moment], dict[str, list[Interaction]]]:
    """Warm every user's state on ``before``, replay ``after`` and return the decision moments
    in time order, with each user's replayed events (to judge the moments by)."""
    cfg, max_len = config.policy, user_state.DEFAULT_MAX_LEN
    states: dict[str, UserState] = defaultdict(UserState)
    history: dict[str, list[Event]] = defaultdict(list)
    for row, it in enumerate(before):
        history[it.user_id].append(_event(row, it))
    carts: dict[str, Event] = {}  # the worker keeps these in its open-carts table
    for user_id, events in history.items():
        applied, _ = user_state.apply_events(states[user_id], events, max_len=max_len)
        opened = user_state.open_cart_event(states[user_id], applied)
        if opened is not None:
            carts[user_id] = opened
    every_event = not any(r.event_type == "add_to_cart" for r in (*before, *after))
    future: dict[str, list[Interaction]] = defaultdict(list)
    moments: list[Moment] = []

    def add(user_id: str, st: UserState, trigger: Trigger, now_ms: int, start: int) -> None:
        moments.append(Moment(user_id, trigger, now_ms, user_state.encode(st), (start, -1),
                              propensity(st, now_ms), st.n_events))

    for row, it in enumerate(after, start=len(before)):
        st = states[it.user_id]
        position = len(future[it.user_id])
        if cart_abandoned(st, it.ts_ms, cfg):
            at = st.cart_ts_ms + int(cfg.cart_abandon_seconds * 1000)
            cart = carts.get(it.user_id)
            add(it.user_id, st, Trigger(TriggerKind.CART_ABANDONED,
                                        f"cart:{cart.event_id if cart else ''}",
                                        (cart.item_id,) if cart else (), at), at, position)
            st.cart_reminded = True
        future[it.user_id].append(it)
        event = _event(row, it)
        applied, _ = user_state.apply_events(st, [event], max_len=max_len)
        if not applied:
            continue
        opened = user_state.open_cart_event(st, applied)
        if opened is not None:
            carts[it.user_id] = opened
        triggers = ([Trigger(TriggerKind.VISIT, event.event_id, (event.item_id,), event.ts)]
                    if every_event else event_triggers(st, applied, cfg))
        for trigger in triggers[:1]:  # the worker decides a user's strongest trigger only
            add(it.user_id, st, trigger, it.ts_ms, position + 1)
    horizon = config.horizon
    judged = [dataclasses.replace(m, future=(m.future[0], min(m.future[0] + horizon,
                                                               len(future[m.user_id]))))
              for m in moments]
    return judged, future


def user_vectors(encoder: ServingModel, moments: Sequence[Moment], batch: int = 512) -> np.ndarray:
    """The encoder's vector for each moment's user state, in batched forward passes."""
    out = np.zeros((len(moments), int(encoder.config.d_model)), dtype=np.float16)
    for start in range(0, len(moments), batch):
        chunk = [user_state.decode(m.state) for m in moments[start:start + batch]]
        items = [encoder.item_indices_from_keys(s.items) for s in chunk]
        types = [s.types.astype(np.int64) for s in chunk]
        out[start:start + len(chunk)] = encoder.user_vectors(items, types)
    return out
