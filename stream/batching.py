"""Micro-batches straight from faust's consumer, without faust's per-event machinery.

faust hands each record to a stream one at a time: a few asyncio tasks, an Event object and a
queue hop per record, which caps a decode-only agent at a few thousand events per second on two
cores. The hot path needs whole fetches instead. :class:`BatchingConsumer` takes the records of
the topics it is told about (``events``) out of each fetch *before* faust turns them into
events, hands them to a batch handler per topic-partition, and acknowledges their offsets in
faust's own bookkeeping, so faust still owns everything else: group membership, partition
assignment (co-partitioned with the state table's changelog), offset commits, transactions,
table recovery and standbys.

Contract with faust (pinned at faust-streaming 0.15.3; tests/stream and tests/reliability
exercise it against the real broker):

- records of batch topics are processed only while the consumer's flow is active, in the
  generation they were fetched in, and only for partitions active when the batch is processed;
  otherwise they are dropped, and a partition still assigned is sought back so they are
  fetched again (a dropped record never sought back is a hole that blocks the partition's
  commits for good);
- a batch takes each partition's records once per offset, in offset order, from the offset it
  expects next, however many fetches brought them (a repeated offset would be applied twice
  and acknowledged twice, and faust's commit of the partition would stall);
- a partition is revoked, and offsets are committed (under exactly-once: a transaction is
  closed), only between batches (:meth:`BatchingConsumer.holding_batch_lock`), so the table
  never loses a partition under a batch that is writing to it, and a transaction never holds
  half a batch;
- offsets become committable only after the handler returned and its writes settled, i.e.
  after state writes and output sends were delivered (at-least-once: a crash before the
  commit replays the batch; state skips records at or below each user's last applied offset,
  and decisions carry deterministic ids). A handler may return before its last writes are
  acknowledged (:class:`Settling`): the next batch is fetched and handled meanwhile, and a
  commit, a revocation or the next hand-over waits until they are;
- under exactly-once, output that no input offset commits (the abandonment timer's decisions)
  closes its transactions at once (:meth:`BatchingConsumer.commit_partitions`): faust commits
  a transaction only when its partition has new offsets, so on a quiet partition the timer's
  decisions would stay invisible to ``read_committed`` consumers until the broker aborts the
  transaction (``transaction_timeout``) and fences the producer.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import faust
from aiokafka import TopicPartition
from faust.events import Event as FaustEvent
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

#: What a batch handler returns: None once the batch is durable, or what to await before its
#: offsets may be acknowledged (its writes are on their way to the broker meanwhile).
Settle = Callable[[], Awaitable[None]]
#: Processes one fetch: each partition's records (aiokafka ConsumerRecords, offset order).
BatchHandler = Callable[[Mapping[TP, Sequence[Any]]], Awaitable[Settle | None]]
#: Whether gated topics may be processed now (see :meth:`BatchingApp.batch_topic`).
BatchGate = Callable[[], Awaitable[bool]]


def unprocessed(records: Sequence[Any], expected: int | None) -> list[Any]:
    """A partition's records from offset ``expected`` on (all if None), each offset once, in
    offset order.

    One batch can hold a partition's records from several fetches (the linger), and a seek
    between two of them (faust seeks to the committed offsets again when a rebalance
    completes) makes the later fetch repeat offsets the earlier one brought, or start below
    them. Processing a repeated record would apply its event twice in one batch (the second
    copy dead-lettered as a duplicate of a good event).
    """
    by_offset = {r.offset: r for r in records if expected is None or r.offset >= expected}
    return [by_offset[offset] for offset in sorted(by_offset)]


class Settling:
    """The one handled batch whose writes are still on their way to the broker.

    A handler that returns a :data:`Settle` lets the consumer fetch and handle the next batch
    while the broker acknowledges this one's changelog writes. Its offsets are acknowledged
    only once it settled, so the commit order holds: offsets are committed after the batch's
    outputs and state are durable. At most one batch settles at a time: handing over the next
    one waits for it, which bounds what is in flight (one batch settling, one being handled)
    and keeps acknowledgements in offset order. A failed settle raises where it is waited for,
    as a failed write does inside a handler: nothing of that batch is acknowledged.
    """

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None

    @property
    def in_flight(self) -> int:
        return 0 if self._task is None else 1

    async def hand_over(self, settle: Settle, acknowledge: Callable[[], None]) -> None:
        """Wait for the batch settling now, then let this one settle; ``acknowledge`` its
        offsets once it has."""
        await self.wait()

        async def settle_then_acknowledge() -> None:
            await settle()
            acknowledge()

        self._task = asyncio.ensure_future(settle_then_acknowledge())

    async def wait(self) -> None:
        """Until nothing is settling (before a commit, a revocation, a stop)."""
        task = self._task
        if task is None:
            return
        try:
            await asyncio.shield(task)  # a cancelled waiter leaves the batch settling
        finally:
            if task.done() and self._task is task:
                self._task = None  # a failure is reported once


class CommittedReadsThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, reading only committed records whatever the guarantee, and
    never waiting on the broker longer than a batch window.

    faust reads uncommitted records unless it runs exactly-once itself; a shop's producer may
    write transactionally (a CRM importing consent, say), and a record it aborted must never
    count, nor one it has not committed yet.

    faust lets a fetch wait up to 1.5 s for data. The consumer has one fetch in flight per
    broker, and a partition whose records are still buffered is left out of it: so a fetch
    sent while the events partitions' records were buffered asks only for idle partitions
    (preferences, coupons), waits its full time, and holds back the next fetch of events.
    Measured at 5,000 events/s: decisions took 0.97 s at the median and 2.2 s at p99, with
    1.2-1.5 s gaps between batches; with the wait bounded by the batch window, 0.18 s and
    0.54 s.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"  # read when the fetcher starts
        window = self.app.batch_linger_seconds  # type: ignore[attr-defined]
        consumer._fetch_max_wait_ms = max(10, min(1500, int(window * 1000)))
        return consumer


class BatchingConsumer(faust_aiokafka.Consumer):
    _batch_lock: asyncio.Lock | None = None
    _batch_lock_owner: asyncio.Task[Any] | None = None
    _settling: Settling | None = None

    def _new_consumer_thread(self) -> Any:
        return CommittedReadsThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def batch_lock(self) -> asyncio.Lock:
        if self._batch_lock is None:
            self._batch_lock = asyncio.Lock()
        return self._batch_lock

    @property
    def settling(self) -> Settling:
        if self._settling is None:
            self._settling = Settling()
        return self._settling

    @asynccontextmanager
    async def holding_batch_lock(self) -> AsyncIterator[None]:
        """The batch lock, re-entrant for the task that holds it (a revocation commits)."""
        task = asyncio.current_task()
        if task is not None and self._batch_lock_owner is task:
            yield
            return
        async with self.batch_lock:
            self._batch_lock_owner = task
            try:
                yield
            finally:
                self._batch_lock_owner = None

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """Commit only between batches.

        A batch sends its decisions before it writes state and acks its offsets. Under
        exactly-once, a commit in between would close the transaction with the decisions but
        without the state and offsets; a crash before the next commit would then replay the
        batch and publish its decisions a second time, in a second committed transaction.
        """
        async with self.holding_batch_lock():
            await self.settling.wait()  # its offsets join this commit
            committed: bool = await super().commit(topics,
                                                   start_new_transaction=start_new_transaction)
            return committed

    async def commit_partitions(self, partitions: set[int]) -> None:
        """Close the open transactions of ``partitions`` now, with the offsets they carry.

        For exactly-once output written outside a batch (the timer's). A partition with acked,
        uncommitted offsets commits them in the same transaction (its batch's outputs are in
        it too); one without commits its last committed offsets again, which Kafka accepts.
        """
        async with self.holding_batch_lock():
            await self.settling.wait()
            # Input partitions only: a changelog's committed offset is None (never consumed).
            tps = [tp for tp in self.assignment() if tp.partition in partitions
                   and not self.app.assignor.is_standby(tp)]
            offsets = dict(self._filter_committable_offsets(tps))
            for tp in tps:
                committed = self._committed_offset.get(tp)
                if tp not in offsets and committed is not None:
                    offsets[tp] = committed
            if offsets:
                # aiokafka's transactional commit accepts its own TopicPartition only.
                await self._commit_offsets({TopicPartition(tp.topic, tp.partition): offset
                                            for tp, offset in offsets.items()})
            covered = {tp.partition for tp in offsets}
            for partition in partitions - covered:  # nothing consumed there yet this run
                await self._commit_bare_transaction(partition)

    async def _commit_bare_transaction(self, partition: int) -> None:
        app = self.app
        group = app.assignor.group_for_topic(next(iter(
            app.batch_handlers)))  # type: ignore[attr-defined]
        transactional_id = f"{app.conf.id}-{group}-{partition}"
        producer: Any = app.producer
        lock = producer._trn_locks.get(transactional_id)
        transaction = producer._transaction_producers.get(transactional_id)
        if lock is None or transaction is None:
            return  # not ours (revoked meanwhile): nothing of ours is open there
        async with lock:
            await transaction.commit_transaction()
            await transaction.begin_transaction()

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        generation = self.app.consumer_generation_id
        fetched, active = await super()._wait_next_records(timeout)
        records = cast(dict[TP, list[Any]] | None, fetched)  # faust's is a plain dict
        handlers: dict[str, BatchHandler] = self.app.batch_handlers  # type: ignore[attr-defined]
        if records and handlers:
            await self._linger(records, handlers)
            by_topic: dict[str, dict[TP, list[Any]]] = {}
            for tp in [tp for tp in records if tp.topic in handlers]:
                by_topic.setdefault(tp.topic, {})[tp] = records.pop(tp)
            app: Any = self.app
            for topic in sorted(by_topic, key=lambda t: app.batch_topics_first.get(t, 1)):
                batches = by_topic[topic]
                if topic in app.batch_gated and not await app.batch_gate():
                    await self._fetch_again(batches)  # read again once the gate opens
                    await asyncio.sleep(0.05)  # no busy loop over the same records
                    continue
                await self._process(handlers[topic], batches, active, generation)
        # What is left (other topics) goes through faust's per-event path as usual.
        return records, active

    async def _linger(self, records: dict[TP, list[Any]], handlers: Mapping[str, Any]) -> None:
        """Keep fetching until the batch is full or the linger time is up, counted from the
        oldest record's timestamp (a record that waited while the last batch was handled has
        used part of its window already), and never longer than the linger from now (a
        producer's clock may be ahead).

        Bigger batches make the encoder's one padded forward pass cheaper per user; the linger
        bounds what that costs in latency. Under load a single fetch already fills the batch.
        """
        app = self.app
        limit, linger = app.batch_max_records, app.batch_linger_seconds  # type: ignore[attr-defined]
        if linger <= 0:
            return
        loop = asyncio.get_running_loop()
        oldest_ms = min((part[0].timestamp for tp, part in records.items()
                         if tp.topic in handlers and part), default=None)
        waited = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        deadline = loop.time() + linger - min(waited, linger)

        def size() -> int:
            return sum(len(part) for tp, part in records.items() if tp.topic in handlers)

        while size() < limit and self.flow_active and not self.should_stop:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            more, _ = await super()._wait_next_records(remaining)
            for tp, part in (more or {}).items():
                records.setdefault(tp, []).extend(part)

    async def _process(self, handler: BatchHandler, batches: dict[TP, list[Any]], active: Any,
                       generation: int) -> None:
        async with self.holding_batch_lock():
            if (not self.flow_active or self.should_stop
                    or self.app.consumer_generation_id != generation):
                await self._fetch_again(batches)
                return
            fresh: dict[TP, list[Any]] = {}
            # Active now, not at the first fetch: a linger's later fetch may bring records of
            # a partition that became active meanwhile (its table recovered), and a partition
            # may have been paused since. Records of a partition not active now are read
            # again: by us once it is active, or by its new owner.
            current = self._get_active_partitions() if active is not None else None
            inactive = {tp: records for tp, records in batches.items()
                        if current is not None and tp not in current}
            if inactive:
                await self._fetch_again(inactive)
            for tp, records in batches.items():
                if tp in inactive:
                    continue
                read = self._read_offset[tp]
                kept = unprocessed(records, read)
                if kept:
                    await self._note_gaps(tp, read, kept)
                    fresh[tp] = kept
            if not fresh:
                return
            settle = await handler(fresh)
            for tp, records in fresh.items():
                self._read_offset[tp] = records[-1].offset + 1

            def acknowledge() -> None:
                for tp, records in fresh.items():
                    self._ack_offsets(tp, [r.offset for r in records])

            if settle is None:
                acknowledge()
            else:
                await self.settling.hand_over(settle, acknowledge)
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    async def _fetch_again(self, batches: Mapping[TP, Sequence[Any]]) -> None:
        """Records dropped because a rebalance overtook them must be fetched again.

        faust seeks every assigned partition to its committed offset when the new assignment
        starts, but the dropped records may come from a fetch made *after* that seek; left
        alone, the consumer would go on past them: never processed, never acknowledged, and
        the partition's commits stuck at the hole. Seeking back to the earliest of them, or
        to the consumer's position if that is earlier, reads them again either way.
        """
        if self.should_stop:
            return  # stopping: the next owner starts from the committed offsets
        assigned = self.assignment()
        for tp, records in batches.items():
            if tp not in assigned or not records:
                continue
            position = await self.position(tp)
            first = records[0].offset
            target = first if position is None else min(first, position)
            # Never below the committed offset: a stale batch's records there were processed
            # and committed already (by us or by the partition's previous owner).
            committed = self._committed_offset.get(tp)
            await self.seek(tp, target if committed is None else max(target, committed))

    async def _note_gaps(self, tp: TP, expected: int | None, records: Sequence[Any]) -> None:
        """Offsets with no record (transaction markers, compaction) must not block commits."""
        for record in records:
            if expected is not None and record.offset > expected:
                await self._add_gap(tp, expected, record.offset - 1)
            expected = record.offset + 1

    def _ack_offsets(self, tp: TP, offsets: list[int]) -> None:
        """faust's ``ack(message)`` for a whole batch, without building a Message per record."""
        committed = self._committed_offset[tp]
        if committed is not None:
            offsets = [o for o in offsets if o >= committed]
        index = self._acked_index[tp]
        # Each offset once: faust finds the committable offset as the first run of consecutive
        # numbers in the acked list, and a repeated offset ends that run (the partition's
        # commit would then creep forward by one offset per commit).
        offsets = list(dict.fromkeys(o for o in offsets if o not in index))
        index.update(offsets)
        self._acked[tp].extend(offsets)
        self._n_acked += len(offsets)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        async with self.holding_batch_lock():
            try:
                await self.settling.wait()  # acknowledged before the revocation commits
            except Exception as exc:
                # The batch's writes failed: its offsets stay unacknowledged. The worker
                # stops, as on a failed write inside a batch, and faust's revocation still
                # runs (a revocation that raised would be skipped by aiokafka).
                await self.crash(exc)
            await super().on_partitions_revoked(revoked)


async def _always_open() -> bool:
    return True


class BatchingProducer(faust_aiokafka.Producer):
    """faust's producer with a configurable transaction timeout (faust leaves aiokafka's 60 s):
    the broker aborts a transaction open longer, and the worker's producer is then fenced."""

    def _settings_extra(self) -> Mapping[str, Any]:
        extra = dict(super()._settings_extra())
        if self.app.in_transaction:
            extra["transaction_timeout_ms"] = int(
                self.app.transaction_timeout_seconds * 1000)  # type: ignore[attr-defined]
        return extra


class BatchingTransport(faust_aiokafka.Transport):
    Consumer = BatchingConsumer
    Producer = BatchingProducer


class BatchingApp(faust.App):
    """A faust App whose consumer can hand whole fetches of chosen topics to a handler."""

    def __init__(self, *args: Any, batch_max_records: int = 2000,
                 batch_linger_seconds: float = 0.0, transaction_timeout_seconds: float = 60.0,
                 **kwargs: Any) -> None:
        # A fetch returns at most broker_max_poll_records, which bounds the batch size.
        kwargs.setdefault("broker_max_poll_records", batch_max_records)
        super().__init__(*args, **kwargs)
        self.batch_handlers: dict[str, BatchHandler] = {}
        self.batch_topics_first: dict[str, int] = {}  # 0: before the other topics of a fetch
        self.batch_gated: set[str] = set()
        self.batch_gate: BatchGate = _always_open
        self.batch_max_records = batch_max_records
        self.batch_linger_seconds = batch_linger_seconds
        self.transaction_timeout_seconds = transaction_timeout_seconds

    def _new_transport(self) -> Any:
        return BatchingTransport(self.conf.broker_consumer, self)

    def batch_topic(self, topic: faust.TopicT, handler: BatchHandler, *, first: bool = False,
                    gated: bool = False) -> None:
        """Deliver ``topic``'s records to ``handler`` in batches instead of to agents.

        ``first`` topics are handled before the others of the same fetch (a table the others
        read). ``gated`` topics are handled only while :attr:`batch_gate` says so; until then
        their records are read again later (used to hold events back until the preferences
        table has caught up, so consent holds from the first event).
        """
        for name in topic.topics:
            self.batch_handlers[name] = handler
            self.batch_topics_first[name] = 0 if first else 1
            if gated:
                self.batch_gated.add(name)
        # Registering the channel subscribes the consumer and joins the topic to the
        # co-partitioned group of the tables, without an agent consuming it.
        self.topics.add(topic)

    @contextmanager
    def partition_context(self, topic: str, partition: int) -> Iterator[None]:
        """Make faust's tables see an event of ``topic``'s ``partition`` being processed.

        faust's Table picks the RocksDB partition and the changelog partition from the
        "current event"; inside a batch handler there is none, so we provide one per partition.
        """
        message = Message(topic, partition, -1, 0.0, 0, None, None, None, None,
                          tp=TP(topic, partition))
        event = FaustEvent(self, None, None, None, message)
        token = _current_event.set(weakref.ref(event))
        try:
            yield
        finally:
            _current_event.reset(token)
