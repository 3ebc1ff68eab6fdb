"""The topics promo-stream reads and writes, how to connect to Kafka, and creating topics.

DESIGN §3 is the contract; this module is its configuration: partitions, compaction, retention.
Topics keyed by user id share one partition count, so a user's events, preferences and state
changelog land on the same partition number and therefore on the same worker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from stream.config import KafkaSettings
from stream.contracts import DAY_MS

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger(__name__)


_HOME_CACHE: dict[tuple[bytes, int], int] = {}


class TopicConfigError(RuntimeError):
    """The cluster's topics contradict the settings (partition counts, a refused creation):
    waiting will not help, someone has to change one or the other."""


class BrokerNotReady(RuntimeError):
    """The broker answers but the topics have no leaders yet: try again shortly."""


class BrokerRefused(RuntimeError):
    """A broker answered and refused us (credentials, TLS): retrying will not help."""


async def probe(kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Connect once to each bootstrap server until one answers, to tell a broker that is not
    there (retry later) from one that refuses us (raise :class:`BrokerRefused`), which the
    client's own bootstrap reports the same way."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaConnectionError, KafkaError

    kwargs = client_kwargs(kafka)
    kwargs.pop("bootstrap_servers")
    for server in kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            try:
                conn = await create_conn(host, int(port),
                                         request_timeout_ms=int(timeout_s * 1000), **kwargs)
            except ssl.SSLError:
                raise  # an OSError too, but a refusal: the certificates do not match
            except (TimeoutError, KafkaConnectionError, OSError, ValueError):
                continue  # not there (or not yet)
        except (KafkaError, ssl.SSLError) as exc:
            raise BrokerRefused(
                f"{server} refused the connection ({type(exc).__name__}: {exc}); check "
                "kafka.security_protocol, kafka.sasl_username / sasl_password(_file) and "
                "kafka.ssl_cafile") from exc
        conn.close()
        return


def expected_partition(key: bytes, partitions: int) -> int:
    """The partition a user's records belong on: the Java client's default partitioner
    (``murmur2(key) & 0x7fffffff % partitions``), which aiokafka and librdkafka's
    ``murmur2_random`` share. Producers using another (librdkafka's default CRC32) are
    corrected by the worker's repartition topic, at the cost of one extra hop.
    """
    home = _HOME_CACHE.get((key, partitions))
    if home is None:
        if len(_HOME_CACHE) > 500_000:  # users repeat; the pure-Python hash is the cost
            _HOME_CACHE.clear()
        home = _HOME_CACHE[(key, partitions)] = (murmur2(key) & 0x7FFFFFFF) % partitions
    return home


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


#: The worker's tables (faust: RocksDB + a compacted changelog topic each, co-partitioned with
#: `events`). Their changelogs are created before the worker joins its group (see
#: :func:`ensure_topics`).
TABLES = ("users", "coupon-budgets", "open-carts", "preferences", "pending-outcomes",
          "outcome-counts", "api-claims")


def changelog_topic(app_id: str, table: str) -> str:
    return f"{app_id}-{table}-changelog"


def repartition_topic(app_id: str, source: str) -> str:
    """Where the worker forwards records of ``source`` ("events" or "preferences") that a
    producer put on another partition than their key's (Kafka Streams' repartition topics)."""
    return f"{app_id}-{source}-repartition"


def topic_specs(kafka: KafkaSettings, app_id: str | None = None) -> list[TopicSpec]:
    """The topics of the contract; with ``app_id``, also that worker group's internal ones."""
    p = kafka.partitions
    compacted = {"cleanup.policy": "compact"}
    week = {"retention.ms": str(7 * DAY_MS)}
    specs = [
        TopicSpec(kafka.events_topic, p, week),
        # Rejected records are kept longer than events: someone has to look at them.
        TopicSpec(kafka.dlq_topic, p, {"retention.ms": str(30 * DAY_MS)}),
        TopicSpec(kafka.decisions_topic, p, week),
        # One record per decision, keyed by its id: compaction keeps the last of any repeat.
        TopicSpec(kafka.outcomes_topic, p, compacted),
        TopicSpec(kafka.vectors_topic, p, compacted),
        TopicSpec(kafka.preferences_topic, p, compacted),
        # Every worker reads the whole catalog, so one partition keeps it in order.
        TopicSpec(kafka.coupons_topic, 1, compacted),
    ]
    if app_id:
        specs += [TopicSpec(changelog_topic(app_id, table), p, compacted) for table in TABLES]
        specs += [TopicSpec(repartition_topic(app_id, "events"), p, week),
                  TopicSpec(repartition_topic(app_id, "preferences"), p, week)]
    return specs


