"""`promo`: the command line of promo-stream. Every subcommand has ``--help``.

A failure a user can cause (a broker not running, a port taken, a bad setting, a missing file)
is one line on stderr saying what to do, and a non-zero exit; ``promo --debug`` shows the
Python traceback instead (:func:`run`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deploy.kafka import launcher
from encoder.cli import _data_options as _encoder_data_options
from encoder.cli import _load as _load_encoder_data
from encoder.cli import evaluate, publish, train
from stream import logs
from stream.config import ConfigError, Settings, as_toml, load_settings

DEFAULT_BROKER_DIR = Path(".promo/broker")


class Context:
    """What every subcommand shares: the settings, loaded once from file and environment."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._settings


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", envvar="PROMO_CONFIG", type=click.Path(dir_okay=False),
              help="TOML settings file (sections kafka, worker, contract, replay).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False),
              default=None, help="[default: worker.log_level]")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="json writes one JSON object per line [default: worker.log_format]")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an unexpected error.")
@click.version_option(package_name="promo-stream")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None,
         log_format: str | None, debug: bool) -> None:
    """promo-stream: real-time personalised coupons and push notifications from Kafka events.

    \b
    Typical session:
      promo broker start          # a local Kafka (KRaft) broker as a JVM process
      promo worker                # consume events, keep state, publish decisions
      promo replay instacart      # replay a real dataset as events
      promo broker stop
    Settings come from --config FILE, then PROMO_<SECTION>_<FIELD> variables;
    `promo config` prints the effective values.
    """
    context = Context(config_path)
    ctx.obj = context
    if ctx.invoked_subcommand in ("config",):
        return
    settings = context.settings
    logs.configure(log_level or settings.worker.log_level, log_format or settings.worker.log_format)


def run() -> None:
    """The `promo` entry point: click reports usage and ClickException errors itself; every
    other exception becomes one line here (what happened, what to do), unless --debug."""
    try:
        main.main(prog_name="promo")
    except Exception as exc:
        if "--debug" in sys.argv[1:]:
            raise
        click.echo(f"Error: {explain(exc)}", err=True)
        sys.exit(1)


def explain(exc: BaseException) -> str:
    """One line for an error, with the next step where there is an obvious one."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from pydantic import ValidationError

    if isinstance(exc, KafkaConnectionError):
        return (f"cannot reach Kafka ({exc}); start a broker (`promo broker start`) or point "
                "kafka.bootstrap_servers (--bootstrap-servers, PROMO_KAFKA_BOOTSTRAP_SERVERS) "
                "at one")
    if isinstance(exc, KafkaError):
        return f"Kafka said: {exc}"
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return f"invalid setting: {problems}"
    if isinstance(exc, OSError | ValueError | RuntimeError):
        return str(exc) or type(exc).__name__
    return (f"unexpected {type(exc).__name__}: {exc} (run with `promo --debug ...` for the "
            "traceback, and please report it)")


@main.command("config")
@pass_context
def show_config(context: Context) -> None:
    """Print the effective settings as TOML (secrets masked)."""
    click.echo(as_toml(context.settings), nl=False)


@main.group()
def broker() -> None:
    """Run a local Apache Kafka (KRaft) broker or 3-node cluster as JVM processes."""


def _data_dir_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_BROKER_DIR,
                        help="Directory holding the cluster's config, logs and data.")(f)


@broker.command("install")
def broker_install() -> None:
    """Resolve Kafka's jars with Maven into the cache (no-op when cached)."""
    try:
        libs = launcher.ensure_jars()
    except launcher.BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka {launcher.kafka_version()} jars: {libs}", err=True)


@broker.command("start")
@_data_dir_option
@click.option("--nodes", type=click.Choice(["1", "3"]), default="1",
              help="1 for development; 3 for replication factor 3 on one machine.")
@click.option("--port", type=click.IntRange(1, 65_535), default=None,
              help="Client port of a single node [default: 9092, what kafka.bootstrap_servers "
                   "expects].")
@click.option("--controller-port", type=int, default=None, help="KRaft controller port.")
@click.option("--heap", default="512m", help="JVM -Xmx per node.")
@click.option("--timeout", type=float, default=90.0, help="Seconds to wait for readiness.")
def broker_start(data_dir: Path, nodes: str, port: int | None, controller_port: int | None,
                 heap: str, timeout: float) -> None:
    """Start the broker(s) and wait until ready; print the bootstrap servers on stdout."""
    n = int(nodes)
    if n == 1 and port is None and launcher.Cluster.load(data_dir) is None:
        if not _port_free(9092):
            raise click.ClickException(
                "127.0.0.1:9092 is in use (another broker? `promo broker status`); pass "
                "--port N and then set PROMO_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:N")
        port = 9092
    try:
        cluster = launcher.start(data_dir, nodes=n, broker_port=port,
                                 controller_port=controller_port, heap=heap, timeout=timeout)
    except launcher.BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka {launcher.kafka_version()} ready: {n} node(s), data in "
               f"{cluster.data_dir}", err=True)
    click.echo(cluster.bootstrap_servers)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@broker.command("stop")
