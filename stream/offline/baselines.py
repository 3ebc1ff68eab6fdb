"""The baselines: the same policy with other item rankings (random, popularity, and the user's
own items first) in place of the encoder's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from encoder.data import Interaction
from stream.offline.moments import conversion_types
from stream.policy import ServingModel


class BaselineItems:
    """An :class:`~stream.policy.ItemModel` that ranks items by a fixed score per item (or a
    random one) instead of the user's vector; ids and item vectors come from the encoder."""

    def __init__(self, encoder: ServingModel, name: str, item_scores: np.ndarray | None,
                 seed: int = 0, history_first: bool = False) -> None:
        self.encoder = encoder
        self.model_version = name
        self.n_items = int(encoder.config.n_items)
        self.item_scores = item_scores  # (vocab_size,) or None for random scores
        self.rng = np.random.default_rng(seed)
        # Rank the user's own items (the policy's repeat boost) above every other item.
        self.history_first = history_first

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.encoder.item_indices(item_ids)

    def item_indices_from_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.encoder.item_indices_from_keys(keys)

    def item_id(self, index: int) -> str | None:
        return self.encoder.item_id(index)

    def item_vectors(self, indices: np.ndarray) -> np.ndarray:
        return self.encoder.item_vectors(indices)

    def _all_scores(self, rows: int) -> np.ndarray:
        size = int(self.encoder.config.vocab_size)
        if self.item_scores is None:
            return self.rng.random((rows, size))
        return np.broadcast_to(self.item_scores, (rows, size))

    def score_items(self, vectors: np.ndarray,
                    candidates: np.ndarray | None = None) -> np.ndarray:
        scores = self._all_scores(len(vectors))
        if candidates is None:
            return np.asarray(scores[:, 1:1 + self.n_items], dtype=np.float32)
        c = np.asarray(candidates, dtype=np.int64)
        if c.ndim == 1:
            return np.asarray(scores[:, c], dtype=np.float32)
        return np.asarray(np.take_along_axis(scores, c, axis=1), dtype=np.float32)

    def top_items(self, vectors: np.ndarray, k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  boost: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        # Only the "repeat" baseline uses ``boost`` (the user's own history, the policy's
        # repeat prior), and lexicographically: its items first, then the item scores.
        scores = self.score_items(vectors).astype(np.float64)
        for row, (indices, values) in enumerate(boost or () if self.history_first else ()):
            cols = np.asarray(indices, dtype=np.int64) - 1
            known = (cols >= 0) & (cols < self.n_items)
            scores[row, cols[known]] += 1e6 * np.asarray(values, dtype=np.float64)[known]
        for row, banned in enumerate(exclude or ()):
            cols = np.asarray(banned, dtype=np.int64) - 1
            scores[row, cols[(cols >= 0) & (cols < self.n_items)]] = -np.inf
        k = min(k, self.n_items)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return top.astype(np.int64) + 1, np.take_along_axis(scores, top, axis=1)

    def popular_items(self, k: int) -> np.ndarray:
        return np.asarray(self.top_items(np.zeros((1, 1), np.float32), k)[0][0])


def popularity_scores(encoder: ServingModel, before: Sequence[Interaction]) -> np.ndarray:
    """Conversions per vocabulary index before the cut (never the checkpoint's counts, which
    may include later data)."""
    converts = conversion_types(before)
    indices = encoder.item_indices([r.item_id for r in before if r.event_type in converts])
    return np.bincount(indices, minlength=int(encoder.config.vocab_size)).astype(np.float64)
