"""Checkpoint directories: write them, and load them only if they are whole and consistent.

A checkpoint is a directory:

- ``weights.pt``: the model's state_dict (loaded with ``weights_only=True``, no pickled code);
- ``config.json``: ``dataclasses.asdict(EncoderConfig)``, rebuilt with ``EncoderConfig(**...)``;
- ``vocab.json``: the raw item ids, index 1 first, and the number of OOV buckets;
- ``popularity.npy``: int64 count of each index among the training targets (cold start);
- ``metrics.json``: training metadata (data, settings, curve, validation and test metrics);
- ``training_curve.png``: loss and validation NDCG@10 per epoch;
- ``manifest.json``: the sha256 of every file above, and ``model_version``, written last, so a
  directory without it is an interrupted write.

``model_version`` is the first 16 hex digits of the sha256 of the manifest lines of the files
that determine the model's outputs (weights, config, vocabulary, popularity). Two checkpoints
with those files identical share a version even if their training logs differ.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder.config import EncoderConfig
from encoder.model import EncoderModel
from encoder.vocab import Vocabulary

MANIFEST = "manifest.json"
MODEL_FILES = ("weights.pt", "config.json", "vocab.json", "popularity.npy")
FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or inconsistent; the message says what and where."""


@dataclass(frozen=True)
class Checkpoint:
    model: EncoderModel
    vocab: Vocabulary
    popularity: np.ndarray
    metrics: dict[str, Any]
    model_version: str
    path: Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_version(hashes: dict[str, str]) -> str:
    lines = "".join(f"{name} {hashes[name]}\n" for name in MODEL_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def save(out_dir: Path, model: EncoderModel, vocab: Vocabulary, popularity: np.ndarray,
         metrics: dict[str, Any], curve_png: bytes | None = None) -> str:
    """Write a checkpoint directory; returns its ``model_version``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    payloads: dict[str, bytes] = {
        "weights.pt": buffer.getvalue(),
        "config.json": _json(asdict(model.cfg)),
        "vocab.json": _json({"items": vocab.items, "n_oov_buckets": vocab.n_oov_buckets}),
        "metrics.json": _json(metrics),
    }
    npy = io.BytesIO()
    np.save(npy, np.asarray(popularity, dtype=np.int64), allow_pickle=False)
    payloads["popularity.npy"] = npy.getvalue()
    if curve_png is not None:
        payloads["training_curve.png"] = curve_png
    hashes = {}
    for name, data in payloads.items():
        (out_dir / name).write_bytes(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    version = combined_version(hashes)
    manifest = {"format": FORMAT, "model_version": version, "model_files": list(MODEL_FILES),
                "files": dict(sorted(hashes.items()))}
    (out_dir / MANIFEST).write_bytes(_json(manifest))
    return version


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=False) + "\n").encode()


def load(checkpoint_dir: Path) -> Checkpoint:
    """Read and verify a checkpoint; any problem is a :class:`CheckpointError`."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    manifest = _read_json(path, MANIFEST, hint=" (incomplete checkpoint: the manifest is "
                          "written last)")
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST}: not a format-{FORMAT} manifest")
    for name in MODEL_FILES:
        if name not in files:
            raise CheckpointError(f"{path / MANIFEST}: does not list {name}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(f"{file}: corrupt, sha256 {actual[:12]}... does not match "
                                  f"{expected[:12]}... in {MANIFEST}")
    version = combined_version(files)
    if manifest.get("model_version") != version:
        raise CheckpointError(f"{path / MANIFEST}: model_version {manifest.get('model_version')!r}"
                              f" does not match its file hashes ({version})")

    raw_config = _read_json(path, "config.json")
    known = {f.name for f in fields(EncoderConfig)}
    if set(raw_config) - known:
        raise CheckpointError(f"{path / 'config.json'}: unknown fields "
                              f"{sorted(set(raw_config) - known)}")
    try:
        config = EncoderConfig(**raw_config)
    except (TypeError, AssertionError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: invalid config: {exc}") from exc

    raw_vocab = _read_json(path, "vocab.json")
    try:
        vocab = Vocabulary(raw_vocab["items"], raw_vocab["n_oov_buckets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'vocab.json'}: invalid vocabulary: {exc}") from exc
    if (vocab.n_items, vocab.n_oov_buckets) != (config.n_items, config.n_oov_buckets):
        raise CheckpointError(f"{path}: vocab.json has {vocab.n_items} items and "
                              f"{vocab.n_oov_buckets} OOV buckets, config.json says "
                              f"{config.n_items} and {config.n_oov_buckets}")

    try:
        popularity = np.load(path / "popularity.npy", allow_pickle=False)
    except ValueError as exc:
        raise CheckpointError(f"{path / 'popularity.npy'}: unreadable: {exc}") from exc
    if popularity.shape != (config.vocab_size,) or popularity.dtype != np.int64:
        raise CheckpointError(f"{path / 'popularity.npy'}: shape {popularity.shape} "
                              f"{popularity.dtype}, want ({config.vocab_size},) int64")

    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad archive
        raise CheckpointError(f"{path / 'weights.pt'}: unreadable: {exc}") from exc
    model = EncoderModel(config)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path / 'weights.pt'}: does not match config.json: "
                              f"{' '.join(str(exc).split())[:500]}") from exc
    model.eval()
    metrics = _read_json(path, "metrics.json") if (path / "metrics.json").is_file() else {}
    return Checkpoint(model, vocab, popularity, metrics, version, path)


def _read_json(path: Path, name: str, hint: str = "") -> dict[str, Any]:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file}: missing{hint}")
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return value
