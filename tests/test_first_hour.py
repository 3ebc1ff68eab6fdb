"""A new user's first hour, as they meet it: the `promo` command in a shell. Every mistake a
user can make is one line on stderr that says what to do, a non-zero exit, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from deploy.kafka.launcher import free_port
from tests.support import PROMO, PromoProcess, settings_env, wait_until


def promo(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    return subprocess.run([PROMO, *args], env=base | (env or {}), capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=cwd)


def one_clear_line(done: subprocess.CompletedProcess[str], *says: str) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for text in says:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(("args", "env", "says"), [
    (["config"], {"PROMO_POLICY_HOLDOUT_PERCENT": "150"}, ["holdout_percent", "100"]),
    (["config"], {"PROMO_POLICY_QUIET_START_HOUR": "25"}, ["quiet_start_hour"]),
    (["config"], {"PROMO_KAFKA_PARTITIONS": "-1"}, ["partitions"]),
    (["config"], {"PROMO_WORKER_LOG_FORMAT": "xml"}, ["log_format", "'text' or 'json'"]),
    (["config"], {"PROMO_WORKER_PROCESSING_GUARANTEE": "exactly-once"}, ["exactly_once"]),
    (["--log-level", "loud", "config"], {}, ["loud", "debug"]),
    (["replay", "instacart", "--limit", "-2"], {}, ["-2", "1"]),
    (["replay", "instacart", "--limit", "10", "--bootstrap-servers", "127.0.0.1:1"], {},
     ["cannot reach Kafka", "promo broker start"]),
    (["train", "--interactions", "/no/such.csv", "--out", "/tmp/x"], {}, ["/no/such.csv"]),
])
def test_a_mistake_is_one_clear_line(args: list[str], env: dict[str, str],
                                     says: list[str]) -> None:
    one_clear_line(promo(*args, env=env), *says)


def test_debug_shows_the_traceback_instead() -> None:
    done = promo("--debug", "replay", "instacart", "--limit", "10", "--bootstrap-servers",
                 "127.0.0.1:1")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_a_worker_without_a_broker_retries_and_starts_when_it_appears(
        tmp_path: Path, kafka_cluster) -> None:
    # The broker is not there yet: the worker says so once per attempt and keeps trying.
    from deploy.kafka import launcher

    port = free_port()
    metrics = free_port()
    env = {"PROMO_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "PROMO_WORKER_DATA_DIR": str(tmp_path / "worker"),
           "PROMO_WORKER_METRICS_PORT": str(metrics), "PROMO_WORKER_APP_ID": "late-broker"}
    worker = PromoProcess(["worker"], {k: v for k, v in os.environ.items()
                                       if not k.startswith("PROMO_")} | env,
                          tmp_path / "worker.log")
    try:
        worker.wait_for_log("cannot reach Kafka", timeout=60)
        worker.wait_for_log("attempt 2", timeout=60)
        assert worker.alive()
        assert "Traceback" not in worker.log_path.read_text()
        cluster = launcher.start(tmp_path / "broker", nodes=1, broker_port=port)
        try:
            worker.wait_for_log("worker ready", timeout=120)
        finally:
            assert worker.stop() == 0, worker.log_tail()
            launcher.stop(tmp_path / "broker")
        assert cluster.bootstrap_servers.endswith(str(port))
    finally:
        worker.stop()


def test_a_second_worker_on_a_taken_metrics_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = promo("worker", env={"PROMO_WORKER_METRICS_PORT": str(port),
                                    "PROMO_WORKER_DATA_DIR": str(tmp_path / "w"),
                                    "PROMO_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
                     timeout=60)
    one_clear_line(done, f"127.0.0.1:{port}", "worker.metrics_port")


def test_broker_start_on_a_taken_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # if someone holds 9092 already: the same case
            taken.bind(("127.0.0.1", 9092))
        done = promo("broker", "start", "--data-dir", str(tmp_path / "b"))
    one_clear_line(done, "9092 is in use", "--port")


@pytest.mark.kafka
def test_campaigns_and_consent_from_files(settings, tmp_path: Path) -> None:
    env = {k: v for k, v in settings_env(settings).items() if k.startswith("PROMO_")}
    campaigns = tmp_path / "campaigns.json"
    campaigns.write_text(json.dumps([
        {"coupon_id": "spring-10", "value": 10.0, "budget": 500.0,
         "valid_from": "2026-03-01T00:00:00Z", "valid_to": 4102444800000, "items": ["sku-1"]},
        {"coupon_id": "any-2", "value": 2.0, "budget": 100.0}]))
    done = promo("coupons", "publish", str(campaigns), env=env)
    assert done.returncode == 0, done.stderr
    listed = promo("coupons", "list", "--json", env=env)
    rows = {json.loads(line)["coupon_id"]: json.loads(line) for line in listed.stdout.split()}
    assert set(rows) == {"spring-10", "any-2"}
    assert rows["spring-10"]["valid_from"] == 1_772_323_200_000  # epoch milliseconds
    done = promo("coupons", "retire", "any-2", env=env)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "any-2" not in promo("coupons", "list", env=env).stdout, timeout=30)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"coupon_id": "ok", "value": 1, "budget": 10}\n'
                   '{"coupon_id": "typo", "value": 1, "budget": 10, "valid_untill": 5}\n')
    one_clear_line(promo("coupons", "publish", str(bad), env=env), "bad.jsonl:2",
                   "valid_untill")
    assert "ok" not in promo("coupons", "list", env=env).stdout  # all or nothing
    for body, rule in [({"value": 0, "budget": 10}, "value must be above 0"),
                       ({"value": 5, "budget": 1}, "below one coupon's value"),
                       ({"value": 1, "budget": 10, "valid_to": 1_700_000_000},
                        "epoch seconds"),
                       ({"value": 1, "budget": 10, "valid_from": 1_800_000_000_000,
                         "valid_to": 1_700_000_000_000}, "after valid_from")]:
        bad.write_text(json.dumps({"coupon_id": "x"} | body) + "\n")
        one_clear_line(promo("coupons", "publish", str(bad), env=env), rule)

    consent = tmp_path / "consent.csv"
    consent.write_text("user_id,push_opt_in,coupon_opt_in,timezone\n"
                       "u1,false,true,Europe/Berlin\nu2,,no,\n")
    done = promo("preferences", "publish", str(consent), env=env)
    assert done.returncode == 0 and "published 2" in done.stdout, done.stderr
    consent.write_text("user_id,push_opt_in,coupon_opt_in,timezone\nu3,maybe,,\n")
    one_clear_line(promo("preferences", "publish", str(consent), env=env), "consent.csv:2",
                   "maybe")
    as_lines = tmp_path / "consent.jsonl"
    as_lines.write_text('{"user_id": "u4", "timezone": "Mars/Olympus"}\n')
    one_clear_line(promo("preferences", "publish", str(as_lines), env=env),
                   "not an IANA time zone")
