"""Writes promo_test.yml, the `promtool test rules` cases of ../rules/promo.yml.

    .venv/bin/python deploy/prometheus/tests/make_promo_test.py          # rewrite the file
    .venv/bin/python deploy/prometheus/tests/make_promo_test.py --check  # exit 1 if stale

The cases (series, times, expected labels and values) are written here; the expected
annotations are the rules' own texts with those labels and values filled in, so a reworded
runbook line needs no second edit. tests/deploy/test_prometheus.py checks the file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "rules" / "promo.yml"
OUT = HERE / "promo_test.yml"

Case = dict[str, Any]


def _rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]
            if "alert" in rule}


def _firing(alert: str, labels: dict[str, str], at: str, **filled: str) -> Case:
    """``alert`` firing at ``at`` with ``labels``; ``filled`` maps each template in its
    annotations (``{{ $labels.instance }}``) to the text it must render as."""
    annotations = {}
    for key, text in _rules()[alert]["annotations"].items():
        for template, value in filled.items():
            text = text.replace(template, value)
        assert "{{" not in text, f"{alert}.{key}: fill in {text!r}"
        annotations[key] = text
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]}


def _quiet(alert: str, at: str) -> Case:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def _case(name: str, interval: str, series: dict[str, str], checks: list[Case]) -> Case:
    return {"name": name, "interval": interval,
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": checks}


INSTANCE, VALUE = "{{ $labels.instance }}", "{{ $value }}"
PERCENT, DURATION = "{{ $value | humanizePercentage }}", "{{ $value | humanizeDuration }}"


def cases() -> list[Case]:
    return [
        _case("worker down fires after a minute, not for a blip", "30s", {
            'up{job="promo-worker", instance="w1:9464"}': "1 1 0 0 0 0",
            'up{job="promo-worker", instance="w2:9464"}': "1 1 1 0 1 1"}, [
            _quiet("PromoWorkerDown", "1m"),
            _firing("PromoWorkerDown", {"severity": "critical", "job": "promo-worker",
                                        "instance": "w1:9464"}, "2m30s",
                    **{INSTANCE: "w1:9464"})]),
        _case("not ready fires only when it lasts over five minutes", "1m", {
            'promo_worker_ready{instance="w1"}': "0 0 0 0 0 0 0 0",
            'promo_worker_ready{instance="w2"}': "0 0 1 1 1 1 1 1"}, [
            _quiet("PromoWorkerNotReady", "3m"),
            _firing("PromoWorkerNotReady", {"severity": "warning", "instance": "w1"}, "7m",
                    **{INSTANCE: "w1"})]),
        _case("lag fires when high and growing, not when high and draining", "1m", {
            'promo_stream_consumer_lag_records{instance="grow", partition="0"}': "20000+1000x30",
            'promo_stream_consumer_lag_records{instance="drain", partition="0"}': "50000-1000x30",
            'promo_stream_consumer_lag_records{instance="small", partition="0"}': "100+10x30"}, [
            _quiet("PromoConsumerLagGrowing", "5m"),
            _firing("PromoConsumerLagGrowing", {"severity": "warning", "instance": "grow"},
                    "25m", **{INSTANCE: "grow", VALUE: "45000"})]),
        _case("dead-letter rate above 5% fires", "1m", {
            'promo_stream_records_rejected_total{reason="not_json"}': "0+10x30",
            'promo_stream_events_consumed_total{type="view"}': "0+90x30"}, [
            _firing("PromoDeadLetterRateHigh", {"severity": "warning"}, "25m",
                    **{PERCENT: "10%"})]),
        _case("dead-letter rate of 1% stays quiet", "1m", {
            'promo_stream_records_rejected_total{reason="not_json"}': "0+1x30",
            'promo_stream_events_consumed_total{type="view"}': "0+99x30"}, [
            _quiet("PromoDeadLetterRateHigh", "25m")]),
        _case("pull API answering 10% server errors fires", "1m", {
            'promo_api_requests_total{endpoint="offers",status="200"}': "0+90x30",
            'promo_api_requests_total{endpoint="offers",status="503"}': "0+10x30"}, [
            _firing("PromoApiErrorsHigh", {"severity": "warning"}, "25m",
                    **{PERCENT: "10%"})]),
        _case("pull API client errors (401, 400) stay quiet", "1m", {
            'promo_api_requests_total{endpoint="offers",status="200"}': "0+50x30",
            'promo_api_requests_total{endpoint="offers",status="401"}': "0+50x30"}, [
            _quiet("PromoApiErrorsHigh", "25m")]),
        # 100 decisions a minute: 90 within 0.5 s, the other 10 between 5 and 10 s.
        _case("p99 latency over five seconds fires", "1m", {
            'promo_decision_latency_seconds_bucket{le="0.5"}': "0+90x30",
            'promo_decision_latency_seconds_bucket{le="5.0"}': "0+90x30",
            'promo_decision_latency_seconds_bucket{le="10.0"}': "0+100x30",
            'promo_decision_latency_seconds_bucket{le="+Inf"}': "0+100x30"}, [
            _firing("PromoDecisionLatencyHigh", {"severity": "warning"}, "25m",
                    **{DURATION: "9.5s"})]),
        _case("p99 latency within a second stays quiet", "1m", {
            'promo_decision_latency_seconds_bucket{le="0.5"}': "0+99x30",
            'promo_decision_latency_seconds_bucket{le="1.0"}': "0+100x30",
            'promo_decision_latency_seconds_bucket{le="+Inf"}': "0+100x30"}, [
            _quiet("PromoDecisionLatencyHigh", "25m")]),
        _case("triggers without decisions fire", "1m", {
            'promo_decisions_triggers_total{kind="cart_add"}': "0+60x40",
            'promo_decisions_published_total{action="push",arm="treatment"}': "0x40"}, [
            _firing("PromoNoDecisions", {"severity": "critical"}, "30m")]),
        _case("decisions flowing keep no-decisions quiet", "1m", {
            'promo_decisions_triggers_total{kind="cart_add"}': "0+60x40",
            'promo_decisions_published_total{action="push",arm="treatment"}': "0+5x40"}, [
            _quiet("PromoNoDecisions", "30m")]),
        _case("views only, no triggers: no-decisions stays quiet", "1m", {
            'promo_decisions_triggers_total{kind="cart_add"}': "0x40",
            'promo_decisions_published_total{action="push",arm="treatment"}': "0x40",
            'promo_stream_events_consumed_total{type="view"}': "0+600x40"}, [
            _quiet("PromoNoDecisions", "30m")]),
        _case("a campaign nearly spent on one worker fires for that campaign only", "1m", {
            'promo_coupon_budget_remaining_ratio{instance="w1",campaign="spring"}':
                "0.5 0.3 0.08 0.05 0.05 0.05 0.05 0.05 0.05 0.05",
            'promo_coupon_budget_remaining_ratio{instance="w2",campaign="spring"}': "0.9x9",
            'promo_coupon_budget_remaining_ratio{instance="w1",campaign="fall"}': "0.9x9"}, [
            _quiet("PromoCouponBudgetNearlySpent", "3m"),
            _firing("PromoCouponBudgetNearlySpent", {"severity": "info", "campaign": "spring"},
                    "9m", **{"{{ $labels.campaign }}": "spring", PERCENT: "5%"})]),
        _case("two model versions for 15 minutes fire; a quick rollout does not", "1m", {
            'promo_encoder_model_info{instance="w1",version="aaa"}': "1x30",
            'promo_encoder_model_info{instance="w2",version="aaa"}': "1 1 1 _x27",
            'promo_encoder_model_info{instance="w2",version="bbb"}': "_ _ _ 1x27"}, [
            _quiet("PromoModelVersionMismatch", "10m"),
            _firing("PromoModelVersionMismatch", {"severity": "warning"}, "20m",
                    **{VALUE: "2"})]),
        _case("encoder failures fire; none stay quiet", "1m", {
            'promo_encoder_failures_total{stage="inference"}': "0 0 1 2 3 4 5 6 7 8 9 10"}, [
            _quiet("PromoEncoderFailing", "1m"),
            _firing("PromoEncoderFailing", {"severity": "warning"}, "10m")]),
        _case("a ready worker without a model fires; one that loads one, or is not ready, "
              "does not", "1m", {
            'promo_encoder_model_loaded{instance="w1"}': "0x7",
            'promo_worker_ready{instance="w1"}': "1x7",
            'promo_encoder_model_loaded{instance="w2"}': "0 0 1 1 1 1 1 1",
            'promo_worker_ready{instance="w2"}': "1x7",
            'promo_encoder_model_loaded{instance="w3"}': "0x7",
            'promo_worker_ready{instance="w3"}': "0x7"}, [
            _quiet("PromoModelNotLoaded", "3m"),
            _firing("PromoModelNotLoaded", {"severity": "warning", "instance": "w1"}, "7m",
                    **{INSTANCE: "w1"})]),
        _case("a campaign clearly worse than its holdout fires; an unclear one and a good "
              "one do not", "1m", {
            # hurts: 20% vs 30% over 20,000 + 2,000 decisions, summed over two workers
            'promo_uplift_decisions{instance="w1", campaign="hurts", arm="treatment"}':
                "10000x30",
            'promo_uplift_conversions{instance="w1", campaign="hurts", arm="treatment"}':
                "2000x30",
            'promo_uplift_decisions{instance="w2", campaign="hurts", arm="treatment"}':
                "10000x30",
            'promo_uplift_conversions{instance="w2", campaign="hurts", arm="treatment"}':
                "2000x30",
            'promo_uplift_decisions{instance="w1", campaign="hurts", arm="holdout"}':
                "2000x30",
            'promo_uplift_conversions{instance="w1", campaign="hurts", arm="holdout"}':
                "600x30",
            # unclear: the same rates on 100 + 10 decisions
            'promo_uplift_decisions{instance="w1", campaign="unclear", arm="treatment"}':
                "100x30",
            'promo_uplift_conversions{instance="w1", campaign="unclear", arm="treatment"}':
                "20x30",
            'promo_uplift_decisions{instance="w1", campaign="unclear", arm="holdout"}':
                "10x30",
            'promo_uplift_conversions{instance="w1", campaign="unclear", arm="holdout"}':
                "3x30",
            # helps: 30% vs 20%
            'promo_uplift_decisions{instance="w1", campaign="helps", arm="treatment"}':
                "20000x30",
            'promo_uplift_conversions{instance="w1", campaign="helps", arm="treatment"}':
                "6000x30",
            'promo_uplift_decisions{instance="w1", campaign="helps", arm="holdout"}':
                "2000x30",
            'promo_uplift_conversions{instance="w1", campaign="helps", arm="holdout"}':
                "400x30"}, [
            _quiet("PromoCampaignHurtsConversion", "10m"),
            _firing("PromoCampaignHurtsConversion", {"severity": "warning",
                                                     "campaign": "hurts"}, "20m",
                    **{"{{ $labels.campaign }}": "hurts",
                       PERCENT: _percent(_hurts_upper_bound())})]),
    ]


def _hurts_upper_bound() -> float:
    """The guardrail's bound for the "hurts" case, by stream/uplift.py's own code."""
    from stream.outcomes import ArmTally, Tally
    from stream.uplift import lift

    return lift(Tally(ArmTally(decisions=20_000, converted=4_000),
                      ArmTally(decisions=2_000, converted=600))).lift_interval.high


def _percent(value: float) -> str:
    """Prometheus's humanizePercentage: the value x 100 with 4 significant digits."""
    return f"{value * 100:.4g}%"


def render() -> str:
    doc = {"rule_files": ["../rules/promo.yml"], "evaluation_interval": "1m",
           "tests": cases()}
    body: str = yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
    return ("# Generated by make_promo_test.py (edit that, then run it); promtool test rules "
            "this file.\n" + body)


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)


if __name__ == "__main__":
    main()
