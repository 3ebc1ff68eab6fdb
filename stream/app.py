"""The faust application: topics, tables, timers and the batch handler. Wiring only.

Nothing runs at import time: :func:`create_app` builds a worker from settings, so tests and
several workers can live side by side.

Tables (RocksDB, each with a changelog topic, all co-partitioned with `events`):

- ``users``: encoded :class:`~stream.state.UserState` per user;
- ``coupon-budgets``: per partition, what that partition reserved of each campaign;
- ``open-carts``: users with an open cart, its time and item, scanned by the abandonment timer;
- ``preferences``: the `user-preferences` topic, read by a (per-event) agent;
- ``pending-outcomes``: each decision still waiting for its outcome (its user's state holds
  the window), and each partition's event-time watermark (key ``~watermark``);
- ``outcome-counts``: closed decisions and conversions per group and arm, per partition
  (:mod:`stream.outcomes`); its compacted changelog is what `promo report uplift` reads;
- ``api-claims``: the pull API's claims by user and idempotency key (:mod:`stream.api`).

A record on another partition than ``murmur2(key)`` picks (a producer with another
partitioner) is forwarded to a repartition topic on the right one, for `events` by the batch
handler and for `user-preferences` by its agent: the tables are only ever written on the
partition their user lives on, whatever client produced the record.

The coupon catalog is read by every worker in full (:mod:`stream.catalog`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faust
import orjson
from faust.types import TP

from stream.api import Api, Ownership, tls_context
from stream.bandit import OutcomeFollower
from stream.batching import BatchingApp, BatchingConsumer, Settle
from stream.catalog import CouponCatalog
from stream.config import ApiSettings, KafkaSettings, Settings, WorkerSettings
from stream.contracts import DAY_MS, Coupon, Limits, Preferences, Reason, Rejection, dead_letter
from stream.exporter import write_snapshot
from stream.metrics import MAX_CAMPAIGN_SERIES, Metrics
from stream.models import ModelWatcher
from stream.outcomes import Rules, merged, totals
from stream.pipeline import Claim, ClaimAnswer, ClaimWriteFailed, OpenCart, Pipeline, Topics
from stream.policy import partition_budget
from stream.topics import expected_partition, repartition_topic, sasl_password, ssl_context

log = logging.getLogger(__name__)

#: The key of a partition's event-time watermark in ``pending-outcomes`` (decision refs are hex).
_WATERMARK = b"~watermark"


@dataclass
class Worker:
    """A built application and the objects a runner or test needs to reach."""

    app: BatchingApp
    pipeline: Pipeline
    metrics: Metrics
    models: ModelWatcher
    catalog: CouponCatalog
    api: Api


def broker_credentials(kafka: KafkaSettings) -> Any:
    """faust's form of the connection security in the settings (None for PLAINTEXT)."""
    protocol = kafka.security_protocol
    context = ssl_context(kafka) if protocol in ("SSL", "SASL_SSL") else None
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=kafka.sasl_username,
                                     password=sasl_password(kafka), ssl_context=context,
                                     mechanism=kafka.sasl_mechanism)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None


def web_settings(api: ApiSettings, middlewares: Sequence[Any] = ()) -> dict[str, Any]:
    """faust's web server serves the pull API (stream/api.py), and nothing else."""
    if not api.enabled:
        return {"web_enabled": False}
    return {
        "web_enabled": True, "web_bind": api.host, "web_port": api.port, "web_host": api.host,
        "canonical_url": api.url(),  # published in the group: how other workers forward
        "web_ssl_context": tls_context(api),
        "web_application_options": {"middlewares": list(middlewares),
                                    "client_max_size": api.max_body_bytes},
        "web_cors_options": {},  # no cross-origin browser calls: the shop's server calls
        # faust's own pages show table data, sensors and the cluster's layout: all off.
        "web_stats_enabled": False, "web_graph_enabled": False, "web_router_enabled": False,
        "web_tables_enabled": False, "web_metrics_enabled": False,
    }


