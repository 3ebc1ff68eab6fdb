"""The pipeline throughput benchmark's --quick mode runs end to end and reports its ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_mode_measures_all_three_and_merges_only_its_keys(
        tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"someone_elses_key": 1.5}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline_throughput.py"), "--quick",
         "--checkpoint", str(checkpoints["v1"]), "--out-dir", str(tmp_path),
         "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("c/b = ")
    merged = json.loads(summary.read_text())
    assert merged["someone_elses_key"] == 1.5
    assert merged["pipeline_vs_naive_faust"] > 0 and merged["pipeline_vs_raw_aiokafka"] > 0
    assert 0 < merged["state_bytes_per_user"] <= 1024
    assert merged["two_workers_over_one"] > 0
    result = json.loads((tmp_path / "pipeline_throughput_quick.json").read_text())
    assert result["machine"]["kafka"] and result["machine"]["cores"] >= 1
    assert result["config"]["events"] == 6_000
    assert set(result["events_per_second"]) == {"raw_aiokafka", "naive_faust", "promo",
                                                "promo_two_workers"}
    assert (tmp_path / "pipeline_throughput_quick.png").read_bytes()[:4] == b"\x89PNG"
