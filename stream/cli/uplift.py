"""`promo train-uplift` and `promo evaluate-policy`: learn which offer changes which user,
and judge the policy that follows on the log before it serves.

scikit-learn and pandas are imported inside the command: `promo --help` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click

from stream.cli.common import Context, pass_context


@click.command("train-uplift")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A randomized test: one row per user, gzip or plain CSV with a header.")
@click.option("--from-kafka", is_flag=True,
              help="Learn from the product's own log instead: the outcomes topic (holdout and "
                   "logged exploration, weighted by inverse propensity).")
@click.option("--treatment-col", help="With --csv: the column naming the action each row got.")
@click.option("--control",
              help="With --csv: the value of --treatment-col that means nothing was done.")
@click.option("--outcome-col", help="With --csv: the column that is 1 if the row converted.")
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
@pass_context
def train_uplift(context: Context, csv_path: Path | None, from_kafka: bool,
                 treatment_col: str | None, control: str | None, outcome_col: str | None,
                 ignore: tuple[str, ...], out: Path, overwrite: bool, held_out_share: float,
                 seed: int, progress: bool) -> None:
    """Train the uplift model: each action's chance to convert, hence its effect.

    From a CSV, the columns not named are features: numbers as they are, text as categories.
    From Kafka, the features are the snapshots the policy recorded with each decision. The
    model and its held-out Qini, uplift in the top 30% and Qini curves are written to --out;
    point worker.uplift_checkpoint at it (after `promo evaluate-policy`). Examples:

    \b
        promo train-uplift --csv hillstrom.csv.gz --treatment-col segment \\
            --control "No E-Mail" --outcome-col visit --ignore-col conversion \\
            --ignore-col spend --out checkpoints/uplift
        promo train-uplift --from-kafka --out checkpoints/uplift-v2
    """
    from stream import uplift_train

    if (csv_path is None) == (not from_kafka):
        raise click.UsageError("give exactly one of --csv FILE and --from-kafka")
    if out.is_symlink():
        raise click.ClickException(f"{out} is a symlink (the path workers serve?): train into a "
                                   "new directory, then `promo publish` it")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.ClickException(f"{out} is not empty; pass --overwrite to replace it")
    try:
        if csv_path is not None:
            if treatment_col is None or control is None or outcome_col is None:
                raise click.UsageError("--csv needs --treatment-col, --control and --outcome-col")
            table = uplift_train.read_csv(csv_path, treatment_col, outcome_col, control, ignore)
        else:
            settings = context.settings
            table = uplift_train.from_outcomes(
                uplift_train.read_outcomes(settings.kafka, progress=progress), settings.policy)
    except (uplift_train.TableError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    staged = out.with_name(f".{out.name}.{os.getpid()}")  # the old one stays until this is whole
    try:
        model = uplift_train.train(table, staged, held_out_share, seed, progress)
    except ValueError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise click.ClickException(str(exc)) from exc
    if out.exists():
        shutil.rmtree(out)
    os.replace(staged, out)
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


@click.command("evaluate-policy")
@click.option("--candidate", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An uplift checkpoint (`promo train-uplift --out`).")
@click.option("--live", type=click.Path(path_type=Path), default=None,
              help="The uplift checkpoint serving now [default: worker.uplift_checkpoint; "
                   "none: the policy that wrote the log].")
@click.option("--from-kafka", is_flag=True,
              help="Judge on the outcomes topic (kafka.* settings), up to its current end (the "
                   "only log there is; say it, so that the command reads as what it does).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimates as one JSON object.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_context
def evaluate_policy(context: Context, candidate: Path, live: Path | None, from_kafka: bool,
                    as_json: bool, progress: bool) -> None:
    """Judge an uplift model's policy on the log before it serves.

    Estimates the incremental profit per decision of the candidate's policy, the live one's
    and doing nothing, from the outcomes topic: inverse propensity (IPS) and doubly robust
    (DR), each with a 95% interval. `promo publish` uses the same estimate to refuse a
    candidate that does not beat the live policy. Example:

        promo evaluate-policy --candidate checkpoints/uplift-v2 --from-kafka
    """
    if not from_kafka:
        raise click.UsageError("the log to judge on is the outcomes topic: pass --from-kafka")
    result = judge_from_kafka(context, candidate, live, progress)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['rows']} decisions judged (none the candidate trained on); money per "
               "decision (incremental profit)")
    click.echo(f"{'policy':<10} {'IPS':>9} {'95% interval':>20} {'DR':>9} "
               f"{'95% interval':>20} {'as logged':>10}")
    for row in result["policies"]:
        ips, dr = row["ips"], row["dr"]
        click.echo(f"{row['name']:<10} {ips['value']:>9.4f} {_span(ips):>20} "
                   f"{dr['value']:>9.4f} {_span(dr):>20} {row['matched']:>10}")
    gain = result["gain"]
    click.echo(f"candidate - live (DR, paired): {gain['value']:.4f} {_span(gain)}")


def _span(estimate: dict[str, float]) -> str:
    return f"[{estimate['low']:.4f}, {estimate['high']:.4f}]"


def judge_from_kafka(context: Context, candidate: Path, live: Path | None,
                     progress: bool) -> dict[str, Any]:
    """The candidate, the live policy and doing nothing judged on the outcomes topic."""
    from dataclasses import asdict

    from stream import offpolicy, uplift_model, uplift_train

    settings = context.settings
    live = live or (Path(settings.worker.uplift_checkpoint)
                    if settings.worker.uplift_checkpoint else None)
    try:
        new = uplift_model.load(candidate)
        old = uplift_model.load(live) if live is not None and live.exists() else None
        log = offpolicy.read_log(uplift_train.read_outcomes(settings.kafka, progress=progress),
                                 settings.policy)
        compared = offpolicy.compare(new, old, log, settings.policy)
    except (uplift_model.CheckpointError, ValueError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    return {"rows": compared.rows, "candidate": new.version,
            "live": old.version if old is not None else "as logged",
            "gain": asdict(compared.gain),
            "policies": [{"name": j.name, "ips": asdict(j.ips), "dr": asdict(j.dr),
                          "matched": j.matched} for j in compared.judged]}


COMMANDS = [train_uplift, evaluate_policy]
