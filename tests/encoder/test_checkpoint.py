from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import checkpoint
from encoder.checkpoint import CheckpointError
from encoder.inference import Encoder
from encoder.train import TrainResult


@pytest.fixture
def copy(checkpoint_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint_dir, tmp_path / "copy"))


def rehash(path: Path) -> None:
    """Re-sign the manifest after an edit, as a careless tool would."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = checkpoint.sha256_file(path / name)
    manifest["model_version"] = checkpoint.combined_version(manifest["files"])
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_gives_identical_outputs_and_the_same_version(
        trained: TrainResult, checkpoint_dir: Path, tmp_path: Path) -> None:
    first = Encoder.load(checkpoint_dir)
    again = Encoder.load(checkpoint_dir)
    assert first.model_version == again.model_version
    assert len(first.model_version) == 16
    items = [trained.split.test.items[u] for u in range(20)]
    types = [trained.split.test.types[u] for u in range(20)]
    trained.model.eval()
    original = Encoder(trained.model, trained.vocab, trained.split.popularity, "x")
    np.testing.assert_array_equal(first.user_vectors(items, types),
                                  original.user_vectors(items, types))
    assert first.vocab.items == trained.vocab.items
    np.testing.assert_array_equal(first.popularity, trained.split.popularity)
    # Saving the same model again reproduces the same model_version.
    version = checkpoint.save(tmp_path / "again", trained.model, trained.vocab,
                              trained.split.popularity, {"different": "metrics"})
    assert version == first.model_version


def test_a_corrupt_file_is_named(copy: Path) -> None:
    data = bytearray((copy / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.pt: corrupt"):
        Encoder.load(copy)


def test_a_missing_manifest_means_an_incomplete_checkpoint(copy: Path) -> None:
    (copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing.*incomplete"):
        Encoder.load(copy)


def test_a_missing_file_is_named(copy: Path) -> None:
    (copy / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"vocab\.json: missing"):
        Encoder.load(copy)


def test_weights_that_do_not_match_the_config_are_refused(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["d_model"] = 32
    config["d_ff"] = 64
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy)
    with pytest.raises(CheckpointError, match=r"weights\.pt: does not match config\.json"):
        Encoder.load(copy)


def test_a_vocabulary_that_does_not_match_the_config_is_refused(copy: Path) -> None:
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["items"].append("one-too-many")
    (copy / "vocab.json").write_text(json.dumps(vocab))
    rehash(copy)
    with pytest.raises(CheckpointError, match=r"vocab\.json has .* config\.json says"):
        Encoder.load(copy)


def test_an_unknown_config_field_is_refused(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["flux_capacitor"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy)
    with pytest.raises(CheckpointError, match=r"unknown fields.*flux_capacitor"):
        Encoder.load(copy)


def test_a_tampered_version_is_refused(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_version"] = "0" * 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match its file hashes"):
        Encoder.load(copy)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Encoder.load(tmp_path / "nothing-here")


def test_weights_load_without_unpickling_code(copy: Path) -> None:
    torch.save({"evil": object()}, copy / "weights.pt")
    rehash(copy)
    with pytest.raises(CheckpointError, match=r"weights\.pt: unreadable"):
        Encoder.load(copy)
