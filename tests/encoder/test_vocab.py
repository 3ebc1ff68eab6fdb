from __future__ import annotations

import hashlib

import numpy as np
import pytest

from encoder.vocab import Vocabulary, item_key, item_keys


def test_item_key_is_a_stable_signed_64_bit_blake2b() -> None:
    # Pinned values: the worker stores these keys, so they must never change.
    assert item_key("item-1") == 8406168460641299428
    assert item_key("") == -5426141060434712860
    digest = hashlib.blake2b("é".encode(), digest_size=8).digest()
    assert item_key("é") == int.from_bytes(digest, "little", signed=True) == 3394012004367669963
    assert item_keys(["item-1", ""]).dtype == np.int64


def test_known_items_map_to_their_index_and_unknown_ones_to_a_bucket() -> None:
    vocab = Vocabulary(["a", "b", "c"], n_oov_buckets=5)
    got = vocab.indices(["c", "a", "zzz", "b", "zzz"])
    assert got.tolist()[:2] == [3, 1]
    assert got[3] == 2
    assert 4 <= got[2] <= 8
    assert got[2] == got[4] == vocab.index("zzz")


def test_indices_from_keys_agree_with_indices_from_ids() -> None:
    vocab = Vocabulary([f"i{k}" for k in range(100)], n_oov_buckets=7)
    ids = ["i5", "nope", "i99", "i0", "other", "i42"]
    from_keys = vocab.indices_from_keys(item_keys(ids).reshape(2, 3))
    assert from_keys.shape == (2, 3)
    assert from_keys.ravel().tolist() == vocab.indices(ids).tolist()


def test_item_id_reverses_the_vocabulary() -> None:
    vocab = Vocabulary(["a", "b"], n_oov_buckets=2)
    assert [vocab.item_id(i) for i in range(5)] == [None, "a", "b", None, None]


def test_duplicate_items_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(["a", "a"], n_oov_buckets=1)
