"""`promo train-uplift`: an uplift model from a randomized test or the product's own log,
judged on rows it never saw.

Any CSV of a randomized test will do. One column names the action each row got (one value
means nothing was done), one says whether the row converted (0/1), and every other column
not ignored is a feature. The rows are split, stratified by action and outcome, into a
training part (the model, :func:`stream.uplift_model.fit`) and a held-out part. The held-out
part gives the figures a data scientist reads first:

- each action's Qini coefficient and uplift in the top 30% (scikit-uplift's metrics);
- the same for a random ranking, as the floor;
- a Qini curve per action (``qini_curves.png``).

All of it goes into the checkpoint's ``metrics.json``.

The product's own log (the `outcomes` topic, :func:`from_outcomes`) is not one randomized test
but the holdout plus logged exploration; its rows are weighted by inverse propensity. Its
held-out Qini is then only indicative: `promo evaluate-policy` judges a model on the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream import uplift_model
from stream.config import KafkaSettings, PolicyConfig
from stream.contracts import Outcome
from stream.uplift_model import CONTROL, UpliftModel

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

TOP_SHARE = 0.3  # uplift "at 30%": the share of users a campaign typically targets


class TableError(ValueError):
    """The CSV cannot be read as a randomized test; the message says which column and why."""


@dataclass(frozen=True)
class RandomizedTable:
    columns: dict[str, np.ndarray]  # features only
    actions: np.ndarray  # str per row; the control value is renamed CONTROL
    converted: np.ndarray  # 0/1 per row
    # 1 / the probability each row got its action, where that was not the same for everyone
    # (the product's own log); None: a randomized test, every row counts once.
    weights: np.ndarray | None = None
    # Decision ids, for a table read from the log: its held-out rows are chosen by a hash of
    # them, so that `promo evaluate-policy` can judge the model on decisions it never saw.
    keys: np.ndarray | None = None


def read_csv(path: Path, treatment_col: str, outcome_col: str, control: str,
             ignore: Sequence[str] = ()) -> RandomizedTable:
    """Read a randomized test; features are the columns not named here."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise TableError(f"{path}: cannot read as CSV: {exc}") from exc
    missing = [c for c in (treatment_col, outcome_col, *ignore) if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: no column {', '.join(map(repr, missing))}; the columns are "
                         f"{', '.join(map(str, frame.columns))}")
    treatment = frame[treatment_col].astype(str).to_numpy()
    if control not in set(treatment.tolist()):
        values = sorted(set(treatment.tolist()))[:10]
        raise TableError(f"{path}: column {treatment_col!r} never has the control value "
                         f"{control!r}; its values include {values}")
    outcome = frame[outcome_col]
    if outcome.dtype == bool:
        converted = outcome.to_numpy().astype(np.int64)
    else:
        numbers = pd.to_numeric(outcome, errors="coerce")
        if numbers.isna().any() or not numbers.isin([0, 1]).all():
            raise TableError(f"{path}: column {outcome_col!r} must be 0 or 1 in every row "
                             f"(conversion happened or not)")
        converted = numbers.to_numpy().astype(np.int64)
    features = [c for c in frame.columns if c not in {treatment_col, outcome_col, *ignore}]
    if not features:
        raise TableError(f"{path}: no feature columns left")
    actions = np.where(treatment == control, CONTROL, treatment)
    if CONTROL in set(treatment.tolist()) and control != CONTROL:
        raise TableError(f"{path}: column {treatment_col!r} uses {CONTROL!r} for an action "
                         f"other than the control")
    return RandomizedTable({c: frame[c].to_numpy() for c in features}, actions, converted)


