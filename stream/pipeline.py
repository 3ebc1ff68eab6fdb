"""The hot path, independent of faust: a micro-batch of consumed records in, effects out.

One call to :meth:`Pipeline.process` handles everything the consumer fetched:

1. validate every record (rejects go to the dead-letter topic with their reason);
2. group valid events by user, keeping each user's arrival order;
3. load each touched user's state once and apply the user's events (duplicates of already
   applied event ids are dead-lettered as ``duplicate_event``);
4. refresh the vectors of every user whose state changed, in **one** batched encoder call, run
   off the event loop;
5. rank push candidates for every user with a trigger in a few matrix products (scoring the
   catalogue one user at a time was the main cost of a decision), then decide for each of them
   (:mod:`stream.policy`), reserving coupon budgets;
6. write, in this order: coupon budgets (and flush them), decisions + user vectors + dead
   letters (and wait until the broker has them), then user states (handed to the producer,
   so they belong to the same transaction as the batch's offsets under exactly-once).

The write order is what makes a crash safe under at-least-once delivery. Budgets are reserved
before a coupon can leave, so no crash can lead to an overspend (at worst a reservation without
a coupon, which under-spends). Outputs are acknowledged before user state is written, so a user
whose state shows an event applied has had its decisions published; a crash before the state
write replays the batch, which decides the same triggers again under the same decision ids
(consumers de-duplicate by ``decision_id``). The consumer acknowledges the offsets only after
this method returns.

The worker hands in a :class:`Store` (faust tables) and a :class:`Sink` (the producer); tests
hand in dictionaries and lists.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from stream import policy, state
from stream.config import PolicyConfig
from stream.events import Event, Limits, Reason, Rejection, dead_letter, parse_event
from stream.logs import user_ref
from stream.metrics import Metrics
from stream.policy import Coupon, CouponBudget, Decision, Preferences, Trigger
from stream.state import UserState

log = logging.getLogger(__name__)


class Record(Protocol):
    """A consumed Kafka record, whatever client read it (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Store(Protocol):
    """Per-partition state the pipeline reads and writes (faust tables in the worker)."""

    def get_users(self, partition: int, user_ids: Sequence[str]) -> dict[str, bytes]: ...
    def put_users(self, partition: int, records: Mapping[str, bytes]) -> None: ...
    def get_budgets(self, partition: int) -> dict[str, bytes]: ...
    def put_budgets(self, partition: int, records: Mapping[str, bytes]) -> None: ...
    def get_preferences(self, partition: int, user_id: str) -> bytes | None: ...
    def set_open_carts(self, partition: int, carts: Mapping[str, int | None]) -> None: ...
    def due_carts(self, before_ms: int) -> list[tuple[int, str]]: ...
    async def flush(self) -> None: ...


class Sink(Protocol):
    """Sends records; ``source_partition`` names the input partition they derive from (the
    transaction they belong to under exactly-once)."""

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   source_partition: int) -> Awaitable[Any]: ...
    async def flush(self) -> None: ...


class ModelSource(Protocol):
    """The encoder currently serving, or None (missing or failed checkpoint)."""

    @property
    def encoder(self) -> Any | None: ...


@dataclass(frozen=True)
class Topics:
    dlq: str
    decisions: str
    vectors: str


@dataclass
class BatchResult:
    events: int = 0
    rejected: int = 0
    duplicates: int = 0
    refreshed: int = 0
    decisions: list[Decision] = field(default_factory=list)
    trigger_ts_ms: list[int] = field(default_factory=list)  # event time behind each decision


@dataclass
class _User:
    partition: int
    events: list[Event] = field(default_factory=list)
    sources: dict[int, Record] = field(default_factory=dict)  # id(event) -> its record
    state: UserState | None = None
    before: bytes | None = None
    applied: list[Event] = field(default_factory=list)


