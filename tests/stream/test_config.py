"""Settings: defaults, then a TOML file, then PROMO_* variables; mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import ConfigError, as_toml, load_settings


def test_defaults_need_no_file_or_environment() -> None:
    settings = load_settings(environ={})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.events_topic == "events"
    assert settings.worker.metrics_host == "127.0.0.1"  # localhost unless opened up


def test_file_then_environment_override_defaults(tmp_path: Path) -> None:
    path = tmp_path / "promo.toml"
    path.write_text('[kafka]\nbootstrap_servers = "file:9092"\npartitions = 8\n'
                    '[worker]\nbatch_max_seconds = 0.5\n')
    settings = load_settings(path, environ={"PROMO_KAFKA_PARTITIONS": "12",
                                            "PROMO_WORKER_LOG_FORMAT": "json"})
    assert settings.kafka.bootstrap_servers == "file:9092"
    assert settings.kafka.partitions == 12
    assert settings.worker.batch_max_seconds == 0.5
    assert settings.worker.log_format == "json"


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "promo.toml"
    path.write_text('[kafka]\nevents_topic = "clicks"\n')
    assert load_settings(environ={"PROMO_CONFIG": str(path)}).kafka.events_topic == "clicks"


@pytest.mark.parametrize(("environ", "message"), [
    ({"PROMO_KAFKA_PARTITIONZ": "3"}, "no field 'partitionz'"),
    ({"PROMO_KAFKA_PARTITIONS": "three"}, "partitions"),
    ({"PROMO_WORKER_METRICS_PORT": "true"}, "metrics_port"),
])
def test_unknown_or_mistyped_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_unknown_sections_in_a_file_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "promo.toml"
    path.write_text("[kafak]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown sections"):
        load_settings(path, environ={})


def test_printed_settings_mask_secrets_and_read_back(tmp_path: Path) -> None:
    settings = load_settings(environ={"PROMO_KAFKA_SASL_PASSWORD": "hunter2"})
    text = as_toml(settings)
    assert "hunter2" not in text
    path = tmp_path / "out.toml"
    path.write_text(text.replace('"***"', '""'))
    assert load_settings(path, environ={}).kafka == load_settings(environ={}).kafka
