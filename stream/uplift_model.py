"""The uplift model: for a user and each candidate action, the chance they convert, hence what
the action changes over doing nothing.

A promotion should go to the users it changes, not to those who buy anyway. That takes the
conversion probability *with* and *without* each action, learnt from randomized data (the
holdout arm, logged exploration, or any A/B test's CSV).

**The learner** is one logistic regression over the features ``x``, a one-hot of the action
``a`` and their products ``a * x * s``, fitted with scikit-learn on standardized features. The
scale ``s`` of the products sets how much the action's effect may vary between users, because
the L2 penalty on their coefficients grows as ``1 / s**2``:

- ``s = 0`` gives one shared effect on the log-odds (scikit-uplift's SoloModel without
  interactions). That is the right bet when the effect barely differs between users. On
  log-odds it still gives users near even odds the largest absolute uplift.
- A large ``s`` lets each action have its own model (TwoModels, in effect). That is right when
  the data hold real differences.

``s`` is chosen from a grid by the Qini coefficient of pooled out-of-fold predictions on the
training rows, so the data decide between the two bets. Rows from the product's log, where
users had unequal chances of each offer, come weighted by inverse propensity; an unweighted
Qini would compare offers on different users there, so the weighted out-of-fold log-loss
chooses instead. One model covers every action: the
policy compares none, push and each coupon tier on the same scale.

**What is ours** is the encoding of any table of features (numbers as they are and as signed
``log1p``, categories one-hot), the choice of ``s``, and a checkpoint that holds plain
coefficients in JSON (no pickled code). It is verified like the encoder's and served with numpy
alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONTROL = "none"  # the action that changes nothing: every uplift is measured against it
SHRINKAGES = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)  # the grid for s: from one shared effect to free
FOLDS = 5
MAX_LEVELS = 32  # a category column keeps its most frequent levels; rarer ones encode as none
MODEL_FILE, METRICS_FILE, MANIFEST = "uplift.json", "metrics.json", "manifest.json"
FORMAT = 1

Columns = Mapping[str, Sequence[Any] | np.ndarray]


class CheckpointError(Exception):
    """An uplift checkpoint is missing, corrupt or inconsistent; the message says which file."""


# --- features ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    """How a table of raw features becomes the model's matrix.

    A numeric column gives two features, its value and ``sign(v) * log1p(|v|)`` (spend and
    counts are heavy-tailed; the model gets both the level and the diminishing return). A
    missing value takes the training mean. A categorical column gives one 0/1 feature per
    known level; a level never seen in training is all zeros.
    """

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    means: tuple[float, ...] = ()

    @classmethod
    def infer(cls, columns: Columns, max_levels: int = MAX_LEVELS) -> FeatureSpec:
        numeric: list[str] = []
        means: list[float] = []
        categorical: list[tuple[str, tuple[str, ...]]] = []
        for name, values in columns.items():
            as_numbers = _as_float(values)
            if as_numbers is not None:
                numeric.append(name)
                finite = as_numbers[np.isfinite(as_numbers)]
                means.append(float(finite.mean()) if len(finite) else 0.0)
            else:
                levels, counts = np.unique(np.asarray([str(v) for v in values]),
                                           return_counts=True)
                order = np.lexsort((levels, -counts))[:max_levels]
                categorical.append((name, tuple(str(levels[i]) for i in sorted(order))))
        return cls(tuple(numeric), tuple(categorical), tuple(means))

    @property
    def names(self) -> list[str]:
        names = [n for name in self.numeric for n in (name, f"log1p({name})")]
        for name, levels in self.categorical:
            names.extend(f"{name}={level}" for level in levels)
        return names

    def matrix(self, columns: Columns) -> np.ndarray:
        """The (rows, features) matrix; columns the spec does not name are ignored."""
        n = _rows(columns)
        parts: list[np.ndarray] = []
        for name, mean in zip(self.numeric, self.means, strict=True):
            values = _as_float(columns[name]) if name in columns else None
            if values is None:
                values = np.full(n, mean)
            values = np.where(np.isfinite(values), values, mean)
            parts.append(np.stack([values, np.sign(values) * np.log1p(np.abs(values))], axis=1))
        for name, levels in self.categorical:
            raw = (np.asarray([str(v) for v in columns[name]]) if name in columns
                   else np.full(n, ""))
            parts.append((raw[:, None] == np.asarray(levels)[None, :]).astype(np.float64))
        return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0))

    def to_json(self) -> dict[str, Any]:
        return {"numeric": list(self.numeric), "means": list(self.means),
                "categorical": {name: list(levels) for name, levels in self.categorical}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FeatureSpec:
        return cls(tuple(raw["numeric"]),
                   tuple((name, tuple(levels)) for name, levels in raw["categorical"].items()),
                   tuple(float(m) for m in raw["means"]))


def _rows(columns: Columns) -> int:
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _as_float(values: Sequence[Any] | np.ndarray) -> np.ndarray | None:
    """The column as floats (None and NaN become NaN), or None if it holds text."""
    array = np.asarray(values)
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    try:
        return np.asarray([math.nan if v is None else float(v) for v in array], np.float64)
    except (TypeError, ValueError):
        return None


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Feature snapshots (one mapping per decision) as columns; a key a row lacks is None."""
    names = sorted({name for row in rows for name in row})
    return {name: [row.get(name) for row in rows] for name in names}


