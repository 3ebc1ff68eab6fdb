"""What every `promo` command shares: the settings, flag overrides, and one way to name data.

Nothing here imports torch: a command pays for the model only when it runs one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from stream.config import Settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """The settings, loaded once from file and environment, for every subcommand."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from stream.config import ConfigError, load_settings  # pydantic: only when needed

            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._settings


pass_context = click.make_pass_decorator(Context)


def with_overrides(settings: Settings, **sections: dict[str, object]) -> Settings:
    """Settings with the command-line flags that were given (None means not given)."""
    changes = {}
    for name, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            changes[name] = dataclasses.replace(getattr(settings, name), **given)
    return dataclasses.replace(settings, **changes)


def bootstrap_option(f: F) -> F:
    return click.option("--bootstrap-servers", default=None,
                        help="Kafka bootstrap servers [default: kafka.bootstrap_servers].")(f)


def progress_option(f: F) -> F:
    return click.option("--progress/--no-progress", default=True,
                        help="Show progress (on stderr).")(f)


@dataclasses.dataclass(frozen=True)
class DataChoice:
    """Where a command's interactions come from: exactly one of a named dataset, a CSV, or
    (for the commands that learn) the events topic's history."""

    dataset: str | None
    interactions: Path | None
    user_col: str
    item_col: str
    time_col: str
    type_col: str | None
    datasets_dir: Path | None
    from_kafka: bool | None = None  # None: the command does not offer --from-kafka


_DATA_PARAMS = ("dataset", "interactions", "user_col", "item_col", "time_col", "type_col",
                "datasets_dir", "from_kafka")


def data_options(*, from_kafka: bool) -> Callable[[F], F]:
    """The options that name interaction data, the same for every command that reads some;
    they arrive as one ``data: DataChoice`` argument."""
    def decorate(f: F) -> F:
        options = [
            click.option("--dataset", metavar="NAME",
                         help="A named dataset: instacart comes installed; the research "
                              "datasets are read from --datasets-dir (a wrong name lists them "
                              "all)."),
            click.option("--interactions", type=click.Path(exists=True, dir_okay=False,
                                                           path_type=Path),
                         help="Any CSV (or .csv.gz) of interactions instead: one row per "
                              "event, with user, item and time columns."),
            click.option("--user-col", default="user_id", show_default=True,
                         help="User column of --interactions."),
            click.option("--item-col", default="item_id", show_default=True,
                         help="Item column of --interactions."),
            click.option("--time-col", default="timestamp", show_default=True,
                         help="Time column of --interactions: epoch seconds, epoch "
                              "milliseconds or ISO-8601 (detected per file)."),
            click.option("--type-col", default=None,
                         help="Event-type column of --interactions (view, click, add_to_cart, "
                              "purchase and synonyms such as cart or buy); without it every "
                              "row is a purchase."),
            click.option("--datasets-dir", type=click.Path(file_okay=False, path_type=Path),
                         default=None, help="Where named research datasets are looked up "
                         "[default: replay.datasets_dir, else $PROMO_DATASETS_DIR, else "
                         "./datasets]."),
        ]
        if from_kafka:
            options.append(click.option(
                "--from-kafka", is_flag=True,
                help="Read the events topic's history instead (kafka.* settings), up to its "
                     "current end."))

        def gather(*args: object, **kwargs: object) -> object:
            values: dict[str, Any] = {name: kwargs.pop(name, None) for name in _DATA_PARAMS}
            kwargs["data"] = DataChoice(**values)
            return f(*args, **kwargs)

        command: Any = functools.update_wrapper(gather, f)
        for option in reversed(options):
            command = option(command)
        return command  # type: ignore[no-any-return]

    return decorate


def load_data(settings: Settings, data: DataChoice, *,
              progress: bool = True) -> tuple[str, list[Any], dict[str, Any]]:
    """(name, interactions, source description) for ``data``; one clear error otherwise."""
    from encoder import data as datasets

    given = (data.dataset is not None) + (data.interactions is not None) + bool(data.from_kafka)
    if given != 1:
        raise click.UsageError(
            f"name a dataset (--dataset NAME: {', '.join(datasets.DATASET_NAMES)}), give "
            "--interactions FILE.csv" + (", or --from-kafka" if data.from_kafka is not None
                                          else "") + " (exactly one)")
    source: dict[str, Any]
    try:
        if data.from_kafka:
            rows, source = _event_log(settings, progress)
            name = settings.kafka.events_topic
        elif data.interactions is not None:
            rows = datasets.load_interactions_csv(
                data.interactions, user_col=data.user_col, item_col=data.item_col,
                time_col=data.time_col, type_col=data.type_col)
            name = data.interactions.name.split(".")[0]
            source = {"interactions": str(data.interactions), "user_col": data.user_col,
                      "item_col": data.item_col, "time_col": data.time_col,
                      "type_col": data.type_col}
        else:
            assert data.dataset is not None
            name = datasets.canonical_name(data.dataset)
            where = data.datasets_dir or settings.datasets_dir()
            rows = datasets.load_dataset(name, where)
            source = {"dataset": name, "path": str(datasets.dataset_path(name, where))}
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    source["interactions_loaded"] = len(rows)
    return name, rows, source


def _event_log(settings: Settings, progress: bool) -> tuple[list[Any], dict[str, Any]]:
    from aiokafka.errors import KafkaError

    from encoder.data import DataError
    from stream import eventlog

    try:
        log = eventlog.load(settings.kafka, settings.contract, progress=progress)
    except KafkaError as exc:
        raise DataError(f"cannot read {settings.kafka.events_topic!r} from "
                        f"{settings.kafka.bootstrap_servers}: {exc}") from exc
    if not log.interactions:
        raise DataError(f"topic {settings.kafka.events_topic!r} holds no valid events")
    if log.skipped:
        click.echo(f"skipped records: {dict(log.skipped)}", err=True)
    return log.interactions, log.source(settings.kafka.events_topic)
