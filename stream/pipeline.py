"""The hot path, independent of faust: a micro-batch of consumed records in, effects out.

One call to :meth:`Pipeline.process` handles everything the consumer fetched:

1. validate every record (rejects go to the dead-letter topic with their reason); a valid event
   that its producer put on another partition than ``murmur2(user_id)`` would (librdkafka's
   default partitioner is CRC32, for one) is forwarded to the repartition topic, on the
   partition its user's state, preferences and carts live on, and processed from there;
2. group valid events by user, keeping each user's arrival order;
3. load each touched user's state once and apply the user's events (duplicates of already
   applied event ids are dead-lettered as ``duplicate_event``);
4. refresh the vectors of every user whose state changed, in **one** batched encoder call, run
   off the event loop;
5. rank push candidates for every user with a trigger in a few matrix products (scoring the
   catalogue one user at a time was the main cost of a decision), then decide for each of them
   (:mod:`stream.policy`), reserving coupon budgets;
6. attribute (:mod:`stream.outcomes`): each decision opens an attribution window in its user's
   state; the users' events, in log order, convert open windows; windows the partition's
   event time (its watermark, advanced record by record) has passed close unconverted, for
   users of the batch and for those the deadline index names. A closed window is an outcome,
   counted per group and arm in the ``outcome-counts`` table;
7. write, in this order: coupon budgets (and flush them), decisions + outcomes + user vectors
   + dead letters + forwarded records (and wait until the broker has them), then user states,
   open carts, pending decisions, watermarks and outcome counts (handed to the producer, so
   they belong to the same transaction as the batch's offsets under exactly-once, and
   flushed before the offsets are acknowledged: the worker handles the next batch while the
   broker acknowledges them, see :class:`stream.batching.Settling`).

:meth:`Pipeline.check_carts` (the abandonment timer) runs steps 3-7 for carts open too long:
the same loading, decide loop, error isolation and write order.

The write order is what makes a crash safe under at-least-once delivery. Budgets are reserved
before a coupon can leave, so no crash can lead to an overspend (at worst a reservation without
a coupon, which under-spends). Outputs are acknowledged before user state is written, so a user
whose state shows an event applied has had its decisions published; a crash before the state
write replays the batch, which decides the same triggers again under the same decision ids
(consumers de-duplicate by ``decision_id``). The consumer acknowledges the offsets only after
this method returns.

Errors are policy, not accidents (as Kafka Streams' exception handlers). Steps 1-5 only read
the store, so when they raise, the batch is computed again (``retries`` times: a transient
fault passes), then cut in halves, keeping each user's records together and in order, until
the record or cart that raises is alone; it is dead-lettered as ``processing_error`` with the
exception and its offset, and everything else is processed. One decision that raises costs
that decision only. A failure to *write* (the broker unreachable past the producer's retries)
is not the input's fault: it propagates, nothing is acknowledged, and the records are read
again.

The worker hands in a :class:`Store` (faust tables) and a :class:`Sink` (the producer);
:mod:`stream.testing` has in-memory ones for specs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import numpy as np
import orjson
from sortedcontainers import SortedList

from stream import outcomes, policy, state
from stream.bandit import OfferStats
from stream.config import PolicyConfig
from stream.contracts import (
    Action,
    Coupon,
    Decision,
    Event,
    Limits,
    Outcome,
    Preferences,
    Reason,
    Rejection,
    Trigger,
    TriggerKind,
    dead_letter,
    parse_event,
)
from stream.logs import user_ref
from stream.metrics import Metrics
from stream.policy import CouponBudget, ServingModel
from stream.state import PendingWindow, UserState
from stream.topics import expected_partition
from stream.uplift_model import UpliftModel

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


@dataclass(frozen=True)
class OpenCart:
    """An entry of the open-carts table: a cart whose abandonment reminder is still due.

    It holds the cart's raw item id (user state keeps only that a cart is open): the reminder
    names the very item, however long its id.
    """

    partition: int
    user_id: str
    ts_ms: int
    item_id: str
    event_id: str  # of the cart add that opened it: the reminder's trigger, so its decision id

    def to_json(self) -> bytes:
        return orjson.dumps({"ts": self.ts_ms, "p": self.partition, "item": self.item_id,
                             "event": self.event_id})

    @classmethod
    def from_json(cls, user_id: str, raw: bytes) -> OpenCart:
        body = orjson.loads(raw)
        return cls(int(body["p"]), user_id, int(body["ts"]), str(body["item"]),
                   str(body["event"]))


class Store(Protocol):
    """Per-partition state the pipeline reads and writes (faust tables in the worker)."""

    def get_users(self, partition: int, user_ids: Sequence[str]) -> dict[str, bytes]: ...
    def put_users(self, partition: int, records: Mapping[str, bytes]) -> None: ...
    def get_budgets(self, partition: int) -> dict[str, bytes]: ...
    def put_budgets(self, partition: int, records: Mapping[str, bytes]) -> None: ...
    def get_preferences(self, partition: int, user_id: str) -> bytes | None: ...
    def set_open_carts(self, partition: int, carts: Mapping[str, OpenCart | None]) -> None: ...
    def due_carts(self, before_ms: int) -> list[OpenCart]: ...
    # Attribution: decisions waiting for their outcome (by ``outcomes.ref``), the partition's
    # event-time watermark, and outcome counts (by ``outcomes.tally_key``).
    def get_pending(self, partition: int, refs: Sequence[str]) -> dict[str, bytes]: ...
    def put_pending(self, partition: int, records: Mapping[str, bytes | None]) -> None: ...
    def all_pending(self, partition: int) -> list[bytes]: ...
    def get_watermark(self, partition: int) -> int: ...
    def put_watermark(self, partition: int, watermark: int) -> None: ...
    def get_counts(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]: ...
    def put_counts(self, partition: int, records: Mapping[str, bytes]) -> None: ...
    # The pull API's claims by idempotency key (``Claim.store_key``).
    def get_claims(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]: ...
    def put_claims(self, partition: int, records: Mapping[str, bytes | None]) -> None: ...
    async def flush(self) -> None: ...


class Sink(Protocol):
    """Sends records; ``source_partition`` names the input partition they derive from (the
    transaction they belong to under exactly-once); ``partition`` None lets the producer's
    partitioner (murmur2 of the key) choose."""

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   source_partition: int, partition: int | None = None) -> Awaitable[Any]: ...
    async def flush(self) -> None: ...


class ModelSource(Protocol):
    """The models currently serving; None for one missing or failed to load."""

    @property
    def encoder(self) -> ServingModel | None: ...

    @property
    def uplift(self) -> UpliftModel | None: ...


@dataclass(frozen=True)
class Topics:
    events: str
    repartition: str  # where misplaced events go, on the partition their user lives on
    dlq: str
    decisions: str
    vectors: str
    outcomes: str = "outcomes"


class Output(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes | None
    source_partition: int
    partition: int | None = None


@dataclass
class BatchResult:
    events: int = 0
    rejected: int = 0
    duplicates: int = 0
    repartitioned: int = 0
    refreshed: int = 0
    decisions: list[Decision] = field(default_factory=list)
    trigger_ts_ms: list[int] = field(default_factory=list)  # event time behind each decision
    outcomes: list[Outcome] = field(default_factory=list)
    unattributed: int = 0  # conversions that found no open window
    partitions: set[int] = field(default_factory=set)  # partitions written to

    def add(self, other: BatchResult) -> BatchResult:
        self.events += other.events
        self.rejected += other.rejected
        self.duplicates += other.duplicates
        self.repartitioned += other.repartitioned
        self.refreshed += other.refreshed
        self.decisions += other.decisions
        self.trigger_ts_ms += other.trigger_ts_ms
        self.outcomes += other.outcomes
        self.unattributed += other.unattributed
        self.partitions |= other.partitions
        return self


@dataclass(frozen=True)
class Claim:
    """A shop claims an offer for a user (the pull API): decided like a stream trigger, under
    the client's idempotency key."""

    partition: int
    user_id: str
    key: str

    @property
    def store_key(self) -> str:
        """The ``api-claims`` table's key: the user's, so it lives on the user's partition."""
        return f"{self.user_id}\x1f{self.key}"

    def trigger(self, now_ms: int) -> Trigger:
        # Named by the key: the same key decides again under the same decision id.
        return Trigger(TriggerKind.ON_SITE, f"claim:{self.key}", (), now_ms)


