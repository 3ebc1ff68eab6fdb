"""docker-compose.kafka.yml cannot run here (no Docker engine), so check it says what the local
launcher does: same Kafka version, same broker settings, same topics and ports."""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy.kafka import launcher
from stream.config import load_settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.kafka.yml"
# Settings that shape behaviour; listener and quorum wiring differ by design (containers need
# a second listener, the image formats with static voters) and are documented in the file.
SHARED_BROKER_SETTINGS = [
    "process.roles", "num.partitions", "default.replication.factor", "min.insync.replicas",
    "offsets.topic.replication.factor", "offsets.topic.num.partitions",
    "transaction.state.log.replication.factor", "transaction.state.log.min.isr",
    "transaction.state.log.num.partitions", "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr", "group.initial.rebalance.delay.ms",
]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_the_pinned_kafka_version_in_kraft_mode() -> None:
    kafka = compose()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{launcher.kafka_version()}"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka["environment"]


def test_compose_broker_settings_match_the_launcher(tmp_path: Path) -> None:
    env = compose()["services"]["kafka"]["environment"]
    node = launcher.Node(1, 9092, 9093, "dir")
    local = launcher.server_properties(launcher.Cluster(tmp_path, "cid", [node]), node)
    for key in SHARED_BROKER_SETTINGS:
        env_key = "KAFKA_" + key.upper().replace(".", "_")
        assert env.get(env_key) == local[key], f"{env_key}: compose {env.get(env_key)!r} " \
                                               f"!= launcher {local[key]!r}"


def test_compose_ports_match_the_defaults() -> None:
    services = compose()["services"]
    defaults = load_settings(environ={})
    assert "9092:9092" in services["kafka"]["ports"]
    assert defaults.kafka.bootstrap_servers == "127.0.0.1:9092"
    port = defaults.worker.metrics_port
    assert f"{port}:{port}" in services["worker"]["ports"]
    assert services["worker"]["environment"]["PROMO_WORKER_METRICS_PORT"] == str(port)


def test_compose_worker_uses_the_default_topics_and_partitions() -> None:
    env = compose()["services"]["worker"]["environment"]
    defaults = load_settings(environ={})
    assert int(env["PROMO_KAFKA_PARTITIONS"]) == defaults.kafka.partitions
    # Topic names are not overridden, so the worker creates the documented topics itself.
    assert not [key for key in env if key.endswith("_TOPIC")]
    # Every PROMO_* variable must name a real setting.
    assert load_settings(environ={k: v for k, v in env.items()}) is not None


def test_compose_mounts_files_that_exist() -> None:
    root = COMPOSE.parent
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (root / source).exists(), f"{source} is mounted but missing"
        build = service.get("build")
        if build:
            assert (root / build["context"] / build["dockerfile"]).exists()
