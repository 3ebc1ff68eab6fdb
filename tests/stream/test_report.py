"""`promo report`: quantiles computed like Prometheus, and a chart drawn from samples."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest

from stream.report import histogram_quantile, latency_quantiles, load, record, render, save


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    buckets = {0.5: 90.0, 1.0: 95.0, 5.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5 * 50 / 90)
    assert histogram_quantile(0.99, buckets) == pytest.approx(1.0 + 4.0 * (99 - 95) / 5)
    assert math.isnan(histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}))


def test_a_report_is_drawn_from_scraped_samples(tmp_path: Path) -> None:
    def sample(n: int) -> dict[str, float]:
        return {
            'promo_stream_events_consumed_total{type=view}': 100.0 * n,
            'promo_decisions_published_total{action=push,arm=treatment}': 10.0 * n,
            'promo_decision_latency_seconds_bucket{le=0.5}': 9.0 * n,
            'promo_decision_latency_seconds_bucket{le=1.0}': 10.0 * n,
            'promo_decision_latency_seconds_bucket{le=+Inf}': 10.0 * n,
            'promo_stream_consumer_lag_records{partition=0}': 5.0,
            'promo_coupon_budget_remaining_ratio{campaign=spring}': 1.0 - 0.1 * n,
            'promo_worker_heartbeat_age_seconds{}': 0.4,
        }

    samples = [(float(t), sample(t)) for t in range(5)]
    p50 = latency_quantiles(samples, 0.5)
    assert p50 == pytest.approx([0.5 * 5 / 9] * 4)
    save(samples, tmp_path / "samples.json")
    assert load(tmp_path / "samples.json") == samples
    render(samples, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_worker_that_goes_away_leaves_the_samples_taken_so_far(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    served = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(1)
            body = f"promo_stream_events_consumed_total{{type=\"view\"}} {len(served)}\n"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop_after_three(n: int) -> None:
        if n == 3:
            server.shutdown()
            server.server_close()

    samples = record(url, duration=30, interval=0.05, on_sample=stop_after_three)
    assert len(samples) == 3
    assert [s['promo_stream_events_consumed_total{type=view}'] for _, s in samples] == [1, 2, 3]
    with pytest.raises(urllib.error.URLError, match="refused"):  # nothing to draw: said
        record(url, duration=1, interval=0.05)
