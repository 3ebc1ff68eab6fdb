"""The encoder benchmarks' --quick modes run, write their files and report their headlines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, tmp_path: Path) -> tuple[str, dict[str, float]]:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"someone_elses_key": 1.5}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--threads", "2",
         "--out-dir", str(tmp_path), "--summary", str(summary)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1], json.loads(summary.read_text())


@pytest.mark.slow
def test_speed_bench_quick_mode(tmp_path: Path) -> None:
    last_line, summary = run_bench("encoder_speed.py", tmp_path)
    assert last_line.startswith("encoder batched vs per-user loop: ")
    assert summary["someone_elses_key"] == 1.5
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
    last_line, summary = run_bench("encoder_quality.py", tmp_path)
    assert "encoder_ml-100k_full_ndcg10_types_vs_no_types=" in last_line
    assert summary["someone_elses_key"] == 1.5
    result = json.loads((tmp_path / "encoder_quality_quick.json").read_text())
    run = result["runs"]["ml-100k-types"]
    assert set(run["test"]) == {"model", "popularity"}
    assert run["test_95ci"]["model"]["full"]["NDCG@10"][0] <= \
        run["test"]["model"]["full"]["NDCG@10"] <= run["test_95ci"]["model"]["full"]["NDCG@10"][1]
    assert (tmp_path / "encoder_quality_ranks_quick.npz").exists()
    assert (tmp_path / "encoder_quality_quick.png").read_bytes()[:4] == b"\x89PNG"