async def read_snapshot(kafka: KafkaSettings, topic: str,
                        handle: Callable[[ConsumerRecord[bytes, bytes]], None], *,
                        timeout: float = 600.0,
                        on_progress: Callable[[int, int], None] | None = None) -> dict[int, int]:
    """Hand every record of ``topic`` to ``handle``, from the beginning up to the end offsets
    taken when reading starts (records arriving meanwhile wait for the next read), with
    ``read_committed``: an aborted transaction's records never reach it. Returns partition ->
    the offset reading stopped at; ``on_progress(read, total)`` is called after each fetch."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    try:
        await consumer.start()
        tps = await _assign_from_beginning(consumer, kafka, topic)
        start = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        total = sum(end[tp] - start[tp] for tp in tps)
        pending = {tp for tp in tps if end[tp] > start[tp]}
        read = 0
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout:.0f} s")
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < end[tp]:
                        read += 1
                        handle(record)
            for tp in list(pending):
                # Under read_committed, transaction markers take offsets too: position decides.
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if on_progress:
                on_progress(read, total)
    finally:
        await consumer.stop()
    return {tp.partition: end[tp] for tp in tps}


async def _assign_from_beginning(consumer: AIOKafkaConsumer, kafka: KafkaSettings,
                                 topic: str) -> list[TopicPartition]:
    """Assign the started ``consumer`` every partition of ``topic``, at the beginning."""
    from aiokafka import TopicPartition

    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()  # a fresh client may not know yet
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TopicMissing(f"topic {topic!r} not found on {kafka.bootstrap_servers}")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def follow_topic(kafka: KafkaSettings, topic: str,
                       handle: Callable[[bytes | None, bytes | None], None], *,
                       on_caught_up: Callable[[], None] | None = None) -> None:
    """Hand ``handle(key, value)`` every record of ``topic`` from the beginning, then every new
    one, forever, outside any consumer group (every caller reads all partitions: a compacted
    topic read in full, as a faust GlobalTable would be), under ``read_committed``.
    ``on_caught_up`` is called once, when the end offsets found at the start are reached."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tps = await _assign_from_beginning(consumer, kafka, topic)
        end = await consumer.end_offsets(tps)
        not_yet_told = on_caught_up
        while True:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for record in records:
                    handle(record.key, record.value)
            if not_yet_told is not None and all(
                    [await consumer.position(tp) >= end[tp] for tp in tps]):
                not_yet_told()
                not_yet_told = None
    finally:
        await consumer.stop()


