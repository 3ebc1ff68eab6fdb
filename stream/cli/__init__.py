"""`promo`: the command line of promo-stream. Every subcommand has ``--help``.

One module per command group: :mod:`~stream.cli.broker` (a local Kafka),
:mod:`~stream.cli.streaming` (worker, replay, export-events, demo),
:mod:`~stream.cli.campaigns` (coupons, preferences), :mod:`~stream.cli.model` (train,
evaluate, publish, simulate), :mod:`~stream.cli.observe` (report, report uplift),
:mod:`~stream.cli.shop` (shop-sim), :mod:`~stream.cli.offers` (the pull API) and
:mod:`~stream.cli.uplift` (train-uplift). Shared
options live in :mod:`~stream.cli.common`.

A failure a user can cause (a broker not running, a port taken, a bad setting, a missing file)
is one line on stderr saying what to do, and a non-zero exit; ``promo --debug`` shows the
Python traceback instead (:func:`run`).
"""

from __future__ import annotations

import sys

import click

from stream import logs
from stream.cli import broker, campaigns, model, observe, offers, shop, streaming, uplift
from stream.cli.common import Context, pass_context


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", envvar="PROMO_CONFIG", type=click.Path(dir_okay=False),
              help="TOML settings file (sections kafka, contract, worker, replay, policy, "
                   "attribution, uplift, api).")
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
      promo broker start                     # a local Kafka (KRaft) broker, a JVM process
      promo worker                           # consume events, keep state, publish decisions
      promo replay --dataset instacart       # replay a real dataset as events
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
    from stream.config import as_toml

    click.echo(as_toml(context.settings), nl=False)


for _module in (broker, streaming, campaigns, model, observe, shop, offers, uplift):
    for _command in _module.COMMANDS:
        main.add_command(_command)
