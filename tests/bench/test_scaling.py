"""The scaling benchmark's --quick mode runs end to end and reports its ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.kafka
@pytest.mark.slow(seconds=50)
def test_quick_mode_measures_each_size_and_merges_its_key(
        tmp_path: Path, checkpoints: dict[str, Path], bootstrap: str) -> None:
    last_line, merged = run_bench("scaling.py", tmp_path,
                                  "--checkpoint", str(checkpoints["v1"]),
                                  "--bootstrap-servers", bootstrap)
    assert last_line.startswith("throughput 10,000 / 1,000 users = ")
    assert merged["throughput_1m_over_10k_users"] > 0
    result = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert [s["users"] for s in result["sizes"]] == [1_000, 10_000]
    for size in result["sizes"]:
        assert size["measured_events"] == 3_000
        assert size["events_per_second"] > 0 and size["rss_mb"] > 0
        assert size["recovery_seconds"] > 0
        assert 0 < size["state_bytes_per_user"] <= 1024
    assert (tmp_path / "scaling_quick.png").read_bytes()[:4] == b"\x89PNG"