class Pipeline:
    def __init__(self, *, limits: Limits, topics: Topics, store: Store, sink: Sink,
                 metrics: Metrics, model: ModelSource, policy_config: PolicyConfig,
                 coupons: Callable[[], Mapping[str, Coupon]], partitions: int,
                 max_len: int = state.DEFAULT_MAX_LEN,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.topics = topics
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self.model = model
        self.policy_config = policy_config
        self.coupons = coupons
        self.partitions = partitions
        self.max_len = max_len
        self.clock = clock
        self.totals: Counter[str] = Counter()  # since the last summary line

    # --- the batch ------------------------------------------------------------------------

    async def process(self, records: Sequence[Record]) -> BatchResult:
        started = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        result = BatchResult()
        outputs: list[tuple[str, bytes | None, bytes, int]] = []
        users: dict[str, _User] = {}
        rejected: Counter[str] = Counter()
        by_type: Counter[str] = Counter()
        for record in records:
            parsed = parse_event(record.value, record.key, now_ms=now_ms, limits=self.limits)
            if isinstance(parsed, Rejection):
                rejected[parsed.reason.value] += 1
                outputs.append(self._dead_letter(parsed, record, now_ms))
                continue
            user = users.get(parsed.user_id)
            if user is None:
                user = users[parsed.user_id] = _User(record.partition)
            user.events.append(parsed)
            user.sources[id(parsed)] = record
        self._load_and_apply(users, records, outputs, rejected, by_type, now_ms)
        result.events = sum(by_type.values())
        result.rejected = sum(rejected.values())
        result.duplicates = rejected.get(Reason.DUPLICATE_EVENT.value, 0)

        changed = {uid: u for uid, u in users.items() if u.applied}
        result.refreshed = await self._refresh_vectors(changed, outputs, now_ms)
        budgets = self._load_budgets(changed)
        fired: dict[str, list[Trigger]] = {}
        for user_id, user in changed.items():
            assert user.state is not None
            triggers = policy.event_triggers(user.state, user.applied, self.policy_config)
            for trigger in triggers:
                self.metrics.triggers.labels(kind=trigger.kind).inc()
            if triggers:
                fired[user_id] = triggers
        rankings = self._rank_pushes(changed, fired, now_ms)
        for user_id, triggers in fired.items():
            user = changed[user_id]
            try:
                decision = self._decide(user_id, user, triggers[0], budgets, now_ms,
                                        rankings.get(user_id))
            except Exception as exc:  # a bug must cost one decision, not the worker
                log.exception("deciding failed", extra={"user": user_ref(user_id)})
                rejected[Reason.PROCESSING_ERROR.value] += 1
                trigger_event = next(e for e in user.applied
                                     if e.event_id == triggers[0].event_id)
                outputs.append(self._dead_letter(
                    Rejection(Reason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"),
                    user.sources[id(trigger_event)], now_ms))
                continue
            if decision is not None:
                result.decisions.append(decision)
                result.trigger_ts_ms.append(triggers[0].ts_ms)
                outputs.append((self.topics.decisions, user_id.encode(),
                                decision.to_json(), user.partition))
        await self._write(changed, budgets, outputs)
        self._count(records, by_type, rejected, result, started, now_ms)
        return result

    async def check_carts(self) -> BatchResult:
        """Decide cart-abandonment pushes for carts open longer than the configured delay.

        Runs on a timer, between micro-batches, over this worker's partitions only. Each cart
        gets at most one decision (its id derives from the cart's time); a purchase that
        arrived in time has already closed the cart; a cart in the user's quiet hours waits.
        """
        started = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        cfg = self.policy_config
        result = BatchResult()
        due = self.store.due_carts(now_ms - int(cfg.cart_abandon_seconds * 1000))
        log.debug("cart check", extra={"due": len(due)})
        if not due:
            return result
        users: dict[str, _User] = {}
        for partition, user_id in due:
            users[user_id] = _User(partition)
        for partition in {p for p, _ in due}:
            ids = [uid for p, uid in due if p == partition]
            stored = self.store.get_users(partition, ids)
            for uid in ids:
                raw = stored.get(uid)
                users[uid].before = raw
                users[uid].state = state.decode(raw) if raw else UserState()
        outputs: list[tuple[str, bytes | None, bytes, int]] = []
        ready: dict[str, _User] = {}
        for uid, user in users.items():
            s = user.state
            assert s is not None
            if not policy.cart_abandoned(s, now_ms, cfg):
                ready[uid] = user  # closed or already reminded: the open-cart entry goes
                continue
            raw_prefs = self.store.get_preferences(user.partition, uid)
            prefs = Preferences.from_json(raw_prefs) if raw_prefs else None
            zone = prefs.timezone if prefs and prefs.timezone else cfg.default_timezone
            if policy.in_quiet_hours(now_ms, zone, cfg):
                continue  # try again after the quiet hours
            ready[uid] = user
        stale = {uid: u for uid, u in ready.items() if u.state is not None and (
            u.state.vector is None or self.model.encoder is None
            or u.state.model_version != self.model.encoder.model_version)}
        result.refreshed = await self._refresh_vectors(stale, outputs, now_ms)
        budgets = self._load_budgets(ready)
        for uid, user in ready.items():
            s = user.state
            assert s is not None
            if not policy.cart_abandoned(s, now_ms, cfg):
                continue
            trigger = Trigger("cart_abandoned", f"cart:{s.cart_ts_ms}", (s.cart_item or "",),
                              s.cart_ts_ms)
            self.metrics.triggers.labels(kind=trigger.kind).inc()
            decision = self._decide(uid, user, trigger, budgets, now_ms)
            if decision is not None:
                result.decisions.append(decision)
                result.trigger_ts_ms.append(now_ms)  # the timer, not the cart, is the trigger
                outputs.append((self.topics.decisions, uid.encode(), decision.to_json(),
                                user.partition))
        await self._write(ready, budgets, outputs, force_carts=True)
        self._count([], Counter(), Counter(), result, started, now_ms)
        return result

    def _dead_letter(self, rejection: Rejection, record: Record,
                     now_ms: int) -> tuple[str, bytes | None, bytes, int]:
        return (self.topics.dlq, record.key, dead_letter(
            rejection, raw=record.value, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset, at_ms=now_ms), record.partition)

    def _load_and_apply(self, users: dict[str, _User], records: Sequence[Record],
                        outputs: list[tuple[str, bytes | None, bytes, int]],
                        rejected: Counter[str], by_type: Counter[str], now_ms: int) -> None:
        by_partition: dict[int, list[str]] = defaultdict(list)
        for user_id, user in users.items():
            by_partition[user.partition].append(user_id)
        # Where each event came from, so a duplicate is dead-lettered with its source offset.
        for partition, user_ids in by_partition.items():
            stored = self.store.get_users(partition, user_ids)
            for user_id in user_ids:
                user = users[user_id]
                user.before = stored.get(user_id)
                user.state = state.decode(user.before) if user.before else UserState()
                # A user's records come from one partition in offset order: those at or below
                # the stored offset are in the state already (redelivered after a crash or a
                # rebalance under at-least-once), however many there are.
                fresh = [e for e in user.events
                         if user.sources[id(e)].offset > user.state.last_offset]
                if len(fresh) < len(user.events):
                    self.metrics.records_redelivered.inc(len(user.events) - len(fresh))
                if fresh:
                    user.state.last_offset = user.sources[id(fresh[-1])].offset
                applied, duplicates = state.apply_events(user.state, fresh,
                                                         max_len=self.max_len)
                user.applied = applied
                for event in applied:
                    by_type[event.type] += 1
                for event in duplicates:
                    rejected[Reason.DUPLICATE_EVENT.value] += 1
                    record = user.sources[id(event)]
                    outputs.append(self._dead_letter(
                        Rejection(Reason.DUPLICATE_EVENT,
                                  f"event_id {event.event_id!r} was already applied"),
                        record, now_ms))


    async def _refresh_vectors(self, users: Mapping[str, _User],
                               outputs: list[tuple[str, bytes | None, bytes, int]],
                               now_ms: int) -> int:
        encoder = self.model.encoder
        if encoder is None or not users:
            return 0
        ids = list(users)
        states = [users[uid].state for uid in ids]
        items = [encoder.item_indices_from_keys(s.items) for s in states]  # type: ignore[union-attr]
        types = [s.types.astype(np.int64) for s in states]  # type: ignore[union-attr]
        times = [s.ts_s * 1000 for s in states]  # type: ignore[union-attr]
        started = time.perf_counter()
        try:
            # A forward pass takes milliseconds to tens of milliseconds: off the event loop,
            # so heartbeats and the preferences agent keep running meanwhile.
            vectors = await asyncio.to_thread(encoder.user_vectors, items, types, times)
        except Exception:
            self.metrics.encoder_failures.labels(stage="inference").inc()
            log.exception("encoder call failed; deciding without fresh vectors",
                          extra={"users": len(ids)})
            return 0
        self.metrics.encoder_duration.observe(time.perf_counter() - started)
        self.metrics.encoder_batch_size.observe(len(ids))
        self.metrics.vector_refreshes.inc(len(ids))
        version = encoder.model_version
        for uid, s, vector in zip(ids, states, vectors, strict=True):
            assert s is not None
            s.vector = np.asarray(vector, dtype=np.float16)
            s.model_version = version
            s.vector_events = s.n_events
            outputs.append((self.topics.vectors, uid.encode(), orjson.dumps({
                "vector": base64.b64encode(s.vector.astype("<f2").tobytes()).decode(),
                "model_version": version, "updated_at": now_ms, "n_events": s.n_events,
            }), users[uid].partition))
        return len(ids)

    def _load_budgets(self, users: Mapping[str, _User]) -> dict[int, dict[str, CouponBudget]]:
        """This batch's partitions' budgets for every campaign, reserved against in memory."""
        catalog = self.coupons()
        budgets: dict[int, dict[str, CouponBudget]] = {}
        for partition in {u.partition for u in users.values()}:
            stored = self.store.get_budgets(partition)
            mine: dict[str, CouponBudget] = {}
            for coupon in catalog.values():
                budget = policy.partition_budget(coupon, partition, self.partitions)
                raw = stored.get(coupon.coupon_id)
                if raw:
                    body = orjson.loads(raw)
                    budget.spent, budget.exposures = float(body["spent"]), int(body["exposures"])
                mine[coupon.coupon_id] = budget
            budgets[partition] = mine
        return budgets

    def _current_vector(self, user: _User) -> np.ndarray | None:
        """The user's vector if the serving model computed it, else None."""
        assert user.state is not None
        encoder = self.model.encoder
        if encoder is None or user.state.vector is None:
            return None
        return user.state.vector if user.state.model_version == encoder.model_version else None

    def _rank_pushes(self, users: Mapping[str, _User], fired: Mapping[str, list[Trigger]],
                     now_ms: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Push candidates for every user with a trigger, a vector and an open push channel,
        in a few matrix products instead of one catalogue scan per decision."""
        encoder, cfg = self.model.encoder, self.policy_config
        if encoder is None:
            return {}
        ids, vectors, exclusions, boosts = [], [], [], []
        for user_id in fired:
            state_ = users[user_id].state
            vector = self._current_vector(users[user_id])
            if (vector is None or state_ is None or state_.n_events < cfg.cold_start_events
                    or policy.push_blocked(state_, now_ms, cfg)):
                continue  # decide falls back to popularity, or sends no push at all
            ids.append(user_id)
            vectors.append(vector)
            exclusions.append(policy.push_exclusions(state_, encoder, now_ms, cfg))
            boosts.append(policy.repeat_boost(state_, encoder, cfg))
        if not ids:
            return {}
        try:
            ranked = policy.rank_push_items(encoder, np.stack(vectors), exclusions, boosts,
                                            cfg)
        except Exception:  # each decision then ranks its own candidates (or fails alone)
            log.exception("batched push ranking failed", extra={"users": len(ids)})
            return {}
        return dict(zip(ids, ranked, strict=True))

    def _decide(self, user_id: str, user: _User, trigger: Trigger,
                budgets: dict[int, dict[str, CouponBudget]], now_ms: int,
                push_ranking: tuple[np.ndarray, np.ndarray] | None = None) -> Decision | None:
        assert user.state is not None
        raw_prefs = self.store.get_preferences(user.partition, user_id)
        prefs = Preferences.from_json(raw_prefs) if raw_prefs else None
        ctx = policy.Context(config=self.policy_config, coupons=self.coupons(),
                             budgets=budgets.setdefault(user.partition, {}),
                             model=self.model.encoder, now_ms=now_ms,
                             push_ranking=push_ranking)
        vector = self._current_vector(user)
        current = vector is not None
        decision = policy.decide(user_id, user.state, vector, trigger, prefs, ctx,
                                 vector_stale=current and user.state.vector_stale)
        if decision is not None and decision.to_send:
            user.state.channels[decision.action].record_send(now_ms)
        if trigger.kind == "cart_abandoned":
            user.state.cart_reminded = True  # decided once, even if consent said nothing
        return decision

    async def _write(self, users: Mapping[str, _User],
                     budgets: dict[int, dict[str, CouponBudget]],
                     outputs: list[tuple[str, bytes | None, bytes, int]],
                     force_carts: bool = False) -> None:
        if any(b.exposures for mine in budgets.values() for b in mine.values()):
            for partition, mine in budgets.items():
                self.store.put_budgets(partition, {
                    cid: orjson.dumps({"spent": b.spent, "exposures": b.exposures})
                    for cid, b in mine.items() if b.exposures})
            await self.sink.flush()  # reservations are durable before any coupon leaves
        deliveries = [await self.sink.send(topic, key, value, partition)
                      for topic, key, value, partition in outputs]
        if deliveries:
            await asyncio.gather(*deliveries)  # a failed send raises: the batch is not acked
        by_partition: dict[int, dict[str, bytes]] = defaultdict(dict)
        carts: dict[int, dict[str, int | None]] = defaultdict(dict)
        for user_id, user in users.items():
            assert user.state is not None
            encoded = state.encode(user.state)
            if encoded != user.before:
                by_partition[user.partition][user_id] = encoded
                self.metrics.state_bytes.observe(len(encoded))
            was_open = force_carts or (user.before is not None
                                       and state.decode(user.before).cart_item is not None)
            now_open = user.state.cart_item is not None and not user.state.cart_reminded
            if now_open:
                carts[user.partition][user_id] = user.state.cart_ts_ms
            elif was_open:
                carts[user.partition][user_id] = None
        for partition, encoded_users in by_partition.items():
            self.store.put_users(partition, encoded_users)
        for partition, open_carts in carts.items():
            self.store.set_open_carts(partition, open_carts)
        await self.store.flush()

    def _count(self, records: Sequence[Record], by_type: Counter[str], rejected: Counter[str],
               result: BatchResult, started: float, now_ms: int) -> None:
        m = self.metrics
        for event_type, n in by_type.items():
            m.events_consumed.labels(type=event_type).inc(n)
        for reason, n in rejected.items():
            m.records_rejected.labels(reason=reason).inc(n)
        published_ms = int(self.clock() * 1000)
        for decision, trigger_ts in zip(result.decisions, result.trigger_ts_ms, strict=True):
            m.decisions.labels(action=decision.action, arm=decision.arm).inc()
            m.decision_latency.observe(max(0, published_ms - trigger_ts) / 1000)
        if records:
            m.batch_size.observe(len(records))
            m.batch_duration.observe(time.perf_counter() - started)
        totals = self.totals
        totals["records"] += len(records)
        totals["events"] += result.events
        totals["rejected"] += result.rejected
        totals["decisions"] += len(result.decisions)
        totals["sent"] += sum(1 for d in result.decisions if d.to_send)
        totals["batches"] += 1 if records else 0
        log.debug("batch", extra={"records": len(records), "events": result.events,
                                  "rejected": result.rejected, "decisions": len(result.decisions),
                                  "refreshed": result.refreshed})

    def log_summary(self) -> None:
        """One info line with what happened since the last one (the worker calls it each
        minute), then start counting again."""
        totals, self.totals = self.totals, Counter()
        log.info("summary", extra={key: totals.get(key, 0) for key in (
            "records", "events", "rejected", "decisions", "sent", "batches")})
