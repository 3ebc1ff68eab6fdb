"""Propensity calibration: is the "likely to buy anyway" score a probability? Platt scaling,
Brier scores and reliability bins over the decision moments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from encoder.data import Interaction
from stream.offline.moments import Moment


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, bias) of ``sigmoid(scale * logit(score) + bias)`` by Newton's method on the log
    loss (a little L2 keeps it finite when the labels are all one class)."""
    x = _logit(scores)
    y = labels.astype(np.float64)
    w = np.zeros(2)
    features = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(features @ w)))
        gradient = features.T @ (p - y) + 1e-3 * w
        hessian = (features * (p * (1 - p))[:, None]).T @ features + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def _logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def apply_platt(scores: np.ndarray, scale: float, bias: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(scale * _logit(scores) + bias)))


def brier(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((predicted - labels) ** 2)) if len(labels) else float("nan")


def reliability_bins(predicted: np.ndarray, labels: np.ndarray,
                     bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of predicted probability: mean prediction, observed rate, count."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                        "predicted": float(predicted[mask].mean()),
                        "observed": float(labels[mask].mean()), "count": int(mask.sum())})
    return out


def propensity_report(moments: Sequence[Moment], future: Mapping[str, Sequence[Interaction]],
                      converts: frozenset[str]) -> dict[str, Any]:
    """Is the "likely to buy anyway" score a probability? Label: the user converted on
    anything within the horizon. Fit Platt calibration on the first half of the moments (in
    time), report Brier scores and reliability bins on the second half."""
    scores = np.asarray([m.propensity for m in moments])
    labels = np.asarray([any(r.event_type in converts
                             for r in future[m.user_id][m.future[0]:m.future[1]])
                         for m in moments], dtype=np.float64)
    half = len(moments) // 2
    if half == 0:
        return {"moments": len(moments)}
    scale, bias = fit_platt(scores[:half], labels[:half])
    held_scores, held_labels = scores[half:], labels[half:]
    fitted = apply_platt(held_scores, scale, bias)
    return {
        "moments_fit": half, "moments_held_out": len(held_labels),
        "positive_rate_held_out": float(held_labels.mean()),
        "brier_raw": brier(held_scores, held_labels),
        "brier_calibrated": brier(fitted, held_labels),
        "brier_base_rate": brier(np.full_like(held_labels, labels[:half].mean()), held_labels),
        "platt": {"propensity_logit_scale": scale, "propensity_logit_bias": bias},
        "bins_raw": reliability_bins(held_scores, held_labels),
        "bins_calibrated": reliability_bins(fitted, held_labels),
    }
