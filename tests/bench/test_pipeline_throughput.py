"""The pipeline throughput benchmark's --quick mode runs end to end and reports its ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.kafka
@pytest.mark.slow(seconds=90)
def test_quick_mode_measures_all_six_and_merges_its_keys(
        tmp_path: Path, checkpoints: dict[str, Path], bootstrap: str) -> None:
    last_line, merged = run_bench("pipeline_throughput.py", tmp_path,
                                  "--checkpoint", str(checkpoints["v1"]),
                                  "--bootstrap-servers", bootstrap)
    assert last_line.startswith("c/b = ")
    assert merged["pipeline_vs_naive_faust"] > 0 and merged["pipeline_vs_raw_aiokafka"] > 0
    assert 0 < merged["state_bytes_per_user"] <= 1024
    assert merged["two_workers_over_one"] > 0 and merged["attribution_throughput_ratio"] > 0
    assert merged["worker_cpu_vs_naive_cpu"] > 0 and merged["pipeline_vs_quixstreams"] > 0
    result = json.loads((tmp_path / "pipeline_throughput_quick.json").read_text())
    assert result["machine"]["kafka"] and result["machine"]["cores"] >= 1
    assert result["config"]["events"] == 10_000  # --quick: large enough to time
    assert set(result["events_per_second"]) == {"raw_aiokafka", "naive_faust", "promo",
                                                "promo_two_workers", "promo_attribution_off",
                                                "quixstreams"}
    pinned = result["pinned"]  # the session broker is not the benchmark's: only its side pinned
    assert pinned["broker_pinned"] is False and pinned["worker_core"] != pinned["producer_core"]
    assert pinned["promo"] > 0 and pinned["naive_faust"] > 0
    cpu = result["worker_cpu_seconds_per_100k_events"]
    assert set(cpu) == {"naive_faust", "promo", "promo_attribution_off", "quixstreams"}
    assert all(seconds > 0 for seconds in cpu.values())  # every process did measurable work
    assert (tmp_path / "pipeline_throughput_quick.png").read_bytes()[:4] == b"\x89PNG"