# --- the model ---------------------------------------------------------------------------------

def _design(z: np.ndarray, action_index: np.ndarray, n_actions: int, s: float) -> np.ndarray:
    """[z, one-hot(action) without the control, one-hot(action) (x) z * s]."""
    onehot = np.zeros((len(z), n_actions - 1))
    treated = action_index > 0
    onehot[np.flatnonzero(treated), action_index[treated] - 1] = 1.0
    interactions = (onehot[:, :, None] * z[:, None, :]).reshape(len(z), -1) * s
    return np.concatenate([z, onehot, interactions], axis=1)


@dataclass(frozen=True)
class UpliftModel:
    actions: tuple[str, ...]  # actions[0] is CONTROL
    spec: FeatureSpec
    mean: np.ndarray  # of the encoded features, for standardizing
    scale: np.ndarray
    coef: np.ndarray  # over _design's columns
    intercept: float
    shrinkage: float  # the chosen s
    metrics: dict[str, Any] = field(default_factory=dict, compare=False)
    # The range of each encoded feature in training: values outside it are clipped to it, so
    # the model never extrapolates. A feature nearly constant in training (a tiny scale) would
    # otherwise turn an ordinary value at serving time into thousands of standard deviations.
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def conversion(self, columns: Columns) -> np.ndarray:
        """(rows, actions): each user's chance to convert under each action."""
        x = self.spec.matrix(columns)
        if self.low is not None and self.high is not None:
            x = np.clip(x, self.low, self.high)
        z = (x - self.mean) / self.scale
        n, k = len(z), len(self.actions)
        out = np.empty((n, k))
        for a in range(k):
            logits = _design(z, np.full(n, a), k, self.shrinkage) @ self.coef + self.intercept
            out[:, a] = 1 / (1 + np.exp(-logits))
        return out

    def uplift(self, columns: Columns) -> np.ndarray:
        """(rows, actions): each action's change in the chance to convert; column 0 is 0."""
        p = self.conversion(columns)
        return np.asarray(p - p[:, :1])

    @property
    def base_rate(self) -> float:
        """How often the training rows converted with nothing done (0.5 if unknown)."""
        return float(self.metrics.get("conversion_per_action", {}).get(CONTROL, 0.5))

    @property
    def version(self) -> str:
        return "uplift-" + hashlib.sha256(_model_json(self)).hexdigest()[:16]


Vector = Sequence[Any] | np.ndarray


