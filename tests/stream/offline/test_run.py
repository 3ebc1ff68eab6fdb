"""The whole simulation: decisions judged by what users really did next, beside baselines, with
the repeat weight chosen before the cut."""

from __future__ import annotations

import pytest

from encoder.inference import Encoder
from stream.offline.run import choose_repeat_weight
from tests.stream.offline.conftest import CONFIG, interaction

pytestmark = pytest.mark.slow


def test_the_encoder_beats_random_and_popularity_beats_random(report: dict) -> None:
    rates = {name: p["hit_rate"] for name, p in report["policies"].items()}
    assert rates["ours"] > 3 * rates["random"]
    assert rates["popularity"] > 3 * rates["random"]


def test_the_repeat_weight_is_the_best_on_a_validation_period_before_the_cut(
        report: dict) -> None:
    tuning = report["repeat_weight"]
    rates = {float(w): r for w, r in tuning["validation_hit_rate"].items()}
    assert set(rates) == set(CONFIG.repeat_weights)
    assert tuning["validation_moments"] > 100
    best = max(rates.values())
    assert tuning["chosen"] == min(w for w, r in rates.items() if r == best)
    assert tuning["configured"] == CONFIG.policy.push_repeat_weight


def test_too_short_a_history_to_validate_on_keeps_the_configured_repeat_weight(
        encoder: Encoder) -> None:
    # One distinct time before the cut: there is no validation period to choose on.
    before = [interaction("u", f"i{n}", "purchase", 0) for n in range(5)]
    tuning = choose_repeat_weight(before, encoder, CONFIG, frozenset({"purchase"}))
    assert tuning["chosen"] == CONFIG.policy.push_repeat_weight
    assert tuning["validation_moments"] == 0