class ClaimWriteFailed(RuntimeError):
    """A claim's writes failed part way: the local state may hold what the broker does not
    (under exactly-once, an aborted transaction), so the worker must restart from the
    changelog, as after a failed batch write."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"writing the claim of partition {claim.partition} failed")


@dataclass(frozen=True)
class ClaimAnswer:
    decision: dict[str, Any] | None  # as published on `decisions`; None: consent allows none
    replayed: bool  # the key was claimed before: the decision made then
    partitions: set[int]  # written to (committed now under exactly-once)


@dataclass(frozen=True)
class Preview:
    decision: Decision | None  # None: consent allows no offer at all
    known: bool  # the worker holds state for the user (else the cold-start answer)


@dataclass(frozen=True)
class StoredVector:
    vector: np.ndarray  # float16
    model_version: str
    updated_at: int | None  # event time (ms) of the newest event it saw; None: not the last
    current: bool  # the serving model computed it from every event of the user's state


#: What a batch pass works on: a consumed record, or a cart the timer found due. (An API claim
#: is computed alone by :meth:`Pipeline.claim`, never retried or isolated as a batch is.)
Work = Record | OpenCart


@dataclass
class _User:
    partition: int
    events: list[Event] = field(default_factory=list)
    sources: dict[int, Record] = field(default_factory=dict)  # id(event) -> its record
    due_cart: OpenCart | None = None
    claim: Claim | None = None
    state: UserState | None = None
    before: bytes | None = None
    cart_was_due: bool = False  # an open-carts entry exists for this user
    applied: list[Event] = field(default_factory=list)
    watermarks: dict[int, int] = field(default_factory=dict)  # id(event) -> watermark before it
    decision: Decision | None = None  # made in this pass
    windows_before: list[PendingWindow] = field(default_factory=list)


@dataclass
class _Pass:
    """Everything one pass over a batch computed, before anything is written."""

    now_ms: int
    users: dict[str, _User] = field(default_factory=dict)
    outputs: list[Output] = field(default_factory=list)
    budgets: dict[int, dict[str, CouponBudget]] = field(default_factory=dict)
    carts: dict[int, dict[str, OpenCart | None]] = field(
        default_factory=lambda: defaultdict(dict))
    result: BatchResult = field(default_factory=BatchResult)
    rejected: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    triggers: Counter[str] = field(default_factory=Counter)
    watermarks: dict[int, int] = field(default_factory=dict)  # per partition, as it advances
    watermarks_before: dict[int, int] = field(default_factory=dict)  # ... and as it was
    pending: dict[int, dict[str, bytes | None]] = field(
        default_factory=lambda: defaultdict(dict))  # None: the outcome is out
    tallies: dict[int, dict[outcomes.Group, outcomes.Tally]] = field(
        default_factory=lambda: defaultdict(dict))
    due_windows: list[tuple[int, tuple[int, str]]] = field(default_factory=list)  # index entries
    turns: _Turns = field(default_factory=lambda: _Turns())
    # The coupon catalog as the pass began: it may change while the pass yields.
    catalog: Mapping[str, Coupon] = field(default_factory=dict)
    claims: dict[int, dict[str, bytes | None]] = field(
        default_factory=lambda: defaultdict(dict))  # api-claims entries to write


class Pipeline:
    def __init__(self, *, limits: Limits, topics: Topics, store: Store, sink: Sink,
                 metrics: Metrics, model: ModelSource, policy_config: PolicyConfig,
                 coupons: Callable[[], Mapping[str, Coupon]], partitions: int,
                 attribution: outcomes.Rules | None = outcomes.DEFAULT_RULES,
                 max_len: int = state.DEFAULT_MAX_LEN, retries: int = 2,
                 clock: Callable[[], float] = time.time,
                 offer_stats: OfferStats | None = None) -> None:
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
        self.retries = retries
        self.clock = clock
        self.attribution = attribution  # None: no windows, no outcomes
        # Every worker's outcome counts, for Thompson sampling (stream.bandit).
        self.offer_stats = offer_stats if policy_config.thompson_sampling else None
        self.totals: Counter[str] = Counter()  # since the last summary line
        # Per partition: (watermark past which a window closes, user id) of every open window,
        # built from ``pending-outcomes`` when a partition is first met after an assignment.
        self._deadlines: dict[int, SortedList] = {}

    def forget_partitions(self) -> None:
        """After a rebalance: rebuild the deadline index of each partition when next met."""
        self._deadlines.clear()

    def open_windows(self) -> int:
        """Attribution windows open on the partitions met since the last rebalance."""
        return sum(len(index) for index in self._deadlines.values())

    # --- entry points -----------------------------------------------------------------------

    async def process(self, records: Sequence[Record], *, durable: bool = True) -> BatchResult:
        """Handle one micro-batch of consumed records (see the module docstring).

        With ``durable`` False it returns once the state writes are handed to the store, not
        yet acknowledged by the broker: the caller awaits ``store.flush()`` before it
        acknowledges the offsets, and may handle the next batch meanwhile.
        """
        result = await self._run(list(records), self.retries)
        if durable:
            await self.store.flush()
        return result

    async def check_carts(self) -> BatchResult:
        """Decide cart-abandonment pushes for carts open longer than the configured delay.

        Runs on a timer, between micro-batches, over this worker's partitions only. Each cart
        gets at most one decision (its id derives from the cart's time); a purchase that
        arrived in time has already closed the cart; a cart in the user's quiet hours waits.
        ``partitions`` of the result names the partitions written to: under exactly-once their
        transactions must be committed now, since no input offset will do it.
        """
        delay_ms = int(self.policy_config.cart_abandon_seconds * 1000)
        due = self.store.due_carts(int(self.clock() * 1000) - delay_ms)
        log.debug("cart check", extra={"due": len(due)})
        if not due:
            return BatchResult()
        result = await self._run(list(due), self.retries)
        await self.store.flush()
        return result

    def preview(self, user_id: str, partition: int, push_items: int | None = None) -> Preview:
        """What the policy would decide for the user now, on the same code and state as a
        decision, changing nothing: no budget reserved, no cap counted, nothing published."""
        now_ms = int(self.clock() * 1000)
        raw = self.store.get_users(partition, [user_id]).get(user_id)
        user = _User(partition, before=raw,
                     state=state.decode(raw) if raw else UserState())
        catalog = self.coupons()
        budgets = self._load_budgets({user_id: user}, catalog)  # fresh: decide may reserve
        config = self.policy_config
        if push_items is not None:
            config = replace(config, push_items=push_items)
        assert user.state is not None
        ctx = policy.Context(config=config, coupons=catalog,
                             budgets=budgets.setdefault(partition, {}),
                             model=self.model.encoder, now_ms=now_ms,
                             uplift=self.model.uplift)
        vector = self._current_vector(user)
        decision = policy.decide(user_id, user.state, vector,
                                 Trigger(TriggerKind.ON_SITE, "preview", (), now_ms),
                                 self._preferences(user_id, user), ctx,
                                 vector_stale=vector is not None and user.state.vector_stale)
        return Preview(decision, known=raw is not None)

    def vector(self, user_id: str, partition: int) -> StoredVector | None:
        """The user's vector as the state holds it, or None (no state, or no vector yet)."""
        raw = self.store.get_users(partition, [user_id]).get(user_id)
        s = state.decode(raw) if raw else None
        if s is None or s.vector is None:
            return None
        encoder = self.model.encoder
        return StoredVector(
            s.vector, s.model_version,
            updated_at=s.last_ts_s * 1000 if not s.vector_stale else None,
            current=encoder is not None and encoder.model_version == s.model_version
            and not s.vector_stale)

    async def claim(self, claim: Claim, remember_ms: int) -> ClaimAnswer:
        """Decide for a shop's claim and publish it, as for a stream trigger: budgets and caps
        apply and are spent, the decision goes to `decisions` and opens its attribution
        window. A key claimed within ``remember_ms`` answers with the decision made then.

        Raises what deciding raised (the caller answers with an error; nothing is written).
        """
        started = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        raw = self.store.get_claims(claim.partition, [claim.store_key]).get(claim.store_key)
        if raw is not None:
            body = orjson.loads(raw)
            if now_ms - int(body["at"]) < remember_ms:
                return ClaimAnswer(body["decision"], replayed=True, partitions=set())
        done = await self._compute([claim], now_ms)
        decision = done.users[claim.user_id].decision
        published = orjson.loads(decision.to_json()) if decision else None
        done.claims[claim.partition][claim.store_key] = orjson.dumps(
            {"at": now_ms, "decision": published})
        try:
            await self._write(done)
            await self.store.flush()
        except Exception as exc:
            raise ClaimWriteFailed(claim) from exc
        self._count([claim], done, started)
        return ClaimAnswer(published, replayed=False, partitions=done.result.partitions)

    # --- one pass, retried, then isolated -------------------------------------------------

    async def _run(self, work: list[Work], retries: int) -> BatchResult:
        started = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        failure: Exception | None = None
        for attempt in range(retries + 1):
            try:
                done = await self._compute(work, now_ms)
                break
            except Exception as exc:  # input (or a bug it meets) must not stop the worker
                failure = exc
                log.warning("batch failed (attempt %d of %d): %s: %s", attempt + 1,
                            retries + 1, type(exc).__name__, exc)
        else:
            assert failure is not None
            return await self._isolate(work, failure, now_ms)
        await self._write(done)
        self._count(work, done, started)
        return done.result

    async def _isolate(self, work: list[Work], failure: Exception, now_ms: int) -> BatchResult:
        """Find what raises by halving the batch; dead-letter it, process the rest."""
        if len(work) == 1:
            return await self._dead_letter_alone(work[0], failure, now_ms)
        result = BatchResult()
        for part in _halves(work):
            result.add(await self._run(part, retries=0))
        return result

    async def _dead_letter_alone(self, item: Work, failure: Exception,
                                 now_ms: int) -> BatchResult:
        done = _Pass(now_ms)
        error = f"{type(failure).__name__}: {failure}"[:500]
        log.error("processing failed; dead-lettered as processing_error",
                  exc_info=failure, extra={"source": _describe(item)})
        done.rejected[Reason.PROCESSING_ERROR.value] += 1
        if isinstance(item, OpenCart):
            done.outputs.append(self._timer_dead_letter(item, error, type(failure).__name__,
                                                        now_ms))
            done.carts[item.partition][item.user_id] = None  # do not fail on every tick
        else:
            done.outputs.append(self._dead_letter(
                Rejection(Reason.PROCESSING_ERROR, error), item, now_ms,
                exception=type(failure).__name__))
        await self._write(done)
        self._count([item], done, time.perf_counter())
        return done.result

    # --- computing a pass (reads the store, writes nothing) -------------------------------

    async def _compute(self, work: Sequence[Work | Claim], now_ms: int) -> _Pass:
        done = _Pass(now_ms)
        for item in work:
            if isinstance(item, OpenCart):
                user = done.users.setdefault(item.user_id, _User(item.partition))
                user.due_cart = item
            elif isinstance(item, Claim):
                done.users.setdefault(item.user_id, _User(item.partition)).claim = item
            else:
                self._route(item, done)
            await done.turns.take()
        self._add_due_windows(done)
        await self._load_and_apply(done)
        changed = {uid: u for uid, u in done.users.items() if u.applied}
        encoder = self.model.encoder
        due = {uid: u for uid, u in done.users.items() if u.due_cart is not None}
        stale = {uid: u for uid, u in due.items() if uid not in changed and (
            u.state is not None and (u.state.vector is None or encoder is None
                                     or u.state.model_version != encoder.model_version))}
        done.result.refreshed = await self._refresh_vectors(changed | stale, done)
        fired = self._triggers(done)
        done.catalog = self.coupons()
        done.budgets = self._load_budgets({uid: done.users[uid] for uid in fired}, done.catalog)
        rankings = self._rank_pushes(done.users, fired, now_ms)
        await done.turns.take()
        await self._decide_all(done, fired, rankings)
        await self._attribute(done)
        self._note_open_carts(done)
        return done

    def _route(self, record: Record, done: _Pass) -> None:
        """Validate a record: reject it, forward it to its user's partition, or keep it."""
        parsed = parse_event(record.value, record.key, now_ms=done.now_ms, limits=self.limits)
        if isinstance(parsed, Rejection):
            done.rejected[parsed.reason.value] += 1
            done.outputs.append(self._dead_letter(parsed, record, done.now_ms))
            return
        if record.topic == self.topics.events:
            key = parsed.user_id.encode()  # the record's key: parse_event checked they match
            home = expected_partition(key, self.partitions)
            if home != record.partition and record.value is not None:
                done.result.repartitioned += 1
                done.outputs.append(Output(self.topics.repartition, key, record.value,
                                           record.partition, home))
                return
        user = done.users.get(parsed.user_id)
        if user is None:
            user = done.users[parsed.user_id] = _User(record.partition)
        user.events.append(parsed)
        user.sources[id(parsed)] = record
        if self.attribution is not None:
            mark = self._watermark(done, record.partition)
            user.watermarks[id(parsed)] = mark
            done.watermarks[record.partition] = max(mark, parsed.ts)

    def _watermark(self, done: _Pass, partition: int) -> int:
        mark = done.watermarks.get(partition)
        if mark is None:
            mark = done.watermarks[partition] = self.store.get_watermark(partition)
            done.watermarks_before[partition] = mark
        return mark

    def _add_due_windows(self, done: _Pass) -> None:
        """Users whose open windows this batch's event time has passed: loaded with the
        batch's users, so their windows close in this pass."""
        if self.attribution is None:
            return
        for partition, mark in done.watermarks.items():
            for entry in self._deadline_index(partition).irange(
                    maximum=(mark - 1, "\U0010ffff")):
                done.due_windows.append((partition, entry))
                if entry[1] not in done.users:
                    done.users[entry[1]] = _User(partition)

    def _deadline_index(self, partition: int) -> SortedList:
        index = self._deadlines.get(partition)
        if index is None:
            rules = self.attribution
            assert rules is not None
            index = self._deadlines[partition] = SortedList()
            for raw in self.store.all_pending(partition):
                body = orjson.loads(raw)
                index.add((rules.closes_by_start(int(body["window_start"]) // 1000),
                           body["user_id"]))
        return index

    async def _load_and_apply(self, done: _Pass) -> None:
        by_partition: dict[int, list[str]] = defaultdict(list)
        for user_id, user in done.users.items():
            by_partition[user.partition].append(user_id)
        for partition, user_ids in by_partition.items():
            stored = self.store.get_users(partition, user_ids)
            for user_id in user_ids:
                user = done.users[user_id]
                user.before = stored.get(user_id)
                user.state = state.decode(user.before) if user.before else UserState()
                user.cart_was_due = user.due_cart is not None or (
                    user.state.cart_open and not user.state.cart_reminded)
                user.windows_before = list(user.state.pending)
                if user.events:
                    self._apply(user_id, user, done)
                await done.turns.take()

    def _apply(self, user_id: str, user: _User, done: _Pass) -> None:
        s = user.state
        assert s is not None
        # A user's records come from one partition of each topic, in offset order: those at
        # or below the stored offset are in the state already (redelivered after a crash or a
        # rebalance under at-least-once), however many there are.
        fresh: list[Event] = []
        for event in user.events:
            record = user.sources[id(event)]
            from_events = record.topic != self.topics.repartition
            last = s.last_offset if from_events else s.last_repartition_offset
            if record.offset <= last:
                continue
            fresh.append(event)
            if from_events:
                s.last_offset = record.offset
            else:
                s.last_repartition_offset = record.offset
        if len(fresh) < len(user.events):
            self.metrics.records_redelivered.inc(len(user.events) - len(fresh))
        applied, duplicates = state.apply_events(s, fresh, max_len=self.max_len)
        user.applied = applied
        for event in applied:
            done.by_type[event.type] += 1
        for event in duplicates:
            done.rejected[Reason.DUPLICATE_EVENT.value] += 1
            done.outputs.append(self._dead_letter(
                Rejection(Reason.DUPLICATE_EVENT,
                          f"event_id {event.event_id!r} was already applied"),
                user.sources[id(event)], done.now_ms))

    async def _refresh_vectors(self, users: Mapping[str, _User], done: _Pass) -> int:
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
            done.outputs.append(Output(self.topics.vectors, uid.encode(), orjson.dumps({
                "vector": base64.b64encode(s.vector.astype("<f2").tobytes()).decode(),
                "model_version": version, "updated_at": done.now_ms, "n_events": s.n_events,
            }), users[uid].partition))
        return len(ids)

    def _triggers(self, done: _Pass) -> dict[str, Trigger]:
        """Each user's strongest trigger: from the events just applied, or the due cart."""
        cfg = self.policy_config
        fired: dict[str, Trigger] = {}
        for user_id, user in done.users.items():
            s = user.state
            assert s is not None
            if user.claim is not None:
                fired[user_id] = user.claim.trigger(done.now_ms)
                done.triggers[TriggerKind.ON_SITE] += 1
                continue
            cart = user.due_cart
            if cart is not None and policy.cart_abandoned(s, done.now_ms, cfg) \
                    and s.cart_ts_ms == cart.ts_ms:
                prefs = self._preferences(user_id, user)
                zone = prefs.timezone if prefs and prefs.timezone else cfg.default_timezone
                if policy.in_quiet_hours(done.now_ms, zone, cfg):
                    continue  # the entry stays: tried again after the quiet hours
                # Named by the cart add that opened the cart: two carts opened at the same
                # millisecond (a re-add after a reminder) are two reminders, two ids.
                fired[user_id] = Trigger(TriggerKind.CART_ABANDONED, f"cart:{cart.event_id}",
                                         (cart.item_id,) if cart.item_id else (), cart.ts_ms)
                continue
            triggers = policy.event_triggers(s, user.applied, cfg) if user.applied else []
            for trigger in triggers:
                done.triggers[trigger.kind] += 1
            if triggers:
                fired[user_id] = triggers[0]
        for trigger in fired.values():
            if trigger.kind == TriggerKind.CART_ABANDONED:
                done.triggers[trigger.kind] += 1
        return fired

    def _load_budgets(self, users: Mapping[str, _User],
                      catalog: Mapping[str, Coupon]) -> dict[int, dict[str, CouponBudget]]:
        """This batch's partitions' budgets for every campaign, reserved against in memory."""
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

    def _rank_pushes(self, users: Mapping[str, _User], fired: Mapping[str, Trigger],
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

    async def _decide_all(self, done: _Pass, fired: Mapping[str, Trigger],
                          rankings: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """The one decide loop, for stream- and timer-triggered decisions alike: a decision
        that raises is dead-lettered with what triggered it and costs nothing else."""
        for user_id, trigger in fired.items():
            await done.turns.take()
            user = done.users[user_id]
            s = user.state
            assert s is not None
            try:
                decision = self._decide(user_id, user, trigger, done, rankings.get(user_id))
            except Exception as exc:  # a bug must cost one decision, not the worker
                if user.claim is not None:
                    raise  # the claim's caller answers with the error; nothing is written
                log.exception("deciding failed", extra={"user": user_ref(user_id),
                                                        "trigger": trigger.kind})
                done.rejected[Reason.PROCESSING_ERROR.value] += 1
                error = f"deciding failed: {type(exc).__name__}: {exc}"[:500]
                if user.due_cart is not None and trigger.kind == TriggerKind.CART_ABANDONED:
                    s.cart_reminded = True  # decided (as failed) once, not on every tick
                    done.outputs.append(self._timer_dead_letter(
                        user.due_cart, error, type(exc).__name__, done.now_ms))
                else:
                    source = next(user.sources[id(e)] for e in user.applied
                                  if e.event_id == trigger.event_id)
                    done.outputs.append(self._dead_letter(
                        Rejection(Reason.PROCESSING_ERROR, error), source, done.now_ms,
                        exception=type(exc).__name__))
                continue
            if decision is None:
                continue
            user.decision = decision
            done.result.decisions.append(decision)
            # A timer decision's latency runs from the timer, not from the cart add.
            done.result.trigger_ts_ms.append(
                done.now_ms if trigger.kind == TriggerKind.CART_ABANDONED else trigger.ts_ms)
            done.outputs.append(Output(self.topics.decisions, user_id.encode(),
                                       decision.to_json(), user.partition))

    async def _attribute(self, done: _Pass) -> None:
        """Open a window per decision, convert or close windows (:mod:`stream.outcomes`), and
        turn each closed window into its outcome and counts."""
        rules = self.attribution
        if rules is None:
            return
        abandon_ms = int(self.policy_config.cart_abandon_seconds * 1000)
        closings: dict[int, list[tuple[_User, outcomes.Closing]]] = defaultdict(list)
        for user in done.users.values():
            await done.turns.take()
            s = user.state
            assert s is not None
            if user.decision is None and self._nothing_to_attribute(user, done, rules):
                done.result.unattributed += sum(
                    1 for e in user.applied if e.type in rules.conversion_types)
                continue
            steps: list[outcomes.Seen | outcomes.Opened] = [
                outcomes.Seen(e, user.watermarks[id(e)]) for e in user.applied]
            decision = user.decision
            if decision is not None:
                start = outcomes.window_start(decision, abandon_ms)
                opened = outcomes.Opened(outcomes.open_window(decision, start))
                after = next((i + 1 for i, e in enumerate(user.applied)
                              if e.event_id == decision.trigger_event_id), len(steps))
                steps.insert(after, opened)
                done.pending[user.partition][opened.window.ref] = outcomes.pending_record(
                    decision, start)
            start_mark = done.watermarks_before.get(user.partition)
            if start_mark is None:  # a timer's pass: no record moved the partition's time
                start_mark = self.store.get_watermark(user.partition)
            still, closed = outcomes.attribute(s.pending, steps, rules, start_mark)
            mark = done.watermarks.get(user.partition)
            if mark is not None:
                still, expired = outcomes.expire(still, mark, rules)
                closed += expired
            s.pending = still
            converting = {id(c.conversion) for c in closed if c.conversion is not None}
            done.result.unattributed += sum(
                1 for e in user.applied
                if e.type in rules.conversion_types and id(e) not in converting)
            closings[user.partition] += [(user, c) for c in closed]
        for partition, closed_here in closings.items():
            made = done.pending[partition]
            missing = [c.window.ref for _, c in closed_here if c.window.ref not in made]
            stored = self.store.get_pending(partition, missing) if missing else {}
            for user, closing in closed_here:
                raw = made.get(closing.window.ref) or stored.get(closing.window.ref)
                made[closing.window.ref] = None
                if raw is None:  # written by no pass: a bug, never silent
                    log.error("attribution window without its decision",
                              extra={"ref": closing.window.ref, "partition": partition})
                    continue
                result = outcomes.outcome(raw, closing, rules)
                done.result.outcomes.append(result)
                done.outputs.append(Output(self.topics.outcomes, result.decision_id.encode(),
                                           result.to_json(), user.partition))
                done.tallies[partition].setdefault(outcomes.Group.of(result),
                                                   outcomes.Tally()).add(result)

    @staticmethod
    def _nothing_to_attribute(user: _User, done: _Pass, rules: outcomes.Rules) -> bool:
        """No decision made, and no window the user's events could convert or the batch's
        watermark close: the walk would change nothing (most users of most batches)."""
        assert user.state is not None
        if not user.state.pending:
            return True
        if any(e.type in rules.conversion_types for e in user.applied):
            return False
        mark = done.watermarks.get(user.partition)
        return mark is None or all(mark <= rules.closes_by(w) for w in user.state.pending)

    def _preferences(self, user_id: str, user: _User) -> Preferences | None:
        raw = self.store.get_preferences(user.partition, user_id)
        return Preferences.from_json(raw) if raw else None

    def _decide(self, user_id: str, user: _User, trigger: Trigger, done: _Pass,
                push_ranking: tuple[np.ndarray, np.ndarray] | None = None) -> Decision | None:
        assert user.state is not None
        now_ms = done.now_ms
        ctx = policy.Context(config=self.policy_config, coupons=done.catalog,
                             budgets=done.budgets.setdefault(user.partition, {}),
                             model=self.model.encoder, now_ms=now_ms,
                             push_ranking=push_ranking, uplift=self.model.uplift,
                             bandit=self.offer_stats)
        vector = self._current_vector(user)
        current = vector is not None
        decision = policy.decide(user_id, user.state, vector, trigger,
                                 self._preferences(user_id, user), ctx,
                                 vector_stale=current and user.state.vector_stale)
        if decision is not None and decision.action != Action.NONE:
            # A holdout decision counts against the caps as if sent (a ghost send): both arms
            # then see the same caps, and their decisions compare like for like.
            user.state.channels[decision.action].record_send(now_ms)
        if trigger.kind == TriggerKind.CART_ABANDONED:
            user.state.cart_reminded = True  # decided once, even if consent said nothing
        return decision

    def _note_open_carts(self, done: _Pass) -> None:
        """Open-carts entries to write: a cart opened by this pass, or one no longer due."""
        for user_id, user in done.users.items():
            s = user.state
            assert s is not None
            due_now = s.cart_open and not s.cart_reminded
            opened = state.open_cart_event(s, user.applied) if due_now else None
            # An entry for another cart than the state's open one cannot be decided: stale.
            stale = user.due_cart is not None and user.due_cart.ts_ms != s.cart_ts_ms
            if opened is not None:
                done.carts[user.partition][user_id] = OpenCart(
                    user.partition, user_id, s.cart_ts_ms, opened.item_id, opened.event_id)
            elif user.cart_was_due and (stale or not due_now):
                done.carts[user.partition][user_id] = None

    # --- writing ------------------------------------------------------------------------------

    async def _write(self, done: _Pass) -> None:
        budgets = done.budgets
        if any(b.exposures for mine in budgets.values() for b in mine.values()):
            for partition, mine in budgets.items():
                self.store.put_budgets(partition, {
                    cid: orjson.dumps({"spent": b.spent, "exposures": b.exposures})
                    for cid, b in mine.items() if b.exposures})
            await self.sink.flush()  # reservations are durable before any coupon leaves
        deliveries = [await self.sink.send(*output) for output in done.outputs]
        if deliveries:
            await asyncio.gather(*deliveries)  # a failed send raises: the batch is not acked
        by_partition: dict[int, dict[str, bytes]] = defaultdict(dict)
        for user_id, user in done.users.items():
            await done.turns.take()
            assert user.state is not None
            encoded = state.encode(user.state)
            if encoded != user.before:
                by_partition[user.partition][user_id] = encoded
                self.metrics.state_bytes.observe(len(encoded))
                if user.before is None:
                    self.metrics.users_in_state.inc()
        for partition, encoded_users in by_partition.items():
            self.store.put_users(partition, encoded_users)
        for partition, open_carts in done.carts.items():
            if open_carts:
                self.store.set_open_carts(partition, open_carts)
        self._write_attribution(done)
        for partition, claims in done.claims.items():
            self.store.put_claims(partition, claims)
        done.result.partitions = ({o.source_partition for o in done.outputs}
                                  | set(by_partition) | {p for p, c in done.carts.items() if c}
                                  | {p for p, r in done.pending.items() if r}
                                  | {p for p, c in done.claims.items() if c})
        self._index_windows(done)

    def _write_attribution(self, done: _Pass) -> None:
        for partition, records in done.pending.items():
            if records:
                self.store.put_pending(partition, records)
        for partition, mark in done.watermarks.items():
            if mark != done.watermarks_before[partition]:  # one changelog record less a batch
                self.store.put_watermark(partition, mark)
        for partition, groups in done.tallies.items():
            keys = {outcomes.tally_key(partition, g): t for g, t in groups.items()}
            stored = self.store.get_counts(partition, list(keys))
            self.store.put_counts(partition, {
                key: (outcomes.Tally.from_json(stored[key]).merge(tally) if key in stored
                      else tally).to_json() for key, tally in keys.items()})

    def _index_windows(self, done: _Pass) -> None:
        """Bring the deadline index up to date with the windows just written."""
        rules = self.attribution
        if rules is None:
            return
        for partition, entry in done.due_windows:  # due: closed now, or never in the state
            self._deadline_index(partition).discard(entry)
        for user_id, user in done.users.items():
            if user.state is None or user.windows_before == user.state.pending:
                continue
            index = self._deadline_index(user.partition)
            for window in user.windows_before:
                index.discard((rules.closes_by(window), user_id))
            for window in user.state.pending:
                index.add((rules.closes_by(window), user_id))

    def _dead_letter(self, rejection: Rejection, record: Record, now_ms: int,
                     exception: str | None = None) -> Output:
        return Output(self.topics.dlq, record.key, dead_letter(
            rejection, raw=record.value, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset, at_ms=now_ms,
            exception=exception), record.partition)

    def _timer_dead_letter(self, cart: OpenCart, error: str, exception: str,
                           now_ms: int) -> Output:
        """A timer decision that raised: the source is the open-carts entry, not a record."""
        key = cart.user_id.encode()
        return Output(self.topics.dlq, key, dead_letter(
            Rejection(Reason.PROCESSING_ERROR, error), raw=cart.to_json(), key=key,
            topic=TIMER_SOURCE, partition=cart.partition, offset=-1, at_ms=now_ms,
            exception=exception), cart.partition)

    # --- accounting ---------------------------------------------------------------------------

    def _count(self, work: Sequence[Work | Claim], done: _Pass, started: float) -> None:
        m, result = self.metrics, done.result
        records = sum(1 for item in work if not isinstance(item, OpenCart | Claim))
        result.events = sum(done.by_type.values())
        result.rejected = sum(done.rejected.values())
        result.duplicates = done.rejected.get(Reason.DUPLICATE_EVENT.value, 0)
        for event_type, n in done.by_type.items():
            m.events_consumed.labels(type=event_type).inc(n)
        for reason, n in done.rejected.items():
            m.records_rejected.labels(reason=reason).inc(n)
        for kind, n in done.triggers.items():
            m.triggers.labels(kind=kind).inc(n)
        if result.repartitioned:
            m.records_repartitioned.inc(result.repartitioned)
        published_ms = int(self.clock() * 1000)
        for decision, trigger_ts in zip(result.decisions, result.trigger_ts_ms, strict=True):
            m.decisions.labels(action=decision.action, arm=decision.arm).inc()
            explored = any(r["code"] == "explored" for r in decision.reasons)
            m.offers.labels(offer=decision.offer, arm=decision.arm,
                            chosen="explored" if explored else "greedy").inc()
            m.decision_latency.observe(max(0, published_ms - trigger_ts) / 1000)
        for outcome in result.outcomes:
            m.count_outcome(outcome)
        if result.unattributed:
            m.conversions_unattributed.inc(result.unattributed)
        if records:
            m.batch_size.observe(records)
            m.batch_duration.observe(time.perf_counter() - started)
        totals = self.totals
        totals["records"] += records
        totals["events"] += result.events
        totals["rejected"] += result.rejected
        totals["decisions"] += len(result.decisions)
        totals["sent"] += sum(1 for d in result.decisions if d.to_send)
        totals["outcomes"] += len(result.outcomes)
        totals["batches"] += 1 if records else 0
        log.debug("batch", extra={"records": records, "events": result.events,
                                  "rejected": result.rejected,
                                  "decisions": len(result.decisions),
                                  "refreshed": result.refreshed})

    def log_summary(self) -> None:
        """One info line with what happened since the last one (the worker calls it each
        minute), then start counting again."""
        totals, self.totals = self.totals, Counter()
        log.info("summary", extra={key: totals.get(key, 0) for key in (
            "records", "events", "rejected", "decisions", "sent", "outcomes", "batches")})


class _Turns:
    """Hands the event loop back to its other work (the pull API's requests, heartbeats,
    the preferences agent) once a pass has held it for ``slice_seconds``: a pass over a
    micro-batch is tens of milliseconds of CPU, and a request that arrives meanwhile would
    wait for all of it."""

    def __init__(self, slice_seconds: float = 0.002) -> None:
        self.slice_seconds = slice_seconds
        self.since = time.perf_counter()

    async def take(self) -> None:
        if time.perf_counter() - self.since >= self.slice_seconds:
            await asyncio.sleep(0)
            self.since = time.perf_counter()


#: The dead-letter ``source.topic`` of a cart-abandonment decision that raised.
TIMER_SOURCE = "timer:cart_abandoned"


def _work_key(item: Work) -> bytes | None:
    return item.user_id.encode() if isinstance(item, OpenCart) else item.key


def _describe(item: Work) -> dict[str, Any]:
    if isinstance(item, OpenCart):
        return {"topic": TIMER_SOURCE, "partition": item.partition,
                "user": user_ref(item.user_id)}
    return {"topic": item.topic, "partition": item.partition, "offset": item.offset}


def _halves(work: list[Work]) -> list[list[Work]]:
    """Two parts of a batch that keep each user's work together and in order; a single
    user's work is cut in its middle (the first half is processed, and written, first)."""
    order: dict[bytes | None, list[Work]] = {}
    for item in work:
        order.setdefault(_work_key(item), []).append(item)
    if len(order) == 1:
        middle = len(work) // 2
        return [work[:middle], work[middle:]]
    keys = list(order)
    first = set(keys[: len(keys) // 2])
    return [[item for item in work if _work_key(item) in first],
            [item for item in work if _work_key(item) not in first]]
