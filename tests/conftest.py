"""Shared fixtures. Tests that claim Kafka behaviour use the real broker started here;
workers run as `promo worker` subprocesses with small encoder checkpoints built from real data."""

from __future__ import annotations

import os

# One torch/OpenMP thread per process, set before torch loads (children inherit it): `make
# test` runs four test processes, and the workers and tools they start, on two cores, where
# thread pools fighting over the cores cost more than they give.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio
import dataclasses
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from deploy.kafka import launcher
from encoder import checkpoint
from encoder.config import EncoderConfig
from encoder.data import load_dataset
from encoder.model import EncoderModel
from encoder.vocab import Vocabulary
from stream.config import Settings, load_settings
from stream.topics import ensure_topics
from tests.support import FIXTURE_DATASETS, PROMO, PromoProcess
from tests.workers import worker_env

#: Modules whose tests start brokers, workers or Prometheus themselves (not through the
#: session broker): they are `kafka` tests too, left out of `make check`.
_STARTS_REAL_PARTS = ("tests/bench/", "tests/reliability/", "tests/deploy/test_launcher.py",
                      "tests/deploy/test_alerts_live.py", "tests/deploy/test_prometheus.py",
                      "tests/test_clone.py", "tests/test_first_hour.py", "tests/test_readme.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a real broker as `kafka`, from what it uses, so that
    `make check` (``-m "not kafka and not slow"``) cannot run one by mistake.

    Under pytest-xdist (``make test`` runs ``-n 4 --dist loadgroup``): a test that needs no
    broker runs in the group of its folder, if the folder's conftest builds shared fixtures,
    else of its module, so module and session fixtures are built once, not once per process;
    broker tests, which mostly wait, go out one by one. Tests are queued longest first, by
    the ``slow(seconds=N)`` hint (measured on this 2-core machine, run alone), so the long
    ones start at once instead of last.
    """
    root = Path(str(config.rootpath))
    for item in items:
        path = Path(str(item.path))
        where = path.relative_to(root).as_posix()
        if ("kafka_cluster" in getattr(item, "fixturenames", ())
                or where.startswith(_STARTS_REAL_PARTS)):
            item.add_marker(pytest.mark.kafka)
        elif (path.parent / "conftest.py").exists() and path.parent != root / "tests":
            item.add_marker(pytest.mark.xdist_group(path.parent.relative_to(root).as_posix()))
        else:
            item.add_marker(pytest.mark.xdist_group(where))

    def expected_seconds(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        if slow is not None:
            return float(slow.kwargs.get("seconds", 30))
        return 10.0 if item.get_closest_marker("kafka") else 1.0

    items.sort(key=expected_seconds, reverse=True)  # stable: same hint, same order


def _shared_broker_dir() -> Path:
    """Where this run's session broker lives: one per `pytest` run, shared by its pytest-xdist
    processes (their parent is the run's controller process)."""
    run = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
    return Path(tempfile.gettempdir()) / f"promo-test-broker-{run}"


@pytest.fixture(scope="session")
def kafka_cluster() -> launcher.Cluster:
    """One real single-node KRaft broker for the whole run, started with `promo broker start`
    when a test first needs it. Test processes share it (each test has its own topics and
    consumer group), which saves three JVMs on two cores; pytest_sessionfinish stops it."""
    data_dir = _shared_broker_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir.with_suffix(".lock")):
        cluster = launcher.status(data_dir)
        if cluster is None or not all(cluster.alive().values()):
            subprocess.run([PROMO, "broker", "start", "--data-dir", str(data_dir),
                            "--port", str(launcher.free_port()),
                            "--controller-port", str(launcher.free_port())],
                           check=True, capture_output=True, timeout=180)
            cluster = launcher.status(data_dir)
    assert cluster is not None
    return cluster


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's controller (or the only process) stops the shared broker, if one started."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    data_dir = _shared_broker_dir()
    if launcher.status(data_dir) is not None:
        launcher.stop(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.with_suffix(".lock").unlink(missing_ok=True)


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
        outcomes_topic=f"outcomes-{run}",
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
