"""Settings: defaults here, overridden by a TOML file, overridden by the environment.

One frozen dataclass per concern, gathered in :class:`Settings`. A TOML file has one table per
section (``[kafka]``, ``[worker]``, ...), and every field can also be set from the environment
as ``PROMO_<SECTION>_<FIELD>`` (``PROMO_KAFKA_BOOTSTRAP_SERVERS=host:9092``). The file comes
from ``--config`` or ``PROMO_CONFIG``. Secrets (SASL password) belong in the environment or a
file named by ``*_file`` settings, never on a command line where ``ps`` would show them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "events"
    dlq_topic: str = "events.dlq"
    decisions_topic: str = "decisions"
    vectors_topic: str = "user-vectors"
    coupons_topic: str = "coupons"
    preferences_topic: str = "user-preferences"
    # Partitions of `events` bound how many workers can share the load; the state changelog
    # and `user-preferences` get the same number so a user's data stays on one worker.
    partitions: int = 4
    replication_factor: int = 1
    security_protocol: str = "PLAINTEXT"  # or SASL_SSL, SASL_PLAINTEXT, SSL
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = ""
    sasl_password_file: str = ""  # read at start; preferred over sasl_password
    ssl_cafile: str = ""


@dataclass(frozen=True)
class ContractSettings:
    max_record_bytes: int = 16 * 1024
    # Events stamped further ahead than this are clock bugs or forgeries, not early arrivals.
    max_future_skew_seconds: float = 300.0
    # Anything older is a unit mistake (seconds sent as milliseconds) or garbage; 1990 still
    # admits the oldest public datasets (MovieLens 100K is from 1997).
    min_event_time_ms: int = 631_152_000_000  # 1990-01-01T00:00:00Z


@dataclass(frozen=True)
class WorkerSettings:
    app_id: str = "promo-stream"
    data_dir: str = ".promo/worker"
    processing_guarantee: str = "at_least_once"  # or exactly_once
    # A worker that dies silently keeps its partitions until this expires (faust's default is
    # 60 s); heartbeats go every 3 s, so 10 s tolerates three missed ones.
    session_timeout_seconds: float = 10.0
    # A micro-batch closes when it holds batch_max_events or batch_max_seconds have passed
    # since its first fetch, whichever comes first; under load a single fetch fills it.
    batch_max_events: int = 2000
    batch_max_seconds: float = 0.1
    metrics_host: str = "127.0.0.1"  # localhost unless an operator opens it up
    metrics_port: int = 9464
    # How often the worker hands its metrics to its exporter (and proves it is alive). A
    # smaller value times things more finely (the benchmarks use 0.05) for a little CPU.
    metrics_snapshot_seconds: float = 1.0
    log_level: str = "info"
    log_format: str = "text"  # or json
    checkpoint: str = ""  # encoder checkpoint directory (or a symlink to one); "" = none
    model_poll_seconds: float = 5.0  # how often to look for a newer checkpoint there
    # A batch whose processing raises is computed again this many times before it is cut in
    # halves to dead-letter the one record that raises (reason processing_error).
    processing_retries: int = 2
    # RocksDB memory per table per partition: a worker opens tables x partitions databases,
    # and faust's defaults (3 write buffers of 64 MB, a 2 GB block cache each) are sized for
    # one big database, not 16 small ones on a small host.
    rocksdb_write_buffer_mb: int = 8
    rocksdb_block_cache_mb: int = 16
    # exactly_once: the broker aborts a transaction open longer than this (and fences the
    # producer). Batches commit every few seconds and timer output at once, so 60 s is slack.
    transaction_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class PolicyConfig:
    """The decision policy's knobs (stream/policy.py explains the order they apply in)."""

    holdout_percent: float = 10.0
    push_daily_cap: int = 3
    push_min_interval_seconds: float = 4 * 3600.0
    coupon_daily_cap: int = 1
    coupon_min_interval_seconds: float = 24 * 3600.0
    quiet_start_hour: int = 22  # local time; no sends from 22:00 ...
    quiet_end_hour: int = 8  # ... to 08:00
    default_timezone: str = "UTC"
    # Users without a preferences record: the shop's terms decide; opt-in is the default here.
    default_push_opt_in: bool = True
    default_coupon_opt_in: bool = True
    repeat_view_threshold: int = 3  # views of one item within the sequence = purchase intent
    cart_abandon_seconds: float = 1800.0
    cold_start_events: int = 3  # fewer events than this: popularity fallbacks
    push_items: int = 3
    push_exclude_recent_hours: float = 24.0  # items touched this recently are never pushed
    # Push ranking adds w * log(1 + n) to an item's score for n occurrences in the user's
    # recent sequence (policy.repeat_boost); 0 ranks by the encoder alone.
    push_repeat_weight: float = 1.0
    # Propensity above `no_coupon_propensity` gets no coupon; above `half_discount_propensity`
    # gets half the coupon's value.
    no_coupon_propensity: float = 0.8
    half_discount_propensity: float = 0.5
    # Platt calibration of the behavioural propensity score, fitted by `promo simulate` on
    # held-out data (it prints the values); 1 and 0 leave the score as it is.
    propensity_logit_scale: float = 1.0
    propensity_logit_bias: float = 0.0
    explain_items: int = 2  # recent items named in the reasons
    cart_check_seconds: float = 5.0  # how often the worker looks for abandoned carts


