"""The latency benchmark's --quick mode measures real decisions and reports the p99 ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.kafka
@pytest.mark.slow(seconds=50)
def test_quick_mode_samples_every_decision_and_merges_its_key(
        tmp_path: Path, checkpoints: dict[str, Path], bootstrap: str) -> None:
    last_line, merged = run_bench("latency.py", tmp_path,
                                  "--checkpoint", str(checkpoints["v1"]),
                                  "--bootstrap-servers", bootstrap)
    assert last_line.startswith("latency p99 / batch window = ")
    assert merged["latency_p99_over_window"] > 0
    result = json.loads((tmp_path / "latency_quick.json").read_text())
    samples = result["samples"]["latency_seconds"]
    assert result["decisions"] == len(samples) > 0
    assert all(s >= 0 for s in samples)
    lat = result["latency_seconds"]
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] == max(samples)
    assert 0 < result["replay_events_per_second"] < result["max_events_per_second"]
    assert result["max_phase_producer_events_per_second"] > 0
    assert (tmp_path / "latency_quick.png").read_bytes()[:4] == b"\x89PNG"
