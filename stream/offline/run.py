"""The whole simulation: the encoder trained before the cut, the repeat weight chosen before the
cut, and every policy run over the replayed part.

``ours`` ranks pushes by the encoder's score plus ``push_repeat_weight * log(1 + n)`` for an item
seen n times in the user's recent events. The weight is chosen on the data before the cut
(unless ``tune_repeat_weight`` is off, which judges the configured one): the last eighth of the
events before the cut is replayed as a validation period, with state warmed on the rest, and
the weight with the best push hit rate there is used after the cut (the report gives the
validation table; put the chosen value in ``policy.push_repeat_weight``). The encoder has seen
the validation period in training, so that choice leans toward trusting the encoder.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encoder.config import EncoderConfig, TrainConfig
from encoder.data import Interaction
from stream.contracts import Coupon
from stream.offline.baselines import BaselineItems, popularity_scores
from stream.offline.calibration import propensity_report
from stream.offline.config import SimulationConfig
from stream.offline.judge import PolicyResult, activity_buckets, run_policy
from stream.offline.moments import (
    collect_moments,
    conversion_types,
    generated_catalog,
    time_split,
    user_vectors,
)
from stream.offline.report import fairness, policy_summary, ratio
from stream.policy import ServingModel


def simulate(rows: Sequence[Interaction], encoder: ServingModel, config: SimulationConfig,
             coupons: Sequence[Coupon] | None = None,
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every policy over the replayed part of ``rows``; return the report (JSON-ready)."""
    before, after, cut = time_split(rows, config.train_fraction)
    converts = conversion_types(rows)
    users_after = len({r.user_id for r in after})
    catalog = list(coupons) if coupons is not None else generated_catalog(
        before, cut, after[-1].ts_ms, users_after, config)
    by_id = {c.coupon_id: c for c in catalog}
    # Each policy is judged on its own choices: logged exploration is what a live worker spends
    # to learn, measured there against the holdout, not part of what is compared here.
    policy_cfg = dataclasses.replace(config.policy, exploration_share=0.0)
    if not config.quiet_hours:
        policy_cfg = dataclasses.replace(policy_cfg, quiet_start_hour=0, quiet_end_hour=0)
    repeat_tuning: dict[str, Any] = {"configured": policy_cfg.push_repeat_weight}
    if config.tune_repeat_weight:
        progress("choosing the repeat weight on a validation period before the cut")
        repeat_tuning |= choose_repeat_weight(before, encoder, dataclasses.replace(
            config, policy=policy_cfg), converts)
        policy_cfg = dataclasses.replace(policy_cfg,
                                         push_repeat_weight=repeat_tuning["chosen"])
    treated = dataclasses.replace(policy_cfg, holdout_percent=0.0)
    progress(f"replaying {len(after):,} events after the cut ({len(before):,} before)")
    moments, future = collect_moments(before, after, dataclasses.replace(config,
                                                                         policy=policy_cfg))
    progress(f"{len(moments):,} decision moments; computing user vectors")
    vectors = user_vectors(encoder, moments)
    d = vectors.shape[1]
    blank = np.zeros((len(moments), d), dtype=np.float16)
    popular = popularity_scores(encoder, before)
    runs = {
        "ours": (encoder, treated, vectors),
        "random": (BaselineItems(encoder, "random", None, config.seed), treated, blank),
        "popularity": (BaselineItems(encoder, "popularity", np.log1p(popular)), treated, blank),
        "repeat": (BaselineItems(encoder, "repeat", np.log1p(popular), history_first=True),
                   dataclasses.replace(treated, push_repeat_weight=1.0), blank),
        "holdout": (encoder, dataclasses.replace(policy_cfg, holdout_percent=100.0), vectors),
        "ours_without_propensity_gate": (encoder, dataclasses.replace(
            treated, no_coupon_propensity=math.inf, half_discount_propensity=math.inf),
            vectors),
        "ours_without_repeat_prior": (encoder, dataclasses.replace(
            treated, push_repeat_weight=0.0), vectors),
    }
    buckets = activity_buckets(moments)
    results: dict[str, PolicyResult] = {}
    for name, (model, cfg, vecs) in runs.items():
        progress(f"policy {name}")
        results[name] = run_policy(model, cfg, moments, vecs, by_id, future, converts,
                                   buckets, gate=treated)
    holdout_rate = results["holdout"].hit_rate
    policies = {name: policy_summary(r, holdout_rate) for name, r in results.items()}
    budget_exceeded = any(r.spent.get(c.coupon_id, 0.0) > c.budget + 1e-9
                          for name, r in results.items() if name != "holdout" for c in catalog)
    ours, gate_off = results["ours"], results["ours_without_propensity_gate"]
    # With binding budgets the gate does not lower total spend, it moves it: the coupons the
    # ungated policy gave to users likely to buy anyway (and how often they did) is the saving.
    gate = {
        "threshold": treated.no_coupon_propensity,
        "coupons_with_gate": ours.coupons, "coupons_without_gate": gate_off.coupons,
        "without_gate_to_likely_buyers": gate_off.likely_coupons,
        "without_gate_likely_buyers_discount": round(gate_off.likely_granted, 2),
        "without_gate_likely_buyers_hit_rate": (
            round(gate_off.likely_hits / gate_off.likely_coupons, 4)
            if gate_off.likely_coupons else None),
        "with_gate_to_likely_buyers": ours.likely_coupons,
        "held_back": ours.binding["likely_to_buy_anyway"],
        "halved": ours.binding["half_discount_propensity"],
    }
    report: dict[str, Any] = {
        "events_before_cut": len(before), "events_replayed": len(after),
        "users_replayed": users_after, "cut_ms": cut, "moments": len(moments),
        "moment_kinds": dict(Counter(m.trigger.kind for m in moments)),
        "horizon_events": config.horizon, "conversion_types": sorted(converts),
        "model_version": encoder.model_version,
        "policies": policies,
        "ratios": {
            "ours_over_random": ratio(results["ours"].hit_rate, results["random"].hit_rate),
            "ours_over_popularity": ratio(results["ours"].hit_rate,
                                          results["popularity"].hit_rate),
            "ours_over_repeat": ratio(results["ours"].hit_rate, results["repeat"].hit_rate),
            "ours_without_repeat_prior_over_popularity": ratio(
                results["ours_without_repeat_prior"].hit_rate, results["popularity"].hit_rate),
        },
        "budget_exceeded": budget_exceeded,
        "repeat_weight": repeat_tuning,
        "propensity": propensity_report(moments, future, converts) | {"gate": gate},
        "fairness": fairness(results, catalog),
        "catalog": [{"coupon_id": c.coupon_id, "value": c.value, "budget": c.budget,
                     "items": list(c.items), "categories": list(c.categories),
                     "max_exposures": c.max_exposures} for c in catalog],
    }
    return report