class TopicMissing(LookupError):
    """The topic to read does not exist on the broker."""


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection settings shared by every aiokafka producer, consumer and admin client."""
    kwargs: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers,
                              "security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL"):
        kwargs.update(sasl_mechanism=kafka.sasl_mechanism,
                      sasl_plain_username=kafka.sasl_username,
                      sasl_plain_password=sasl_password(kafka))
    return kwargs


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=kafka.ssl_cafile or None)
    return context


def sasl_password(kafka: KafkaSettings) -> str:
    if kafka.sasl_password_file:
        return Path(kafka.sasl_password_file).read_text().strip()
    return kafka.sasl_password


async def ensure_topics(kafka: KafkaSettings, *, app_id: str | None = None,
                        timeout_s: float = 30.0) -> list[str]:
    """Create any missing topic of :func:`topic_specs`; return the names created.

    Existing topics are left alone, except that a partition count different from the settings
    is an error: silently running with another count would split users' state. The worker
    passes its ``app_id``, so its changelog and repartition topics exist, with leaders, before
    it joins the group: faust's assignor ignores a topic it cannot see yet, and a table whose
    changelog it ignored (the preferences, say) fails on every access while the worker
    reports ready.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        specs = topic_specs(kafka, app_id)
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        if missing:
            brokers = len((await admin.describe_cluster())["brokers"])
            copies, in_sync = replication(kafka.replication_factor, brokers)
            new = [NewTopic(s.name, s.partitions, copies,
                            topic_configs=s.config | {"min.insync.replicas": str(in_sync)})
                   for s in missing]
            try:
                response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                response = None
            errors = [] if response is None else [
                (name, code, msg) for name, code, msg, *_ in response.topic_errors
                if code not in (0, TopicAlreadyExistsError.errno)]
            if errors:
                raise TopicConfigError(f"creating topics failed: {errors}")
            created = [s.name for s in missing]
            log.info("created topics", extra={"topics": created})
        await _check_partitions(admin, [s for s in specs if s.name in existing])
        await _wait_for_leaders(admin, [s.name for s in specs], timeout_s)
        return created
    finally:
        await admin.close()


def replication(configured: int, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for new topics. ``configured`` 0 follows the
    cluster: three copies where there are three brokers or more, two of which must have a
    write before it counts, so one broker can die without losing data or stopping writes."""
    copies = configured or min(3, max(1, brokers))
    return copies, 2 if copies >= 3 else 1


async def _check_partitions(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    if not specs:
        return
    described = await admin.describe_topics([s.name for s in specs])
    by_name = {t["topic"]: len(t["partitions"]) for t in described}
    wrong = {s.name: (by_name.get(s.name), s.partitions) for s in specs
             if by_name.get(s.name) != s.partitions}
    if wrong:
        detail = ", ".join(f"{name} has {have} (settings say {want})"
                           for name, (have, want) in wrong.items())
        raise TopicConfigError(f"topic partition counts differ from settings: {detail} "
                               f"(set kafka.partitions to match, or use new topics)")


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """New topics take a moment to get leaders; producing before that fails confusingly."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        if all(t["error_code"] == 0 and t["partitions"]
               and all(p["leader"] >= 0 for p in t["partitions"]) for t in described):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerNotReady(f"topics {names} have no leaders after {timeout_s}s")
        await asyncio.sleep(0.2)


async def produce_records(kafka: KafkaSettings, topic: str,
                          records: list[tuple[bytes, bytes | None]]) -> int:
    """Produce keyed records (a None value is a tombstone) and wait until the broker has all
    of them (acks=all, idempotent); the number produced."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*sent)
        return len(sent)
    finally:
        await producer.stop()


async def read_compacted(kafka: KafkaSettings, topic: str) -> dict[bytes, bytes]:
    """The latest value of every key of a compacted topic, read from its start to the end
    offsets taken when reading began (tombstoned keys left out)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                           or await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        latest: dict[bytes, bytes | None] = {}
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for part in (await consumer.getmany(timeout_ms=1000)).values():
                for record in part:
                    if record.key is not None:
                        latest[record.key] = record.value
        return {key: value for key, value in latest.items() if value is not None}
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """A topic's partitions once the consumer's metadata knows it (fetched on demand)."""
    await consumer._client.force_metadata_update()
    partitions: set[int] = consumer.partitions_for_topic(topic) or set()
    if not partitions:
        raise TopicConfigError(f"topic {topic!r} does not exist (run a worker once, or "
                               "`promo replay`, to create the topics)")
    return partitions
