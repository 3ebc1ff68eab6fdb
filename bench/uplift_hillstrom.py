"""Uplift on real randomized data: our model beside scikit-uplift's, and the targeting it buys.

    .venv/bin/python bench/uplift_hillstrom.py            # 5 seeds, about 5 minutes
    .venv/bin/python bench/uplift_hillstrom.py --quick    # 1 seed

The Hillstrom e-mail test (../shared/datasets/hillstrom: 64,000 customers, e-mail assigned at
random to a third each: men's, women's, none; see its SOURCE.md). Target ``visit``; the other
outcomes (``conversion``, ``spend``) are not features. ``--csv`` takes any CSV with the same
columns (the test suite's run uses a synthetic one).

**Ranking.** For women's-vs-none and men's-vs-none, 5 seeds of a 30% held-out split
(stratified by arm and visit), every method on the same split and the same encoded features
(:class:`stream.uplift_model.FeatureSpec`, standardized):

- ours: :func:`stream.uplift_model.fit`, what `promo train-uplift` runs;
- scikit-uplift's TwoModels, ClassTransformation and SoloModel over logistic regression (the
  same learner family);
- a random ranking.

Each gets the held-out Qini coefficient and uplift in the top 30%.
``uplift_hillstrom_qini_vs_best_library`` is our mean Qini over seeds and both e-mails
divided by the best library method's mean over the same. ``..._per_email`` divides by each
e-mail's best method separately, a stricter bar, and is also reported.

**Deciding.** Three choices (none, men's, women's) and e-mails for only 30% of customers. One
model over all three arms ranks customers by their best e-mail's uplift; the top 30% get that
e-mail. The value is estimated on the held-out randomized rows by inverse propensity:
incremental visits per e-mail sent, over no e-mail. ``uplift_hillstrom_policy_vs_random``
divides it by random targeting with the single best e-mail (best on the training rows).
scikit-uplift's TwoModels (one per e-mail, best e-mail per customer) is reported beside it.

Writes bench/results/uplift_hillstrom.json (+ _quick) and merges the headlines into
summary.json (not in --quick unless --summary).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, add_output_options, merge_summary, summary_path, write_json

from stream import uplift_model
from stream.uplift_model import CONTROL

DATASET = ROOT.parent / "shared" / "datasets" / "hillstrom" / "hillstrom.csv.gz"
FEATURES = ("recency", "history_segment", "history", "mens", "womens", "zip_code", "newbie",
            "channel")
ARMS = {"No E-Mail": CONTROL, "Mens E-Mail": "mens", "Womens E-Mail": "womens"}
TARGET, TOP = "visit", 0.3


def load(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    import pandas as pd

    frame = pd.read_csv(path)
    columns = {name: frame[name].to_numpy() for name in FEATURES}
    return columns, frame["segment"].map(ARMS).to_numpy().astype(str), frame[TARGET].to_numpy()


def split(actions: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    strata = np.char.add(actions, y.astype(str))
    train, test = train_test_split(rows, test_size=0.3, random_state=seed, stratify=strata)
    return train, test


def library_models() -> dict[str, Callable[[], Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklift.models import ClassTransformation, SoloModel, TwoModels

    def lr() -> LogisticRegression:
        return LogisticRegression(max_iter=2000)

    return {"TwoModels": lambda: TwoModels(estimator_trmnt=lr(), estimator_ctrl=lr(),
                                           method="vanilla"),
            "ClassTransformation": lambda: ClassTransformation(lr()),
            "SoloModel": lambda: SoloModel(lr())}


def encoded(columns: dict[str, np.ndarray], train: np.ndarray,
            test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same features ours sees, standardized on the training rows."""
    spec = uplift_model.FeatureSpec.infer({k: v[train] for k, v in columns.items()})
    x = spec.matrix(columns)
    mean, scale = x[train].mean(axis=0), x[train].std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    return z[train], z[test]


