from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from stream.cli import main
from tests.encoder.conftest import patterned_interactions

TINY_FLAGS = ["--epochs", "2", "--d-model", "16", "--heads", "2", "--d-ff", "32",
              "--max-len", "12", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "log.csv"
    lines = ["customer,sku,when,kind"]
    lines += [f"{it.user_id},{it.item_id},{it.ts_ms},{it.event_type}"
              for it in patterned_interactions(n_users=60, length=10)]
    path.write_text("\n".join(lines) + "\n")
    return path


CSV_FLAGS = ["--user-col", "customer", "--item-col", "sku", "--time-col", "when",
             "--type-col", "kind"]


@pytest.fixture(scope="module")
def trained_dir(csv_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    result = CliRunner().invoke(main, ["train", "--interactions", str(csv_file), *CSV_FLAGS,
                                       "--out", str(out), *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    assert "model_version" in result.stdout
    return out


def test_train_writes_a_whole_checkpoint(trained_dir: Path) -> None:
    names = {p.name for p in trained_dir.iterdir()}
    assert names == {"weights.pt", "config.json", "vocab.json", "popularity.npy",
                     "metrics.json", "training_curve.png", "manifest.json"}
    assert (trained_dir / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    assert metrics["data"]["interactions"].endswith("log.csv")
    assert set(metrics["test"]) == {"model", "popularity"}


def test_evaluate_json_prints_the_documented_keys(trained_dir: Path, csv_file: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(trained_dir),
                                       "--interactions", str(csv_file), *CSV_FLAGS, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == ["users", "items", "model", "popularity"]
    assert (report["users"], report["items"]) == (60, 30)
    for scorer in ("model", "popularity"):
        assert set(report[scorer]) == {"sampled", "full"}
        for protocol in ("sampled", "full"):
            assert set(report[scorer][protocol]) == {"HR@10", "NDCG@10"}
            assert 0 <= report[scorer][protocol]["NDCG@10"] <= 1
    # The test split is the one training evaluated once: the same numbers come back.
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    assert report["model"] == metrics["test"]["model"]


def test_train_refuses_to_overwrite_without_the_flag(trained_dir: Path, csv_file: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--interactions", str(csv_file), *CSV_FLAGS,
                                       "--out", str(trained_dir), *TINY_FLAGS])
    assert result.exit_code != 0
    assert "--overwrite" in result.output


def test_exactly_one_data_source_is_required(tmp_path: Path, csv_file: Path) -> None:
    for args in ([], ["--dataset", "beauty", "--interactions", str(csv_file)]):
        result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2
        assert "exactly one" in result.output


def test_an_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--dataset", "netflix", "--out",
                                       str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "valid names: games, beauty" in result.output


def test_evaluate_reports_a_broken_checkpoint(tmp_path: Path, csv_file: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "ckpt"),
                                       "--interactions", str(csv_file), *CSV_FLAGS])
    assert result.exit_code == 1
    assert "manifest.json: missing" in result.output
