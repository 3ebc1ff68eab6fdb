"""Propensity calibration: the maths pinned on a known miscalibration, and the report's
held-out scores."""

from __future__ import annotations

import numpy as np
import pytest

from stream.offline.calibration import apply_platt, brier, fit_platt

pytestmark = pytest.mark.slow


def test_the_propensity_report_fits_on_early_moments_and_scores_later_ones(report: dict) -> None:
    prop = report["propensity"]
    assert prop["moments_fit"] + prop["moments_held_out"] == report["moments"]
    assert 0 <= prop["brier_calibrated"] <= 1
    assert sum(b["count"] for b in prop["bins_calibrated"]) == prop["moments_held_out"]
    assert {"propensity_logit_scale", "propensity_logit_bias"} == prop["platt"].keys()


def test_platt_scaling_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.02, 0.98, 20_000)
    truth = apply_platt(scores, 2.0, -1.0)
    labels = (rng.random(scores.size) < truth).astype(float)
    scale, bias = fit_platt(scores, labels)
    assert scale == pytest.approx(2.0, abs=0.15) and bias == pytest.approx(-1.0, abs=0.15)
    assert brier(apply_platt(scores, scale, bias), labels) < brier(scores, labels)
