"""The retrain-and-swap loop on the real broker: events topic -> `promo train --from-kafka` ->
`promo publish` (only if better on the agreed metric) -> the running worker swaps models with
no restart, and its next decisions carry the new model_version."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from encoder.checkpoint import load
from encoder.data import load_dataset
from stream.config import Settings
from stream.contracts import Event
from stream.replay import produce
from tests.conftest import build_checkpoint
from tests.support import PROMO, first_users, settings_env, wait_until
from tests.workers import accounted, read_decisions, send_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow(seconds=50)]

USERS = 60


def _promo(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([PROMO, *args], env=settings_env(settings), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_model_retrained_from_the_event_log_is_published_and_served_without_restart(
        settings: Settings, run_worker, tmp_path: Path) -> None:
    # The live model knows an old catalogue (MovieLens items): the shop's items are all new.
    stale = tmp_path / "models" / "stale"
    build_checkpoint(stale, dataset="ml-100k", seed=3)
    live = tmp_path / "models" / "current"
    live.symlink_to(stale)
    proc, port = run_worker(live, holdout_percent="0")
    first = load(stale).model_version

    rows = first_users(load_dataset("instacart"), USERS)
    replayed = asyncio.run(produce(settings.kafka, rows, id_prefix="log", clock="dataset",
                                   progress=False))
    assert replayed.produced == len(rows)
    wait_until(lambda: accounted(port) >= len(rows), timeout=120, what="the log processed")

    candidate = tmp_path / "models" / "v2"
    trained = _promo(settings, "train", "--from-kafka", "--out", str(candidate), "--epochs", "8",
                     "--patience", "8", "--lr", "0.01", "--d-model", "32", "--d-ff", "64",
                     "--no-progress")
    assert "it/s]" not in trained.stderr and "%|" not in trained.stderr  # no tqdm bar at all
    meta = json.loads((candidate / "metrics.json").read_text())
    source = meta["data"]
    assert source["kafka_topic"] == settings.kafka.events_topic
    assert sum(source["end_offsets"].values()) == len(rows)
    assert source["interactions_loaded"] == len(rows)

    metric = ("--metric", "sampled/NDCG@10")
    published = json.loads(_promo(settings, "publish", "--candidate", str(candidate), "--live",
                                  str(live), "--from-kafka", *metric, "--json").stdout)
    new = load(candidate).model_version
    assert published["live"]["model_version"] == first
    assert published["candidate"]["model_version"] == new
    assert published["candidate"]["value"] > published["live"]["value"]
    assert published["published"] is True
    assert live.resolve() == candidate.resolve()

    proc.wait_for_log(f"model_version={new}", timeout=30)
    now = int(time.time() * 1000)
    send_events(settings, [Event("after-swap", "fresh-user", "add_to_cart", "24852", now)])
    wait_until(lambda: accounted(port) >= len(rows) + 1, timeout=60, what="the new event")
    after = [d for d in read_decisions(settings) if d["user_id"] == "fresh-user"]
    assert [d["model_version"] for d in after] == [new]
    assert proc.log_path.read_text().count("worker ready") == 1  # no restart

    # A worse candidate (the stale model again) is compared and left unpublished.
    kept = json.loads(_promo(settings, "publish", "--candidate", str(stale), "--live",
                             str(live), "--from-kafka", *metric, "--json").stdout)
    assert kept["published"] is False
    assert kept["candidate"]["value"] < kept["live"]["value"]
    assert live.resolve() == candidate.resolve()
