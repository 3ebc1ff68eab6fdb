"""What the streaming worker calls: load a checkpoint, encode many users at once, score items.

Every method takes a whole micro-batch: ragged per-user arrays go in, one padded forward pass
runs under ``torch.inference_mode``, and arrays come out. Nothing here needs a per-user loop.

Conventions: item indices come from :meth:`Encoder.item_indices` (or ``item_indices_from_keys``
on stored :func:`item_key` values); event types are ids ``EVENT_TYPES.index(t) + 1``
(:func:`encoder.data.type_ids`); every per-user array is oldest -> newest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder import checkpoint
from encoder.checkpoint import CheckpointError
from encoder.config import EncoderConfig
from encoder.data import left_pad
from encoder.model import EncoderModel
from encoder.vocab import Vocabulary, item_key

__all__ = ["CheckpointError", "Encoder", "item_key"]


class Encoder:
    """A loaded checkpoint, ready to serve. Build with :meth:`load`."""

    def __init__(self, model: EncoderModel, vocab: Vocabulary, popularity: np.ndarray,
                 model_version: str, metrics: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.config: EncoderConfig = model.cfg
        self.vocab = vocab
        self.popularity = popularity  # (vocab_size,) training count per index (cold start)
        self.model_version = model_version
        self.metrics = metrics or {}

    @classmethod
    def load(cls, checkpoint_dir: Path) -> Encoder:
        """Load and verify a checkpoint directory; raises :class:`CheckpointError`."""
        ckpt = checkpoint.load(checkpoint_dir)
        return cls(ckpt.model, ckpt.vocab, ckpt.popularity, ckpt.model_version, ckpt.metrics)

    # --- ids <-> indices ---------------------------------------------------------------------

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64: known items -> vocabulary index, unknown -> hashed OOV bucket."""
        return self.vocab.indices(item_ids)

    def item_indices_from_keys(self, keys: np.ndarray) -> np.ndarray:
        """The same, from :func:`item_key` values (int64 array of any shape)."""
        return self.vocab.indices_from_keys(keys)

    def item_id(self, index: int) -> str | None:
        """The raw id at ``index``; None for padding and OOV buckets."""
        return self.vocab.item_id(index)

    # --- user vectors ------------------------------------------------------------------------

    def user_vectors(self, items: Sequence[np.ndarray], types: Sequence[np.ndarray],
                     ts_ms: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """float16 (B, d) user vectors for a ragged batch of histories, oldest -> newest.

        Only each user's newest ``config.max_len`` events are read. A user with no events
        gets the zero vector (it scores every item 0: use :attr:`popularity` for them).
        ``ts_ms`` is validated but not used: this model orders events by position only.
        """
        B = len(items)
        if len(types) != B or (ts_ms is not None and len(ts_ms) != B):
            raise ValueError(f"items, types and ts_ms must have one entry per user; got "
                             f"{B}, {len(types)}, {None if ts_ms is None else len(ts_ms)}")
        lengths = np.fromiter((len(a) for a in items), dtype=np.int64, count=B)
        for name, arrays in (("types", types), ("ts_ms", () if ts_ms is None else ts_ms)):
            other = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
            if len(arrays) and (other != lengths).any():
                user = int(np.flatnonzero(other != lengths)[0])
                raise ValueError(f"user {user}: {len(items[user])} items but "
                                 f"{len(arrays[user])} {name}")
        vectors = np.zeros((B, self.config.d_model), dtype=np.float16)
        active = np.flatnonzero(lengths > 0)
        if active.size == 0:
            return vectors
        # Longest first: the model attends rows in chunks cut to each chunk's longest history.
        order = active[np.argsort(-lengths[active], kind="stable")]
        L = self.config.max_len
        item_grid = left_pad([items[i] for i in order], L)
        type_grid = left_pad([types[i] for i in order], L)
        self._check_ranges(item_grid, type_grid, int(np.minimum(lengths, L).sum()))
        with torch.inference_mode():
            out = self.model.user_vectors(torch.from_numpy(item_grid), torch.from_numpy(type_grid))
        vectors[order] = out.numpy().astype(np.float16)
        return vectors

    def _check_ranges(self, item_grid: np.ndarray, type_grid: np.ndarray, events: int) -> None:
        if int((item_grid != 0).sum()) != events or int((type_grid != 0).sum()) != events:
            raise ValueError("an event has item index 0 or event type 0 (both mean padding)")
        if item_grid.max() >= self.config.vocab_size or item_grid.min() < 0:
            raise ValueError(f"item indices must be in 1..{self.config.vocab_size - 1}")
        if type_grid.max() > self.config.n_event_types or type_grid.min() < 0:
            raise ValueError(f"event type ids must be in 1..{self.config.n_event_types}")

    # --- scoring -----------------------------------------------------------------------------

    def score_items(self, vectors: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        """float32 (B, C) dot products of user vectors with item embeddings.

        ``candidates``: None = every known item (C = n_items, column j is index j + 1); a (C,)
        array of indices shared by all users; or a (B, C) array, one row per user.
        """
        v = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
        with torch.inference_mode():
            c = None if candidates is None else torch.from_numpy(
                np.asarray(candidates, dtype=np.int64))
            return self.model.scores(v, c).numpy()

    def top_items(self, vectors: np.ndarray, k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  boost: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The k best known items per user: (indices int64 (B, k), scores float32 (B, k)).

        ``boost[b] = (indices, values)`` adds values to user b's scores of those indices
        before ranking (a prior from the user's own history). ``exclude[b]`` lists indices
        never to return for user b (e.g. just bought). If fewer than k items remain, the tail
        has score -inf.
        """
        scores = torch.from_numpy(self.score_items(vectors))  # (B, n_items)
        for row, (indices, values) in enumerate(boost or ()):
            cols = np.asarray(indices, dtype=np.int64) - 1
            known = (cols >= 0) & (cols < self.config.n_items)
            scores[row, cols[known]] += torch.from_numpy(
                np.asarray(values, dtype=np.float32)[known])
        if exclude is not None:
            rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
            cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) - 1 \
                if len(rows) else np.zeros(0, dtype=np.int64)
            known = (cols >= 0) & (cols < self.config.n_items)
            scores[rows[known], cols[known]] = float("-inf")
        k = min(k, self.config.n_items)
        top = torch.topk(scores, k, dim=1)
        return top.indices.numpy().astype(np.int64) + 1, top.values.numpy()

    def item_vectors(self, indices: np.ndarray) -> np.ndarray:
        """float32 (C, d) embeddings of item indices, OOV buckets included (for explanations)."""
        with torch.inference_mode():
            index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
            vectors: np.ndarray = self.model.item_emb(index).numpy().copy()
        return vectors

    def popular_items(self, k: int) -> np.ndarray:
        """The k most popular known items (cold-start fallback), most popular first."""
        counts = self.popularity[1 : 1 + self.config.n_items]
        return np.argsort(-counts, kind="stable")[:k].astype(np.int64) + 1