@_data_dir_option
@click.option("--timeout", type=float, default=30.0, help="Seconds between SIGTERM and SIGKILL.")
@click.option("--purge", is_flag=True, help="Also delete the data directory.")
def broker_stop(data_dir: Path, timeout: float, purge: bool) -> None:
    """Stop the broker(s): SIGTERM, then SIGKILL after --timeout."""
    was_running = launcher.stop(data_dir, timeout=timeout)
    if purge and data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    click.echo("stopped" if was_running else "not running", err=True)


@broker.command("status")
@_data_dir_option
def broker_status(data_dir: Path) -> None:
    """Show each node's pid, ports and whether it runs; exit 1 if any node is down."""
    cluster = launcher.status(data_dir)
    if cluster is None:
        click.echo(f"no cluster in {data_dir}")
        sys.exit(1)
    alive = cluster.alive()
    for node in cluster.nodes:
        state = "running" if alive[node.node_id] else "stopped"
        click.echo(f"node {node.node_id}: {state:8} pid={cluster.pids.get(node.node_id, '-')} "
                   f"broker=127.0.0.1:{node.broker_port} "
                   f"controller=127.0.0.1:{node.controller_port}")
    click.echo(f"bootstrap servers: {cluster.bootstrap_servers}")
    if not all(alive.values()):
        sys.exit(1)


@main.group()
def coupons() -> None:
    """Publish, list and retire coupon campaigns (the compacted `coupons` topic).

    \b
    A campaigns file is a JSON list (or JSON lines) of objects:
      {"coupon_id": "spring-10", "value": 10.0, "budget": 5000.0,
       "valid_from": "2026-03-01T00:00:00Z", "valid_to": 1775000000000,
       "min_spend": 30.0, "items": ["sku-1"], "categories": ["snacks"],
       "max_exposures": 1000}
    value, budget and min_spend are money; valid_from / valid_to are epoch milliseconds
    or ISO-8601 text (no zone: UTC), valid_to defaulting to no end (and no pacing); no items
    and no categories means any purchase. Workers pick changes up within a second.
    """


@coupons.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file; publish nothing.")
@pass_context
def coupons_publish(context: Context, file: Path, dry_run: bool) -> None:
    """Check every campaign in FILE, then publish them all (or none)."""
    from stream import admin

    campaigns = admin.load_campaigns(file)
    if dry_run:
        click.echo(f"{len(campaigns)} campaigns in {file} are valid; nothing published")
        return
    admin.publish_campaigns(context.settings.kafka, campaigns)
    click.echo(f"published {len(campaigns)} campaigns to {context.settings.kafka.coupons_topic}"
               f": {', '.join(c.coupon_id for c in campaigns)}")


@coupons.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per campaign.")
@pass_context
def coupons_list(context: Context, as_json: bool) -> None:
    """The campaigns the workers serve from, with their windows."""
    import time

    import orjson

    from stream import admin

    campaigns = admin.read_campaigns(context.settings.kafka)
    now_ms = int(time.time() * 1000)
    for coupon in sorted(campaigns.values(), key=lambda c: c.coupon_id):
        if as_json:
            click.echo(orjson.dumps({"coupon_id": coupon.coupon_id}
                                    | orjson.loads(coupon.to_json())).decode())
            continue
        targets = (f"{len(coupon.items)} items, {len(coupon.categories)} categories"
                   if coupon.items or coupon.categories else "any purchase")
        click.echo(f"{coupon.coupon_id:<24} value {coupon.value:>8.2f}  budget "
                   f"{coupon.budget:>10.2f}  {admin.describe_window(coupon, now_ms)}  "
                   f"{targets}")
    if not campaigns and not as_json:
        click.echo(f"no campaigns in {context.settings.kafka.coupons_topic}")


