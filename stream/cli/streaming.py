"""`promo worker`, `promo replay`, `promo export-events` and `promo demo`: the streaming job,
the events that feed it, and the whole thing end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from stream.cli.common import (
    Context,
    DataChoice,
    bootstrap_option,
    data_options,
    load_data,
    pass_context,
    progress_option,
    with_overrides,
)


@click.command("worker")
@bootstrap_option
@click.option("--metrics-port", type=int, default=None,
              help="Port of /metrics; 0 picks a free one [default: worker.metrics_port].")
@click.option("--data-dir", default=None,
              help="Local state (RocksDB) directory [default: worker.data_dir].")
@pass_context
def worker(context: Context, bootstrap_servers: str | None, metrics_port: int | None,
           data_dir: str | None) -> None:
    """Consume `events`, validate them, route rejects to the dead-letter topic, and decide.

    Runs until SIGINT/SIGTERM, then commits and stops cleanly.
    """
    from stream.exporter import ExporterError
    from stream.runner import run_worker
    from stream.topics import BrokerRefused, TopicConfigError

    try:
        run_worker(with_overrides(
            context.settings, kafka={"bootstrap_servers": bootstrap_servers},
            worker={"metrics_port": metrics_port, "data_dir": data_dir}))
    except (ExporterError, TopicConfigError, BrokerRefused) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("replay")
@click.argument("dataset_name", metavar="[DATASET]", required=False)
@data_options(from_kafka=False)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Replay only the first N events.")
@click.option("--rate", type=float, default=None,
              help="Events per second; 0 = as fast as possible [default: replay.rate].")
@click.option("--clock", type=click.Choice(["now", "dataset"]), default=None,
              help="now: stamp events at send time; dataset: keep dataset timestamps "
                   "[default: replay.clock].")
@click.option("--id-prefix", default=None, help="Prefix of event ids [default: dataset name].")
@bootstrap_option
@progress_option
@pass_context
def replay(context: Context, dataset_name: str | None, data: DataChoice, limit: int | None,
           rate: float | None, clock: str | None, id_prefix: str | None,
           bootstrap_servers: str | None, progress: bool) -> None:
    """Replay a real dataset (or --interactions CSV) into `events`, in time order.

    DATASET (the same as --dataset NAME) is instacart (installed with the project) or a
    research dataset in the datasets directory (games, beauty, ml-100k, rees46:
    encoder/data.py says where each comes from). Prints the number of events produced and
    acknowledged by the broker.
    """
    import asyncio

    from stream.replay import produce

    if dataset_name is not None:
        if data.dataset is not None:
            raise click.UsageError("give the dataset once: DATASET or --dataset NAME")
        data = dataclasses.replace(data, dataset=dataset_name)
    settings = with_overrides(context.settings, kafka={"bootstrap_servers": bootstrap_servers})
    name, rows, _ = load_data(settings, data, progress=progress)
    result = asyncio.run(produce(
        settings.kafka, rows, id_prefix=id_prefix or name, limit=limit,
        rate=settings.replay.rate if rate is None else rate,
        clock=clock or settings.replay.clock, progress=progress))
    click.echo(f"replayed {result.produced} events from {name} to "
               f"{settings.kafka.events_topic} in {result.seconds:.1f}s "
               f"({result.rate:,.0f} events/s)")


@click.command("export-events")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The CSV to write (user_id,item_id,timestamp,type,...).")
@bootstrap_option
@progress_option
@pass_context
def export_events(context: Context, out: Path, bootstrap_servers: str | None,
                  progress: bool) -> None:
    """Export the events topic's history (valid events, de-duplicated, in time order) as a CSV
    that `promo train --interactions FILE --type-col type` reads."""
    from aiokafka.errors import KafkaError

    from stream import eventlog

    settings = with_overrides(context.settings, kafka={"bootstrap_servers": bootstrap_servers})
    try:
        log = eventlog.load(settings.kafka, settings.contract, progress=progress)
    except (OSError, ValueError, KafkaError) as exc:
        raise click.ClickException(str(exc)) from exc
    eventlog.write_csv(log.interactions, out)
    click.echo(f"wrote {len(log.interactions)} events to {out}"
               + (f"; skipped {dict(log.skipped)}" if log.skipped else ""))


@click.command("demo")
@click.option("--dataset", default="instacart", help="Named dataset to train on and replay.")
@click.option("--limit", type=click.IntRange(min=1), default=20_000, help="Events to replay.")
@click.option("--datasets-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where research datasets live [default: replay.datasets_dir, else "
                   "$PROMO_DATASETS_DIR]; instacart comes installed.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".promo/demo"), help="Scratch directory (wiped at start).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".promo/models"), help="Where the demo model is kept and reused.")
@click.option("--train-minutes", type=float, default=3.0,
              help="Time budget to train the demo model when none is there yet.")
@click.option("--keep-running", is_flag=True, help="Leave broker and worker up until Ctrl-C.")
@pass_context
def demo(context: Context, dataset: str, limit: int, datasets_dir: Path | None, workdir: Path,
         models_dir: Path, train_minutes: float, keep_running: bool) -> None:
    """Run promo-stream end to end on a local broker with real data, then stop everything.

    Trains (or reuses) a small encoder, starts a broker and a worker, publishes a small coupon
    catalog and a few users' preferences, replays real events plus a few malformed records,
    and prints what the worker did, with example decisions and their reasons.
    """
    from stream.demo import run_demo

    settings = context.settings
    # Carts left open at the end of the slice get their reminder within the demo's run.
    settings = dataclasses.replace(settings, policy=dataclasses.replace(
        settings.policy, cart_abandon_seconds=5.0, cart_check_seconds=1.0))
    choice = DataChoice(dataset=dataset, interactions=None, user_col="", item_col="",
                        time_col="", type_col=None, datasets_dir=datasets_dir)
    name, rows, _ = load_data(settings, choice)
    run_demo(settings, dataset=name, rows=rows, limit=limit, workdir=workdir.resolve(),
             models_dir=models_dir.resolve(), train_minutes=train_minutes,
             keep_running=keep_running)


COMMANDS = [worker, replay, export_events, demo]
