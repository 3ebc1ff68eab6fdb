"""`promo report`: watch a running worker and chart what it does."""

from __future__ import annotations

from pathlib import Path

import click

from stream.cli.common import Context, pass_context


@click.command("report")
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


COMMANDS = [report]