@coupons.command("retire")
@click.argument("coupon_ids", nargs=-1, required=True)
@pass_context
def coupons_retire(context: Context, coupon_ids: tuple[str, ...]) -> None:
    """End campaigns now: no coupon of theirs is issued once workers see it (a second)."""
    from stream import admin

    unknown = admin.retire_campaigns(context.settings.kafka, list(coupon_ids))
    click.echo(f"retired {', '.join(coupon_ids)}"
               + (f" ({', '.join(unknown)} were not in the catalog)" if unknown else ""))


@main.group()
def preferences() -> None:
    """Publish users' consent and time zones (the compacted `user-preferences` topic)."""


@preferences.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check the file; publish nothing.")
@pass_context
def preferences_publish(context: Context, file: Path, dry_run: bool) -> None:
    """Check every record in FILE, then publish them all (or none).

    \b
    FILE: JSON list, JSON lines or CSV (header user_id,push_opt_in,coupon_opt_in,timezone):
      {"user_id": "u42", "push_opt_in": false, "coupon_opt_in": true,
       "timezone": "Europe/Berlin"}
    A flag left out (or empty in a CSV) is not stated: that user gets the configured
    default (policy.default_push_opt_in / default_coupon_opt_in), like a user with no
    record. Stated flags always win.
    """
    from stream import admin

    found = admin.load_preferences(file)
    if dry_run:
        click.echo(f"{len(found)} preferences in {file} are valid; nothing published")
        return
    admin.publish_preferences(context.settings.kafka, found)
    click.echo(f"published {len(found)} preferences to "
               f"{context.settings.kafka.preferences_topic}")


main.add_command(train)
main.add_command(evaluate)
main.add_command(publish)


@main.command("worker")
@click.option("--bootstrap-servers", default=None,
              help="Kafka bootstrap servers [default: kafka.bootstrap_servers].")
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
        run_worker(_with_overrides(
            context.settings, kafka={"bootstrap_servers": bootstrap_servers},
            worker={"metrics_port": metrics_port, "data_dir": data_dir}))
    except (ExporterError, TopicConfigError, BrokerRefused) as exc:
        raise click.ClickException(str(exc)) from exc


def _with_overrides(settings: Settings, **sections: dict[str, object]) -> Settings:
    """Settings with the command-line flags that were given (None means not given)."""
    import dataclasses

    changes = {}
    for name, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            changes[name] = dataclasses.replace(getattr(settings, name), **given)
    return dataclasses.replace(settings, **changes)


