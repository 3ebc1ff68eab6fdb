"""Ranking metrics: the SASRec paper protocol and full ranking, for any scorer, seeded.

For each held-out case the scorer scores every known item given the user's history, and two
ranks of the held-out item are taken from the same scores:

- ``sampled`` (the SASRec paper's protocol, for comparing with published numbers): the item
  against 100 negatives drawn uniformly, without replacement, from the known items the user
  never interacted with (held-out items included, so the validation item can never be a test
  negative). The draw is seeded, so every run and every scorer sees the same negatives.
- ``full``: the item against every known item. When ``exclude_history`` is on, items already
  in the history are removed first (the usual practice on the Amazon data, where re-buying is
  rare); on data with many repeats (Instacart) it must be off, or repeats could never be hit.

HR@k is the share of cases ranked in the top k; NDCG@k averages 1 / log2(rank + 2) over those
(rank 0 is the top; a single relevant item makes IDCG 1). Ties are broken uniformly at random
(seeded), so a scorer that gives many items one score, like popularity, is neither rewarded
nor punished for it. A target that is not in the vocabulary counts as a miss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder.data import Cases, left_pad
from encoder.model import EncoderModel

PROTOCOLS = ("sampled", "full")
MISS = np.iinfo(np.int64).max // 2  # the rank of a target that cannot be hit
REPEAT_THRESHOLD = 0.05  # exclude history from full ranking when fewer repeats than this

#: Scores every known item for some cases: rows -> (len(rows), n_items), column j = index j+1.
Scorer = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class EvalSettings:
    k: int = 10
    n_negatives: int = 100
    exclude_history: bool = True
    seed: int = 0  # negatives and tie-breaks
    batch_size: int = 1024


def auto_exclude_history(repeat_share: float) -> bool:
    """Exclude history from full ranking unless repeats are common in the training data."""
    return repeat_share < REPEAT_THRESHOLD


def model_scorer(model: EncoderModel, cases: Cases) -> Scorer:
    max_len = model.cfg.max_len

    def score(rows: np.ndarray) -> torch.Tensor:
        items = torch.from_numpy(left_pad([cases.items[r] for r in rows], max_len))
        types = torch.from_numpy(left_pad([cases.types[r] for r in rows], max_len))
        return model.scores(model.user_vectors(items, types))

    return score


def popularity_scorer(popularity: np.ndarray, n_items: int) -> Scorer:
    counts = torch.from_numpy(popularity[1 : 1 + n_items].astype(np.float32))

    def score(rows: np.ndarray) -> torch.Tensor:
        return counts.expand(len(rows), n_items).clone()

    return score


def sample_negatives(cases: Cases, n_items: int, n: int, seed: int) -> np.ndarray:
    """(U, n) item indices: per case, n distinct known items the user never touched."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(cases), n), dtype=np.int64)
    for u, user_items in enumerate(cases.user_items):
        seen = set(user_items.tolist())
        pool_size = n_items - sum(1 for i in seen if 1 <= i <= n_items)
        if pool_size < n:  # a tiny catalogue: allow repeats rather than fail
            pool = np.setdiff1d(np.arange(1, n_items + 1), user_items)
            out[u] = rng.choice(pool, size=n, replace=True) if pool.size else 1
            continue
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < n:
            for item in rng.integers(1, n_items + 1, size=n + 16).tolist():
                if item not in seen and item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    if len(chosen) == n:
                        break
        out[u] = chosen
    return out


def rank_targets(scorer: Scorer, cases: Cases, n_items: int, negatives: np.ndarray,
                 settings: EvalSettings) -> dict[str, np.ndarray]:
    """Rank of each case's target under each protocol (0 = top).

    Sampled ranks are exact; full ranks are exact below ``settings.k`` and MISS otherwise
    (as they are when the target is unknown or excluded).
    """
    U = len(cases)
    ranks = {p: np.full(U, MISS, dtype=np.int64) for p in PROTOCOLS}
    rng = torch.Generator().manual_seed(settings.seed)
    lengths = np.fromiter((len(h) for h in cases.items), dtype=np.int64, count=U)
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: narrow batches
    for start in range(0, U, settings.batch_size):
        rows = order[start : start + settings.batch_size]
        with torch.inference_mode():
            scores = scorer(rows)  # (b, n_items)
            targets = torch.from_numpy(cases.targets[rows])
            known = (targets >= 1) & (targets <= n_items)
            col = torch.where(known, targets - 1, 0)[:, None]
            target_score = scores.gather(1, col)  # (b, 1)

            neg = scores.gather(1, torch.from_numpy(negatives[rows] - 1))  # (b, n)
            sampled = _tie_broken_rank(neg > target_score, neg == target_score, rng)

            if settings.exclude_history:
                hist = [cases.items[r] for r in rows]
                hist_rows = np.repeat(np.arange(len(rows)), [len(h) for h in hist])
                hist_cols = np.concatenate(hist) - 1
                inside = (hist_cols >= 0) & (hist_cols < n_items)
                scores[hist_rows[inside], hist_cols[inside]] = float("-inf")
                target_score = scores.gather(1, col)
            full = _rank_if_in_top_k(scores, target_score, settings.k, rng)
            reachable = known & torch.isfinite(target_score[:, 0])
        ranks["sampled"][rows] = torch.where(known, sampled, MISS).numpy()
        ranks["full"][rows] = torch.where(reachable, full, MISS).numpy()
    return ranks