def faust_settings(settings: Settings, web_middlewares: Sequence[Any] = ()) -> dict[str, Any]:
    kafka, worker = settings.kafka, settings.worker
    return {
        "broker_credentials": broker_credentials(kafka),
        "broker": [f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        "store": "rocksdb://",
        "datadir": str(Path(worker.data_dir).resolve()),
        "topic_partitions": kafka.partitions,
        # Unused in practice: ensure_topics creates every topic (replication following the
        # cluster) before the worker starts, and faust skips topics that exist.
        "topic_replication_factor": max(1, kafka.replication_factor),
        "processing_guarantee": worker.processing_guarantee,
        **web_settings(settings.api, web_middlewares),
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": worker.session_timeout_seconds,
        "producer_acks": -1,
    }


class TableStore:
    """The pipeline's :class:`~stream.pipeline.Store` on faust tables.

    faust tables choose their RocksDB partition and changelog partition from the event being
    processed; the batch handler has none, so each access runs in a partition context.
    """

    def __init__(self, app: BatchingApp, events_topic: str, partitions: int,
                 worker: WorkerSettings) -> None:
        self.app = app
        self.events_topic = events_topic
        rocksdb = {"write_buffer_size": worker.rocksdb_write_buffer_mb * 2**20,
                   "max_write_buffer_number": 2,
                   "block_cache_size": worker.rocksdb_block_cache_mb * 2**20}

        def table(name: str, description: str) -> Any:
            return app.Table(name, help=description, key_type=bytes, value_type=bytes,
                             partitions=partitions, default=None, options=dict(rocksdb))

        # The names are stream.topics.TABLES: ensure_topics creates their changelogs.
        self.users = table("users", "Encoded user state, by user id.")
        self.budgets = table("coupon-budgets", "Per-partition coupon reservations.")
        self.carts = table("open-carts", "Open carts: user id -> cart time and item.")
        self.preferences = table("preferences", "user-preferences, by user id.")
        self.pending = table("pending-outcomes",
                             "Decisions waiting for their outcome, and watermarks.")
        self.counts = table("outcome-counts", "Outcome counts per group, arm and partition.")
        self.claims = table("api-claims", "Pull API claims by user and idempotency key.")

    def _context(self, partition: int) -> Any:
        return self.app.partition_context(self.events_topic, partition)

    def _get(self, table: Any, partition: int, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of ``keys`` that ``table`` holds in ``partition``."""
        with self._context(partition):
            found = {key: table.get(key.encode()) for key in keys}
        return {key: raw for key, raw in found.items() if raw is not None}

    def _put(self, table: Any, partition: int, records: Mapping[str, bytes | None]) -> None:
        """Write ``records`` to ``table`` in ``partition``; a None value deletes its key."""
        with self._context(partition):
            for key, raw in records.items():
                if raw is None:
                    table.pop(key.encode(), None)
                else:
                    table[key.encode()] = raw

    def get_users(self, partition: int, user_ids: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.users, partition, user_ids)

    def put_users(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.users, partition, records)

    def get_budgets(self, partition: int) -> dict[str, bytes]:
        with self._context(partition):
            return {key.decode(): raw for key, raw in self._partition_items(self.budgets,
                                                                             partition)}

    def put_budgets(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.budgets, partition, records)

    def get_preferences(self, partition: int, user_id: str) -> bytes | None:
        with self._context(partition):
            raw: bytes | None = self.preferences.get(user_id.encode())
        return raw

    def put_preferences(self, partition: int, key: bytes, value: bytes | None) -> None:
        with self._context(partition):
            if value is None:
                self.preferences.pop(key, None)
            else:
                self.preferences[key] = value

    def set_open_carts(self, partition: int, carts: Mapping[str, OpenCart | None]) -> None:
        self._put(self.carts, partition, {uid: None if cart is None else cart.to_json()
                                          for uid, cart in carts.items()})

    def due_carts(self, before_ms: int) -> list[OpenCart]:
        due = []
        for key, raw in self.carts.items():
            if raw is None:
                continue
            cart = OpenCart.from_json(key.decode(), raw)
            if cart.ts_ms <= before_ms:
                due.append(cart)
        return due

    async def flush(self) -> None:
        """Wait until the broker has every changelog write of the batch, before it is acked.

        faust queues changelog records in its own buffer and a background task moves them to
        the producer. Were offsets committed first (and under exactly-once, the transaction
        closed), the records would land in the next transaction, and a crash in between would
        lose them. faust's own buffer flush gives up after 0.1 s per message; this waits.
        Then the producer itself is flushed: faust commits offsets without waiting for the
        changelog, so on a rebalance the partition's next owner could restore its state from
        a changelog that does not yet hold writes whose offsets were already committed.
        """
        buffer = self.app.producer.buffer
        while buffer.size:
            await buffer.flush()
            if buffer.size:
                await asyncio.sleep(0.001)
        await self.app.producer.flush()

    def get_pending(self, partition: int, refs: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.pending, partition, refs)

    def put_pending(self, partition: int, records: Mapping[str, bytes | None]) -> None:
        self._put(self.pending, partition, records)

    def all_pending(self, partition: int) -> list[bytes]:
        return [raw for key, raw in self._partition_items(self.pending, partition)
                if key != _WATERMARK]

    def get_watermark(self, partition: int) -> int:
        with self._context(partition):
            raw: bytes | None = self.pending.get(_WATERMARK)
        return int(raw) if raw else 0

    def put_watermark(self, partition: int, watermark: int) -> None:
        with self._context(partition):
            self.pending[_WATERMARK] = str(watermark).encode()

    def get_counts(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.counts, partition, keys)

    def put_counts(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.counts, partition, records)

    def get_claims(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.claims, partition, keys)

    def put_claims(self, partition: int, records: Mapping[str, bytes | None]) -> None:
        self._put(self.claims, partition, records)

    async def expired_claims(self, partition: int, before_ms: int) -> list[str]:
        """Claims made before ``before_ms`` (their idempotency keys are to be forgotten),
        read in steps that hand the event loop back."""
        expired: list[str] = []
        db = self.claims.data._db_for_partition(partition)
        for n, (key, raw) in enumerate(self.claims.data._visible_items(db), 1):
            if raw is not None and int(orjson.loads(raw)["at"]) < before_ms:
                expired.append(key.decode())
            if n % 1000 == 0:
                await asyncio.sleep(0)
        return expired

    def partition_counts(self, partition: int) -> dict[str, bytes]:
        return {key.decode(): raw for key, raw in self._partition_items(self.counts, partition)}

    def count_users(self, partitions: set[int]) -> int:
        """Users with state in ``partitions``, counted key by key (RocksDB's own estimate
        counts every unflushed overwrite: 6,322 for 594 users in one run)."""
        dbs = getattr(self.users.data, "_dbs", {})
        return sum(sum(1 for _ in db.keys()) for partition, db in dbs.items()  # noqa: SIM118
                   if partition in partitions)  # (a rocksdict Rdict: iterating it is not keys)

    @staticmethod
    def _partition_items(table: Any, partition: int) -> list[tuple[bytes, bytes]]:
        """Keys of one partition: the same coupon id lives in every partition's database."""
        db = table.data._db_for_partition(partition)
        return [(k, v) for k, v in table.data._visible_items(db) if v is not None]


class ProducerSink:
    """The pipeline's :class:`~stream.pipeline.Sink` on faust's producer.

    Under exactly-once, a record derived from input partition p goes through p's transactional
    producer, so it commits (or aborts) together with p's offsets and changelog writes. faust's
    own Topic.send would not do that for topics its consumer does not subscribe to.
    """

    def __init__(self, app: BatchingApp, events_topic: str) -> None:
        self.app = app
        self.events_topic = events_topic

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   source_partition: int, partition: int | None = None) -> Awaitable[Any]:
        transactional_id = None
        if self.app.in_transaction:
            group = self.app.assignor.group_for_topic(self.events_topic)
            transactional_id = f"{self.app.conf.id}-{group}-{source_partition}"
        fut: Awaitable[Any] = await self.app.producer.send(
            topic, key, value, partition=partition, timestamp=None, headers=None,
            transactional_id=transactional_id)
        return fut

    async def flush(self) -> None:
        await self.app.producer.flush()


class PreferencesCatchUp:
    """Readiness, and the gate that holds events back until consent is enforceable.

    After each rebalance (tables recovered), the worker notes the end offsets of its
    `user-preferences` partitions (and their repartition topic); events are processed, and
    ``promo_worker_ready`` is 1, only once the preferences table has read up to them. So a
    shop that publishes an opt-out and then starts or scales workers never sees an event of
    that user decided before the opt-out is in the table.
    """

    def __init__(self, app: BatchingApp, topics: set[str], metrics: Metrics) -> None:
        self.app = app
        self.topics = topics
        self.metrics = metrics
        # Per partition the end to read up to (None: not known yet); None: not assigned yet.
        self.targets: dict[TP, int | None] | None = None
        self.ready = False
        self._announced = False

    def reset(self) -> None:
        self.targets = None
        self.ready = False
        self.metrics.worker_ready.set(0)

    async def arm(self) -> None:
        consumer = self.app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in self.topics]
        self.targets = dict(await consumer.highwaters(*tps)) if tps else {}
        await self.check()

    async def check(self) -> bool:
        targets = self.targets
        if targets is None:
            return False
        consumer = self.app.consumer
        for tp, end in list(targets.items()):
            if end is None:
                # Under exactly-once the end is the last stable offset, unknown until a first
                # fetch of the partition returns (a SIGKILL test's restart met it): ask again.
                end = consumer.highwater(tp)
                if end is None:
                    continue
                targets[tp] = end
            position = await consumer.position(tp)
            if position is not None and position >= end:
                # The batch gate and arm() check concurrently: either may get here first.
                targets.pop(tp, None)
        if self.targets is not targets:  # a rebalance reset or re-armed it meanwhile
            return False
        if not targets and not self.ready:
            self.ready = True
            self.metrics.worker_ready.set(1)
            if not self._announced:
                self._announced = True
                freeze_heap()
                log.info("worker ready", extra={"partitions": sorted(
                    {tp.partition for tp in consumer.assignment()})})
        return self.ready


