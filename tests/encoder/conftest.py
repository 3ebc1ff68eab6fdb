"""Fixtures for the encoder tests: tiny models and small, learnable data, so the suite is fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import checkpoint
from encoder.config import EncoderConfig, TrainConfig
from encoder.data import EVENT_TYPES, Interaction
from encoder.model import EncoderModel
from encoder.train import TrainResult, train

TINY = EncoderConfig(n_items=40, n_oov_buckets=4, max_len=12, n_layers=2, d_model=16,
                     n_heads=2, d_ff=32, dropout=0.1)


def patterned_interactions(n_users: int = 120, n_items: int = 30, length: int = 14,
                           seed: int = 0) -> list[Interaction]:
    """Users walk the catalogue in steps of 1 or 2 from a random start: next items are
    predictable from the last few, so a model learns quickly and an untrained one cannot."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        step = 1 + u % 2
        start = int(rng.integers(n_items))
        for k in range(length):
            item = (start + k * step) % n_items
            kind = EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))]
            rows.append(Interaction(f"u{u}", f"i{item}", kind, 1_000_000 + k * 60_000 + u))
    rows.sort(key=lambda it: it.ts_ms)
    return rows


@pytest.fixture(scope="session")
def interactions() -> list[Interaction]:
    return patterned_interactions()


@pytest.fixture(scope="session")
def trained(interactions: list[Interaction]) -> TrainResult:
    cfg = EncoderConfig(n_oov_buckets=4, max_len=12, n_layers=2, d_model=16, n_heads=2,
                        d_ff=32, dropout=0.1)
    return train(interactions, cfg, TrainConfig(epochs=6, patience=6, lr=1e-2, batch_size=32,
                                                seed=1), progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def checkpoint_dir(trained: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(out, trained.model, trained.vocab, trained.split.popularity,
                    {"note": "test checkpoint"}, b"not really a png")
    return out


@pytest.fixture
def tiny_model() -> EncoderModel:
    torch.manual_seed(0)
    return EncoderModel(TINY).eval()