def metrics(y: np.ndarray, uplift: np.ndarray, treated: np.ndarray) -> dict[str, float]:
    from sklift.metrics import qini_auc_score, uplift_at_k

    with warnings.catch_warnings():  # scikit-uplift 0.5 on scikit-learn 1.8+: deprecations
        warnings.simplefilter("ignore", FutureWarning)
        return {"qini": float(qini_auc_score(y, uplift, treated)),
                "uplift_at_30": float(uplift_at_k(y, uplift, treated, strategy="overall",
                                                  k=TOP))}


def ranking(columns: dict[str, np.ndarray], actions: np.ndarray, y: np.ndarray, email: str,
            seeds: int) -> dict[str, list[dict[str, float]]]:
    rows = np.flatnonzero((actions == email) | (actions == CONTROL))
    cols = {k: v[rows] for k, v in columns.items()}
    acts, out = actions[rows], y[rows]
    treated = (acts == email).astype(int)
    scores: dict[str, list[dict[str, float]]] = {}
    for seed in range(seeds):
        train, test = split(acts, out, seed)

        def record(name: str, uplift: np.ndarray, test: np.ndarray = test) -> None:
            scores.setdefault(name, []).append(metrics(out[test], uplift, treated[test]))

        ours = uplift_model.fit({k: v[train] for k, v in cols.items()}, acts[train],
                                out[train], seed=seed)
        record("ours", ours.uplift({k: v[test] for k, v in cols.items()})[:, 1])
        z_train, z_test = encoded(cols, train, test)
        for name, make in library_models().items():
            model = make().fit(z_train, out[train], treated[train])
            record(name, model.predict(z_test))
        record("random", np.random.default_rng(seed).random(len(test)))
        print(f"  {email} seed {seed}: ours {scores['ours'][-1]['qini']:.4f} (s = "
              f"{ours.shrinkage}), " + ", ".join(
                  f"{n} {scores[n][-1]['qini']:.4f}" for n in library_models()), flush=True)
    return scores


def ips_value(policy: np.ndarray, actions: np.ndarray, y: np.ndarray) -> float:
    """Mean outcome had every row followed ``policy``, by inverse propensity (arms random)."""
    share = {a: float(np.mean(actions == a)) for a in np.unique(actions)}
    propensity = np.asarray([share[a] for a in actions])
    return float(np.mean((actions == policy) * y / propensity))


def incremental_per_email(policy: np.ndarray, actions: np.ndarray, y: np.ndarray) -> float:
    """Visits ``policy`` adds over sending nothing, per e-mail it sends."""
    nothing = ips_value(np.full(len(policy), CONTROL), actions, y)
    return (ips_value(policy, actions, y) - nothing) / float(np.mean(policy != CONTROL))


def target_top(uplift: np.ndarray, emails: tuple[str, ...]) -> np.ndarray:
    """The best e-mail for the top TOP share by that e-mail's uplift; none for the rest."""
    best = uplift.argmax(axis=1)
    gain = uplift[np.arange(len(uplift)), best]
    chosen = np.full(len(uplift), CONTROL, dtype=object)
    top = np.argsort(-gain, kind="stable")[:round(TOP * len(uplift))]
    chosen[top] = np.asarray(emails, dtype=object)[best[top]]
    return chosen.astype(str)


