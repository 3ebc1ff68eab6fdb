"""Run the real :class:`~stream.pipeline.Pipeline` in-process, without Kafka or faust.

The pipeline reads and writes through two small protocols (``Store`` and ``Sink``); here they
are a dictionary and a list. Specs of state, policy and pipeline behaviour run on this in
milliseconds; what only a broker shows (offsets, changelogs, rebalances, transactions) is
tested against the real broker. The harness serves users too: rehearse a policy change on a
list of records and look at what the worker would have published::

    harness = Harness()
    harness.run([record("u1", Event(...).to_json())])
    harness.decisions()  # parsed `decisions` records, in order
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream import outcomes
from stream.bandit import OfferStats
from stream.config import PolicyConfig
from stream.contracts import Coupon, Limits, Preferences
from stream.metrics import Metrics
from stream.pipeline import BatchResult, OpenCart, Pipeline, Topics
from stream.policy import ServingModel
from stream.topics import expected_partition
from stream.uplift_model import UpliftModel

TOPICS = Topics(events="events", repartition="promo-events-repartition", dlq="events.dlq",
                decisions="decisions", vectors="user-vectors", outcomes="outcomes")


@dataclass(frozen=True)
class Consumed:
    """A consumed record (the pipeline's ``Record`` protocol)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class MemoryStore:
    """The pipeline's ``Store`` on dictionaries, one per partition and table."""

    users: dict[int, dict[str, bytes]] = field(default_factory=dict)
    budgets: dict[int, dict[str, bytes]] = field(default_factory=dict)
    preferences: dict[int, dict[str, bytes]] = field(default_factory=dict)
    carts: dict[int, dict[str, OpenCart]] = field(default_factory=dict)
    pending: dict[int, dict[str, bytes]] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)
    counts: dict[int, dict[str, bytes]] = field(default_factory=dict)
    claims: dict[int, dict[str, bytes]] = field(default_factory=dict)

    @staticmethod
    def _get(table: dict[int, dict[str, bytes]], partition: int,
             keys: Sequence[str]) -> dict[str, bytes]:
        mine = table.get(partition, {})
        return {key: mine[key] for key in keys if key in mine}

    @staticmethod
    def _put(table: dict[int, dict[str, bytes]], partition: int,
             records: Mapping[str, bytes | None]) -> None:
        mine = table.setdefault(partition, {})
        for key, raw in records.items():
            if raw is None:
                mine.pop(key, None)
            else:
                mine[key] = raw

    def get_users(self, partition: int, user_ids: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.users, partition, user_ids)

    def put_users(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.users, partition, records)

    def get_budgets(self, partition: int) -> dict[str, bytes]:
        return dict(self.budgets.get(partition, {}))

    def put_budgets(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.budgets, partition, records)

    def get_preferences(self, partition: int, user_id: str) -> bytes | None:
        return self.preferences.get(partition, {}).get(user_id)

    def set_open_carts(self, partition: int, carts: Mapping[str, OpenCart | None]) -> None:
        mine = self.carts.setdefault(partition, {})
        for user_id, cart in carts.items():
            if cart is None:
                mine.pop(user_id, None)
            else:
                mine[user_id] = cart

    def due_carts(self, before_ms: int) -> list[OpenCart]:
        return [cart for mine in self.carts.values() for cart in mine.values()
                if cart.ts_ms <= before_ms]

    def get_pending(self, partition: int, refs: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.pending, partition, refs)

    def put_pending(self, partition: int, records: Mapping[str, bytes | None]) -> None:
        self._put(self.pending, partition, records)

    def all_pending(self, partition: int) -> list[bytes]:
        return list(self.pending.get(partition, {}).values())

    def all_pending_refs(self) -> set[str]:
        return {ref for mine in self.pending.values() for ref in mine}

    def get_watermark(self, partition: int) -> int:
        return self.watermarks.get(partition, 0)

    def put_watermark(self, partition: int, watermark: int) -> None:
        self.watermarks[partition] = watermark

    def get_counts(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.counts, partition, keys)

    def put_counts(self, partition: int, records: Mapping[str, bytes]) -> None:
        self._put(self.counts, partition, records)

    def get_claims(self, partition: int, keys: Sequence[str]) -> dict[str, bytes]:
        return self._get(self.claims, partition, keys)

    def put_claims(self, partition: int, records: Mapping[str, bytes | None]) -> None:
        self._put(self.claims, partition, records)

    def all_counts(self) -> dict[str, bytes]:
        """Every partition's counts, as `promo report uplift` reads the changelog."""
        return {key: raw for mine in self.counts.values() for key, raw in mine.items()}

    async def flush(self) -> None:
        return None


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    source_partition: int
    partition: int | None


@dataclass
class ListSink:
    """The pipeline's ``Sink``: every record sent, in order."""

    sent: list[Sent] = field(default_factory=list)

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   source_partition: int, partition: int | None = None) -> Awaitable[Any]:
        self.sent.append(Sent(topic, key, value, source_partition, partition))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def flush(self) -> None:
        return None


