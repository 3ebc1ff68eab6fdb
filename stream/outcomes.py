"""Attribution: which decisions converted. Pure functions of a user's events in log order.

Every decision (each arm, each action, ``none`` included) opens an *attribution window* for its
user, from the event time of its trigger, ``window`` long. The window closes exactly once:

- **conversion**: a later event of the user (after the trigger in the user's log order) whose
  type is a conversion type (``purchase`` by default) and whose event time falls inside the
  window converts every window of that user open at that point. Its worth is the event's
  ``value`` (else price x quantity); it *redeems* a coupon decision if it names that coupon;
- **window**: the window's end (plus ``grace``) is behind the event time of the user's
  partition, its *watermark*: the largest event time applied there. The watermark moves with
  the log itself, so whether a conversion came in time depends only on the order of the
  partition's records, never on how the worker cut them into micro-batches or when it ran
  (a replay of last month closes last month's windows as it goes);
- **eviction**: a user holds at most ``max_pending`` open windows (they live in the user's
  1 KB state record). One more closes the oldest ``none`` decision's window, else the oldest,
  at once, marked ``evicted``: it counts in no conversion rate, and is counted.

A conversion that finds no open window is not attributed (the worker counts it). The worker
runs :func:`attribute` over each user's events of a batch and :func:`expire` over users whose
windows the watermark passed; :func:`outcome` builds the `outcomes` record from what the
decision stored when it was made (:func:`pending_record`). The offline benchmark and the
tests run the same functions.

Counts per (action, campaign, model version, policy version) and arm (:class:`Tally`) are what
the lift report and the guardrail read (:mod:`stream.uplift`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import orjson

from stream.config import AttributionSettings
from stream.contracts import (
    Action,
    Arm,
    Closure,
    Decision,
    Event,
    Outcome,
    TriggerKind,
    legacy_offer,
)
from stream.state import PendingWindow


@dataclass(frozen=True)
class Rules:
    window_ms: int = 7 * 86_400_000
    grace_ms: int = 300_000
    conversion_types: frozenset[str] = frozenset({"purchase"})
    max_pending: int = 4

    @classmethod
    def from_settings(cls, settings: AttributionSettings) -> Rules:
        return cls(window_ms=int(settings.window_seconds * 1000),
                   grace_ms=int(settings.grace_seconds * 1000),
                   conversion_types=frozenset(settings.conversion_types),
                   max_pending=settings.max_pending)

    def end_ms(self, window: PendingWindow) -> int:
        return window.start_s * 1000 + self.window_ms

    def closes_by(self, window: PendingWindow) -> int:
        """The watermark past which the window closes unconverted."""
        return self.closes_by_start(window.start_s)

    def closes_by_start(self, start_s: int) -> int:
        """:meth:`closes_by` of a window that opened at ``start_s`` (epoch seconds)."""
        return start_s * 1000 + self.window_ms + self.grace_ms

    def converts(self, window: PendingWindow, event: Event) -> bool:
        return (event.type in self.conversion_types
                and window.start_s * 1000 <= event.ts <= self.end_ms(window))


DEFAULT_RULES = Rules()


@dataclass(frozen=True)
class Closing:
    window: PendingWindow
    closed_by: Closure
    conversion: Event | None = None


@dataclass(frozen=True)
class Seen:
    """A user's event, with the partition's watermark just before it."""

    event: Event
    watermark: int


@dataclass(frozen=True)
class Opened:
    """A decision made for the user at this point of the log."""

    window: PendingWindow


def window_start(decision: Decision, cart_abandon_ms: int) -> int:
    """Event time a decision's window opens at: its trigger's; a cart reminder's when the
    cart counted as abandoned."""
    trigger = decision.trigger
    if trigger is None:
        return decision.created_at
    extra = cart_abandon_ms if trigger.kind == TriggerKind.CART_ABANDONED else 0
    return trigger.ts_ms + extra


def open_window(decision: Decision, start_ms: int) -> PendingWindow:
    return PendingWindow(ref(decision.decision_id), start_ms // 1000, decision.arm,
                         decision.action)


def ref(decision_id: str) -> str:
    """The key of a decision's stored details: the id's first 16 hex digits."""
    return decision_id[:16]


def attribute(windows: Iterable[PendingWindow], steps: Iterable[Seen | Opened],
              rules: Rules, watermark: int = 0) -> tuple[list[PendingWindow], list[Closing]]:
    """Walk one user's steps in log order from the partition's ``watermark``; return the
    windows still open and those closed, in the order they closed.

    A decision opens its window where its trigger is in the log, so windows the watermark
    has passed there close first (the new one too, if its trigger came late): only then may
    one too many evict another. Whatever batches the log is cut into, the same windows close
    the same way.
    """
    still = list(windows)
    closed: list[Closing] = []
    mark = watermark
    for step in steps:
        if isinstance(step, Opened):
            still, expired = expire([*still, step.window], mark, rules)
            closed += expired
            if len(still) > rules.max_pending:
                victim = next((w for w in still if w.action == Action.NONE), still[0])
                still.remove(victim)
                closed.append(Closing(victim, Closure.EVICTION))
            continue
        mark = max(mark, step.watermark)
        still, expired = expire(still, mark, rules)
        closed += expired
        event = step.event
        if event.type in rules.conversion_types:
            hits = [w for w in still if rules.converts(w, event)]
            if hits:
                still = [w for w in still if w not in hits]
                closed += [Closing(w, Closure.CONVERSION, event) for w in hits]
        mark = max(mark, event.ts)
    return still, closed


def expire(windows: Iterable[PendingWindow], watermark: int,
           rules: Rules) -> tuple[list[PendingWindow], list[Closing]]:
    """Close the windows the watermark has passed; (still open, closed)."""
    still: list[PendingWindow] = []
    closed: list[Closing] = []
    for window in windows:
        if watermark > rules.closes_by(window):
            closed.append(Closing(window, Closure.WINDOW))
        else:
            still.append(window)
    return still, closed


def pending_record(decision: Decision, start_ms: int) -> bytes:
    """What a decision keeps until its outcome (the ``pending-outcomes`` table's value)."""
    coupon, push = decision.coupon or {}, decision.push or {}
    return orjson.dumps({
        "decision_id": decision.decision_id, "user_id": decision.user_id,
        "arm": decision.arm, "action": decision.action,
        "coupon_id": coupon.get("coupon_id"), "discount": float(coupon.get("discount", 0.0)),
        "template": push.get("template"),
        "trigger": decision.trigger.kind if decision.trigger else TriggerKind.CART_ADD,
        "model_version": decision.model_version, "policy_version": decision.policy_version,
        "created_at": decision.created_at, "window_start": start_ms,
        "features": decision.features or {}, "offer": decision.offer,
        "propensity": decision.propensity, "choices": decision.choices})


def outcome(pending: bytes, closing: Closing, rules: Rules) -> Outcome:
    body = orjson.loads(pending)
    conversion = closing.conversion
    coupon_id = body["coupon_id"]
    return Outcome(
        decision_id=body["decision_id"], user_id=body["user_id"], arm=Arm(body["arm"]),
        action=Action(body["action"]), coupon_id=coupon_id, discount=body["discount"],
        template=body["template"], trigger=TriggerKind(body["trigger"]),
        model_version=body["model_version"], policy_version=body["policy_version"],
        created_at=body["created_at"], window_start=body["window_start"],
        window_ms=rules.window_ms, features=body["features"], closed_by=closing.closed_by,
        converted=conversion is not None,
        redeemed=conversion is not None and coupon_id is not None
        and conversion.coupon_id == coupon_id,
        value=conversion.worth if conversion is not None else 0.0,
        converted_at=conversion.ts if conversion is not None else None,
        offer=body.get("offer", legacy_offer(body)),  # older records: no offer
        propensity=float(body.get("propensity", 1.0)), choices=body.get("choices"))


# --- counts ----------------------------------------------------------------------------------

@dataclass
class ArmTally:
    """One arm's closed decisions of a group (evicted ones apart: they have no result)."""

    decisions: int = 0
    converted: int = 0
    redeemed: int = 0
    evicted: int = 0
    value: float = 0.0  # sum of conversions' worth
    value_sq: float = 0.0  # sum of its squares: the revenue interval needs the variance
    cost: float = 0.0  # money off granted by redeemed coupons

    def add(self, result: Outcome) -> None:
        if result.evicted:
            self.evicted += 1
            return
        self.decisions += 1
        self.converted += result.converted
        self.value += result.value
        self.value_sq += result.value * result.value
        if result.redeemed:
            self.redeemed += 1
            self.cost += result.discount

    def merge(self, other: ArmTally) -> ArmTally:
        return ArmTally(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(),
                                                strict=True)))


