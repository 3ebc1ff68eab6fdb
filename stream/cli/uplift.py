"""`promo train-uplift`: learn which action changes which user, from a randomized test.

scikit-learn and pandas are imported inside the command: `promo --help` stays fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click


@click.command("train-uplift")
@click.option("--csv", "csv_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A randomized test: one row per user, gzip or plain CSV with a header.")
@click.option("--treatment-col", required=True,
              help="The column naming the action each row got.")
@click.option("--control", required=True,
              help="The value of --treatment-col that means nothing was done.")
@click.option("--outcome-col", required=True, help="The column that is 1 if the row converted.")
@click.option("--ignore-col", "ignore", multiple=True, metavar="COLUMN",
              help="A column that is not a feature, e.g. another outcome measured after the "
                   "treatment (repeat the option for several).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--held-out-share", type=click.FloatRange(0, 1, max_open=True), default=0.3,
              help="Rows kept out of training to judge the model (0: train on all rows).")
@click.option("--seed", type=int, default=0, help="Seeds the split and the folds.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def train_uplift(csv_path: Path, treatment_col: str, control: str, outcome_col: str,
                 ignore: tuple[str, ...], out: Path, overwrite: bool, held_out_share: float,
                 seed: int, progress: bool) -> None:
    """Train the uplift model: each action's chance to convert, hence its effect.

    The other columns are features: numbers as they are, text as categories. The model and its
    held-out Qini, uplift in the top 30% and Qini curves are written to --out. Example, on the
    Hillstrom e-mail test:

    \b
        promo train-uplift --csv hillstrom.csv.gz --treatment-col segment \\
            --control "No E-Mail" --outcome-col visit --ignore-col conversion \\
            --ignore-col spend --out checkpoints/uplift
    """
    from stream import uplift_train

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.ClickException(f"{out} is not empty; pass --overwrite to replace it")
    try:
        table = uplift_train.read_csv(csv_path, treatment_col, outcome_col, control, ignore)
    except uplift_train.TableError as exc:
        raise click.ClickException(str(exc)) from exc
    if overwrite and out.exists():
        shutil.rmtree(out)
    try:
        model = uplift_train.train(table, out, held_out_share, seed, progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_report(model.metrics))
    click.echo(f"model_version {model.version} written to {out}")


def format_report(metrics: dict[str, object]) -> str:
    """The held-out figures as a table, one row per action."""
    lines = [f"rows {metrics['rows']} (training); interaction scale s = {metrics['shrinkage']}"]
    held_out = metrics.get("held_out")
    if not isinstance(held_out, dict):
        return "\n".join([*lines, "no held-out rows: --held-out-share 0"])
    qini, random = held_out["qini"], held_out["qini_random"]
    top, effect = held_out["uplift_at_30"], held_out["average_effect"]
    lines.append(f"held out: {held_out['rows']} rows")
    lines.append(f"{'action':<24} {'qini':>8} {'random':>8} {'uplift@30%':>11} {'avg effect':>11}")
    for action in effect:
        lines.append(f"{action:<24} {qini.get(action, float('nan')):>8.4f} "
                     f"{random.get(action, float('nan')):>8.4f} {top[action]:>11.4f} "
                     f"{effect[action]:>11.4f}")
    return "\n".join(lines)


COMMANDS = [train_uplift]
