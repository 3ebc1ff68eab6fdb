"""`promo report`: watch a running worker and chart what it does; `promo report uplift`: what
its decisions change, from the outcome counts the workers keep."""

from __future__ import annotations

from pathlib import Path

import click

from stream.cli.common import Context, pass_context


@click.group("report", invoke_without_command=True)
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
@click.pass_context
def report(ctx: click.Context, url: str | None, duration: float, interval: float, out: Path,
           save_json: Path | None, from_json: Path | None) -> None:
    """Chart throughput, decisions, latency and lag of a running worker as a PNG.

    `promo report uplift` reports each campaign's lift over the holdout instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    context = ctx.find_object(Context)
    assert context is not None  # the top-level group made it
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


@report.command("uplift")
@click.option("--by", type=click.Choice(["campaign", "version"]), default="campaign",
              help="One row per campaign, or per campaign, model and policy version.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the rates and lifts with their intervals as a PNG.")
@click.option("--alpha", type=click.FloatRange(0.001, 0.5), default=None,
              help="1 - confidence level [default: uplift.alpha]")
@pass_context
def uplift_report(context: Context, by: str, as_json: bool, png: Path | None,
                  alpha: float | None) -> None:
    """Lift of each campaign over the holdout, with always-valid intervals.

    Reads the workers' outcome counts (the compacted `outcome-counts` changelog of
    worker.app_id): decisions whose attribution window closed, by arm. The intervals stay
    valid however often you run this. The fixed-horizon interval is shown only for
    comparison.
    """
    import asyncio
    import dataclasses
    import json

    from stream import outcomes, uplift
    from stream import report as charts
    from stream.topics import changelog_topic, read_compacted

    settings = context.settings
    knobs = settings.uplift if alpha is None else dataclasses.replace(settings.uplift,
                                                                      alpha=alpha)
    topic = changelog_topic(settings.worker.app_id, "outcome-counts")
    counts = asyncio.run(read_compacted(settings.kafka, topic))
    groups = outcomes.totals({key.decode(): raw for key, raw in counts.items()})
    if not groups:
        raise click.ClickException(
            f"no outcomes yet in {topic}: decisions get theirs when their attribution window "
            f"closes (attribution.window_seconds = {settings.attribution.window_seconds:g})")
    rows = uplift.report(groups, by="version" if by == "version" else "campaign",
                         settings=knobs)
    if as_json:
        click.echo(json.dumps({"alpha": knobs.alpha, "mixture_tau": knobs.mixture_tau,
                               "rows": [{"campaign": label, **row.to_dict()}
                                        for label, row in rows]}, indent=1))
    else:
        click.echo(charts.uplift_table(rows, knobs.alpha))
    if png is not None:
        charts.render_uplift(rows, png, knobs.alpha)
        click.echo(f"wrote {png}", err=as_json)


COMMANDS = [report]
