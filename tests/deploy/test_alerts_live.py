"""Every alert rule driven live: a real Prometheus, with deploy/prometheus/rules loaded (only
their ``for:`` shortened), scrapes real workers on the real broker. A healthy worker raises no
alert, pending or firing; each fault raises exactly its own alert.

Each phase starts a fresh Prometheus, so what an earlier phase did (a rate over five minutes,
a counter's jump) cannot leak into the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.kafka.launcher import free_port
from encoder.data import load_dataset
from stream.config import Settings
from stream.contracts import Coupon, Event, Preferences
from stream.replay import to_events
from stream.topics import ensure_topics
from tests.prometheus import Prometheus
from tests.support import PromoProcess, produce_raw, sample, scrape, wait_until
from tests.workers import accounted, send_coupons, send_events, send_preferences, worker_env

pytestmark = pytest.mark.kafka

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / \
    "promo-stream.json"


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Start a fresh Prometheus (stopping the previous one) scraping the given worker ports."""
    started: list[Prometheus] = []

    def start(*ports: int) -> Prometheus:
        for old in started:
            old.stop()
        server = Prometheus(tmp_path / f"prometheus-{len(started)}", rules_for="2s")
        started.append(server)
        server.start(*ports)
        wait_until(server.scraped_every_target, timeout=30, what="a first scrape")
        return server

    yield start
    for server in started:
        server.stop()


def exactly(prom: Prometheus, alert: str, timeout: float = 90.0) -> None:
    """Wait until ``alert`` fires; then it must be the only active alert."""
    wait_until(lambda: prom.alerts().get(alert) == "firing", timeout=timeout,
               what=f"{alert} to fire (active: {prom.alerts()})")
    assert set(prom.alerts()) == {alert}, prom.alerts()


