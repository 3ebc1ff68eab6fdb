"""The report: decision rates by user activity, and what `promo simulate` prints and writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from encoder.data import Interaction
from stream.eventlog import write_csv
from tests.support import PROMO

pytestmark = pytest.mark.slow


def test_decision_rates_are_reported_by_user_activity(report: dict) -> None:
    by_activity = report["fairness"]["ours"]["decision_rate_by_activity"]
    assert 2 <= len(by_activity) <= 4
    assert sum(b["moments"] for b in by_activity.values()) == report["moments"]
    assert sum(b["decisions"] for b in by_activity.values()) == \
        report["policies"]["ours"]["decisions"]


def test_promo_simulate_reads_any_interactions_csv_and_prints_the_json(
        rows: list[Interaction], tmp_path: Path) -> None:
    csv_path = tmp_path / "slice.csv"
    write_csv(rows[: len(rows) // 4], csv_path)
    done = subprocess.run(
        [PROMO, "simulate", "--interactions", str(csv_path), "--type-col", "type",
         "--train-epochs", "2", "--out-dir", str(tmp_path / "out"), "--no-quiet-hours",
         "--json", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result["policies"]) >= {"ours", "random", "popularity", "holdout"}
    for policy in result["policies"].values():
        assert {"hit_rate", "decisions", "coupon_cost"} <= policy.keys()
    assert result["budget_exceeded"] is False
    assert (tmp_path / "out" / "simulation.json").is_file()
    assert (tmp_path / "out" / "simulation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
