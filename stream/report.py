"""`promo report`: watch a worker's /metrics for a while and draw what happened, as a PNG;
`promo report uplift`: the lift of each campaign over the holdout, as text, JSON or a PNG.

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
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from stream.uplift import Interval, Lift

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


# --- `promo report uplift` ---------------------------------------------------------------------

def _points(value: float) -> str:
    return f"{value * 100:+.2f}"


def _span(interval: Interval, scale: float = 100.0, digits: int = 2) -> str:
    return f"[{interval.low * scale:+.{digits}f}, {interval.high * scale:+.{digits}f}]"


def uplift_table(rows: Sequence[tuple[str, Lift]], alpha: float) -> str:
    """The report as text: one block per campaign, the always-valid interval first."""
    level = f"{(1 - alpha) * 100:g}%"
    lines = [f"Conversion within the attribution window, treatment vs holdout; {level} "
             "intervals are always valid (read them as often as you like). The fixed-horizon "
             "interval is shown only for comparison: it is valid for one look at a sample "
             "size fixed in advance.", ""]
    for label, row in rows:
        t, h = row.treatment, row.holdout
        lines.append(f"{label}")
        lines.append(f"  decisions      treatment {t.decisions:>9,}   holdout {h.decisions:>9,}"
                     f"   (evicted windows: {t.evicted + h.evicted:,})")
        lines.append(f"  conv. rate     treatment {row.treatment_rate:9.2%} "
                     f"{_span(row.treatment_interval, digits=1)}   holdout "
                     f"{row.holdout_rate:9.2%} {_span(row.holdout_interval, digits=1)}")
        lines.append(f"  lift (points)  {_points(row.lift)} {_span(row.lift_interval)}  -> "
                     f"{row.verdict}   [fixed horizon, extra: {_span(row.lift_interval_fixed)}]")
        relative = ("n/a" if math.isinf(row.relative_lift)
                    else f"{row.relative_lift:+.1%}")
        lines.append(f"  relative lift  {relative} "
                     f"{_span(row.relative_interval, digits=1)}%")
        lines.append(f"  incremental    {row.incremental_conversions:+,.1f} conversions "
                     f"{_span(row.incremental_interval, scale=1.0, digits=1)}")
        if row.incremental_revenue is not None and row.revenue_interval is not None:
            lines.append(f"                 {row.incremental_revenue:+,.2f} revenue "
                         f"{_span(row.revenue_interval, scale=1.0)}")
        if row.cost:
            per = ("n/a (no increment yet)" if row.cost_per_incremental_conversion is None
                   else f"{row.cost_per_incremental_conversion:,.2f}")
            lines.append(f"  coupon cost    {row.cost:,.2f} redeemed; per incremental "
                         f"conversion {per}")
        lines.append("")
    return "\n".join(lines)


def render_uplift(rows: Sequence[tuple[str, Lift]], out: Path, alpha: float) -> None:
    """Conversion rate per arm and the lift, with their intervals, one row per campaign."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in rows]
    y = list(range(len(rows)))
    fig, (rates, lifts) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.6 * len(rows)), sharey=True)
    for offset, arm, color in ((-0.15, "treatment", "tab:blue"), (0.15, "holdout", "tab:gray")):
        values = [getattr(r, f"{arm}_rate") * 100 for _, r in rows]
        spans = [getattr(r, f"{arm}_interval") for _, r in rows]
        rates.errorbar(values, [v + offset for v in y],
                       xerr=[[v - s.low * 100 for v, s in zip(values, spans, strict=True)],
                             [s.high * 100 - v for v, s in zip(values, spans, strict=True)]],
                       fmt="o", color=color, label=arm, capsize=3)
    rates.set_xlabel("conversion rate (%)")
    rates.legend(fontsize=8)
    values = [r.lift * 100 for _, r in rows]
    for offset, name, color, style in ((-0.1, "lift_interval", "tab:green", "always valid"),
                                       (0.1, "lift_interval_fixed", "tab:orange",
                                        "fixed horizon (extra)")):
        spans = [getattr(r, name) for _, r in rows]
        lifts.errorbar(values, [v + offset for v in y],
                       xerr=[[max(0.0, v - s.low * 100) for v, s in zip(values, spans,
                                                                          strict=True)],
                             [max(0.0, s.high * 100 - v) for v, s in zip(values, spans,
                                                                          strict=True)]],
                       fmt="o", color=color, label=style, capsize=3)
    lifts.axvline(0, color="black", linewidth=0.8)
    lifts.set_xlabel("lift (conversion-rate points)")
    lifts.legend(fontsize=8)
    rates.set_yticks(y, labels)
    rates.invert_yaxis()
    fig.suptitle(f"promo-stream lift vs holdout ({(1 - alpha) * 100:g}% intervals)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
