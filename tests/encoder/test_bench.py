"""The encoder benchmarks' --quick modes run, write their files and report their headlines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench


@pytest.mark.slow
def test_speed_bench_quick_mode(tmp_path: Path) -> None:
    last_line, summary = run_bench("encoder_speed.py", tmp_path, "--threads", "2")
    assert last_line.startswith("encoder batched vs per-user loop: ")
    assert summary["encoder_batched_vs_loop"] > 1
    assert 0 < summary["encoder_fraction_of_matmul_peak"] < 1.5
    result = json.loads((tmp_path / "encoder_speed_quick.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    real = result["batched_vs_loop"]["real histories"]
    assert len(real["batched_seconds"]) == 3  # raw samples, not only a summary
    assert {c["L"] for c in result["sweep"]} == {25, 50}
    assert (tmp_path / "encoder_speed_quick.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quality_bench_quick_mode(tmp_path: Path) -> None:
    last_line, _ = run_bench("encoder_quality.py", tmp_path, "--threads", "2")
    assert "encoder_instacart_full_ndcg10_types_vs_no_types=" in last_line
    result = json.loads((tmp_path / "encoder_quality_quick.json").read_text())
    run = result["runs"]["instacart-types"]
    assert set(run["test"]) == {"model", "popularity"}
    assert run["test_95ci"]["model"]["full"]["NDCG@10"][0] <= \
        run["test"]["model"]["full"]["NDCG@10"] <= run["test_95ci"]["model"]["full"]["NDCG@10"][1]
    assert (tmp_path / "encoder_quality_ranks_quick.npz").exists()
    assert (tmp_path / "encoder_quality_quick.png").read_bytes()[:4] == b"\x89PNG"