def fit(columns: Columns, actions: Vector, converted: Vector,
        weights: Vector | None = None, *,
        shrinkages: Sequence[float] = SHRINKAGES, folds: int = FOLDS, seed: int = 0,
        progress: Callable[[int, int], None] | None = None) -> UpliftModel:
    """Fit on rows of (features, action taken, converted 0/1).

    ``actions`` must include :data:`CONTROL` rows: uplift is only learnable against doing
    nothing. ``weights`` (e.g. inverse propensities from logged exploration) weight the rows.
    ``progress(done, total)`` is called after each of the ``folds * len(shrinkages) + 1`` fits.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(converted, dtype=np.int64)
    taken = np.asarray([str(a) for a in actions])
    if set(np.unique(y)) - {0, 1}:
        raise ValueError("the outcome must be 0 or 1")
    if len(np.unique(y)) < 2 or min(np.bincount(y)) < folds:
        raise ValueError(f"need at least {folds} rows that converted and {folds} that did not; "
                         f"got {int(y.sum())} and {int(len(y) - y.sum())}")
    names = sorted(set(taken.tolist()) - {CONTROL})
    if CONTROL not in set(taken.tolist()) or not names:
        raise ValueError(f"need rows with action {CONTROL!r} and rows with another action; "
                         f"got {sorted(set(taken.tolist()))}")
    all_actions = (CONTROL, *names)
    index = np.asarray([all_actions.index(a) for a in taken])
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    spec = FeatureSpec.infer(columns)
    x = spec.matrix(columns)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    k = len(all_actions)
    total, done = folds * len(shrinkages) + 1, 0

    def learner() -> LogisticRegression:
        return LogisticRegression(max_iter=2000)

    out_of_fold = {s: np.zeros((len(y), k)) for s in shrinkages}
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, test in splits.split(z, y * k + index):
        for s in shrinkages:
            model = learner().fit(_design(z[train], index[train], k, s), y[train],
                                  sample_weight=w[train])
            for a in range(k):
                out_of_fold[s][test, a] = model.predict_proba(
                    _design(z[test], np.full(len(test), a), k, s))[:, 1]
            done += 1
            if progress:
                progress(done, total)
    selection = {s: qini_per_action(out_of_fold[s] - out_of_fold[s][:, :1], index, y, all_actions)
                 for s in shrinkages}
    fit_loss = {s: _log_loss(out_of_fold[s][np.arange(len(y)), index], y, w) for s in shrinkages}
    if weights is None:
        # Randomized rows: rank quality decides. Ties (few features can order users the same
        # way for every s) go to the better-fitting probabilities: the policy weighs sizes.
        selected_by = "qini"
        best = max(shrinkages, key=lambda s: (selection[s]["mean"], -fit_loss[s], -s))
    else:
        # A log whose rows had unequal chances: an unweighted Qini compares the offers on
        # different users and is biased; the weighted log-loss (a proper score of the very
        # probabilities the policy uses) is not.
        selected_by = "weighted_log_loss"
        best = min(shrinkages, key=lambda s: (fit_loss[s], s))
    final = learner().fit(_design(z, index, k, best), y, sample_weight=w)
    if progress:
        progress(total, total)
    metrics = {"rows": len(y),
               "rows_per_action": {a: int((index == i).sum()) for i, a in enumerate(all_actions)},
               "conversion_per_action": {a: float(y[index == i].mean())
                                         for i, a in enumerate(all_actions)},
               "shrinkage": best, "selected_by": selected_by,
               "out_of_fold_qini": {str(s): selection[s] for s in shrinkages},
               "out_of_fold_log_loss": {str(s): fit_loss[s] for s in shrinkages}}
    return UpliftModel(all_actions, spec, mean, scale, final.coef_[0].astype(np.float64),
                       float(final.intercept_[0]), float(best), metrics,
                       x.min(axis=0) if len(x) else None, x.max(axis=0) if len(x) else None)


def _log_loss(p: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.average(y * np.log(p) + (1 - y) * np.log(1 - p), weights=weights))


def qini_per_action(uplift: np.ndarray, action_index: np.ndarray, converted: np.ndarray,
                    actions: Sequence[str]) -> dict[str, float]:
    """scikit-uplift's Qini coefficient of each action's predicted uplift, on the rows that got
    that action or the control; ``mean`` weights the actions by their rows."""
    from sklift.metrics import qini_auc_score

    scores: dict[str, float] = {}
    total = weight = 0.0
    for a in range(1, len(actions)):
        rows = (action_index == a) | (action_index == 0)
        treated = (action_index[rows] == a).astype(int)
        if treated.min() == treated.max() or converted[rows].min() == converted[rows].max():
            continue  # Qini is undefined without both groups and both outcomes
        with warnings.catch_warnings():  # scikit-uplift 0.5 on scikit-learn 1.8+: deprecations
            warnings.simplefilter("ignore", FutureWarning)
            score = float(qini_auc_score(converted[rows], uplift[rows, a], treated))
        scores[actions[a]] = score
        total += score * rows.sum()
        weight += rows.sum()
    scores["mean"] = float(total / weight) if weight else 0.0
    return scores


# --- checkpoints -------------------------------------------------------------------------------

def _model_json(model: UpliftModel) -> bytes:
    payload = {"format": FORMAT, "actions": list(model.actions), "features": model.spec.to_json(),
               "mean": model.mean.tolist(), "scale": model.scale.tolist(),
               "coef": model.coef.tolist(), "intercept": model.intercept,
               "shrinkage": model.shrinkage,
               "low": None if model.low is None else model.low.tolist(),
               "high": None if model.high is None else model.high.tolist()}
    return (json.dumps(payload, indent=1) + "\n").encode()


def save(model: UpliftModel, out_dir: Path, extra_files: Mapping[str, bytes] | None = None) -> str:
    """Write a checkpoint directory (the manifest last: without it the write was interrupted);
    returns the model's version."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    payloads = {MODEL_FILE: _model_json(model),
                METRICS_FILE: (json.dumps(model.metrics, indent=1) + "\n").encode(),
                **(extra_files or {})}
    for name, data in payloads.items():
        (out_dir / name).write_bytes(data)
    manifest = {"format": FORMAT, "model_version": model.version,
                "files": {name: hashlib.sha256(data).hexdigest()
                          for name, data in sorted(payloads.items())}}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return model.version


