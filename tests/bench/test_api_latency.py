"""The pull API benchmark's --quick mode runs end to end and reports its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.kafka
@pytest.mark.slow(seconds=75)
def test_quick_mode_measures_latency_throughput_and_forwarding(
        tmp_path: Path, checkpoints: dict[str, Path], bootstrap: str) -> None:
    last_line, merged = run_bench("api_latency.py", tmp_path,
                                  "--checkpoint", str(checkpoints["v1"]),
                                  "--bootstrap-servers", bootstrap)
    assert last_line.startswith("p99 at 200/s = ")
    assert merged["api_p99_ms_at_200rps"] > 0 and merged["api_p99_ms_at_1000rps"] > 0
    assert merged["api_stream_throughput_ratio"] > 0
    assert "api_forwarding_p50_ms" in merged
    result = json.loads((tmp_path / "api_latency_quick.json").read_text())
    assert [p["load_rps"] for p in result["phases"]] == [0, 200, 1000]
    for phase in result["phases"][1:]:
        # None refused; under the suite's own load a few may outlast the generator's 5 s.
        assert set(phase["statuses"]) <= {"200", "error"}, phase["statuses"]
        assert phase["statuses"]["200"] >= 0.9 * phase["requests"]
        assert phase["stream_events_per_second"] > 0
    pair = result["two_workers"]
    assert pair["users"] > 0 and pair["identical"] == pair["users"]
