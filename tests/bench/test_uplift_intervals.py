"""The interval benchmark's --quick mode: the always-valid interval keeps its promise under
continuous monitoring where the fixed-horizon one does not (seeded, so not flaky)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.slow(seconds=15)
def test_quick_mode_checks_coverage_and_false_positives_under_repeated_looks(
        tmp_path: Path) -> None:
    _, merged = run_bench("uplift_intervals.py", tmp_path, "--campaigns", "30",
                          "--outcomes", "1000")
    result = json.loads((tmp_path / "uplift_intervals_quick.json").read_text())
    assert result["looks_per_campaign"] == 10  # one look per 100 outcomes
    assert merged["uplift_interval_coverage"] == result["uplift_interval_coverage"] >= 0.9
    assert result["uplift_false_positive_rate_monitored"] <= 0.1
    # Reading the textbook interval at every look finds "effects" where there are none.
    assert (result["uplift_false_positive_rate_fixed_horizon"]
            > result["uplift_false_positive_rate_monitored"])
