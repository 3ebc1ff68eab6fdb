"""The report: a summary per policy, exposure and activity fairness, the table `promo simulate`
prints and its figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stream.contracts import Coupon
from stream.offline.config import POLICIES
from stream.offline.judge import BINDING_CODES, PolicyResult


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def policy_summary(r: PolicyResult, holdout_rate: float) -> dict[str, Any]:
    # Rounded: ours and the holdout hit equally offline, and float noise is not a purchase.
    incremental = round(r.hits - holdout_rate * r.decisions, 6)
    return {
        "hit_rate": round(r.hit_rate, 4), "decisions": r.decisions, "hits": r.hits,
        "new_item_hit_rate": round(r.new_item_hits / r.decisions, 4) if r.decisions else 0.0,
        "coupons": r.coupons, "pushes": r.pushes, "coupon_hits": r.coupon_hits,
        "coupon_cost": round(r.coupon_cost, 2), "coupon_granted": round(r.coupon_granted, 2),
        "incremental_purchases": round(incremental, 2),
        "cost_per_incremental_purchase": (round(r.coupon_cost / incremental, 3)
                                          if incremental > 0 else None),
        "binding": {code: r.binding[code] for code in BINDING_CODES if r.binding[code]},
        "bound": r.bound, "bound_rate": round(r.bound / r.moments, 4) if r.moments else 0.0,
    }


def fairness(results: Mapping[str, PolicyResult],
             catalog: Sequence[Coupon]) -> dict[str, Any]:
    """Exposure per coupon (against its cap and budget) and decision rates by activity."""
    out: dict[str, Any] = {}
    for name in ("ours", "random", "popularity", "repeat", "ours_without_propensity_gate"):
        r = results[name]
        counts = [r.exposures[c.coupon_id] for c in catalog]
        out[name] = {
            "coupon_exposure": {c.coupon_id: {
                "issued": r.exposures[c.coupon_id], "cap": c.max_exposures or None,
                "spent": round(r.spent.get(c.coupon_id, 0.0), 2), "budget": c.budget}
                for c in catalog},
            "exposure_max_over_mean": (round(max(counts) / (sum(counts) / len(counts)), 3)
                                       if counts and sum(counts) else None),
            "decision_rate_by_activity": {
                bucket: {"moments": m, "decisions": d,
                         "rate": round(d / m, 4) if m else None}
                for bucket, (m, d) in r.by_activity.items()},
        }
    return out


def report_png(report: Mapping[str, Any]) -> bytes:
    """Hit rate per policy, the propensity reliability diagram, and coupons per campaign."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hits, ax_cal, ax_exp) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [n for n in POLICIES if n in report["policies"]]
    rates = [report["policies"][n]["hit_rate"] for n in names]
    ax_hits.bar(range(len(names)), rates, color="tab:blue")
    ax_hits.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax_hits.set(ylabel=f"hit rate (next {report['horizon_events']} events)",
                title="hit rate per policy")
    prop = report["propensity"]
    ax_cal.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for key, label in (("bins_raw", "raw"), ("bins_calibrated", "Platt-calibrated")):
        bins = prop.get(key, [])
        ax_cal.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o",
                    label=f"{label} (Brier {prop.get('brier_' + key[5:], float('nan')):.3f})")
    ax_cal.set(xlabel="predicted propensity", ylabel="observed conversion rate",
               title="propensity reliability (held out)", xlim=(0, 1), ylim=(0, 1.02))
    ax_cal.legend(fontsize=8)
    shown = [("ours", "tab:green"), ("ours_without_propensity_gate", "tab:olive")]
    ids = [c["coupon_id"] for c in report["catalog"]]
    width = 0.8 / len(shown)
    for k, (name, color) in enumerate(shown):
        exposure = report["fairness"].get(name, {}).get("coupon_exposure", {})
        ax_exp.bar([i + (k - 0.5) * width for i in range(len(ids))],
                   [exposure.get(c, {}).get("issued", 0) for c in ids], width, color=color,
                   label=name.replace("_", " "))
    caps = [(i, c["max_exposures"]) for i, c in enumerate(report["catalog"])
            if c["max_exposures"]]
    if caps:
        ax_exp.scatter([i for i, _ in caps], [cap for _, cap in caps], color="red", marker="_",
                       s=400, label="exposure cap")
    ax_exp.set_xticks(range(len(ids)), ids, rotation=45, fontsize=7)
    ax_exp.set(title="coupons issued per campaign")
    ax_exp.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The table `promo simulate` prints (and the README shows)."""
    lines = [f"{'policy':<30} {'decisions':>9} {'hit rate':>9} {'new items':>9} "
             f"{'coupons':>8} {'coupon cost':>11} {'cost/incr.':>10} {'caps+budgets bound':>18}"]
    for name, p in report["policies"].items():
        per = p["cost_per_incremental_purchase"]
        lines.append(f"{name:<30} {p['decisions']:>9} {p['hit_rate']:>9.4f} "
                     f"{p['new_item_hit_rate']:>9.4f} {p['coupons']:>8} "
                     f"{p['coupon_cost']:>11.2f} {'-' if per is None else f'{per:.2f}':>10} "
                     f"{p['bound']:>18}")
    ratios = report["ratios"]
    lines.append(f"ours/random {ratios['ours_over_random']}  "
                 f"ours/popularity {ratios['ours_over_popularity']}  "
                 f"ours/repeat {ratios['ours_over_repeat']}  "
                 f"budget exceeded: {report['budget_exceeded']}")
    tuning = report["repeat_weight"]
    if "validation_hit_rate" in tuning:
        lines.append(f"push_repeat_weight {tuning['chosen']:g} chosen on "
                     f"{tuning['validation_moments']} validation moments before the cut "
                     f"(hit rate by weight: {tuning['validation_hit_rate']}); configured "
                     f"{tuning['configured']:g}")
    prop = report["propensity"]
    if "brier_raw" in prop:
        lines.append(f"propensity Brier (held out): raw {prop['brier_raw']:.4f}, calibrated "
                     f"{prop['brier_calibrated']:.4f}, base rate {prop['brier_base_rate']:.4f}; "
                     f"without the gate, {prop['gate']['without_gate_to_likely_buyers']} "
                     f"coupons ({prop['gate']['without_gate_likely_buyers_discount']:.2f}) "
                     "go to likely buyers")
    return lines