def split(table: RandomizedTable, held_out_share: float,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out): stratified by action and outcome, or for the log by a
    hash of each decision id (:func:`stream.offpolicy.held_out`)."""
    from sklearn.model_selection import train_test_split

    from stream import offpolicy

    rows = np.arange(len(table.converted))
    if held_out_share <= 0:
        return rows, rows[:0]
    if table.keys is not None:
        out = np.asarray([offpolicy.held_out(str(k), held_out_share, seed)
                          for k in table.keys])
        return rows[~out], rows[out]
    strata = np.char.add(table.actions.astype(str), table.converted.astype(str))
    train, held_out = train_test_split(rows, test_size=held_out_share, random_state=seed,
                                       stratify=strata)
    return np.sort(train), np.sort(held_out)


def subset(table: RandomizedTable, rows: np.ndarray) -> RandomizedTable:
    return RandomizedTable({name: values[rows] for name, values in table.columns.items()},
                           table.actions[rows], table.converted[rows],
                           None if table.weights is None else table.weights[rows],
                           None if table.keys is None else table.keys[rows])


def read_outcomes(kafka: KafkaSettings, *, progress: bool = True) -> list[Outcome]:
    """Every decision's latest outcome in the `outcomes` topic (compacted: one per decision
    id, the last one written wins), with a progress bar on stderr."""
    from tqdm import tqdm

    from stream.topics import read_snapshot

    latest: dict[bytes, Outcome] = {}
    with tqdm(unit="outcome", desc=f"reading {kafka.outcomes_topic}",
              disable=not progress) as bar:
        def show(read: int, total: int) -> None:
            bar.total, bar.n = total, read
            bar.refresh()

        def keep(record: ConsumerRecord[bytes, bytes]) -> None:
            if record.key is not None and record.value is not None:
                latest[record.key] = Outcome.from_json(record.value)

        asyncio.run(read_snapshot(kafka, kafka.outcomes_topic, keep, on_progress=show))
    return list(latest.values())


def from_outcomes(outcomes: Sequence[Outcome], config: PolicyConfig) -> RandomizedTable:
    """The product's log as training rows: what each user actually got (nothing, in the
    holdout), the features the policy read, and whether they converted, weighted by one over
    the probability of what they got (:func:`stream.offpolicy.read_log`). Rows the policy
    favoured count less and explored ones more: the model learns what each offer changes,
    not what the old policy liked. Evicted decisions have no result and are left out."""
    from stream.offpolicy import read_log

    try:
        log = read_log(outcomes, config)
    except ValueError as exc:
        raise TableError(f"the outcomes topic: {exc}") from exc
    columns = {name: np.asarray(values, dtype=object if name == "trigger" else np.float64)
               for name, values in log.columns.items()}
    return RandomizedTable(columns, log.got, np.asarray([int(o.converted) for o in log.outcomes]),
                           1 / log.probability,
                           np.asarray([o.decision_id for o in log.outcomes]))


def evaluate(model: UpliftModel, table: RandomizedTable, seed: int = 0) -> dict[str, Any]:
    """Held-out figures per action: Qini, uplift in the top 30%, and a random ranking's."""
    from sklift.metrics import uplift_at_k

    uplift = model.uplift(table.columns)
    index = np.asarray([model.actions.index(a) if a in model.actions else -1
                        for a in table.actions])
    random = np.random.default_rng(seed).random((len(index), len(model.actions)))
    report: dict[str, Any] = {
        "rows": len(index),
        "qini": uplift_model.qini_per_action(uplift, index, table.converted, model.actions),
        "qini_random": uplift_model.qini_per_action(random, index, table.converted,
                                                    model.actions),
        f"uplift_at_{int(TOP_SHARE * 100)}": {}, "average_effect": {}}
    for a, name in enumerate(model.actions[1:], start=1):
        rows = (index == a) | (index == 0)
        treated = (index[rows] == a).astype(int)
        if treated.min() == treated.max():
            continue
        with warnings.catch_warnings():  # scikit-uplift 0.5 on scikit-learn 1.8+: deprecations
            warnings.simplefilter("ignore", FutureWarning)
            report[f"uplift_at_{int(TOP_SHARE * 100)}"][name] = float(uplift_at_k(
                table.converted[rows], uplift[rows, a], treated, strategy="overall",
                k=TOP_SHARE))
        outcome = table.converted[rows]
        report["average_effect"][name] = float(outcome[treated == 1].mean()
                                               - outcome[treated == 0].mean())
    return report


def qini_curves_png(model: UpliftModel, table: RandomizedTable) -> bytes:
    """One Qini curve per action on the held-out rows, beside a random ranking's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklift.metrics import qini_curve

    uplift = model.uplift(table.columns)
    actions = model.actions[1:]
    figure, axes = plt.subplots(1, len(actions), figsize=(5 * len(actions), 4), squeeze=False)
    for ax, (a, name) in zip(axes[0], enumerate(actions, start=1), strict=True):
        rows = (table.actions == name) | (table.actions == CONTROL)
        outcome, treated = table.converted[rows], (table.actions[rows] == name).astype(int)
        ax.set_title(f"{name} vs {CONTROL} (held out)")
        if treated.min() == treated.max():  # this action has no held-out rows (or no control)
            ax.text(0.5, 0.5, "no held-out rows for both groups", ha="center")
            continue
        with warnings.catch_warnings():  # scikit-uplift 0.5 on scikit-learn 1.8+: deprecations
            warnings.simplefilter("ignore", FutureWarning)
            x, y = qini_curve(outcome, uplift[rows, a], treated)
        ax.plot(x, y, label="model")
        ax.plot([0, x[-1]], [0, y[-1]], "--", color="grey", label="random")
        ax.set_xlabel("users targeted, best first")
        ax.set_ylabel("incremental conversions")
        ax.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def train(table: RandomizedTable, out_dir: Path, held_out_share: float = 0.3, seed: int = 0,
          progress: bool = True) -> UpliftModel:
    """Fit on the training rows, evaluate on the held-out ones, write the checkpoint."""
    from tqdm import tqdm

    train_rows, held_out_rows = split(table, held_out_share, seed)
    training = subset(table, train_rows)
    bar = tqdm(total=uplift_model.FOLDS * len(uplift_model.SHRINKAGES) + 1, unit="fit",
               desc="train-uplift", disable=not progress)

    def advance(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    try:
        model = uplift_model.fit(training.columns, training.actions, training.converted,
                                 training.weights, seed=seed, progress=advance)
    finally:
        bar.close()
    extra: dict[str, bytes] = {}
    metrics = dict(model.metrics, held_out_share=held_out_share, seed=seed,
                   split={"kind": "stratified" if table.keys is None else "decision_id_hash",
                          "held_out_share": held_out_share, "seed": seed})
    if len(held_out_rows):
        held_out = subset(table, held_out_rows)
        metrics["held_out"] = evaluate(model, held_out, seed)
        extra["qini_curves.png"] = qini_curves_png(model, held_out)
    model = dataclasses.replace(model, metrics=metrics)
    uplift_model.save(model, out_dir, extra)
    return model
