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
    ({"PROMO_KAFKA_PARTITIONZ": "3"}, r"kafka.partitionz\): no such setting"),
    ({"PROMO_KAFKA_PARTITIONS": "three"}, r"kafka.partitions\) = 'three'"),
    ({"PROMO_WORKER_METRICS_PORT": "true"}, "worker.metrics_port"),
])
def test_unknown_or_mistyped_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


@pytest.mark.parametrize(("environ", "message"), [
    ({"PROMO_POLICY_HOLDOUT_PERCENT": "150"}, "less than or equal to 100"),
    ({"PROMO_POLICY_QUIET_START_HOUR": "25"}, "less than or equal to 23"),
    ({"PROMO_KAFKA_PARTITIONS": "-1"}, "greater than or equal to 1"),
    ({"PROMO_WORKER_LOG_FORMAT": "xml"}, "'text' or 'json'"),
    ({"PROMO_WORKER_PROCESSING_GUARANTEE": "exactly-once"}, "'at_least_once' or 'exactly_once'"),
    ({"PROMO_WORKER_LOG_LEVEL": "loud"}, "'debug', 'info', 'warning' or 'error'"),
    ({"PROMO_POLICY_DEFAULT_TIMEZONE": "Mars/Olympus"}, "not an IANA time zone"),
    ({"PROMO_POLICY_HALF_DISCOUNT_PROPENSITY": "0.9"}, "must not exceed no_coupon_propensity"),
    ({"PROMO_KAFKA_SECURITY_PROTOCOL": "TLS"}, "'SASL_SSL'"),
])
def test_values_out_of_range_or_choice_are_rejected_when_loaded(environ: dict[str, str],
                                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "promo.toml"
    path.write_text("[policy]\nholdout_percent = -5\n[worker]\nbatch_max_events = 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={"PROMO_KAFKA_PARTITIONS": "0"})
    text = str(raised.value)
    assert f"{path} [policy] holdout_percent" in text and "PROMO_KAFKA_PARTITIONS" in text
    assert "batch_max_events" in text


def test_a_replaced_setting_is_checked_too() -> None:
    import dataclasses

    from pydantic import ValidationError

    settings = load_settings(environ={})
    assert dataclasses.replace(settings.kafka, partitions=8).partitions == 8
    with pytest.raises(ValidationError):
        dataclasses.replace(settings.policy, holdout_percent=101)


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


@pytest.mark.parametrize(("environ", "message"), [
    ({"PROMO_API_ENABLED": "true"}, "the API needs a bearer token"),
    ({"PROMO_API_TLS_CERTFILE": "cert.pem"}, "both api.tls_certfile and api.tls_keyfile"),
    ({"PROMO_API_PORT": "0"}, "api.port"),
    ({"PROMO_API_ENABLED": "1", "PROMO_API_TOKENS": "t", "PROMO_API_IDEMPOTENCY_SECONDS": "3600"},
     "a claim key must outlive its decision's window"),
])
def test_an_api_that_could_not_serve_safely_is_refused(environ: dict[str, str],
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_api_tokens_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated 2026-12\nfrom-file\n\n")
    api = load_settings(environ={"PROMO_API_ENABLED": "1", "PROMO_API_TOKENS": "a, b",
                                 "PROMO_API_TOKENS_FILE": str(tokens)}).api
    assert api.accepted_tokens() == {"a", "b", "from-file"}
    assert api.url() == "http://127.0.0.1:8470"