def quiet_for(prom: Prometheus, seconds: float) -> None:
    """No alert pending or firing, checked every second for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert prom.alerts() == {}, prom.alerts()
        time.sleep(1.0)


def other_settings(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """A second, independent deployment on the same broker: topics, group, state."""
    run = uuid.uuid4().hex[:6]
    k = settings.kafka
    kafka = dataclasses.replace(
        k, events_topic=f"{k.events_topic}-{name}{run}", dlq_topic=f"{k.dlq_topic}-{name}{run}",
        decisions_topic=f"{k.decisions_topic}-{name}{run}",
        vectors_topic=f"{k.vectors_topic}-{name}{run}",
        outcomes_topic=f"{k.outcomes_topic}-{name}{run}",
        coupons_topic=f"{k.coupons_topic}-{name}{run}",
        preferences_topic=f"{k.preferences_topic}-{name}{run}")
    worker = dataclasses.replace(settings.worker, app_id=f"{settings.worker.app_id}-{name}",
                                 data_dir=str(tmp_path / f"data-{name}"))
    return dataclasses.replace(settings, kafka=kafka, worker=worker)


def corrupt_copy(checkpoint: Path, where: Path) -> Path:
    shutil.copytree(checkpoint, where)
    weights = where / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    return where


def repoint(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".next")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def start_worker(settings: Settings, checkpoint: Path, log: Path,
                 wait_for: str = "worker ready") -> tuple[PromoProcess, int]:
    port = free_port()
    proc = PromoProcess(["worker"], worker_env(settings, port, checkpoint), log)
    proc.wait_for_log(wait_for, timeout=120)
    return proc, port


@pytest.mark.slow(seconds=120)
def test_a_healthy_worker_is_quiet_and_each_fault_raises_exactly_its_alert(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path],
        prometheus_for: Callable[..., Prometheus]) -> None:
    asyncio.run(ensure_topics(settings.kafka))
    send_coupons(settings, [Coupon("everyday", value=1.0, budget=100_000.0)])
    current = tmp_path / "current"
    current.symlink_to(checkpoints["v1"])
    worker, port = start_worker(settings, current, tmp_path / "worker.log")
    try:
        # --- healthy: real traffic, decisions, coupons; nothing pending, nothing firing
        prom = prometheus_for(port)
        events = list(to_events(load_dataset("instacart")[:3000], id_prefix="healthy",
                                clock=now_ms))
        send_events(settings, events)
        wait_until(lambda: accounted(port) >= len(events), timeout=120, what="the replay")
        quiet_for(prom, 15)
        # Every dashboard panel returns data for a healthy worker (no typo, no unset series).
        import json

        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel.get("targets", []):  # a row has none
                expr = target["expr"].replace("$__rate_interval", "1m")
                assert prom.vector(expr), f"panel {panel['title']!r}: {expr} has no data"
        budget = prom.query('promo_coupon_budget_remaining_ratio{campaign="everyday"}')
        assert budget is not None and 0.99 < budget < 1.0  # some coupons issued, most left

        # --- a campaign's budget spent: its alert fires, for it; retired, the alert ends
        prom = prometheus_for(port)
        send_coupons(settings, [Coupon("tiny", value=1.0, budget=2.0, items=("24852",))])
        wait_until(lambda: prom.query('promo_coupon_budget_remaining_ratio{campaign="tiny"}')
                   == 1.0, timeout=30, what="the new campaign in the budget gauge")
        send_events(settings, [Event(f"tiny-{n}", f"bargain-hunter-{n}", "add_to_cart",
                                     "24852", now_ms()) for n in range(30)])
        exactly(prom, "PromoCouponBudgetNearlySpent[tiny]")
        asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.coupons_topic,
                                [(b"tiny", None)]))
        wait_until(lambda: prom.alerts() == {}, timeout=60, what="the retired campaign's alert "
                   "to end")

        # --- events decided long after they happened: the latency alert
        prom = prometheus_for(port)
        send_events(settings, [Event(f"late-{n}", f"late-{n}", "add_to_cart", "13176",
                                     now_ms() - 30_000) for n in range(200)])
        exactly(prom, "PromoDecisionLatencyHigh")

        # --- triggers, but every triggering user opted out: no decision at all
        prom = prometheus_for(port)
        quiet = {f"quiet-{n}": Preferences(False, False) for n in range(50)}
        send_preferences(settings, quiet)
        stored = sample(scrape(port), "promo_stream_preferences_stored_total")
        wait_until(lambda: sample(scrape(port), "promo_stream_preferences_stored_total")
                   >= stored + len(quiet), timeout=60, what="the opt-outs stored")
        send_events(settings, [Event(f"q-{u}", u, "add_to_cart", "13176", now_ms())
                               for u in quiet])
        exactly(prom, "PromoNoDecisions")

        # --- a producer gone wrong: a flood of malformed records
        prom = prometheus_for(port)
        asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.events_topic,
                                [(b"broken", b"{not json") for _ in range(500)]))
        exactly(prom, "PromoDeadLetterRateHigh")

        # --- a corrupt checkpoint published (a new version, damaged in transit): the old
        # model keeps serving, the alert says why
        prom = prometheus_for(port)
        repoint(current, corrupt_copy(checkpoints["v2"], tmp_path / "corrupt"))
        exactly(prom, "PromoEncoderFailing")

        # --- the worker stuck (SIGSTOP) while events keep coming: lag, not "down"
        prom = prometheus_for(port)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            more = list(to_events(load_dataset("instacart")[3000:25_000], id_prefix="stall",
                                  clock=now_ms))
            producer = threading.Thread(target=send_events, args=(settings, more), daemon=True)
            producer.start()
            exactly(prom, "PromoConsumerLagGrowing")
            producer.join(60)
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        assert prom.query("max(promo_worker_heartbeat_age_seconds)") > 5

        # --- the worker killed: its exporter goes with it, and it is down
        prom = prometheus_for(port)
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(30)
        exactly(prom, "PromoWorkerDown")
    finally:
        worker.stop()


@pytest.mark.slow(seconds=55)
def test_workers_without_a_model_on_another_version_or_not_ready_raise_their_alerts(
        settings: Settings, tmp_path: Path, checkpoints: dict[str, Path],
        prometheus_for: Callable[..., Prometheus]) -> None:
    no_model = other_settings(settings, tmp_path, "nomodel")
    other = other_settings(settings, tmp_path, "other")
    stuck = other_settings(settings, tmp_path, "stuck")
    stuck = dataclasses.replace(stuck, kafka=dataclasses.replace(
        stuck.kafka, bootstrap_servers=f"127.0.0.1:{free_port()}"))
    link = tmp_path / "nomodel-current"
    link.symlink_to(corrupt_copy(checkpoints["v1"], tmp_path / "corrupt"))

    workers: list[PromoProcess] = []
    try:
        w_no_model, p_no_model = start_worker(no_model, link, tmp_path / "nomodel.log")
        workers.append(w_no_model)
        prom = prometheus_for(p_no_model)
        exactly(prom, "PromoModelNotLoaded")
        repoint(link, checkpoints["v2"])  # published again, good this time: no restart
        wait_until(lambda: prom.alerts() == {}, timeout=60, what="the model alert to end")

        w_other, p_other = start_worker(other, checkpoints["v1"], tmp_path / "other.log")
        workers.append(w_other)
        prom = prometheus_for(p_no_model, p_other)  # v2 beside v1
        exactly(prom, "PromoModelVersionMismatch")

        # A worker whose broker cannot be reached (not started, a wrong address): up, it
        # retries, and it is not ready.
        w_stuck, p_stuck = start_worker(stuck, checkpoints["v1"], tmp_path / "stuck.log",
                                        wait_for="cannot reach Kafka")
        workers.append(w_stuck)
        prom = prometheus_for(p_stuck)
        exactly(prom, "PromoWorkerNotReady")
        assert "worker ready" not in w_stuck.log_path.read_text()
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.log_tail()
