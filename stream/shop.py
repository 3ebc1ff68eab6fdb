"""`promo shop-sim`: a shop's users, from real histories, answering decisions with a known effect.

The rehearsal of a campaign, and the only place where "did the lift estimate find the truth"
can be checked. Three parts:

- :class:`Shop`, the users. Each simulated user copies a real user's rhythm (any interactions
  file: its purchase sessions are the orders): the real gaps between their orders decide when
  they come back, the real baskets what they put in the cart (cart adds, then one purchase
  with the basket's value). Between orders they browse: a few views of an item they know, and
  now and then a cart they leave. Real users are resampled under new ids to any count.
- :class:`Effects`, the truth the estimate must find. A decision sent to a user (treatment arm,
  coupon or push) may bring an extra order within days; how likely depends on the user's
  segment, which the worker's state can observe through the order rhythm: **sure things**
  (ordering every few days) buy anyway and are not moved, **persuadables** (every week or
  two) are, **lost causes** (rarely) hardly are, and **do-not-disturb** users (a seeded share)
  are put off by pushes: they skip their next order. Pushes tire: each push in the last week
  multiplies a push's effect by ``fatigue``. Holdout decisions are never sent, so never act.
- the **ground truth**, by rehearsing the same shop twice in-process with the worker's own
  pipeline (:class:`stream.testing.Harness`, same policy, catalog and encoder): once with every
  user treated, once with none. The conversion rates of decisions in the two worlds, per
  campaign, are what the live arms estimate; their difference is the true lift.

:func:`run_live` drives a shop against a real broker: it produces the users' events on an
accelerated clock (sim time runs ``speed`` times faster than the wall clock and ends before
it: the contract refuses events from the future), consumes `decisions` and answers them, and
at the end moves every partition's event time past the last attribution window, so every
decision gets its outcome.

The worker decides on its own clock (caps, minimum intervals, quiet hours, propensity from
days idle), the shop on its accelerated one: rehearse with those time gates off
(:data:`REHEARSAL_POLICY`), or the truth's in-process twin decides under other caps than the
worker did.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from encoder.data import Interaction
from stream.config import PolicyConfig, Settings
from stream.contracts import DAY_MS, Action, Arm, Coupon, Event
from stream.outcomes import Rules, Tally
from stream.policy import ServingModel
from stream.topics import expected_partition

HOUR_MS = 3_600_000
MINUTE_MS = 60_000
#: Policy gates that run on the worker's clock, off for a rehearsal on an accelerated one.
REHEARSAL_POLICY = {"push_daily_cap": 1000, "push_min_interval_seconds": 0.0,
                    "coupon_daily_cap": 1000, "coupon_min_interval_seconds": 0.0,
                    "quiet_start_hour": 0, "quiet_end_hour": 0,
                    "no_coupon_propensity": math.inf, "half_discount_propensity": math.inf,
                    "cart_abandon_seconds": 10.0**9}
SEGMENTS = ("sure_thing", "persuadable", "lost_cause", "do_not_disturb")


@dataclass(frozen=True)
class Effects:
    """The true response to decisions (see the module docstring)."""

    coupon_uplift: float = 0.25  # a persuadable's chance that a coupon brings an extra order
    push_uplift: float = 0.10  # the same for a push, before fatigue
    lost_cause_factor: float = 0.2  # a lost cause's share of those chances
    sure_thing_days: float = 5.0  # median days between orders at or below: buys anyway
    lost_cause_days: float = 15.0  # above: a lost cause
    put_off_share: float = 0.10  # users a push puts off (do not disturb)
    put_off_rate: float = 0.30  # their chance to skip their next order after a push
    fatigue: float = 0.5  # each push of the last 7 days multiplies a push's effect by this
    browse_per_order: float = 1.5  # browsing sessions between two orders, on average
    redeem_rate: float = 0.9  # chance an order uses a coupon the user holds

    def uplift(self, segment: str, action: str, recent_pushes: int) -> float:
        base = self.coupon_uplift if action == Action.COUPON else self.push_uplift
        factor = {"persuadable": 1.0, "lost_cause": self.lost_cause_factor}.get(segment, 0.0)
        fatigue = self.fatigue ** recent_pushes if action == Action.PUSH else 1.0
        return min(1.0, base * factor * fatigue)


@dataclass(frozen=True)
class Order:
    gap_ms: int  # since the previous order of the real user
    items: tuple[str, ...]


def histories(rows: Iterable[Interaction], max_items: int = 12) -> list[list[Order]]:
    """Every real user's orders (purchases grouped by session, else by time), in time order;
    users with fewer than two orders have no rhythm to copy and are left out."""
    baskets: dict[str, dict[str, tuple[int, list[str]]]] = defaultdict(dict)
    for row in rows:
        if row.event_type != "purchase":
            continue
        key = row.session_id or str(row.ts_ms)
        _, items = baskets[row.user_id].setdefault(key, (row.ts_ms, []))
        if row.item_id not in items and len(items) < max_items:
            items.append(row.item_id)
    result = []
    for orders in baskets.values():
        timed = sorted(orders.values())
        if len(timed) < 2:
            continue
        gaps = [timed[i][0] - timed[i - 1][0] for i in range(1, len(timed))]
        result.append([Order(max(gap, 12 * HOUR_MS), tuple(items))
                       for gap, (_, items) in zip([gaps[0], *gaps], timed, strict=True)])
    if not result:
        raise ValueError("no user with two purchases or more: nothing to copy a rhythm from")
    return result


def basket_value(items: Sequence[str]) -> float:
    return round(sum(price(item) for item in items), 2)


def price(item_id: str) -> float:
    """A stable price for an item the data gives none for: 1.00 to 10.99."""
    return 1 + int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=2).digest(),
                              "little") % 1000 / 100


@dataclass
class SimUser:
    user_id: str
    orders: list[Order]
    segment: str
    next_order: int = 0
    skip_next: bool = False
    busy_until: int = 0
    pushes: list[int] = field(default_factory=list)
    coupon: tuple[str, int, float] | None = None  # (coupon id, held until, discount)


@dataclass
class ShopStats:
    natural_orders: int = 0
    skipped_orders: int = 0
    extra_orders: int = 0
    browse_sessions: int = 0
    treated: int = 0  # decisions sent to the shop's users
    pushes: int = 0
    redeemed: int = 0
    coupon_spend: float = 0.0  # discounts of redeemed coupons: what promotions cost the shop
    extra_value: float = 0.0  # of the orders decisions brought
    skipped_value: float = 0.0  # of the orders pushes put off


class Shop:
    """Simulated users and their pending happenings, on the shop's own clock."""

    def __init__(self, templates: Sequence[list[Order]], *, users: int, start_ms: int,
                 effects: Effects | None = None, seed: int = 0,
                 id_prefix: str = "sim-") -> None:
        self.effects = effects or Effects()
        self.rng = random.Random(seed)
        self.stats = ShopStats()
        self._queue: list[tuple[int, int, str, int]] = []
        self._seq = itertools.count()
        self._events = itertools.count()
        self.users: list[SimUser] = []
        self.by_id: dict[str, int] = {}
        self.last_ts = start_ms  # the latest event time produced (a session runs past its start)
        for k in range(users):
            orders = self.rng.choice(templates)
            user = SimUser(f"{id_prefix}{k}", orders, self._segment(f"{id_prefix}{k}", orders))
            self.by_id[user.user_id] = k
            self.users.append(user)
            first = start_ms + int(self.rng.uniform(0, min(orders[0].gap_ms, 14 * DAY_MS)))
            self._push(first, "order", k)
            self._schedule_browse(k, start_ms)

    def _segment(self, user_id: str, orders: list[Order]) -> str:
        e = self.effects
        share = int.from_bytes(hashlib.sha256(b"dnd:" + user_id.encode()).digest()[:4], "big")
        if share / 2**32 < e.put_off_share:
            return "do_not_disturb"
        gaps = sorted(o.gap_ms for o in orders[1:]) or [orders[0].gap_ms]
        median_days = gaps[len(gaps) // 2] / DAY_MS
        if median_days <= e.sure_thing_days:
            return "sure_thing"
        return "persuadable" if median_days <= e.lost_cause_days else "lost_cause"

    def _push(self, at_ms: int, kind: str, user: int) -> None:
        heapq.heappush(self._queue, (at_ms, next(self._seq), kind, user))

    def _schedule_browse(self, k: int, after_ms: int) -> None:
        user = self.users[k]
        mean_gap = sum(o.gap_ms for o in user.orders) / len(user.orders)
        if self.effects.browse_per_order > 0:
            wait = self.rng.expovariate(self.effects.browse_per_order / mean_gap)
            self._push(after_ms + int(wait), "browse", k)

    def until(self, now_ms: int) -> list[Event]:
        """Every event of happenings due by ``now_ms``, in time order per user (a session
        that starts by then is produced whole, so its last events may be a few minutes
        later)."""
        events: list[Event] = self._due(now_ms)
        if events:
            self.last_ts = max(self.last_ts, max(e.ts for e in events))
        return events

    def closing_time(self, rules: Rules) -> int:
        """An event time past every window a decision on the events so far can open."""
        return self.last_ts + rules.window_ms + rules.grace_ms + MINUTE_MS

    def _due(self, now_ms: int) -> list[Event]:
        events: list[Event] = []
        while self._queue and self._queue[0][0] <= now_ms:
            at, _, kind, k = heapq.heappop(self._queue)
            user = self.users[k]
            at = max(at, user.busy_until + 1000)
            if kind == "browse":
                events += self._browse(user, at)
                self._schedule_browse(k, at)
                continue
            template = user.orders[user.next_order % len(user.orders)]
            if kind == "order":  # the natural rhythm
                user.next_order += 1
                nxt = user.orders[user.next_order % len(user.orders)]
                self._push(at + nxt.gap_ms + int(self.rng.uniform(-2, 2) * HOUR_MS), "order", k)
                if user.skip_next:
                    user.skip_next = False
                    self.stats.skipped_orders += 1
                    self.stats.skipped_value += basket_value(template.items)
                    continue
                self.stats.natural_orders += 1
            else:
                self.stats.extra_orders += 1
                self.stats.extra_value += basket_value(template.items)
            events += self._order(user, at, template.items)
        return events

    def _event(self, user: SimUser, kind: str, item: str, ts: int,
               **fields: float | str | None) -> Event:
        return Event(f"{user.user_id}-{next(self._events)}", user.user_id, kind, item, ts,
                     **fields)  # type: ignore[arg-type]

    def _order(self, user: SimUser, at: int, items: Sequence[str]) -> list[Event]:
        events = [self._event(user, "add_to_cart", item, at + i * 20_000, price=price(item))
                  for i, item in enumerate(items)]
        done = at + len(items) * 20_000 + MINUTE_MS
        coupon_id = None
        if user.coupon is not None and user.coupon[1] >= done \
                and self.rng.random() < self.effects.redeem_rate:
            coupon_id = user.coupon[0]
            self.stats.redeemed += 1
            self.stats.coupon_spend += user.coupon[2]
        user.coupon = None if coupon_id else user.coupon
        events.append(self._event(user, "purchase", items[-1], done, quantity=len(items),
                                  value=basket_value(items),
                                  coupon_id=coupon_id))
        user.busy_until = done
        return events

    def _browse(self, user: SimUser, at: int) -> list[Event]:
        self.stats.browse_sessions += 1
        known = [item for order in user.orders for item in order.items]
        item = self.rng.choice(known)
        events = [self._event(user, "view", item, at + i * 30_000) for i in range(3)]
        if self.rng.random() < 0.5:
            events.append(self._event(user, "add_to_cart", item, at + 90_000,
                                      price=price(item)))
        user.busy_until = events[-1].ts
        return events

    def answer(self, user_id: str, arm: str, action: str, coupon_id: str | None,
               at_ms: int, discount: float = 0.0) -> None:
        """A decision reached the user at ``at_ms`` (shop time): act on it if it was sent.
        ``discount`` is the coupon's money off, spent if the user redeems it."""
        k = self.by_id.get(user_id)
        if k is None or arm != Arm.TREATMENT or action == Action.NONE:
            return
        user = self.users[k]
        self.stats.treated += 1
        recent = sum(1 for t in user.pushes if t > at_ms - 7 * DAY_MS)
        if action == Action.PUSH:
            self.stats.pushes += 1
            user.pushes = [t for t in user.pushes if t > at_ms - 7 * DAY_MS] + [at_ms]
            if user.segment == "do_not_disturb" \
                    and self.rng.random() < self.effects.put_off_rate:
                user.skip_next = True
        elif coupon_id is not None:
            user.coupon = (coupon_id, at_ms + 7 * DAY_MS, discount)
        if self.rng.random() < self.effects.uplift(user.segment, action, recent):
            self._push(at_ms + int(self.rng.uniform(1, 72) * HOUR_MS), "extra", k)

    def answer_json(self, raw: bytes, at_ms: int) -> None:
        body = orjson.loads(raw)
        coupon = body.get("coupon") or {}
        self.answer(body["user_id"], body["arm"], body["action"], coupon.get("coupon_id"), at_ms,
                    float(coupon.get("discount") or 0.0))

    def segments(self) -> dict[str, int]:
        counts = dict.fromkeys(SEGMENTS, 0)
        for user in self.users:
            counts[user.segment] += 1
        return counts


# --- the ground truth: the same shop, everyone treated and no one ------------------------------

@dataclass
class Rehearsal:
    """What one in-process run measured: outcome counts per campaign (and ``all``)."""

    tallies: dict[str, Tally]
    decisions: int
    events: int
    stats: ShopStats

    def rates(self, arm: str) -> dict[str, dict[str, float]]:
        out = {}
        for campaign, tally in self.tallies.items():
            side = tally.holdout if arm == Arm.HOLDOUT else tally.treatment
            out[campaign] = {"decisions": side.decisions, "converted": side.converted,
                             "rate": side.converted / side.decisions if side.decisions else 0.0}
        return out


@dataclass(frozen=True)
class Setup:
    """A rehearsal: the shop (who, how long, how they respond) and the worker's side (policy,
    catalog, encoder, partitions, attribution rules)."""

    templates: Sequence[list[Order]]
    users: int
    days: float
    start_ms: int
    policy: PolicyConfig
    coupons: Sequence[Coupon]
    encoder: ServingModel | None
    partitions: int
    rules: Rules
    effects: Effects = field(default_factory=Effects)
    seed: int = 0


def rehearse(setup: Setup, holdout_percent: float, step_ms: int = HOUR_MS,
             progress: Callable[[int], None] | None = None) -> Rehearsal:
    """Run the shop against the worker's pipeline in-process (no broker) for ``days``, then
    close every window; ``holdout_percent`` 0 treats everyone, 100 no one."""
    from stream.testing import Harness

    shop = Shop(setup.templates, users=setup.users, start_ms=setup.start_ms,
                effects=setup.effects, seed=setup.seed)
    rules = setup.rules
    harness = Harness(policy=replace(setup.policy, holdout_percent=holdout_percent),
                      encoder=setup.encoder, coupons=setup.coupons,
                      partitions=setup.partitions, now_ms=setup.start_ms, attribution=rules)
    tallies: dict[str, Tally] = defaultdict(Tally)
    decisions = events = 0
    end = setup.start_ms + int(setup.days * DAY_MS)

    def feed(batch: list[Event], now: int) -> None:
        nonlocal decisions, events
        harness.now_ms = now
        result = harness.run([harness.record(e.user_id, e.to_json()) for e in batch])
        harness.sink.sent.clear()  # only the results are kept
        events += len(batch)
        decisions += len(result.decisions)
        for decision in result.decisions:
            coupon = decision.coupon or {}
            shop.answer(decision.user_id, decision.arm, decision.action,
                        coupon.get("coupon_id"), now, float(coupon.get("discount") or 0.0))
        for outcome in result.outcomes:
            tallies[outcome.campaign].add(outcome)
            tallies["all"].add(outcome)

    now = setup.start_ms
    while now < end:
        now = min(now + step_ms, end)
        batch = shop.until(now)
        if batch:
            feed(batch, now)
        if progress is not None:
            progress(now)
    closing = shop.closing_time(rules)
    feed(clock_events(setup.partitions, closing, "twin"), closing)
    return Rehearsal(dict(tallies), decisions, events, shop.stats)


def clock_events(partitions: int, ts: int, tag: str) -> list[Event]:
    """One view per partition at ``ts``: moves each partition's event time there, so every
    attribution window that ended before it closes."""
    events, found = [], set()
    for n in itertools.count():
        user = f"shop-sim-clock-{n}"
        home = expected_partition(user.encode(), partitions)
        if home not in found:
            found.add(home)
            events.append(Event(f"{user}-{tag}-{ts}", user, "view", "shop-sim-clock", ts))
        if len(found) == partitions:
            return events
    raise AssertionError("unreachable")


def ground_truth(setup: Setup,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The true rates per campaign with every user treated and with none, and their
    difference: what the live arms estimate."""
    treated = rehearse(setup, 0.0, progress=progress)
    control = rehearse(setup, 100.0, progress=progress)
    rate_t, rate_h = treated.rates(Arm.TREATMENT), control.rates(Arm.HOLDOUT)
    campaigns = {}
    for campaign in sorted(set(rate_t) | set(rate_h)):
        t = rate_t.get(campaign, {"decisions": 0, "converted": 0, "rate": 0.0})
        h = rate_h.get(campaign, {"decisions": 0, "converted": 0, "rate": 0.0})
        campaigns[campaign] = {"treatment": t, "holdout": h,
                               "true_lift": t["rate"] - h["rate"] if t["decisions"]
                               and h["decisions"] else None}
    return {"users": setup.users, "seed": setup.seed, "campaigns": campaigns,
            "treated_world": {"decisions": treated.decisions, "events": treated.events,
                              **asdict(treated.stats)},
            "control_world": {"decisions": control.decisions, "events": control.events,
                              **asdict(control.stats)}}


def coupons_from(records: Mapping[bytes, bytes]) -> list[Coupon]:
    return [Coupon.from_json(key.decode(), raw) for key, raw in records.items()]


# --- live, against the real broker -------------------------------------------------------------

@dataclass
class LiveRun:
    events: int = 0
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (arm, action)
    outcomes: dict[str, bytes] = field(default_factory=dict)  # id -> the last record

    @property
    def missing_outcomes(self) -> int:
        return len(set(self.decisions) - set(self.outcomes))


async def run_live(settings: Settings, shop: Shop, *, start_ms: int, days: float, speed: float,
                   wait_seconds: float = 120.0,
                   progress: Callable[[float], None] | None = None) -> LiveRun:
    """Produce the shop's events on a clock ``speed`` times the wall clock's, answer its
    decisions as they arrive, then close every window and wait for every outcome."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from stream.topics import client_kwargs

    kafka = settings.kafka
    rules = Rules.from_settings(settings.attribution)
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", enable_idempotence=True,
                                linger_ms=5)
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await producer.start()
    await consumer.start()
    run = LiveRun()
    loop = asyncio.get_running_loop()
    try:
        tps = [TopicPartition(topic, p) for topic in (kafka.decisions_topic, kafka.outcomes_topic)
               for p in range(kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)  # this rehearsal's decisions only
        for tp in tps:
            await consumer.position(tp)
        end = start_ms + int(days * DAY_MS)
        began = loop.time()

        def shop_now() -> int:
            return min(end, start_ms + int((loop.time() - began) * speed * 1000))

        async def send(events: list[Event]) -> None:
            sent = [await producer.send(kafka.events_topic, e.to_json(), key=e.user_id.encode())
                    for e in events]
            if sent:
                await asyncio.gather(*sent)
            run.events += len(events)

        async def receive(timeout_ms: int) -> None:
            fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
            now = shop_now()
            for records in fetched.values():
                for record in records:
                    if record.value is None or record.key is None:
                        continue
                    if record.topic == kafka.decisions_topic:
                        body = orjson.loads(record.value)
                        run.decisions[body["decision_id"]] = (body["arm"], body["action"])
                        shop.answer_json(record.value, now)
                    else:
                        run.outcomes[record.key.decode()] = record.value

        while True:
            now = shop_now()
            await send(shop.until(now))
            await receive(20)
            if progress is not None:
                progress(now)
            if now >= end:
                break
        await send(clock_events(kafka.partitions, shop.closing_time(rules), "live"))
        deadline = loop.time() + wait_seconds
        while loop.time() < deadline:
            await receive(500)
            if run.decisions and not run.missing_outcomes:
                await receive(2000)  # a straggler decision would reopen the count
                if not run.missing_outcomes:
                    break
        return run
    finally:
        await consumer.stop()
        await producer.stop()
