from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoder.data import Cases
from encoder.evaluate import (
    MISS,
    EvalSettings,
    auto_exclude_history,
    evaluate,
    metrics_from_ranks,
    popularity_scorer,
    rank_targets,
    sample_negatives,
)


def cases(histories: list[list[int]], targets: list[int],
          extra: list[list[int]] | None = None) -> Cases:
    items = [np.array(h, dtype=np.int64) for h in histories]
    every = [np.array(sorted({*h, t, *(extra[u] if extra else [])}), dtype=np.int64)
             for u, (h, t) in enumerate(zip(histories, targets, strict=True))]
    return Cases(items, [np.ones_like(h) for h in items], np.array(targets, dtype=np.int64),
                 every)


def fixed_scorer(scores: list[list[float]]):
    table = torch.tensor(scores)
    return lambda rows: table[torch.from_numpy(rows)].clone()


def test_hr_and_ndcg_on_a_hand_computed_example() -> None:
    ranks = np.array([0, 1, 5, 10, MISS])
    m = metrics_from_ranks(ranks, k=10)
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 5)


def test_full_ranking_counts_better_items_and_can_exclude_history() -> None:
    # Items 1..5. User 0 history [5], target 2; user 1 history [2], target 2 (a repeat).
    c = cases([[5], [2]], [2, 2])
    scorer = fixed_scorer([[0.1, 0.5, 0.9, 0.3, 1.0], [0.1, 0.5, 0.9, 0.3, 1.0]])
    negatives = np.array([[1, 3], [1, 4]])
    keep = rank_targets(scorer, c, 5, negatives, EvalSettings(exclude_history=False))
    assert keep["full"].tolist() == [2, 2]  # items 5 and 3 score higher
    assert keep["sampled"].tolist() == [1, 0]  # [1, 3] vs 2: item 3 beats it; [1, 4]: none
    drop = rank_targets(scorer, c, 5, negatives, EvalSettings(exclude_history=True))
    assert drop["full"].tolist() == [1, MISS]  # item 5 is history; a repeat cannot be hit


def test_unknown_targets_are_misses() -> None:
    c = cases([[1]], [7])  # 7 is an OOV bucket for a 5-item catalogue
    r = rank_targets(fixed_scorer([[1, 2, 3, 4, 5]]), c, 5, np.array([[2]]),
                     EvalSettings(exclude_history=False))
    assert r["full"][0] == r["sampled"][0] == MISS


def test_negatives_are_seeded_distinct_and_never_the_users_items() -> None:
    c = cases([[1, 2, 3]] * 50, [4] * 50, extra=[[9]] * 50)
    a = sample_negatives(c, 30, 20, seed=3)
    assert a.shape == (50, 20)
    assert np.array_equal(a, sample_negatives(c, 30, 20, seed=3))
    assert not np.array_equal(a, sample_negatives(c, 30, 20, seed=4))
    for row in a:
        assert len(set(row)) == 20
        assert not {1, 2, 3, 4, 9} & set(row.tolist())
        assert row.min() >= 1 and row.max() <= 30


def test_ties_are_broken_uniformly_so_constant_scores_earn_chance() -> None:
    n_users, n_items = 4000, 50
    c = cases([[1]] * n_users, [2] * n_users)
    popularity = np.zeros(1 + n_items, dtype=np.int64)  # every item tied
    metrics, _ = evaluate({"flat": popularity_scorer(popularity, n_items)}, c, n_items,
                          EvalSettings(exclude_history=False, n_negatives=20))
    assert metrics["flat"]["full"]["HR@10"] == pytest.approx(10 / 50, abs=0.02)
    assert metrics["flat"]["sampled"]["HR@10"] == pytest.approx(10 / 21, abs=0.03)


def test_history_is_excluded_only_where_repeats_are_rare() -> None:
    assert auto_exclude_history(0.0)
    assert not auto_exclude_history(0.6)