def choose_repeat_weight(before: Sequence[Interaction], encoder: ServingModel,
                         config: SimulationConfig, converts: frozenset[str]) -> dict[str, Any]:
    """The push_repeat_weight with the best push hit rate on the last ``validation_fraction``
    of ``before``, replayed with state warmed on the rest (no coupons: it judges pushes).
    Ties go to the smaller weight."""
    keep = {"chosen": config.policy.push_repeat_weight, "validation_moments": 0,
            "validation_hit_rate": {}}
    try:
        warm, valid, _ = time_split(before, 1.0 - config.validation_fraction)
    except ValueError:  # too few distinct times before the cut to validate on: keep the setting
        return keep
    moments, future = collect_moments(warm, valid, config)
    if not moments:
        return keep
    vectors = user_vectors(encoder, moments)
    treated = dataclasses.replace(config.policy, holdout_percent=0.0)
    buckets = activity_buckets(moments)
    rates = {w: run_policy(encoder, dataclasses.replace(treated, push_repeat_weight=w),
                           moments, vectors, {}, future, converts, buckets).hit_rate
             for w in sorted(config.repeat_weights)}
    best = max(rates.values())
    return {"chosen": min(w for w, r in rates.items() if r == best),
            "validation_moments": len(moments), "validation_events": len(valid),
            "validation_hit_rate": {str(w): round(r, 4) for w, r in rates.items()}}


def train_before_cut(before: Sequence[Interaction], out: Path, config: TrainConfig, *,
                     progress: bool = True,
                     log: Callable[[str], None] = print) -> ServingModel:
    """Train the default encoder on the events before the cut, save it in ``out`` and load it
    back as the worker would (so its model_version is the checkpoint's)."""
    from encoder import checkpoint
    from encoder import train as training
    from encoder.inference import Encoder

    result = training.train(before, EncoderConfig(), config, progress=progress, log=log)
    meta = training.metadata(result, config, {"simulation": "events before the cut",
                                              "interactions_loaded": len(before)})
    png = training.training_curve_png(result.history, result.best_epoch, "before the cut")
    checkpoint.save(out, result.model, result.vocab, result.split.popularity, meta, png)
    return Encoder.load(out)
