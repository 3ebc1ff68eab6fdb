"""Metrics as an SRE sees them: scraped by the real Prometheus from a worker on the real broker,
valid for promtool, and with bounded label values."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka.launcher import free_port
from encoder.data import load_dataset
from stream.config import Settings
from stream.metrics import Metrics
from stream.replay import to_events
from tests.support import wait_until
from tests.workers import accounted, read_decisions, send_events

pytestmark = pytest.mark.kafka

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
# Every label the worker may export, and the most distinct values any may take.
ALLOWED_LABELS = {"type", "reason", "action", "arm", "kind", "stage", "partition", "le",
                  "version", "path"}
MAX_VALUES_PER_LABEL = 32


class Prometheus:
    """The real prometheus on a free port, with the project's scrape config and rules, its
    target pointed at a test worker."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: scripts/bootstrap.sh installs Debian's package"
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, worker_port: int) -> None:
        shutil.copytree(PROMETHEUS_DIR / "rules", self.workdir / "rules")
        conf = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        conf["global"]["scrape_interval"] = "1s"  # the project's config says 5s; tests wait
        conf["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{worker_port}"]
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(conf))
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: _ready(self.port), timeout=30, what="prometheus to be ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path)
    yield server
    server.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_replayed_volume(settings: Settings, run_worker,
                                                prometheus: Prometheus,
                                                checkpoints: dict[str, Path]) -> None:
    _, port = run_worker(checkpoints["v1"])
    prometheus.start(port)
    prom_port = prometheus.port
    events = list(to_events(load_dataset("instacart")[:3000], id_prefix="scrape",
                            clock=lambda: int(time.time() * 1000)))
    send_events(settings, events)
    wait_until(lambda: accounted(port) >= len(events), timeout=120, what="events processed")
    decisions = read_decisions(settings)
    assert decisions

    def scraped(expr: str, want: float) -> bool:
        got = query(prom_port, expr)
        return got is not None and abs(got - want) < 1e-6

    wait_until(lambda: scraped("sum(promo_stream_events_consumed_total)", len(events)),
               timeout=60, what="prometheus to see every event")
    wait_until(lambda: scraped("sum(promo_decisions_published_total)", len(decisions)),
               timeout=30, what="prometheus to see every decision")
    # Every decision here was triggered by an event, so each has one latency observation.
    wait_until(lambda: scraped("sum(promo_decision_latency_seconds_count)", len(decisions)),
               timeout=30, what="the latency histogram to count every decision")
    assert query(prom_port, 'up{job="promo-worker"}') == 1
    # Over the whole run (the counters since start), not a rate: the replay may fit between
    # two scrapes.
    p99 = query(prom_port, "histogram_quantile(0.99, sum by (le) "
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
