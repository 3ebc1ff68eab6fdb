"""The latency benchmark's --quick mode measures real decisions and reports the p99 ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_mode_samples_every_decision_and_merges_only_its_key(
        tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"someone_elses_key": 1.5}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "latency.py"), "--quick",
         "--checkpoint", str(checkpoints["v1"]), "--out-dir", str(tmp_path),
         "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("latency p99 / batch window = ")
    merged = json.loads(summary.read_text())
    assert merged["someone_elses_key"] == 1.5 and merged["latency_p99_over_window"] > 0
    result = json.loads((tmp_path / "latency_quick.json").read_text())
    samples = result["samples"]["latency_seconds"]
    assert result["decisions"] == len(samples) > 0
    assert all(s >= 0 for s in samples)
    lat = result["latency_seconds"]
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] == max(samples)
    assert 0 < result["replay_events_per_second"] < result["max_events_per_second"]
    assert (tmp_path / "latency_quick.png").read_bytes()[:4] == b"\x89PNG"
