"""Shared fixtures. Tests that claim Kafka behaviour use the real broker started here;
workers run as `promo worker` subprocesses with small encoder checkpoints built from real data."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.kafka import launcher
from encoder import checkpoint
from encoder.config import EncoderConfig
from encoder.data import load_dataset
from encoder.model import EncoderModel
from encoder.vocab import Vocabulary
from stream.config import Settings, load_settings
from stream.topics import ensure_topics
from tests.support import FIXTURE_DATASETS, PromoProcess
from tests.workers import worker_env

#: Modules whose tests start brokers, workers or Prometheus themselves (not through the
#: session broker): they are `kafka` tests too, left out of `make check`.
_STARTS_REAL_PARTS = ("tests/bench/", "tests/reliability/", "tests/deploy/test_launcher.py",
                      "tests/deploy/test_alerts_live.py", "tests/deploy/test_prometheus.py",
                      "tests/test_clone.py", "tests/test_first_hour.py", "tests/test_readme.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a real broker as `kafka`, from what it uses, so that
    `make check` (``-m "not kafka and not slow"``) cannot run one by mistake."""
    root = Path(str(config.rootpath))
    for item in items:
        where = Path(str(item.path)).relative_to(root).as_posix()
        if ("kafka_cluster" in getattr(item, "fixturenames", ())
                or where.startswith(_STARTS_REAL_PARTS)):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.Cluster]:
    """One real single-node KRaft broker for the whole session, started by our launcher."""
    data_dir = tmp_path_factory.mktemp("kafka")
    cluster = launcher.start(data_dir, nodes=1)
    try:
        yield cluster
    finally:
        launcher.stop(data_dir)


@pytest.fixture
def bootstrap(kafka_cluster: launcher.Cluster) -> str:
    return kafka_cluster.bootstrap_servers


@pytest.fixture
def settings(bootstrap: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics, consumer group and state directory on the broker."""
    run = uuid.uuid4().hex[:8]
    base = load_settings(environ={})
    kafka = dataclasses.replace(
        base.kafka, bootstrap_servers=bootstrap, partitions=2,
        events_topic=f"events-{run}", dlq_topic=f"events.dlq-{run}",
        decisions_topic=f"decisions-{run}", vectors_topic=f"user-vectors-{run}",
        coupons_topic=f"coupons-{run}", preferences_topic=f"user-preferences-{run}")
    worker = dataclasses.replace(base.worker, app_id=f"promo-test-{run}",
                                 data_dir=str(tmp_path / "worker"), batch_max_seconds=0.1)
    return dataclasses.replace(base, kafka=kafka, worker=worker)


def build_checkpoint(out: Path, dataset: str = "instacart", seed: int = 0,
                     n_event_types: int = 4) -> str:
    """A small checkpoint over a real dataset's vocabulary and popularity, weights from
    ``seed``. The streaming tests check plumbing (vectors equal the offline encoder's, the
    version travels with decisions), which does not depend on how well the model ranks."""
    rows = load_dataset(dataset, FIXTURE_DATASETS)  # instacart: the installed sample
    counts = Counter(r.item_id for r in rows)
    vocab = Vocabulary([item for item, _ in counts.most_common()], n_oov_buckets=16)
    torch.manual_seed(seed)
    model = EncoderModel(EncoderConfig(n_items=vocab.n_items, n_oov_buckets=16, d_model=32,
                                       n_event_types=n_event_types))
    popularity = np.zeros(model.cfg.vocab_size, dtype=np.int64)
    for item, n in counts.items():
        popularity[vocab.index(item)] = n
    return checkpoint.save(out, model, vocab, popularity, {"seed": seed, "dataset": dataset})


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    build_checkpoint(root / "v1", seed=1)
    build_checkpoint(root / "v2", seed=2)
    return {"v1": root / "v1", "v2": root / "v2"}


@pytest.fixture
def run_worker(settings: Settings,
               tmp_path: Path) -> Iterator[Callable[..., tuple[PromoProcess, int]]]:
    """Start `promo worker` subprocesses for this test's settings; stopped (and required to
    exit cleanly) at the end."""
    asyncio.run(ensure_topics(settings.kafka))  # before a test produces coupons or prefs
    started: list[PromoProcess] = []

    def start(checkpoint: Path | None, env: dict[str, str] | None = None,
              **policy: str) -> tuple[PromoProcess, int]:
        port = launcher.free_port()
        proc = PromoProcess(["worker"],
                            worker_env(settings, port, checkpoint, **policy) | (env or {}),
                            tmp_path / f"worker-{len(started)}.log")
        started.append(proc)
        proc.wait_for_log("worker ready", timeout=120)
        return proc, port

    yield start
    for proc in started:
        assert proc.stop() == 0, proc.log_tail()