def freeze_heap() -> None:
    """Leave what the worker built to start (torch, the model, faust's services, about a
    million objects) out of the cyclic garbage collector's full passes: each one scanned it
    all, about 100 ms with the event loop stopped, every few seconds under load (the pull
    API's p99 showed them). What is built later is collected as before."""
    gc.collect()
    gc.freeze()


def exporter_dir(settings: Settings) -> Path:
    """Where the worker leaves its metrics for its exporter (stream/exporter.py)."""
    return Path(settings.worker.data_dir) / "exporter"


def set_budget_gauges(metrics: Metrics, catalog: Mapping[str, Coupon], store: TableStore,
                      partitions: set[int], n_partitions: int, now_s: float) -> None:
    """``promo_coupon_budget_remaining_ratio{campaign}`` from the pacing state: of each valid
    campaign's shares on this worker's partitions, the part not reserved yet. Campaigns that
    ended, or that this worker holds no share of, lose their series."""
    gauge = metrics.coupon_budget_remaining
    now_ms = int(now_s * 1000)
    valid = [c for c in catalog.values() if c.is_valid(now_ms) and c.budget > 0]
    reserved: dict[str, float] = {}
    for partition in partitions:
        for coupon_id, raw in store.get_budgets(partition).items():
            reserved[coupon_id] = reserved.get(coupon_id, 0.0) + float(
                orjson.loads(raw)["spent"])
    ratios: dict[str, float] = {}
    for coupon in valid:
        share = sum(partition_budget(coupon, p, n_partitions).share for p in partitions)
        if share > 0:
            ratios[coupon.coupon_id] = max(0.0, 1 - reserved.get(coupon.coupon_id, 0.0) / share)
    kept = dict(sorted(ratios.items(), key=lambda kv: (kv[1], kv[0]))[:MAX_CAMPAIGN_SERIES])
    gauge.clear()  # campaigns that ended or moved to another worker lose their series
    for campaign, ratio in kept.items():
        gauge.labels(campaign=campaign).set(ratio)