def _dataset_options(f: click.decorators.FC) -> click.decorators.FC:
    """The ways to name interaction data, shared by every command that reads some."""
    options = [
        click.argument("dataset", required=False),
        click.option("--interactions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Any CSV of interactions instead of a named dataset."),
        click.option("--user-col", default="user_id", help="User column of --interactions."),
        click.option("--item-col", default="item_id", help="Item column of --interactions."),
        click.option("--time-col", default="timestamp", help="Time column of --interactions."),
        click.option("--type-col", default=None, help="Event-type column of --interactions."),
        click.option("--datasets-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Where research datasets live (instacart comes "
                     "installed) [default: replay.datasets_dir, else $PROMO_DATASETS_DIR, else "
                     "./datasets]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load_interactions(settings: Settings, dataset: str | None, interactions: Path | None,
                       user_col: str, item_col: str, time_col: str, type_col: str | None,
                       datasets_dir: Path | None) -> tuple[str, list]:  # type: ignore[type-arg]
    from encoder import data

    if (dataset is None) == (interactions is None):
        raise click.UsageError("name a DATASET or give --interactions FILE.csv (exactly one); "
                               f"datasets: {', '.join(data.DATASET_NAMES)}")
    try:
        if interactions is not None:
            return interactions.stem, data.load_interactions_csv(
                interactions, user_col=user_col, item_col=item_col, time_col=time_col,
                type_col=type_col)
        assert dataset is not None
        return dataset, data.load_dataset(dataset, datasets_dir or settings.datasets_dir())
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("replay")
@_dataset_options
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Replay only the first N events.")
@click.option("--rate", type=float, default=None,
              help="Events per second; 0 = as fast as possible [default: replay.rate].")
@click.option("--clock", type=click.Choice(["now", "dataset"]), default=None,
              help="now: stamp events at send time; dataset: keep dataset timestamps "
                   "[default: replay.clock].")
@click.option("--id-prefix", default=None, help="Prefix of event ids [default: dataset name].")
@click.option("--bootstrap-servers", default=None,
              help="Kafka bootstrap servers [default: kafka.bootstrap_servers].")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_context
def replay(context: Context, dataset: str | None, interactions: Path | None, user_col: str,
           item_col: str, time_col: str, type_col: str | None, datasets_dir: Path | None,
           limit: int | None, rate: float | None, clock: str | None, id_prefix: str | None,
           bootstrap_servers: str | None, progress: bool) -> None:
    """Replay a real dataset (or --interactions CSV) into `events`, in time order.

    DATASET is instacart (installed with the project) or a research dataset in the datasets
    directory (games, beauty, ml-100k, rees46: encoder/data.py says where each comes from).
    Prints the number of events produced and acknowledged by the broker.
    """
    import asyncio

    from stream.replay import produce

    settings = _with_overrides(context.settings, kafka={"bootstrap_servers": bootstrap_servers})
    name, rows = _load_interactions(settings, dataset, interactions, user_col, item_col, time_col,
                                    type_col, datasets_dir)
    result = asyncio.run(produce(
        settings.kafka, rows, id_prefix=id_prefix or name, limit=limit,
        rate=settings.replay.rate if rate is None else rate,
        clock=clock or settings.replay.clock, progress=progress))
    click.echo(f"replayed {result.produced} events from {name} to "
               f"{settings.kafka.events_topic} in {result.seconds:.1f}s "
               f"({result.rate:,.0f} events/s)")


@main.command("demo")
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
    import dataclasses

    from stream.demo import run_demo

    settings = context.settings
    # Carts left open at the end of the slice get their reminder within the demo's run.
    settings = dataclasses.replace(settings, policy=dataclasses.replace(
        settings.policy, cart_abandon_seconds=5.0, cart_check_seconds=1.0))
    name, rows = _load_interactions(settings, dataset, None, "", "", "", None, datasets_dir)
    run_demo(settings, dataset=name, rows=rows, limit=limit, workdir=workdir.resolve(),
             models_dir=models_dir.resolve(), train_minutes=train_minutes,
             keep_running=keep_running)


@main.command("simulate")
@_encoder_data_options
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Judge this encoder (it must not have seen the events after "
              "the cut) [default: train one on the events before the cut].")
@click.option("--train-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.8, help="Events before this quantile of time train and warm up; the "
              "rest are replayed and judged.")
@click.option("--horizon", type=click.IntRange(min=1), default=30,
              help="A decision hits if the user converts on an offered item within this many "
                   "of their next events.")
@click.option("--coupons", "coupons_file", type=click.Path(exists=True, dir_okay=False,
                                                           path_type=Path), default=None,
              help="A JSON list of campaigns ({coupon_id, value, budget, items, categories, "
                   "valid_from, valid_to, max_exposures}) [default: generated from the "
                   "events before the cut].")
@click.option("--campaigns", type=click.IntRange(min=1), default=8,
              help="Campaigns to generate when no --coupons file is given.")
@click.option("--quiet-hours/--no-quiet-hours", default=True,
              help="Apply quiet hours (switch off for logs whose times are synthesised).")
@click.option("--tune-repeat-weight/--no-tune-repeat-weight", default=True, show_default=True,
              help="Choose policy.push_repeat_weight on a validation period before the cut "
                   "(the report gives the value to deploy), or judge the configured one.")
@click.option("--train-minutes", type=click.FloatRange(min=0, min_open=True), default=3.0,
              help="Training budget when no --checkpoint is given.")
@click.option("--seed", type=int, default=0, help="Seed of training, campaigns and the random "
              "policy.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("simulation"), help="Where simulation.json, simulation.png (and "
              "the trained model) are written.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object "
              "on stdout (progress goes to stderr).")
@click.option("--progress/--no-progress", default=True, help="Show progress (on stderr).")
@pass_context
def simulate(context: Context, dataset: str | None, interactions: Path | None, user_col: str,
             item_col: str, time_col: str, type_col: str | None, datasets_dir: Path | None,
             from_kafka: bool, checkpoint_dir: Path | None, train_fraction: float, horizon: int,
             coupons_file: Path | None, campaigns: int, quiet_hours: bool,
             tune_repeat_weight: bool, train_minutes: float, seed: int, out_dir: Path,
             as_json: bool, progress: bool) -> None:
    """Judge decisions offline by what users really did next, beside baselines.

    Cuts the data in time, trains on (or uses a checkpoint for) the part before the cut, and
    replays the rest through the worker's own state and policy code. Compares our policy with
    random, popularity, repeat (the user's own items first), holdout (no coupon) and ours
    without the propensity gate or the repeat prior, on the same users and moments: hit rate,
    new-item hit rate, coupon cost, cost per incremental purchase, caps and budgets binding,
    propensity calibration and coupon exposure. The repeat prior's weight is chosen on a
    validation period before the cut. Policy knobs come from the settings (`promo config`).
    Example:

        promo simulate --dataset instacart-sample --json
    """
    import dataclasses
    import json

    import orjson

    from encoder.checkpoint import CheckpointError
    from encoder.inference import Encoder
    from stream import simulate as sim
    from stream.contracts import Coupon

    def say(text: str) -> None:
        if progress:
            click.echo(text, err=True)

    rows, _ = _load_encoder_data(dataset, interactions, user_col, item_col, time_col, type_col,
                                 datasets_dir, from_kafka, progress)
    config = sim.SimulationConfig(train_fraction=train_fraction, horizon=horizon,
                                  campaigns=campaigns, seed=seed, quiet_hours=quiet_hours,
                                  tune_repeat_weight=tune_repeat_weight,
                                  policy=context.settings.policy)
    coupons = None
    if coupons_file is not None:
        try:
            coupons = [Coupon.from_json(str(c["coupon_id"]), orjson.dumps(c))
                       for c in json.loads(coupons_file.read_text())]
        except (ValueError, KeyError, TypeError) as exc:
            raise click.ClickException(f"{coupons_file}: not a list of campaigns: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if checkpoint_dir is not None:
            encoder = Encoder.load(checkpoint_dir)
        else:
            before, _, _ = sim.time_split(rows, train_fraction)
            say(f"training an encoder on the {len(before):,} events before the cut "
                f"(at most {train_minutes:g} min)")
            encoder = sim.train_before_cut(before, out_dir / "model", minutes=train_minutes,
                                           seed=seed, progress=progress, log=say)
        result = sim.simulate(rows, encoder, config, coupons, progress=say)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = result | {"source": dataset or str(interactions or "kafka"),
                       "settings": dataclasses.asdict(config) | {"train_minutes": train_minutes}}
    (out_dir / "simulation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "simulation.png").write_bytes(sim.report_png(result))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for line in sim.summary_lines(result):
            click.echo(line)
        click.echo(f"wrote {out_dir / 'simulation.json'} and {out_dir / 'simulation.png'}")


@main.command("export-events")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The CSV to write (user_id,item_id,timestamp,type,...).")
@click.option("--bootstrap-servers", default=None,
              help="Kafka bootstrap servers [default: kafka.bootstrap_servers].")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_context
def export_events(context: Context, out: Path, bootstrap_servers: str | None,
                  progress: bool) -> None:
    """Export the events topic's history (valid events, de-duplicated, in time order) as a CSV
    that `promo train --interactions FILE --type-col type` reads."""
    from aiokafka.errors import KafkaError

    from stream import eventlog

    settings = _with_overrides(context.settings, kafka={"bootstrap_servers": bootstrap_servers})
    try:
        log = eventlog.load(settings.kafka, settings.contract, progress=progress)
    except (OSError, ValueError, KafkaError) as exc:
        raise click.ClickException(str(exc)) from exc
    eventlog.write_csv(log.interactions, out)
    click.echo(f"wrote {len(log.interactions)} events to {out}"
               + (f"; skipped {dict(log.skipped)}" if log.skipped else ""))


@main.command("report")
@click.option("--url", default=None,
              help="A worker's metrics URL [default: http://worker.metrics_host:"
                   "worker.metrics_port/metrics].")
@click.option("--duration", type=float, default=60.0, help="Seconds to watch.")
@click.option("--interval", type=float, default=1.0, help="Seconds between scrapes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("promo-report.png"), help="The PNG to write.")
@click.option("--save-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the raw samples, to re-draw later with --from-json.")
@click.option("--from-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Draw samples saved earlier instead of scraping.")
@pass_context
def report(context: Context, url: str | None, duration: float, interval: float, out: Path,
           save_json: Path | None, from_json: Path | None) -> None:
    """Chart throughput, decisions, latency and lag of a running worker as a PNG."""
    from tqdm import tqdm

    from stream import report as charts

    if from_json is not None:
        samples = charts.load(from_json)
    else:
        worker = context.settings.worker
        url = url or f"http://{worker.metrics_host}:{worker.metrics_port}/metrics"
        total = int(duration / interval) + 1
        with tqdm(total=total, unit="scrape", desc=f"watching {url}") as bar:
            try:
                samples = charts.record(url, duration, interval,
                                        on_sample=lambda n: bar.update(1))
            except OSError as exc:
                raise click.ClickException(f"cannot scrape {url}: {exc}") from exc
        if save_json:
            charts.save(samples, save_json)
    charts.render(samples, out)
    click.echo(f"wrote {out} ({len(samples)} samples)")
