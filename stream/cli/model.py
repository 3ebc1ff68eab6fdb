"""`promo train`, `promo evaluate`, `promo publish` and `promo simulate`: the model's life
offline, from data to a served checkpoint, and decisions judged by what users did next.

torch is imported inside the commands, never at import time: `promo --help` stays fast.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from encoder.config import EncoderConfig, TrainConfig
from stream.cli.common import Context, DataChoice, data_options, load_data, pass_context

if TYPE_CHECKING:
    from encoder.checkpoint import Checkpoint
    from encoder.data import Interaction
    from stream.policy import ServingModel

if TYPE_CHECKING:
    pass


def _target_types(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    from encoder.vocab import EVENT_TYPES

    unknown = [t for t in names if t not in EVENT_TYPES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not in {', '.join(EVENT_TYPES)}",
                                 param_hint="--target-types")
    return names


_HISTORY = {"auto": None, "exclude": True, "keep": False}
_history_option = click.option(
    "--history", type=click.Choice(list(_HISTORY)), default="auto", show_default=True,
    help="Full ranking: exclude the user's earlier items from the candidates, keep them, or "
         "auto (exclude unless 5% or more of training targets are repeats).")
_target_types_option = click.option(
    "--target-types", default=None, metavar="TYPES",
    help="Comma-separated event types to predict (e.g. add_to_cart); other events are inputs "
         "only [default: every event; for evaluate, what the checkpoint was trained with].")


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.command("train")
@data_options(from_kafka=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs,
              show_default=True, help="At most this many passes over the training data.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              default=TrainConfig.max_minutes, show_default=True,
              help="Stop training after this much wall-clock time (evaluation comes after).")
@click.option("--patience", type=click.IntRange(min=1), default=TrainConfig.patience,
              show_default=True,
              help="Stop after this many epochs without a better validation NDCG@10.")
@click.option("--select-protocol", type=click.Choice(["full", "sampled"]),
              default=TrainConfig.select_protocol, show_default=True,
              help="Validation NDCG@10 that picks the epoch: full ranking over every item "
                   "(what the worker does) or the SASRec paper's 100 sampled negatives.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True,
              help="Seed for initialisation, batching, dropout and evaluation negatives.")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size,
              show_default=True, help="Training windows per optimiser step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr,
              show_default=True, help="Peak AdamW learning rate (after a 100-step warmup).")
@click.option("--negatives", type=click.IntRange(min=0), default=TrainConfig.negatives,
              show_default=True, help="Uniform negatives per batch in the sampled softmax; 0 "
              "(or a catalogue this small) uses the softmax over every item.")
@click.option("--horizon", type=click.IntRange(min=1), default=TrainConfig.horizon,
              show_default=True, help="Each position also learns the items of up to this "
              "many next events (1: the next event only, as SASRec).")
@click.option("--horizon-weight", type=click.FloatRange(min=0),
              default=TrainConfig.horizon_weight, show_default=True,
              help="Loss weight of each event after the next one (the next event weighs 1).")
@click.option("--lr-decay/--no-lr-decay", default=TrainConfig.decay, show_default=True,
              help="Decay the learning rate linearly to zero over --epochs, or over as many "
                   "epochs as fit in --max-minutes at the first epoch's pace if fewer.")
@click.option("--weight-decay", type=click.FloatRange(min=0),
              default=TrainConfig.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--max-len", type=click.IntRange(min=1), default=EncoderConfig.max_len,
              show_default=True, help="L: the newest events per user the encoder reads.")
@click.option("--layers", type=click.IntRange(min=1), default=EncoderConfig.n_layers,
              show_default=True, help="Transformer blocks.")
@click.option("--d-model", type=click.IntRange(min=2), default=EncoderConfig.d_model,
              show_default=True, help="Width of embeddings and user vectors.")
@click.option("--heads", type=click.IntRange(min=1), default=EncoderConfig.n_heads,
              show_default=True, help="Attention heads (must divide --d-model).")
@click.option("--d-ff", type=click.IntRange(min=1), default=EncoderConfig.d_ff,
              show_default=True, help="Hidden width of each block's MLP.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True),
              default=EncoderConfig.dropout, show_default=True,
              help="Dropout rate in training.")
@click.option("--oov-buckets", type=click.IntRange(min=1), default=EncoderConfig.n_oov_buckets,
              show_default=True, help="Hashed buckets for items unknown at training time.")
@click.option("--event-types/--no-event-types", default=True, show_default=True,
              help="Embed event types (our extension) or items only, as SASRec.")
@_target_types_option
@_history_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads [default: torch's choice, the number of cores].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar per epoch (on stderr).")
@pass_context
def train(context: Context, data: DataChoice, out: Path,
          overwrite: bool, epochs: int, max_minutes: float, patience: int,
          select_protocol: str, seed: int,
          batch_size: int, lr: float, negatives: int, horizon: int, horizon_weight: float,
          lr_decay: bool, weight_decay: float,
          max_len: int, layers: int,
          d_model: int, heads: int, d_ff: int, dropout: float, oov_buckets: int,
          event_types: bool, target_types: str | None, history: str, threads: int | None,
          progress: bool) -> None:
    """Train the user encoder and write a checkpoint directory.

    Splits each user's events leave-one-out (last event test, the one before validation),
    trains with softmax cross-entropy (sampled), keeps the epoch with the best validation
    NDCG@10, then evaluates the test split once. Writes weights, config, vocabulary,
    popularity, metrics.json, training_curve.png and a manifest whose hash is the
    model_version. Example:

        promo train --dataset beauty --out checkpoints/beauty
    """
    from encoder import checkpoint
    from encoder import train as training
    from encoder.evaluate import describe

    if d_model % heads:
        raise click.BadParameter(f"{d_model} is not divisible by --heads {heads}",
                                 param_hint="--d-model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.ClickException(f"{out} is not empty; pass --overwrite to replace it")
    _, rows, source = load_data(context.settings, data, progress=progress)
    model_config = EncoderConfig(n_oov_buckets=oov_buckets, max_len=max_len, n_layers=layers,
                                 d_model=d_model, n_heads=heads, d_ff=d_ff, dropout=dropout,
                                 use_event_types=event_types)
    config = TrainConfig(epochs=epochs, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                         negatives=negatives, horizon=horizon, horizon_weight=horizon_weight,
                         decay=lr_decay, weight_decay=weight_decay,
                         patience=patience, select_protocol=select_protocol, seed=seed,
                         target_types=_target_types(target_types),
                         exclude_history=_HISTORY[history], threads=threads)
    try:
        result = training.train(rows, model_config, config, progress=progress, log=_err)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    meta = training.metadata(result, config, source)
    title = f"{source.get('dataset') or Path(str(source.get('interactions'))).name}: " \
            f"best epoch {result.best_epoch}"
    png = training.training_curve_png(result.history, result.best_epoch, title,
                                      config.select_protocol)
    if overwrite and out.exists():
        shutil.rmtree(out)
    version = checkpoint.save(out, result.model, result.vocab, result.split.popularity, meta,
                              png)
    _err(f"stopped: {result.stopped}; chosen epoch {result.best_epoch}")
    for line in describe(result.test):
        click.echo(f"test {line}")
    click.echo(f"model_version {version} written to {out}")


@click.command("evaluate")
@click.option("--checkpoint", "checkpoint_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint directory written by `promo train`.")
@data_options(from_kafka=True)
@_target_types_option
@_history_option
@click.option("--seed", type=int, default=None,
              help="Seed of the sampled negatives and tie-breaks [default: the training seed].")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object on stdout: {"users", "items", "model": {"sampled": '
                   '{"HR@10", "NDCG@10"}, "full": {...}}, "popularity": {...}}.')
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads [default: torch's choice].")
@pass_context
def evaluate(context: Context, checkpoint_dir: Path, data: DataChoice, target_types: str | None,
             history: str, seed: int | None, as_json: bool, threads: int | None) -> None:
    """Evaluate a checkpoint on the test split of a dataset or CSV.

    Splits the data leave-one-out exactly as training does and reports, on the test cases,
    the SASRec paper protocol (the held-out item against 100 sampled negatives) and full
    ranking over all items, HR@10 and NDCG@10, next to a popularity baseline on the same
    cases. Example:

        promo evaluate --checkpoint checkpoints/beauty --dataset beauty --json
    """
    import torch

    from encoder.checkpoint import CheckpointError, load
    from encoder.evaluate import describe, summary

    if threads:
        torch.set_num_threads(threads)
    try:
        ckpt = load(checkpoint_dir)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    _, rows, _ = load_data(context.settings, data)
    metrics, n_test = _evaluate_on(ckpt, rows, target_types, history, seed)
    if as_json:
        sys.stdout.write(json.dumps(summary(n_test, ckpt.vocab.n_items, metrics))
                         + "\n")
    else:
        for line in describe(metrics):
            click.echo(line)


def _evaluate_on(ckpt: Checkpoint, rows: list[Interaction], target_types: str | None,
                 history: str, seed: int | None,
                 ) -> tuple[dict[str, dict[str, dict[str, float]]], int]:
    """A checkpoint's metrics (beside popularity) on the leave-one-out test split of ``rows``,
    and the number of test users."""
    from encoder import data
    from encoder.evaluate import EvalSettings, auto_exclude_history, evaluate_model

    trained = ckpt.metrics.get("data", {}).get("target_types")
    wanted = _target_types(target_types) if target_types else (tuple(trained) if trained
                                                               else None)
    split = data.encode_split(data.leave_one_out(data.user_sequences(rows), wanted),
                              ckpt.vocab, wanted)
    if len(split.test) == 0:
        raise click.ClickException("no user has 3 or more events: nothing to test on")
    exclude = _HISTORY[history]
    if exclude is None:
        exclude = auto_exclude_history(split.repeat_share)
    if seed is None:
        seed = int(ckpt.metrics.get("train_config", {}).get("seed", 0))
    settings = replace(EvalSettings(), exclude_history=exclude, seed=seed)
    metrics = evaluate_model(ckpt.model, split.popularity, split.test, settings)
    unknown = int((~ckpt.vocab.is_known(split.test.targets)).sum())
    _err(f"model_version {ckpt.model_version}: {len(split.test)} test users, "
         f"{ckpt.vocab.n_items} items; full ranking "
         f"{'without' if exclude else 'with'} history items; seed {seed}"
         + (f"; {unknown} targets unknown to the model (counted as misses)" if unknown else ""))
    return metrics, len(split.test)


_METRICS = ("full/NDCG@10", "full/HR@10", "sampled/NDCG@10", "sampled/HR@10")


@click.command("publish")
@click.option("--candidate", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The newly trained checkpoint directory.")
@click.option("--live", required=True, type=click.Path(path_type=Path),
              help="The path workers serve from (worker.checkpoint): a symlink that publishing "
                   "re-points atomically. If it does not exist yet, the candidate is published.")
@data_options(from_kafka=True)
@_target_types_option
@_history_option
@click.option("--metric", type=click.Choice(_METRICS), default="full/NDCG@10",
              show_default=True, help="The agreed metric; the candidate must beat the live "
              "model on it.")
@click.option("--min-gain", type=float, default=0.0, show_default=True,
              help="Publish only if the candidate is better by more than this.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampled negatives (the same for both models).")
@click.option("--dry-run", is_flag=True, help="Compare, but never re-point --live.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"metric", "live": {"model_version", "value"}, "candidate": {...}, '
                   '"published"} as one JSON object on stdout.')
@pass_context
def publish(context: Context, candidate: Path, live: Path, data: DataChoice,
            target_types: str | None, history: str, metric: str, min_gain: float, seed: int,
            dry_run: bool, as_json: bool) -> None:
    """Publish a retrained model if it beats the live one on the same data.

    Evaluates both checkpoints on the same leave-one-out test split (each over its own item
    vocabulary; a target a model does not know counts as a miss) and, if the candidate is
    better on --metric, re-points the --live symlink at it. Running workers poll that path
    (worker.model_poll_seconds) and swap to the new model_version without a restart. Example:

        promo train --from-kafka --out models/v2
        promo publish --candidate models/v2 --live models/current --from-kafka
    """
    if (candidate / "uplift.json").exists():  # an uplift model: judged on the outcomes log
        _publish_uplift(context, candidate, live, data, min_gain, dry_run, as_json)
        return
    from encoder.checkpoint import CheckpointError, load

    _, rows, _ = load_data(context.settings, data)
    protocol, name = metric.split("/")
    try:
        new = load(candidate)
        old = load(live) if live.exists() else None
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    new_metrics, _ = _evaluate_on(new, rows, target_types, history, seed)
    new_value = float(new_metrics["model"][protocol][name])
    old_value = None
    if old is not None:
        old_metrics, _ = _evaluate_on(old, rows, target_types, history, seed)
        old_value = float(old_metrics["model"][protocol][name])
    if old is not None and old.model_version == new.model_version:
        better = False
    else:
        better = old_value is None or new_value > old_value + min_gain
    if better and not dry_run:
        _repoint(live, candidate)
    result = {"metric": metric,
              "live": None if old is None else {"model_version": old.model_version,
                                                "value": old_value},
              "candidate": {"model_version": new.model_version, "value": new_value},
              "published": better and not dry_run}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        was = "none" if old is None else f"{old.model_version} {old_value:.4f}"
        click.echo(f"{metric}: live {was}; candidate {new.model_version} {new_value:.4f}")
        click.echo(f"published {live} -> {candidate}" if result["published"]
                   else "not published")


def _repoint(live: Path, candidate: Path) -> None:
    """Re-point the ``live`` symlink at ``candidate`` atomically: a worker polling it sees the
    old model or the new, never none."""
    import os

    if live.is_dir() and not live.is_symlink():
        raise click.ClickException(f"{live} is a directory, not a symlink: point workers at a "
                                   "symlink (e.g. models/current) so it can be re-pointed "
                                   "atomically")
    live.parent.mkdir(parents=True, exist_ok=True)
    staged = live.with_name(f".{live.name}.{os.getpid()}")
    os.symlink(candidate.resolve(), staged)
    os.replace(staged, live)


def _publish_uplift(context: Context, candidate: Path, live: Path, data: DataChoice,
                    min_gain: float, dry_run: bool, as_json: bool) -> None:
    """Publish an uplift model only if its policy beats the live one on the outcomes log: the
    95% interval of its doubly robust gain in incremental profit per decision over the live
    policy (the live uplift model's, else the policy that wrote the log), paired row by row on
    decisions the candidate did not train on, must lie above ``min_gain``."""
    from stream.cli.uplift import judge_from_kafka

    if not data.from_kafka:
        raise click.UsageError("an uplift model is judged on the outcomes log: pass --from-kafka")
    result = judge_from_kafka(context, candidate, live, progress=not as_json)
    by_name = {row["name"]: row for row in result["policies"]}
    new_value, old_value = by_name["candidate"]["dr"]["value"], by_name["live"]["dr"]["value"]
    # Better means the paired gain's 95% interval lies above min_gain, not only its middle.
    gain = result["gain"]
    better = result["candidate"] != result["live"] and gain["low"] > min_gain
    if better and not dry_run:
        _repoint(live, candidate)
    outcome = {"metric": "dr/incremental_profit_per_decision",
               "live": {"model_version": result["live"], "value": old_value},
               "candidate": {"model_version": result["candidate"], "value": new_value},
               "gain": gain, "published": better and not dry_run}
    if as_json:
        sys.stdout.write(json.dumps(outcome) + "\n")
        return
    click.echo(f"incremental profit per decision (DR): live {result['live']} {old_value:.4f}; "
               f"candidate {result['candidate']} {new_value:.4f}; gain {gain['value']:.4f} "
               f"[{gain['low']:.4f}, {gain['high']:.4f}]")
    click.echo(f"published {live} -> {candidate}" if outcome["published"] else "not published")


@click.command("simulate")
@data_options(from_kafka=True)
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
@click.option("--train-epochs", type=click.IntRange(min=1), default=None,
              help="Stop training after this many epochs, if the budget has not ended it "
                   "[default: the training default].")
@click.option("--seed", type=int, default=0, help="Seed of training, campaigns and the random "
              "policy.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("simulation"), help="Where simulation.json, simulation.png (and "
              "the trained model) are written.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object "
              "on stdout (progress goes to stderr).")
@click.option("--progress/--no-progress", default=True, help="Show progress (on stderr).")
@pass_context
def simulate(context: Context, data: DataChoice, checkpoint_dir: Path | None,
             train_fraction: float, horizon: int, coupons_file: Path | None, campaigns: int,
             quiet_hours: bool,
             tune_repeat_weight: bool, train_minutes: float, train_epochs: int | None,
             seed: int, out_dir: Path,
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
    from encoder.config import TrainConfig
    from encoder.inference import Encoder
    from stream import offline
    from stream.contracts import Coupon

    def say(text: str) -> None:
        if progress:
            click.echo(text, err=True)

    name, rows, _ = load_data(context.settings, data, progress=progress)
    config = offline.SimulationConfig(train_fraction=train_fraction, horizon=horizon,
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
    encoder: ServingModel
    try:
        if checkpoint_dir is not None:
            encoder = Encoder.load(checkpoint_dir)
        else:
            before, _, _ = offline.time_split(rows, train_fraction)
            say(f"training an encoder on the {len(before):,} events before the cut "
                f"(at most {train_minutes:g} min)")
            training = TrainConfig(max_minutes=train_minutes, seed=seed)
            if train_epochs is not None:
                training = dataclasses.replace(training, epochs=train_epochs)
            encoder = offline.train_before_cut(before, out_dir / "model", training,
                                               progress=progress, log=say)
        result = offline.simulate(rows, encoder, config, coupons, progress=say)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = result | {"source": name,
                       "settings": dataclasses.asdict(config) | {"train_minutes": train_minutes,
                                                                "train_epochs": train_epochs}}
    (out_dir / "simulation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "simulation.png").write_bytes(offline.report_png(result))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for line in offline.summary_lines(result):
            click.echo(line)
        click.echo(f"wrote {out_dir / 'simulation.json'} and {out_dir / 'simulation.png'}")


COMMANDS = [train, evaluate, publish, simulate]
