"""Metrics as an SRE sees them: scraped by the real Prometheus from a worker on the real broker,
valid for promtool, and with bounded label values."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from encoder.data import load_dataset
from stream.config import Settings
from stream.metrics import Metrics
from stream.replay import to_events
from tests.prometheus import Prometheus
from tests.support import wait_until
from tests.workers import accounted, read_decisions, send_events

pytestmark = pytest.mark.kafka

# Every label the worker may export, and the most distinct values any may take.
ALLOWED_LABELS = {"type", "reason", "action", "arm", "kind", "stage", "partition", "le",
                  "offer", "chosen",
                  "version", "path", "campaign", "converted",  # converted: true or false
                  "endpoint", "status"}  # the pull API's: a route name, an HTTP status
MAX_VALUES_PER_LABEL = 32


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus")
    yield server
    server.stop()


def test_prometheus_scrapes_the_replayed_volume(settings: Settings, run_worker,
                                                prometheus: Prometheus,
                                                checkpoints: dict[str, Path]) -> None:
    _, port = run_worker(checkpoints["v1"])
    prometheus.start(port)
    events = list(to_events(load_dataset("instacart")[:3000], id_prefix="scrape",
                            clock=lambda: int(time.time() * 1000)))
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=120, what="events processed")
    decisions = read_decisions(settings)
    assert decisions

    def scraped(expr: str, want: float) -> bool:
        got = prometheus.query(expr)
        return got is not None and abs(got - want) < 1e-6

    wait_until(lambda: scraped("sum(promo_stream_events_consumed_total)", len(events)),
               timeout=60, what="prometheus to see every event")
    wait_until(lambda: scraped("sum(promo_decisions_published_total)", len(decisions)),
               timeout=30, what="prometheus to see every decision")
    # Every decision here was triggered by an event, so each has one latency observation.
    wait_until(lambda: scraped("sum(promo_decision_latency_seconds_count)", len(decisions)),
               timeout=30, what="the latency histogram to count every decision")
    assert prometheus.query('up{job="promo-worker"}') == 1
    # Over the whole run (the counters since start), not a rate: the replay may fit between
    # two scrapes.
    p99 = prometheus.query("histogram_quantile(0.99, sum by (le) "
                           "(promo_decision_latency_seconds_bucket))")
    assert p99 is not None and 0 < p99 < 30


def test_a_live_scrape_passes_promtool_and_keeps_labels_bounded(
        settings: Settings, run_worker, checkpoints: dict[str, Path]) -> None:
    _, port = run_worker(checkpoints["v1"])
    rows = load_dataset("instacart")[:5000]
    events = list(to_events(rows, id_prefix="labels", clock=lambda: int(time.time() * 1000)))
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=120, what="events processed")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"],
                           input=text, capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    users = {r.user_id for r in rows}
    items = {r.item_id for r in rows}
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("promo_"), family.name
        for s in family.samples:
            for label, value in s.labels.items():
                assert label in ALLOWED_LABELS, f"{s.name} has label {label}"
                if label == "partition":  # a number, like Instacart's user and item ids
                    assert 0 <= int(value) < settings.kafka.partitions
                elif label != "le":
                    assert value not in users and value not in items, f"{s.name}{s.labels}"
                values.setdefault(label, set()).add(value)
    for label, seen in values.items():
        if label != "le":  # histogram buckets: fixed in code, not in data
            assert len(seen) <= MAX_VALUES_PER_LABEL, f"{label} took {len(seen)} values"


def test_every_metric_has_help_and_a_conventional_name() -> None:
    for family in Metrics().registry.collect():
        assert family.documentation, family.name
        assert family.name.startswith("promo_")
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client appends it
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes", "_records", "_users")), family.name
