"""Alert rules and dashboards, checked with the real promtool (Debian package `prometheus`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream.metrics import EXPORTER_GAUGES, Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "promo-stream.json"
METRIC_NAME = re.compile(r"\bpromo_[a-z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool missing: scripts/bootstrap.sh installs Debian's prometheus package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def exported_names() -> set[str]:
    """Every sample name the worker's registry and its exporter can expose."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                    "_created"], "info": ["_info"], "gauge": [""]}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names | set(EXPORTER_GAUGES)


def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "rules" / "promo.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "tests" / "promo_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_firing_and_quiet_cases() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "promo.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "promo_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts <= fires, f"never seen firing: {alerts - fires}"
    assert alerts <= quiet, f"never seen quiet: {alerts - quiet}"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_expressions_only_use_metrics_the_worker_exports(source: str) -> None:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "promo.yml").read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    if source == "rules":
        exprs = [r["expr"] for g in groups for r in g["rules"]]
    else:
        panels = json.loads(DASHBOARD.read_text())["panels"]
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]  # a row has none
    assert exprs
    known = exported_names()
    # Series our own recording rules make (level:metric:operation) are known by definition.
    exprs = [re.sub("|".join(re.escape(r) for r in recorded), "", e) for e in exprs]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no promo metrics referenced"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


def test_dashboard_covers_what_sres_asked_for() -> None:
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
                     for t in p.get("targets", []))  # a row has none
    for metric in ("promo_stream_events_consumed_total", "promo_decisions_published_total",
                   "promo_decision_latency_seconds_bucket", "promo_stream_consumer_lag_records",
                   "promo_stream_records_rejected_total", "promo_encoder_inference_seconds",
                   "promo_state_record_bytes", "promo_encoder_model_info",
                   "campaign:promo_uplift_lift_upper:ratio", "promo_uplift_conversions",
                   "promo_outcomes_total"):
        assert metric in exprs, f"dashboard lacks {metric}"


def test_the_promtool_cases_are_generated_from_the_current_rules() -> None:
    script = PROMETHEUS / "tests" / "make_promo_test.py"
    done = subprocess.run([sys.executable, str(script), "--check"], check=False, timeout=60)
    assert done.returncode == 0, f"stale promo_test.yml: run {script.name}"
