"""Shared fixtures. Tests that claim Kafka behaviour use the real broker started here."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka import launcher
from stream.config import Settings, load_settings


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


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a `promo` subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    for section in dataclasses.fields(settings):
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            env[f"PROMO_{section.name.upper()}_{name.upper()}"] = str(value)
    return env
