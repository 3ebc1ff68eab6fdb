"""The model's vocabularies: event types, and raw item ids <-> model indices.

Event types are the contract's four kinds of interaction; the model sees each as an id
(``TYPE_IDS``, 0 being padding). The worker validates events against the same tuple.

Items: index 0 is padding, 1..n_items are the known items in vocabulary order, and an unknown
item maps to bucket ``n_items + 1 + item_key(id) mod n_oov_buckets``. The streaming worker
keeps 64-bit :func:`item_key` values in user state instead of raw ids (8 bytes, fixed size),
and :class:`Vocabulary` maps those keys to indices with one vectorised search.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")  # id = index + 1
TYPE_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}  # 0 = padding


def item_key(item_id: str) -> int:
    """Stable signed 64-bit key of a raw item id: blake2b (8-byte digest), little-endian."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def item_keys(item_ids: Iterable[str]) -> np.ndarray:
    """:func:`item_key` of each id, as an int64 array."""
    return np.fromiter((item_key(i) for i in item_ids), dtype=np.int64)


class Vocabulary:
    def __init__(self, items: Sequence[str], n_oov_buckets: int) -> None:
        if len(set(items)) != len(items):
            raise ValueError("vocabulary items must be unique")
        if n_oov_buckets < 1:
            raise ValueError(f"n_oov_buckets must be at least 1, got {n_oov_buckets}")
        self.items: list[str] = list(items)
        self.n_oov_buckets = n_oov_buckets
        self._index = {item: i + 1 for i, item in enumerate(self.items)}
        keys = item_keys(self.items)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        self._sorted_index = (order + 1).astype(np.int64)
        if len(self._sorted_keys) > 1 and (np.diff(self._sorted_keys) == 0).any():
            # 2^-64 per pair; if it ever happens, two items would silently share a vector.
            raise ValueError("two vocabulary items share an item_key (64-bit hash collision)")
        self.keys = keys  # item_key of index i + 1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def oov_bucket(self, keys: np.ndarray) -> np.ndarray:
        """Bucket indices for (unknown) item keys; np.mod is non-negative for a positive base."""
        return np.asarray(self.n_items + 1 + np.mod(keys, self.n_oov_buckets), dtype=np.int64)

    def index(self, item_id: str) -> int:
        found = self._index.get(item_id)
        if found is not None:
            return found
        return int(self.oov_bucket(np.array([item_key(item_id)], dtype=np.int64))[0])

    def indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 indices: known items -> 1..n_items, unknown -> their OOV bucket."""
        out = np.fromiter((self._index.get(i, 0) for i in item_ids), dtype=np.int64,
                          count=len(item_ids))
        unknown = np.flatnonzero(out == 0)
        if unknown.size:
            out[unknown] = self.oov_bucket(item_keys(item_ids[int(i)] for i in unknown))
        return out

    def indices_from_keys(self, keys: np.ndarray) -> np.ndarray:
        """The same as :meth:`indices`, from :func:`item_key` values (any int64 array shape)."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self._sorted_keys, keys)
        pos = np.minimum(pos, len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos] == keys
        return np.where(found, self._sorted_index[pos], self.oov_bucket(keys))

    def item_id(self, index: int) -> str | None:
        """The raw id at ``index``; None for padding and OOV buckets."""
        return self.items[index - 1] if 1 <= index <= self.n_items else None

    def is_known(self, indices: np.ndarray) -> np.ndarray:
        return (indices >= 1) & (indices <= self.n_items)