def load(checkpoint_dir: Path) -> UpliftModel:
    """Read and verify a checkpoint; any problem is a :class:`CheckpointError` naming it."""
    path = Path(checkpoint_dir)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path / MANIFEST}: missing (not an uplift checkpoint, or an "
                              "interrupted write: the manifest is written last)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: unreadable: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != FORMAT
            or MODEL_FILE not in files):
        raise CheckpointError(f"{path / MANIFEST}: not a format-{FORMAT} uplift manifest")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        with open(file, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != expected:
            raise CheckpointError(f"{file}: corrupt, its sha256 does not match {MANIFEST}")
    try:
        raw = json.loads((path / MODEL_FILE).read_text())
        spec = FeatureSpec.from_json(raw["features"])
        model = UpliftModel(
            tuple(raw["actions"]), spec, np.asarray(raw["mean"], np.float64),
            np.asarray(raw["scale"], np.float64), np.asarray(raw["coef"], np.float64),
            float(raw["intercept"]), float(raw["shrinkage"]),
            json.loads((path / METRICS_FILE).read_text()) if METRICS_FILE in files else {},
            None if raw.get("low") is None else np.asarray(raw["low"], np.float64),
            None if raw.get("high") is None else np.asarray(raw["high"], np.float64))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / MODEL_FILE}: invalid model: {exc}") from exc
    d, k = len(spec.names), len(model.actions)
    bounds_ok = all(b is None or b.shape == (d,) for b in (model.low, model.high))
    finite = all(np.isfinite(a).all() for a in (model.mean, model.coef, [model.intercept]))
    if (len(spec.means) != len(spec.numeric) or not finite or not (model.scale > 0).all()):
        raise CheckpointError(f"{path / MODEL_FILE}: inconsistent or non-finite values")
    if (model.actions[:1] != (CONTROL,) or model.mean.shape != (d,) or model.scale.shape != (d,)
            or model.coef.shape != (d + (k - 1) * (d + 1),) or not bounds_ok):
        raise CheckpointError(f"{path / MODEL_FILE}: shapes do not match {d} features and "
                              f"{k} actions")
    if manifest.get("model_version") != model.version:
        raise CheckpointError(f"{path / MANIFEST}: model_version {manifest.get('model_version')!r}"
                              f" does not match the model ({model.version})")
    return model