def deciding(columns: dict[str, np.ndarray], actions: np.ndarray, y: np.ndarray,
             seeds: int) -> list[dict[str, float]]:
    emails = ("mens", "womens")
    runs = []
    for seed in range(seeds):
        train, test = split(actions, y, seed)
        a_test, y_test = actions[test], y[test]

        def per_email(policy: np.ndarray, a_test: np.ndarray = a_test,
                      y_test: np.ndarray = y_test) -> float:
            return incremental_per_email(policy, a_test, y_test)

        ours = uplift_model.fit({k: v[train] for k, v in columns.items()}, actions[train],
                                y[train], seed=seed)
        uplift = ours.uplift({k: v[test] for k, v in columns.items()})
        order = [ours.actions.index(e) for e in emails]
        ours_value = per_email(target_top(uplift[:, order], emails))
        z_train, z_test = encoded(columns, train, test)
        library = np.zeros((len(test), len(emails)))
        for j, email in enumerate(emails):
            rows = (actions[train] == email) | (actions[train] == CONTROL)
            two = library_models()["TwoModels"]().fit(
                z_train[rows], y[train][rows], (actions[train][rows] == email).astype(int))
            library[:, j] = two.predict(z_test)
        library_value = per_email(target_top(library, emails))
        effect = {e: y[train][actions[train] == e].mean() - y[train][actions[train] == CONTROL]
                  .mean() for e in emails}
        best_email = max(emails, key=lambda e: effect[e])
        random_value = float(y_test[a_test == best_email].mean()
                             - y_test[a_test == CONTROL].mean())
        runs.append({"ours": ours_value, "two_models": library_value,
                     "random_best_email": random_value, "best_email": best_email})
        print(f"  deciding seed {seed}: incremental visits per e-mail: ours {ours_value:.4f}, "
              f"TwoModels {library_value:.4f}, random {best_email} {random_value:.4f}",
              flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=DATASET, help="the Hillstrom CSV")
    parser.add_argument("--seeds", type=int, default=None, help="splits [5; quick 1]")
    parser.add_argument("--quick", action="store_true", help="one seed")
    add_output_options(parser)
    args = parser.parse_args()
    if not args.csv.exists():
        parser.error(f"{args.csv} not found: pass --csv (the dataset is in ../shared/datasets)")
    seeds = args.seeds or (1 if args.quick else 5)
    started = time.perf_counter()
    columns, actions, y = load(args.csv)
    per_email = {email: ranking(columns, actions, y, email, seeds) for email in ("womens", "mens")}
    mean = {email: {name: float(np.mean([r["qini"] for r in runs]))
                    for name, runs in scores.items()} for email, scores in per_email.items()}
    methods = [m for m in mean["womens"] if m not in ("ours", "random")]
    overall = {m: float(np.mean([mean[e][m] for e in mean])) for m in [*methods, "ours", "random"]}
    best_library = max(methods, key=lambda m: overall[m])
    decisions = deciding(columns, actions, y, seeds)

    def average(key: str) -> float:
        return float(np.mean([float(run[key]) for run in decisions]))

    results: dict[str, Any] = {
        "csv": str(args.csv), "rows": len(y), "seeds": seeds, "target": TARGET,
        "qini_mean": mean, "qini_mean_over_both_emails": overall,
        "uplift_at_30_mean": {email: {name: float(np.mean([r["uplift_at_30"] for r in runs]))
                                      for name, runs in scores.items()}
                              for email, scores in per_email.items()},
        "best_library_method": best_library,
        "uplift_hillstrom_qini_vs_best_library": round(overall["ours"] / overall[best_library],
                                                       4),
        "uplift_hillstrom_qini_vs_best_library_per_email": round(float(np.mean(
            [mean[e]["ours"] / max(mean[e][m] for m in methods) for e in mean])), 4),
        "incremental_visits_per_email": {k: average(k) for k in
                                         ("ours", "two_models", "random_best_email")},
        "uplift_hillstrom_policy_vs_random": round(average("ours")
                                                   / average("random_best_email"), 4),
        "two_models_policy_vs_random": round(average("two_models")
                                             / average("random_best_email"), 4),
        "per_seed": {"ranking": per_email, "deciding": decisions},
        "seconds": round(time.perf_counter() - started, 1),
    }
    suffix = "_quick" if args.quick else ""
    write_json(args.out_dir / f"uplift_hillstrom{suffix}.json", results)
    summary = summary_path(args)
    if summary is not None:
        merge_summary(summary, **{key: results[key] for key in (
            "uplift_hillstrom_qini_vs_best_library", "uplift_hillstrom_policy_vs_random")})
    for key, value in results.items():
        if key != "per_seed":
            print(f"{key:50s} {value}")


if __name__ == "__main__":
    main()