def set_uplift_gauges(metrics: Metrics, store: TableStore, partitions: set[int]) -> None:
    """``promo_uplift_decisions`` / ``_conversions{campaign,arm}`` from the outcome-counts
    table of this worker's partitions (all versions of a campaign together)."""
    counts: dict[str, bytes] = {}
    for partition in partitions:
        counts.update(store.partition_counts(partition))
    by_campaign = merged(totals(counts), lambda group: group.campaign)
    metrics.uplift_decisions.clear()
    metrics.uplift_conversions.clear()
    for campaign, tally in sorted(by_campaign.items())[:MAX_CAMPAIGN_SERIES]:
        for arm, side in (("treatment", tally.treatment), ("holdout", tally.holdout)):
            metrics.uplift_decisions.labels(campaign=campaign, arm=arm).set(side.decisions)
            metrics.uplift_conversions.labels(campaign=campaign, arm=arm).set(side.converted)


def create_app(settings: Settings, metrics: Metrics | None = None) -> Worker:
    metrics = metrics or Metrics()
    kafka, worker = settings.kafka, settings.worker
    api = Api(settings.api, kafka.partitions, metrics)
    app = BatchingApp(worker.app_id, **faust_settings(settings, [api.middleware]),
                      batch_max_records=worker.batch_max_events,
                      batch_linger_seconds=worker.batch_max_seconds,
                      transaction_timeout_seconds=worker.transaction_timeout_seconds)

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=kafka.partitions)

    events_topic = raw_topic(kafka.events_topic)
    events_repartition = raw_topic(repartition_topic(worker.app_id, "events"))
    preferences_repartition = repartition_topic(worker.app_id, "preferences")
    preferences_topic = app.topic(kafka.preferences_topic, preferences_repartition,
                                  key_type=bytes, value_type=bytes, key_serializer="raw",
                                  value_serializer="raw", partitions=kafka.partitions)
    store = TableStore(app, kafka.events_topic, kafka.partitions, worker)
    sink = ProducerSink(app, kafka.events_topic)
    catalog = CouponCatalog(kafka)
    outcome_reader = (OutcomeFollower(kafka, int(settings.policy.bandit_window_days * DAY_MS))
                      if settings.policy.thompson_sampling else None)
    models = ModelWatcher(worker.checkpoint or None, metrics, worker.uplift_checkpoint or None)
    contract = settings.contract
    pipeline = Pipeline(
        limits=Limits.from_contract(contract),
        topics=Topics(events=kafka.events_topic, repartition=events_repartition.get_topic_name(),
                      dlq=kafka.dlq_topic, decisions=kafka.decisions_topic,
                      vectors=kafka.vectors_topic, outcomes=kafka.outcomes_topic),
        store=store, sink=sink, metrics=metrics,
        model=models, policy_config=settings.policy, coupons=catalog.snapshot,
        partitions=kafka.partitions, retries=worker.processing_retries,
        attribution=Rules.from_settings(settings.attribution)
        if settings.attribution.enabled else None,
        offer_stats=outcome_reader.stats if outcome_reader else None)

    async def process_events(batches: Mapping[TP, Sequence[Any]]) -> Settle:
        await pipeline.process([r for part in batches.values() for r in part], durable=False)
        return store.flush  # the next batch is handled while the broker acknowledges this one

    async def process_preferences(batches: Mapping[TP, Sequence[Any]]) -> None:
        for records in batches.values():
            for record in records:
                try:
                    await _store_preferences(record)
                except Exception as exc:  # one record must not stop consent for the rest
                    log.exception("preferences record failed")
                    await _dead_letter(record, Rejection(
                        Reason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:500]),
                        exception=type(exc).__name__)
        await store.flush()
        await catch_up.check()

    async def _store_preferences(record: Any) -> None:
        key, value = record.key, record.value
        if key is not None and record.topic == kafka.preferences_topic:
            home = expected_partition(key, kafka.partitions)
            if home != record.partition:  # another partitioner: forward to its user's home
                metrics.records_repartitioned.inc()
                fut = await sink.send(preferences_repartition, key, value, record.partition,
                                      partition=home)
                await fut
                return
        if key is None:
            await _dead_letter(record, Rejection(
                Reason.KEY_MISMATCH, "preferences record without a user id key"))
            return
        if value is not None:
            try:
                Preferences.from_json(value)
            except (ValueError, TypeError, AttributeError) as exc:
                await _dead_letter(record, Rejection(
                    Reason.NOT_JSON if isinstance(exc, orjson.JSONDecodeError)
                    else Reason.INVALID_VALUE, str(exc)[:200]))
                return
        store.put_preferences(record.partition, key, value)  # None: a tombstone forgets
        metrics.preferences_stored.inc()

    async def _dead_letter(record: Any, rejection: Rejection,
                           exception: str | None = None) -> None:
        metrics.records_rejected.labels(reason=rejection.reason.value).inc()
        fut = await sink.send(kafka.dlq_topic, record.key, dead_letter(
            rejection, raw=record.value, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset,
            at_ms=int(time.time() * 1000), exception=exception), record.partition)
        await fut

    catch_up = PreferencesCatchUp(app, {kafka.preferences_topic, preferences_repartition},
                                  metrics)
    app.batch_topic(preferences_topic, process_preferences, first=True)
    app.batch_topic(events_topic, process_events, gated=True)
    app.batch_topic(events_repartition, process_events, gated=True)
    app.batch_gate = catch_up.check

    @app.on_partitions_revoked.connect
    async def not_ready(*args: Any, **kwargs: Any) -> None:
        catch_up.reset()  # a rebalance: partitions move, tables recover
        pipeline.forget_partitions()

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment()
                if tp.topic == kafka.events_topic}

    @app.on_rebalance_complete.connect
    async def tables_recovered(*args: Any, **kwargs: Any) -> None:
        # No batch runs until the streams resume, so the count cannot miss a new user.
        metrics.users_in_state.set(store.count_users(owned_partitions()))
        await catch_up.arm()

    @app.timer(0.5, name="readiness")
    async def readiness() -> None:
        if not catch_up.ready:
            await catch_up.check()  # also when no record arrives to trigger it

    @app.timer(settings.policy.cart_check_seconds, name="abandoned-carts")
    async def abandoned_carts() -> None:
        if not app.consumer.assignment() or not catch_up.ready:
            return  # consent must be enforceable before a reminder is decided
        consumer = cast(BatchingConsumer, app.consumer)
        async with consumer.holding_batch_lock():  # never interleave with a batch's writes
            result = await pipeline.check_carts()
            if app.in_transaction and result.partitions:
                await consumer.commit_partitions(result.partitions)

    @app.timer(worker.model_poll_seconds, name="model-watch")
    async def watch_model() -> None:
        await models.poll()

    @app.timer(60.0, name="minute-summary")
    async def minute_summary() -> None:
        pipeline.log_summary()

    snapshots = exporter_dir(settings)

    @app.timer(worker.metrics_snapshot_seconds, name="metrics-snapshot")
    async def metrics_snapshot() -> None:
        # From the event loop on purpose: a stuck loop stops the heartbeat the exporter shows.
        write_snapshot(snapshots, metrics.registry, owned_partitions())

    @app.timer(5.0, name="budget-gauges")
    async def budget_gauges() -> None:
        set_budget_gauges(metrics, catalog.snapshot(), store, owned_partitions(),
                          kafka.partitions, time.time())

    @app.timer(5.0, name="uplift-gauges")
    async def uplift_gauges() -> None:
        set_uplift_gauges(metrics, store, owned_partitions())
        metrics.windows_open.set(pipeline.open_windows())

    @app.task
    async def follow_catalog() -> None:
        await catalog.run()

    if outcome_reader is not None:
        @app.task
        async def follow_outcomes() -> None:
            await outcome_reader.run()

    def owners() -> dict[str, set[int]]:
        """Each member's advertised URL and the users partitions it owns, as the group's
        assignment published them."""
        layout = app.router.table_metadata("users")
        return {url: {p for partitions in topics.values() for p in partitions}
                for url, topics in layout.items()}

    async def claim(request: Claim) -> ClaimAnswer | None:
        consumer = cast(BatchingConsumer, app.consumer)
        async with consumer.holding_batch_lock():  # never interleave with a batch's writes
            if not catch_up.ready or request.partition not in owned_partitions():
                return None  # the partition moved while the claim waited
            try:
                answer = await pipeline.claim(request,
                                              int(settings.api.idempotency_seconds * 1000))
                if app.in_transaction and answer.partitions:
                    await consumer.commit_partitions(answer.partitions)
            except ClaimWriteFailed as exc:
                await app.crash(exc)  # restart from the changelog, as after a batch write
                raise
            return answer

    @app.timer(min(3600.0, settings.api.idempotency_seconds / 10), name="forget-claims")
    async def forget_claims() -> None:
        if not settings.api.enabled or not catch_up.ready:
            return
        before_ms = int((time.time() - settings.api.idempotency_seconds) * 1000)
        consumer = cast(BatchingConsumer, app.consumer)
        for partition in owned_partitions():
            # Found without the batch lock (reads, handing the loop back as it goes), then
            # forgotten in small locked steps, if the partition is still this worker's.
            try:
                expired = await store.expired_claims(partition, before_ms)
            except Exception:  # the partition moved (its database closed) while it was read
                log.warning("forgetting claims skipped", extra={"partition": partition})
                continue
            for start in range(0, len(expired), 500):
                async with consumer.holding_batch_lock():
                    if partition not in owned_partitions() or not catch_up.ready:
                        break
                    store.put_claims(partition, dict.fromkeys(expired[start:start + 500]))
                    await store.flush()
                    if app.in_transaction:
                        await consumer.commit_partitions({partition})

    if settings.api.enabled:
        api.attach(pipeline, Ownership(ready=lambda: catch_up.ready, owned=owned_partitions,
                                       owners=owners, claim=claim))
        api.add_routes(cast(Any, app.web).web_app.router)  # faust's aiohttp driver

        @app.on_before_shutdown.connect
        async def close_api(*args: Any, **kwargs: Any) -> None:
            await api.close()

    return Worker(app=app, pipeline=pipeline, metrics=metrics, models=models, catalog=catalog,
                  api=api)