@dataclass(frozen=True)
class ReplaySettings:
    datasets_dir: str = ""  # empty: $PROMO_DATASETS_DIR, else ../shared/datasets beside the repo
    rate: float = 0.0  # events/s; 0 = as fast as the broker takes them
    clock: str = "now"  # now: stamp events at send time; dataset: keep the dataset's time


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    contract: ContractSettings = field(default_factory=ContractSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def datasets_dir(self) -> Path:
        from encoder.data import default_datasets_dir

        configured = self.replay.datasets_dir
        return Path(configured) if configured else default_datasets_dir()


class ConfigError(ValueError):
    """A settings file or variable names an unknown field or holds a value of the wrong type."""


S = TypeVar("S")


def load_settings(path: str | Path | None = None,
                  environ: Mapping[str, str] | None = None,
                  **overrides: Mapping[str, Any]) -> Settings:
    """Defaults, then the TOML file, then ``PROMO_*`` variables, then ``overrides`` by section."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("PROMO_CONFIG") or None
    file_values: dict[str, Any] = {}
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    unknown = set(file_values) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}")
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        cls = typing.get_type_hints(Settings)[section.name]
        values = dict(file_values.get(section.name, {}))
        prefix = f"PROMO_{section.name.upper()}_"
        names = {f.name for f in dataclasses.fields(cls)}
        for key, raw in environ.items():
            if key.startswith(prefix):
                name = key[len(prefix):].lower()
                if name not in names:
                    raise ConfigError(f"{key}: {cls.__name__} has no field {name!r}")
                values[name] = raw
        values.update(overrides.get(section.name, {}))
        sections[section.name] = _build(cls, values, where=f"[{section.name}]")
    return Settings(**sections)


def _build(cls: type[S], values: Mapping[str, Any], where: str) -> S:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
    kwargs = {name: _coerce(hints[name], value, f"{where} {name}")
              for name, value in values.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or value == "":
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("boolean where a number is expected")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")


def as_environment(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child `promo` process: this process's
    environment without its own ``PROMO_*`` variables, plus every setting as one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    for section in dataclasses.fields(settings):
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            env[f"PROMO_{section.name.upper()}_{name.upper()}"] = str(value)
    return env


def as_toml(settings: Settings) -> str:
    """The effective settings as TOML (secrets masked), for `promo config`."""
    lines: list[str] = []
    for section in dataclasses.fields(settings):
        lines.append(f"[{section.name}]")
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            if "password" in name and value and not name.endswith("_file"):
                value = "***"
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, int | float):
                rendered = repr(value)
            else:
                rendered = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{name} = {rendered}")
        lines.append("")
    return "\n".join(lines)