@dataclass
class FixedModel:
    """A ``ModelSource`` that serves one encoder and one uplift model (None: no model)."""

    encoder: ServingModel | None = None
    uplift: UpliftModel | None = None


class Harness:
    """A pipeline over a :class:`MemoryStore` and a :class:`ListSink`, with a settable clock.

    :meth:`record` builds records the way a murmur2 producer would place them (each on its
    key's partition, offsets counting up per partition), so specs read like producing.
    """

    def __init__(self, *, policy: PolicyConfig | None = None, encoder: ServingModel | None = None,
                 coupons: Sequence[Coupon] = (), partitions: int = 2, now_ms: int = 0,
                 limits: Limits | None = None, retries: int = 2,
                 attribution: outcomes.Rules | None = outcomes.DEFAULT_RULES) -> None:
        self.store = MemoryStore()
        # What a worker reads back from the outcomes topic (for policy.thompson_sampling):
        # here, every outcome the harness's pipeline publishes.
        self.offer_stats = OfferStats(window_ms=int(
            (policy or PolicyConfig()).bandit_window_days * 86_400_000))
        self.sink = ListSink()
        self.metrics = Metrics()
        self.model = FixedModel(encoder)
        self.now_ms = now_ms
        self.partitions = partitions
        self._coupons = {c.coupon_id: c for c in coupons}
        self._offsets: dict[tuple[str, int], int] = {}
        self.pipeline = Pipeline(
            limits=limits or Limits(), topics=TOPICS, store=self.store, sink=self.sink,
            metrics=self.metrics, model=self.model, policy_config=policy or PolicyConfig(),
            coupons=lambda: self._coupons, partitions=partitions, retries=retries,
            attribution=attribution, clock=lambda: self.now_ms / 1000,
            offer_stats=self.offer_stats)

    def record(self, key: bytes | str | None, value: bytes | None, *,
               partition: int | None = None, topic: str = TOPICS.events) -> Consumed:
        """The next record of ``topic`` (on the key's partition unless ``partition``)."""
        raw_key = key.encode() if isinstance(key, str) else key
        if partition is None:
            partition = expected_partition(raw_key, self.partitions) if raw_key else 0
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        return Consumed(topic, partition, offset, raw_key, value)

    def set_preferences(self, user_id: str, prefs: Preferences) -> None:
        partition = expected_partition(user_id.encode(), self.partitions)
        self.store.preferences.setdefault(partition, {})[user_id] = prefs.to_json()

    def run(self, records: Sequence[Consumed]) -> BatchResult:
        return self._counted(asyncio.run(self.pipeline.process(records)))

    def check_carts(self) -> BatchResult:
        return self._counted(asyncio.run(self.pipeline.check_carts()))

    def _counted(self, result: BatchResult) -> BatchResult:
        if self.pipeline.offer_stats is not None:  # policy.thompson_sampling reads them
            for outcome in result.outcomes:
                self.offer_stats.add(outcome)
        return result

    def redeliver_forwarded(self) -> BatchResult:
        """Consume what the pipeline forwarded to the repartition topic (as the worker that
        owns those partitions would), and clear it from the sink."""
        forwarded = [s for s in self.sink.sent if s.topic == TOPICS.repartition]
        self.sink.sent = [s for s in self.sink.sent if s.topic != TOPICS.repartition]
        return self.run([self.record(s.key, s.value, partition=s.partition,
                                     topic=TOPICS.repartition) for s in forwarded])

    def published(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(s.value) for s in self.sink.sent
                if s.topic == topic and s.value is not None]

    def decisions(self) -> list[dict[str, Any]]:
        return self.published(TOPICS.decisions)

    def outcomes(self) -> list[dict[str, Any]]:
        return self.published(TOPICS.outcomes)

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.published(TOPICS.dlq)


def tiny_encoder(item_ids: Sequence[str], *, seed: int = 0, d_model: int = 16) -> ServingModel:
    """A small real encoder over ``item_ids`` with seeded random weights (not trained): specs
    of plumbing (vectors refreshed, versions carried, items ranked) need a model, not a good
    one. Popularity decreases along ``item_ids``."""
    import numpy as np
    import torch

    from encoder.config import EncoderConfig
    from encoder.inference import Encoder
    from encoder.model import EncoderModel
    from encoder.vocab import Vocabulary

    vocab = Vocabulary(list(item_ids), n_oov_buckets=4)
    torch.manual_seed(seed)
    model = EncoderModel(EncoderConfig(n_items=vocab.n_items, n_oov_buckets=4, d_model=d_model,
                                       n_heads=2, d_ff=2 * d_model))
    popularity = np.zeros(model.cfg.vocab_size, dtype=np.int64)
    popularity[1 : 1 + vocab.n_items] = np.arange(vocab.n_items, 0, -1)
    return Encoder(model, vocab, popularity, model_version=f"{seed:016x}")
