"""The soak benchmark's --quick mode: one burst, one silence past twice the transaction
timeout, and the figures it reports are computed from what a read_committed reader saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.kafka
@pytest.mark.slow(seconds=50)
def test_quick_soak_commits_every_reminder_once_and_merges_its_keys(
        tmp_path: Path, checkpoints: dict[str, Path], bootstrap: str) -> None:
    last_line, merged = run_bench("soak.py", tmp_path,
                                  "--checkpoint", str(checkpoints["v1"]),
                                  "--bootstrap-servers", bootstrap)
    assert last_line.startswith("soak: restarts 0, lost 0, duplicated 0")
    result = json.loads((tmp_path / "soak_quick.json").read_text())
    assert result["silences_over_twice_the_timeout"] == 1
    assert result["reminders_expected"] > 0 and not result["producer_fenced_in_log"]
    assert result["reminder_delay_seconds"]["p99"] < result["config"][
        "transaction_timeout_seconds"]
    for key in ("soak_worker_restarts", "soak_decisions_lost", "soak_decisions_duplicated"):
        assert merged[key] == 0
    assert "soak_rss_growth_mb" in merged and merged["soak_reminder_p99_seconds"] > 0
