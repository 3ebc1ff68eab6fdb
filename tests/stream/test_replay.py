"""`promo replay` turns real datasets into contract events on the real broker."""

from __future__ import annotations

import asyncio
import subprocess
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from encoder.data import load_dataset
from stream.config import Settings
from stream.contracts import Event, parse_event
from stream.replay import to_events
from tests.support import FIXTURE_DATASETS, PROMO, consume_all, settings_env

pytestmark = pytest.mark.kafka


def run_replay(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMO, "replay", *args, "--no-progress"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=300, check=False)


def by_user(events: list[Event]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = defaultdict(list)
    for event in events:
        order[event.user_id].append(event.event_id)
    return order


def test_replayed_events_round_trip_in_each_users_order(settings: Settings) -> None:
    expected = list(to_events(load_dataset("rees46", FIXTURE_DATASETS), id_prefix="rees46"))
    done = run_replay(settings, "rees46", "--datasets-dir", str(FIXTURE_DATASETS))
    assert done.returncode == 0, done.stderr
    assert f"replayed {len(expected)} events" in done.stdout

    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                      settings.kafka.events_topic, expect=len(expected)))
    assert len(records) == len(expected)
    consumed = []
    for record in records:
        event = parse_event(record.value, record.key, now_ms=2**62)
        assert isinstance(event, Event), event  # the replay speaks the contract
        consumed.append(event)
    # Offsets order records within a partition; a user lives on one partition.
    consumed_in_log_order = [e for r, e in sorted(zip(records, consumed, strict=True),
                                                  key=lambda pair: (pair[0].partition,
                                                                    pair[0].offset))]
    assert by_user(consumed_in_log_order) == by_user(expected)
    for record, event in zip(records, consumed, strict=True):
        assert record.key == event.user_id.encode()
    source = {e.event_id: e for e in expected}
    for event in consumed:  # payload is the dataset's, only the clock is the replay's
        want = source[event.event_id]
        assert (event.type, event.item_id, event.price, event.category) == (
            want.type, want.item_id, want.price, want.category)


def test_replay_limit_produces_exactly_that_many_instacart_events(settings: Settings) -> None:
    done = run_replay(settings, "instacart", "--limit", "1234", "--clock", "dataset")
    assert done.returncode == 0, done.stderr
    assert "replayed 1234 events" in done.stdout
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                      settings.kafka.events_topic, idle=3.0))
    assert len(records) == 1234
    expected = list(to_events(load_dataset("instacart")[:1234], id_prefix="instacart"))
    got = sorted((orjson.loads(r.value) for r in records), key=lambda b: int(b["event_id"]
                                                                                .rsplit("-")[-1]))
    assert [(b["event_id"], b["ts"], b["type"]) for b in got] == [
        (e.event_id, e.ts, e.type) for e in expected]
    assert {b["type"] for b in got} <= {"add_to_cart", "purchase"}


def test_replay_reads_any_interactions_csv(settings: Settings, tmp_path: Path) -> None:
    csv = tmp_path / "log.csv"
    csv.write_text("customer,product,when,kind\n"
                   "c1,p1,1700000000,view\nc1,p2,1700000060,purchase\nc2,p1,1700000030,view\n")
    done = run_replay(settings, "--interactions", str(csv), "--user-col", "customer",
                      "--item-col", "product", "--time-col", "when", "--type-col", "kind",
                      "--rate", "100")
    assert done.returncode == 0, done.stderr
    assert "replayed 3 events from log" in done.stdout
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                      settings.kafka.events_topic, expect=3))
    bodies = sorted((orjson.loads(r.value) for r in records), key=lambda b: b["event_id"])
    assert [(b["user_id"], b["item_id"], b["type"]) for b in bodies] == [
        ("c1", "p1", "view"), ("c2", "p1", "view"), ("c1", "p2", "purchase")]


def test_replay_names_the_valid_datasets_when_given_an_unknown_one(settings: Settings) -> None:
    done = run_replay(settings, "no-such-dataset")
    assert done.returncode != 0
    assert "instacart" in done.stderr and "Traceback" not in done.stderr
