"""Fixtures for the offline simulator's tests: a slice of real Instacart histories, an encoder
trained for a few epochs on the part before the cut, and the simulation report over it (built
once for all the test modules here)."""

from __future__ import annotations

import pytest

from encoder.config import TrainConfig
from encoder.data import Interaction, load_dataset
from encoder.inference import Encoder
from stream.config import PolicyConfig
from stream.offline.config import SimulationConfig
from stream.offline.moments import time_split
from stream.offline.run import simulate, train_before_cut
from tests.support import first_users

USERS = 80
CONFIG = SimulationConfig(policy=PolicyConfig(quiet_start_hour=0, quiet_end_hour=0))


@pytest.fixture(scope="session")
def rows() -> list[Interaction]:
    """Whole histories of the first USERS Instacart users, in time order."""
    return first_users(load_dataset("instacart"), USERS)


@pytest.fixture(scope="session")
def encoder(rows: list[Interaction], tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    before, _, _ = time_split(rows, CONFIG.train_fraction)
    # Bounded by epochs, not minutes: the same model however busy the machine is.
    return train_before_cut(before, tmp_path_factory.mktemp("sim") / "model",
                            TrainConfig(epochs=6, seed=0), progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def report(rows: list[Interaction], encoder: Encoder) -> dict:
    return simulate(rows, encoder, CONFIG)


def interaction(user: str, item: str, kind: str, minute: int) -> Interaction:
    return Interaction(user, item, kind, 1_600_000_000_000 + minute * 60_000)