@dataclass(frozen=True)
class Group:
    """What lift is measured for: an action and what it promoted, under one model and
    policy version."""

    action: str
    campaign: str
    model_version: str
    policy_version: str

    @classmethod
    def of(cls, result: Outcome) -> Group:
        return cls(result.action, result.campaign, result.model_version,
                   result.policy_version)


@dataclass
class Tally:
    """Both arms of a group: the `outcome-counts` table's value (one per partition)."""

    treatment: ArmTally = field(default_factory=ArmTally)
    holdout: ArmTally = field(default_factory=ArmTally)

    def add(self, result: Outcome) -> None:
        (self.holdout if result.arm == Arm.HOLDOUT else self.treatment).add(result)

    def merge(self, other: Tally) -> Tally:
        return Tally(self.treatment.merge(other.treatment), self.holdout.merge(other.holdout))

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Tally:
        body = orjson.loads(raw)
        return cls(ArmTally(**body["treatment"]), ArmTally(**body["holdout"]))


def tally_key(partition: int, group: Group) -> str:
    """A group's key in the `outcome-counts` table: the partition is part of it, so the
    compacted changelog keeps every partition's count (the report sums them)."""
    return orjson.dumps([partition, group.action, group.campaign, group.model_version,
                         group.policy_version]).decode()


def group_of_key(key: str) -> Group:
    _, action, campaign, model_version, policy_version = orjson.loads(key)
    return Group(action, campaign, model_version, policy_version)


def merged(groups: Mapping[Group, Tally], label: Callable[[Group], str]) -> dict[str, Tally]:
    """The groups' tallies summed by ``label`` (a campaign over its versions, say)."""
    out: dict[str, Tally] = {}
    for group, tally in groups.items():
        key = label(group)
        out[key] = out.get(key, Tally()).merge(tally)
    return out


def totals(counts: Mapping[str, bytes]) -> dict[Group, Tally]:
    """Every group's tally summed over partitions, from `outcome-counts` keys and values."""
    summed: dict[Group, Tally] = {}
    for key, raw in counts.items():
        group = group_of_key(key)
        summed[group] = summed.get(group, Tally()).merge(Tally.from_json(raw))
    return summed