def _rank_if_in_top_k(scores: torch.Tensor, target_score: torch.Tensor, k: int,
                      rng: torch.Generator) -> torch.Tensor:
    """Exact tie-broken rank where it is below k, MISS elsewhere.

    Only HR@k and NDCG@k are reported, so only ranks below k matter: compare the target with
    each row's top k scores (a partial sort) instead of counting over every item, which is
    several times faster; ties are counted over the whole row, only for rows that can hit.
    """
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1).values  # (b, k), descending
    can_hit = (target_score[:, 0] >= top[:, -1]).nonzero().squeeze(1)
    rank = torch.full((scores.shape[0],), MISS, dtype=torch.int64)
    if can_hit.numel():
        t = target_score[can_hit]  # (h, 1)
        greater = (top[can_hit] > t).sum(1)  # every score above t is among the top k
        others_tied = (scores[can_hit] == t).sum(1) - 1
        rank[can_hit] = greater + _uniform_upto(others_tied, rng)
    return torch.where(rank < k, rank, MISS)


def _tie_broken_rank(greater: torch.Tensor, tied: torch.Tensor,
                     rng: torch.Generator) -> torch.Tensor:
    return greater.sum(1) + _uniform_upto(tied.sum(1), rng)


def _uniform_upto(ties: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A uniform integer in 0..ties per row: where the target lands among its ties."""
    u = torch.rand(ties.shape, generator=rng)
    return (u * (ties + 1).to(torch.float64)).floor().to(torch.int64)


def metrics_from_ranks(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    hit = ranks < k
    gain = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    n = max(len(ranks), 1)
    return {f"HR@{k}": float(hit.sum() / n), f"NDCG@{k}": float(gain.sum() / n)}


def evaluate(scorers: dict[str, Scorer], cases: Cases, n_items: int, settings: EvalSettings,
             negatives: np.ndarray | None = None,
             ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, np.ndarray]]]:
    """Metrics and raw ranks of several scorers on the very same cases and negatives.

    ``negatives`` defaults to :func:`sample_negatives` with the settings' seed; pass them in
    to skip the draw when evaluating the same cases repeatedly.
    Returns ``({scorer: {protocol: {"HR@k": x, "NDCG@k": y}}}, {scorer: {protocol: ranks}})``.
    """
    if negatives is None:
        negatives = sample_negatives(cases, n_items, settings.n_negatives, settings.seed)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    all_ranks: dict[str, dict[str, np.ndarray]] = {}
    for name, scorer in scorers.items():
        ranks = rank_targets(scorer, cases, n_items, negatives, settings)
        all_ranks[name] = ranks
        metrics[name] = {p: metrics_from_ranks(ranks[p], settings.k) for p in PROTOCOLS}
    return metrics, all_ranks


def evaluate_model(model: EncoderModel, popularity: np.ndarray, cases: Cases,
                   settings: EvalSettings, *, with_popularity: bool = True,
                   negatives: np.ndarray | None = None,
                   ) -> dict[str, dict[str, dict[str, float]]]:
    """``{"model": {...}, "popularity": {...}}`` on ``cases``; the model is left as found."""
    was_training = model.training
    model.eval()
    try:
        scorers: dict[str, Scorer] = {"model": model_scorer(model, cases)}
        if with_popularity:
            scorers["popularity"] = popularity_scorer(popularity, model.cfg.n_items)
        metrics, _ = evaluate(scorers, cases, model.cfg.n_items, settings, negatives)
    finally:
        model.train(was_training)
    return metrics


def summary(users: int, items: int, metrics: dict[str, dict[str, dict[str, float]]],
            ) -> dict[str, object]:
    """The documented ``promo evaluate --json`` object."""
    return {"users": users, "items": items, "model": metrics["model"],
            "popularity": metrics["popularity"]}


def describe(metrics: dict[str, dict[str, dict[str, float]]], k: int = 10) -> Sequence[str]:
    """Human-readable lines, model beside popularity for each protocol."""
    lines = []
    for protocol in PROTOCOLS:
        parts = []
        for name, by_protocol in metrics.items():
            m = by_protocol[protocol]
            parts.append(f"{name} HR@{k} {m[f'HR@{k}']:.4f} NDCG@{k} {m[f'NDCG@{k}']:.4f}")
        lines.append(f"{protocol:>7}: " + " | ".join(parts))
    return lines
