"""Settings: defaults here, overridden by a TOML file, overridden by the environment.

One frozen dataclass per concern, gathered in :class:`Settings`. A TOML file has one table per
section (``[kafka]``, ``[worker]``, ...), and every field can also be set from the environment
as ``PROMO_<SECTION>_<FIELD>`` (``PROMO_KAFKA_BOOTSTRAP_SERVERS=host:9092``). The file comes
from ``--config`` or ``PROMO_CONFIG``. Secrets (SASL password) belong in the environment or a
file named by ``*_file`` settings, never on a command line where ``ps`` would show them.

Values are checked when they are loaded, by type, range and choice, with pydantic: a holdout of
150%, an hour 25 or ``exactly-once`` (hyphen) is a :class:`ConfigError` naming the setting, the
value and the rule, in `promo config` as in the worker. The sections are pydantic *dataclasses*
(not models): ``dataclasses.replace`` and ``asdict`` keep working everywhere, and ``replace``
validates too. The file and environment are merged here in a few lines rather than by
pydantic-settings, whose nested variables would be ``PROMO_KAFKA__BOOTSTRAP_SERVERS``: every
documented variable name stays as it is.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid", str_strip_whitespace=True)

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
Hour = Annotated[int, Field(ge=0, le=23)]
Share = Annotated[float, Field(ge=0, le=1)]
Name = Annotated[str, Field(min_length=1)]


@dataclass(frozen=True, config=_STRICT)
class KafkaSettings:
    bootstrap_servers: Name = "127.0.0.1:9092"
    events_topic: Name = "events"
    dlq_topic: Name = "events.dlq"
    decisions_topic: Name = "decisions"
    vectors_topic: Name = "user-vectors"
    coupons_topic: Name = "coupons"
    preferences_topic: Name = "user-preferences"
    outcomes_topic: Name = "outcomes"
    # Partitions of `events` bound how many workers can share the load; the state changelog
    # and `user-preferences` get the same number so a user's data stays on one worker.
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 4
    # Copies of every topic the project creates; 0 follows the cluster: 3 (and
    # min.insync.replicas 2, so a write survives one broker's loss) on three brokers or more,
    # else one per broker.
    replication_factor: Annotated[int, Field(ge=0, le=10)] = 0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = ""
    sasl_password_file: str = ""  # read at start; preferred over sasl_password
    ssl_cafile: str = ""


@dataclass(frozen=True, config=_STRICT)
class ContractSettings:
    max_record_bytes: Annotated[int, Field(ge=256, le=1_048_576)] = 16 * 1024
    # Events stamped further ahead than this are clock bugs or forgeries, not early arrivals.
    max_future_skew_seconds: NonNegative = 300.0
    # Anything older is a unit mistake (seconds sent as milliseconds) or garbage; 1990 still
    # admits the oldest public datasets (MovieLens 100K is from 1997).
    min_event_time_ms: Count = 631_152_000_000  # 1990-01-01T00:00:00Z


@dataclass(frozen=True, config=_STRICT)
class WorkerSettings:
    app_id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = "promo-stream"
    data_dir: Name = ".promo/worker"
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # A worker that dies silently keeps its partitions until this expires (faust's default is
    # 60 s); heartbeats go every 3 s, so 10 s tolerates three missed ones.
    session_timeout_seconds: Annotated[float, Field(ge=6, le=300)] = 10.0
    # A micro-batch closes when it holds batch_max_events or batch_max_seconds have passed
    # since its oldest record was written, whichever comes first; under load a single fetch
    # fills it.
    batch_max_events: Annotated[int, Field(ge=1, le=100_000)] = 2000
    batch_max_seconds: NonNegative = 0.1
    metrics_host: Name = "127.0.0.1"  # localhost unless an operator opens it up
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] = 9464  # 0: any free port
    # How often the worker hands its metrics to its exporter (and proves it is alive). A
    # smaller value times things more finely (the benchmarks use 0.05) for a little CPU.
    metrics_snapshot_seconds: Annotated[float, Field(ge=0.01, le=60)] = 1.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    checkpoint: str = ""  # encoder checkpoint directory (or a symlink to one); "" = none
    # Uplift checkpoint (`promo train-uplift`), swapped in like the encoder's; "" = none: the
    # propensity tiers decide.
    uplift_checkpoint: str = ""
    model_poll_seconds: Positive = 5.0  # how often to look for a newer checkpoint there
    # A batch whose processing raises is computed again this many times before it is cut in
    # halves to dead-letter the one record that raises (reason processing_error).
    processing_retries: Annotated[int, Field(ge=0, le=10)] = 2
    # RocksDB memory per table per partition: a worker opens tables x partitions databases,
    # and faust's defaults (3 write buffers of 64 MB, a 2 GB block cache each) are sized for
    # one big database, not 16 small ones on a small host.
    rocksdb_write_buffer_mb: Annotated[int, Field(ge=1, le=1024)] = 8
    rocksdb_block_cache_mb: Annotated[int, Field(ge=1, le=65_536)] = 16
    # exactly_once: the broker aborts a transaction open longer than this (and fences the
    # producer). Batches commit every few seconds and timer output at once, so 60 s is slack;
    # brokers refuse more than their transaction.max.timeout.ms (15 minutes by default).
    transaction_timeout_seconds: Annotated[float, Field(ge=1, le=900)] = 60.0

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True, config=_STRICT)
class PolicyConfig:
    """The decision policy's knobs (stream/policy.py explains the order they apply in)."""

    holdout_percent: Annotated[float, Field(ge=0, le=100)] = 10.0
    push_daily_cap: Count = 3
    push_min_interval_seconds: NonNegative = 4 * 3600.0
    coupon_daily_cap: Count = 1
    coupon_min_interval_seconds: NonNegative = 24 * 3600.0
    quiet_start_hour: Hour = 22  # local time; no sends from 22:00 ...
    quiet_end_hour: Hour = 8  # ... to 08:00 (equal hours: no quiet hours)
    default_timezone: str = "UTC"  # an IANA zone, for users whose preferences name none
    # Consent of a user without a preferences record, or whose record leaves a flag out: the
    # shop's terms decide; opt-in is the default here. A flag a record states always wins.
    default_push_opt_in: bool = True
    default_coupon_opt_in: bool = True
    # Views of one item within the sequence that signal purchase intent.
    repeat_view_threshold: AtLeastOne = 3
    cart_abandon_seconds: Positive = 1800.0
    cold_start_events: Count = 3  # fewer events than this: popularity fallbacks
    push_items: Annotated[int, Field(ge=1, le=50)] = 3
    push_exclude_recent_hours: NonNegative = 24.0  # items touched this recently are never pushed
    # Push ranking adds w * log(1 + n) to an item's score for n occurrences in the user's
    # recent sequence (policy.repeat_boost); 0 ranks by the encoder alone.
    push_repeat_weight: NonNegative = 1.0
    # Propensity (0-1) at or above `no_coupon_propensity` gets no coupon; at or above
    # `half_discount_propensity` gets half the coupon's value. A threshold above 1 (inf
    # included) turns that gate off.
    no_coupon_propensity: NonNegative = 0.8
    half_discount_propensity: NonNegative = 0.5
    # Platt calibration of the behavioural propensity score, fitted by `promo simulate` on
    # held-out data (it prints the values); 1 and 0 leave the score as it is.
    propensity_logit_scale: Positive = 1.0
    propensity_logit_bias: float = 0.0
    explain_items: Annotated[int, Field(ge=0, le=20)] = 2  # recent items named in the reasons
    # Logged exploration: this share of treatment-arm decisions takes a feasible offer at
    # random (drawn from a hash of the decision id, so a replay draws the same), and every
    # decision records the probability its offer had (`propensity`): what lets a new policy
    # be judged on the log before it serves, and the uplift model learn beyond the old one.
    exploration_share: Annotated[float, Field(ge=0, le=1)] = 0.05
    # With an uplift model, an offer is worth the conversions it adds times margin_rate times
    # the user's average order (default_order_value for a user without one), less its cost:
    # a coupon's discount whenever it converts, push_cost per push (fees, fatigue).
    margin_rate: Annotated[float, Field(ge=0, le=1)] = 0.3
    default_order_value: NonNegative = 30.0
    push_cost: NonNegative = 0.0
    # Without an uplift model, choose offers by Thompson sampling over the outcomes of the
    # last bandit_window_days, per context bucket (stream.bandit), instead of the propensity
    # tiers; every worker reads the outcomes topic for it.
    thompson_sampling: bool = False
    bandit_window_days: Positive = 14.0
    cart_check_seconds: Positive = 5.0  # how often the worker looks for abandoned carts

    @field_validator("default_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"not an IANA time zone: {value!r} (e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _tiers_in_order(self) -> PolicyConfig:
        if self.half_discount_propensity > self.no_coupon_propensity:
            raise ValueError("half_discount_propensity must not exceed no_coupon_propensity")
        return self


@dataclass(frozen=True, config=_STRICT)
class AttributionSettings:
    """Which later events count as a decision's conversion (stream/outcomes.py)."""

    enabled: bool = True  # off: no pending windows, no `outcomes` (the benchmark compares)
    # A decision converts if its user converts within this much event time of the trigger.
    window_seconds: Annotated[float, Field(ge=1, le=90 * 86_400)] = 7 * 86_400.0
    # Event types that count as a conversion (a shop that sells sign-ups may add its own).
    conversion_types: tuple[str, ...] = ("purchase",)
    # A window closes once the partition's event time is this far past its end: events from
    # producers whose clocks lag a little still count.
    grace_seconds: NonNegative = 300.0
    # Open windows kept per user (in the user's 1 KB state record); one more evicts the
    # oldest `none` decision's window (else the oldest), which then gets its outcome at once.
    max_pending: Annotated[int, Field(ge=1, le=4)] = 4

    @field_validator("conversion_types", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # From the environment: PROMO_ATTRIBUTION_CONVERSION_TYPES=purchase,add_to_cart
        return tuple(v.strip() for v in value.split(",") if v.strip()) \
            if isinstance(value, str) else value

    @field_validator("conversion_types")
    @classmethod
    def _known_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from encoder.vocab import EVENT_TYPES

        unknown = sorted(set(value) - set(EVENT_TYPES))
        if unknown or not value:
            raise ValueError(f"conversion types must be some of {', '.join(EVENT_TYPES)}; "
                             f"got {list(value)}")
        return value


@dataclass(frozen=True, config=_STRICT)
class UpliftSettings:
    """How `promo report uplift` and the guardrail alert judge lift (stream/uplift.py)."""

    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05  # 0.05: 95% intervals
    # The mixture's spread over true effects (normal, mean 0): the lift in conversion-rate
    # points the test is tuned to find fastest. Intervals are valid for any value.
    mixture_tau: Annotated[float, Field(gt=0, le=1)] = 0.02
    # The same for relative lift (log of the ratio of rates): 0.1 is about 10%.
    mixture_tau_relative: Annotated[float, Field(gt=0, le=5)] = 0.1


@dataclass(frozen=True, config=_STRICT)
class ApiSettings:
    """The pull API every worker serves (stream/api.py; docs/api.md)."""

    enabled: bool = False
    host: Name = "127.0.0.1"  # the interface to bind; localhost unless an operator opens it up
    port: Annotated[int, Field(ge=1, le=65_535)] = 8470
    # How the other workers of the group reach this one (a request for a user this worker
    # does not own is forwarded there); "" = http(s)://host:port.
    advertised_url: str = ""
    # Bearer tokens the API accepts; prefer tokens_file (one per line, read at start) or the
    # environment (PROMO_API_TOKENS=a,b) to a settings file.
    tokens: tuple[str, ...] = ()
    tokens_file: str = ""
    tls_certfile: str = ""  # both set: the API serves HTTPS only
    tls_keyfile: str = ""
    tls_cafile: str = ""  # trusted when forwarding to another worker over HTTPS
    max_body_bytes: Annotated[int, Field(ge=256, le=1_048_576)] = 4096
    # Per token, a token bucket: this many requests a second on average, bursts of `burst`.
    rate_limit_per_second: Positive = 2000.0
    rate_limit_burst: AtLeastOne = 400
    request_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 2.0
    forward_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    # A claim's idempotency key answers with the same decision for this long. At least the
    # attribution window plus its grace (checked): a key forgotten sooner could decide again
    # under the same decision id while the first decision's window is still open.
    idempotency_seconds: Annotated[float, Field(ge=60, le=90 * 86_400)] = 8 * 86_400.0
    retry_after_seconds: Annotated[int, Field(ge=1, le=600)] = 1  # on 503 during a rebalance

    @field_validator("tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return tuple(v.strip() for v in value.split(",") if v.strip()) \
            if isinstance(value, str) else value

    @model_validator(mode="after")
    def _usable(self) -> ApiSettings:
        if self.enabled and not self.tokens and not self.tokens_file:
            raise ValueError("the API needs a bearer token: set api.tokens_file or "
                             "PROMO_API_TOKENS (or api.enabled = false)")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("set both api.tls_certfile and api.tls_keyfile, or neither")
        return self

    def accepted_tokens(self) -> frozenset[str]:
        tokens = set(self.tokens)
        if self.tokens_file:
            tokens |= {line.strip() for line in Path(self.tokens_file).read_text().splitlines()
                       if line.strip() and not line.startswith("#")}
        return frozenset(tokens)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    def url(self) -> str:
        return self.advertised_url or f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, config=_STRICT)
class ReplaySettings:
    datasets_dir: str = ""  # empty: $PROMO_DATASETS_DIR (see encoder/data.py)
    rate: NonNegative = 0.0  # events/s; 0 = as fast as the broker takes them
    clock: Literal["now", "dataset"] = "now"  # now: stamp at send time; dataset: keep its time


@dataclass(frozen=True, config=_STRICT)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    contract: ContractSettings = field(default_factory=ContractSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    uplift: UpliftSettings = field(default_factory=UpliftSettings)
    api: ApiSettings = field(default_factory=ApiSettings)

    @model_validator(mode="after")
    def _claims_outlive_their_windows(self) -> Settings:
        attribution, api = self.attribution, self.api
        needed = attribution.window_seconds + attribution.grace_seconds
        if api.enabled and attribution.enabled and api.idempotency_seconds < needed:
            raise ValueError(f"api.idempotency_seconds ({api.idempotency_seconds:g}) must be at "
                             "least attribution.window_seconds + grace_seconds "
                             f"({needed:g}): a claim key must outlive its decision's window")
        return self

    def datasets_dir(self) -> Path:
        from encoder.data import default_datasets_dir

        configured = self.replay.datasets_dir
        return Path(configured) if configured else default_datasets_dir()


_SECTION_TYPES: dict[str, type[Any]] = {
    "kafka": KafkaSettings, "contract": ContractSettings, "worker": WorkerSettings,
    "replay": ReplaySettings, "policy": PolicyConfig, "attribution": AttributionSettings,
    "uplift": UpliftSettings, "api": ApiSettings}


class ConfigError(ValueError):
    """A settings file or variable names an unknown field or holds a value that breaks a
    rule; the message names each one."""


def load_settings(path: str | Path | None = None,
                  environ: Mapping[str, str] | None = None,
                  **overrides: Mapping[str, Any]) -> Settings:
    """Defaults, then the TOML file, then ``PROMO_*`` variables, then ``overrides`` by section."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("PROMO_CONFIG") or None
    values: dict[str, dict[str, Any]] = {}
    where: dict[tuple[str, str], str] = {}  # (section, field) -> where its value came from
    if path:
        try:
            from_file = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
        for section, body in from_file.items():
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: [{section}] must be a table of settings")
            values[section] = dict(body)
            where.update({(section, name): f"{path} [{section}] {name}" for name in body})
    sections = {f.name for f in dataclasses.fields(Settings)}
    for key, raw in environ.items():
        if not key.startswith("PROMO_") or key in _NOT_SETTINGS:
            continue
        section, _, name = key[len("PROMO_"):].lower().partition("_")
        if section not in sections:
            continue  # PROMO_LOG_SALT and friends are read where they are used
        values.setdefault(section, {})[name] = raw
        where[(section, name)] = key
    for section, given in overrides.items():
        values.setdefault(section, {}).update(given)
    unknown = set(values) - sections
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; "
                          f"known: {', '.join(sorted(sections))}")
    built: dict[str, Any] = {}
    problems: list[str] = []
    for section, body in values.items():
        try:
            built[section] = _SECTION_TYPES[section](**body)
        except ValidationError as exc:
            problems += _explain(section, exc, where)
    if problems:
        head = "invalid setting" if len(problems) == 1 else f"{len(problems)} invalid settings"
        raise ConfigError(f"{head}: " + "; ".join(problems))
    try:
        return Settings(**built)
    except ValidationError as exc:  # a rule across sections
        raise ConfigError("invalid settings: " + "; ".join(
            e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


_NOT_SETTINGS = {"PROMO_CONFIG", "PROMO_DATASETS_DIR", "PROMO_LOG_SALT", "PROMO_SOAK",
                 "PROMO_API_TOKEN"}  # the client's token (`promo offers`), not a setting


def _explain(section: str, error: ValidationError,
             where: Mapping[tuple[str, str], str]) -> list[str]:
    """One line per broken rule: where the value came from, the value, the rule."""
    lines = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"])
        origin = where.get((section, name), "")
        origin = f"{origin} ({section}.{name})" if origin else f"{section}.{name}"
        if problem["type"] == "unexpected_keyword_argument":
            lines.append(f"{origin}: no such setting in [{section}]")
        elif not name:  # a rule across fields
            lines.append(f"[{section}]: {problem['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{origin} = {problem.get('input')!r}: "
                         f"{problem['msg'].removeprefix('Value error, ')}")
    return lines


def as_environment(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child `promo` process: this process's
    environment without its own ``PROMO_*`` variables, plus every setting as one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    for section in dataclasses.fields(settings):
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            env[f"PROMO_{section.name.upper()}_{name.upper()}"] = (
                ",".join(value) if isinstance(value, tuple) else str(value))
    return env


def _secret(name: str) -> bool:
    return ("password" in name or name == "tokens") and not name.endswith("_file")


def as_toml(settings: Settings) -> str:
    """The effective settings as TOML (secrets masked), for `promo config`."""
    lines: list[str] = []
    for section in dataclasses.fields(settings):
        lines.append(f"[{section.name}]")
        for name, value in dataclasses.asdict(getattr(settings, section.name)).items():
            if _secret(name) and value:
                value = tuple("***" for _ in value) if isinstance(value, tuple) else "***"
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, int | float):
                rendered = repr(value)
            elif isinstance(value, tuple):
                rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            else:
                rendered = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{name} = {rendered}")
        lines.append("")
    return "\n".join(lines)
