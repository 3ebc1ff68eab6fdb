"""`promo report`: watch a worker's /metrics for a while and draw what happened, as a PNG.

For people who would rather look than read: throughput by event type, decisions by action,
event-time -> decision latency percentiles, consumer lag, each campaign's remaining budget and
the worker's heartbeat age, over the run. Samples are kept
as JSON too, so a run can be re-drawn (``--from-json``) or compared later.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Sample = dict[str, float]  # "name{label=value,...}" -> value


def scrape_once(url: str) -> Sample:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    sample: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            sample[f"{s.name}{{{labels}}}"] = s.value
    return sample


def record(url: str, duration: float, interval: float,
           on_sample: Callable[[int], None] | None = None) -> list[tuple[float, Sample]]:
    """Scrape ``url`` every ``interval`` seconds for ``duration`` seconds.

    If the worker goes away mid-run (exactly when someone wants the chart), the samples taken
    so far are returned; an ``OSError`` is raised only if not even the first scrape worked.
    """
    samples: list[tuple[float, Sample]] = []
    start = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            samples.append((now - start, scrape_once(url)))
        except OSError:
            if not samples:
                raise
            return samples
        if on_sample:
            on_sample(len(samples))
        if now - start >= duration:
            return samples
        time.sleep(max(0.0, interval - (time.monotonic() - now)))


def _series(samples: Sequence[tuple[float, Sample]], prefix: str) -> dict[str, list[float]]:
    """Values of every sample whose key starts with ``prefix``, by label string."""
    keys = sorted({k for _, s in samples for k in s if k.startswith(prefix + "{")})
    return {k[len(prefix) + 1:-1]: [s.get(k, math.nan) for _, s in samples] for k in keys}


def _rates(times: Sequence[float], values: Sequence[float]) -> list[float]:
    return [(values[i] - values[i - 1]) / (times[i] - times[i - 1]) if times[i] > times[i - 1]
            else 0.0 for i in range(1, len(values))]


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's estimate: linear interpolation within the bucket holding the quantile."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width
                                                          if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def latency_quantiles(samples: Sequence[tuple[float, Sample]], q: float,
                      name: str = "promo_decision_latency_seconds") -> list[float]:
    """Quantile of the observations made between consecutive samples."""
    per_le = _series(samples, f"{name}_bucket")
    bounds = {float(k.split("le=")[1].split(",")[0]): v for k, v in per_le.items()}
    out = []
    for i in range(1, len(samples)):
        delta = {b: values[i] - values[i - 1] for b, values in bounds.items()}
        out.append(histogram_quantile(q, delta) if delta else math.nan)
    return out


def render(samples: Sequence[tuple[float, Sample]], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for t, _ in samples]
    mid = times[1:]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    panels: list[tuple[str, str, str]] = [
        ("promo_stream_events_consumed_total", "events consumed / s", "type="),
        ("promo_decisions_published_total", "decisions published / s", ""),
    ]
    for ax, (metric, label, strip) in zip(axes[0], panels, strict=True):
        for labels, values in _series(samples, metric).items():
            rates = _rates(times, values)
            if any(r > 0 for r in rates):
                ax.plot(mid, rates, label=labels.replace(strip, "") or "all")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[1][0]
    for q in (0.5, 0.95, 0.99):
        ax.plot(mid, latency_quantiles(samples, q), label=f"p{int(q * 100)}")
    ax.set_ylabel("event time -> decision (s)")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1][1]
    gauges = [("promo_stream_consumer_lag_records", axes[1][1], "consumer lag (records)"),
              ("promo_coupon_budget_remaining_ratio", axes[2][0],
               "coupon budget left (share)"),
              ("promo_worker_heartbeat_age_seconds", axes[2][1], "worker heartbeat age (s)")]
    for metric, ax, label in gauges:
        for labels, values in _series(samples, metric).items():
            ax.plot(times, values, label=labels.replace("campaign=", "") or "worker")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[2]:
        ax.set_xlabel("seconds since the report started")
    fig.suptitle(title or "promo-stream worker")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def save(samples: Sequence[tuple[float, Sample]], path: Path) -> None:
    path.write_text(json.dumps([{"t": t, "metrics": s} for t, s in samples]) + "\n")


def load(path: Path) -> list[tuple[float, Sample]]:
    return [(float(row["t"]), dict(row["metrics"])) for row in json.loads(path.read_text())]
