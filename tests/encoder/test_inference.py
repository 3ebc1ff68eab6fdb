from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder.inference import Encoder, item_key


@pytest.fixture(scope="module")
def encoder(checkpoint_dir: Path) -> Encoder:
    return Encoder.load(checkpoint_dir)


def histories(encoder: Encoder, n: int, seed: int = 0) -> tuple[list[np.ndarray],
                                                                list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * encoder.config.max_len, size=n)
    items = [rng.integers(1, encoder.config.vocab_size, size=k) for k in lengths]
    types = [rng.integers(1, 5, size=k) for k in lengths]
    return items, types


def test_batched_vectors_equal_per_user_vectors(encoder: Encoder) -> None:
    items, types = histories(encoder, 150)
    batch = encoder.user_vectors(items, types)
    assert batch.dtype == np.float16
    assert batch.shape == (150, encoder.config.d_model)
    alone = np.concatenate([encoder.user_vectors([i], [t]) for i, t in zip(items, types,
                                                                            strict=True)])
    np.testing.assert_allclose(batch.astype(np.float32), alone.astype(np.float32),
                               rtol=1e-3, atol=2e-3)


def test_only_the_newest_max_len_events_count(encoder: Encoder) -> None:
    L = encoder.config.max_len
    items, types = histories(encoder, 1, seed=3)
    long_items = np.concatenate([np.arange(1, 6), items[0]])
    long_types = np.concatenate([np.ones(5, dtype=np.int64), types[0]])
    np.testing.assert_array_equal(
        encoder.user_vectors([long_items], [long_types]),
        encoder.user_vectors([long_items[-L:]], [long_types[-L:]]))


def test_a_user_without_events_gets_the_zero_vector(encoder: Encoder) -> None:
    items, types = histories(encoder, 2)
    empty = np.zeros(0, dtype=np.int64)
    vectors = encoder.user_vectors([items[0], empty, items[1]], [types[0], empty, types[1]])
    assert not vectors[1].any()
    np.testing.assert_array_equal(vectors[[0, 2]], encoder.user_vectors(items, types))
    assert encoder.user_vectors([empty], [empty]).shape == (1, encoder.config.d_model)


def test_timestamps_are_checked_but_do_not_change_vectors(encoder: Encoder) -> None:
    items, types = histories(encoder, 3)
    ts = [np.arange(len(i)) * 1000 for i in items]
    np.testing.assert_array_equal(encoder.user_vectors(items, types, ts),
                                  encoder.user_vectors(items, types))
    with pytest.raises(ValueError, match="user 1"):
        encoder.user_vectors(items, types, [ts[0], ts[1][:-1], ts[2]])


@pytest.mark.parametrize(("items", "types", "message"), [
    ([np.array([1, 2])], [np.array([1])], "2 items but 1 types"),
    ([np.array([1, 0])], [np.array([1, 1])], "item index 0"),
    ([np.array([1, 10_000])], [np.array([1, 1])], "item indices must be in"),
    ([np.array([1, 2])], [np.array([1, 9])], "event type ids must be in"),
])
def test_bad_input_is_refused_clearly(encoder: Encoder, items: list[np.ndarray],
                                      types: list[np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encoder.user_vectors(items, types)


def test_ids_keys_and_indices_agree(encoder: Encoder) -> None:
    known = encoder.vocab.items[:3]
    ids = [*known, "never-seen"]
    indices = encoder.item_indices(ids)
    assert indices[:3].tolist() == [1, 2, 3]
    assert indices[3] > encoder.config.n_items
    keys = np.array([item_key(i) for i in ids], dtype=np.int64)
    assert encoder.item_indices_from_keys(keys).tolist() == indices.tolist()
    assert [encoder.item_id(int(i)) for i in indices] == [*known, None]


def test_scores_are_dot_products_for_all_shared_or_per_user_candidates(
        encoder: Encoder) -> None:
    items, types = histories(encoder, 4)
    vectors = encoder.user_vectors(items, types)
    emb = encoder.model.item_emb.weight.detach().numpy()
    everything = encoder.score_items(vectors)
    assert everything.dtype == np.float32
    assert everything.shape == (4, encoder.config.n_items)
    np.testing.assert_allclose(everything, vectors.astype(np.float32) @ emb[1:1 + encoder.config
                                                                            .n_items].T,
                               rtol=1e-4, atol=1e-5)
    shared = np.array([5, 1, 3])
    np.testing.assert_allclose(encoder.score_items(vectors, shared), everything[:, shared - 1],
                               rtol=1e-5, atol=1e-6)
    per_user = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    np.testing.assert_allclose(encoder.score_items(vectors, per_user),
                               np.take_along_axis(everything, per_user - 1, axis=1),
                               rtol=1e-5, atol=1e-6)


def test_top_items_rank_by_score_and_honour_exclusions(encoder: Encoder) -> None:
    items, types = histories(encoder, 2)
    vectors = encoder.user_vectors(items, types)
    top, scores = encoder.top_items(vectors, 5)
    assert top.shape == scores.shape == (2, 5)
    assert (np.diff(scores, axis=1) <= 0).all()
    again, _ = encoder.top_items(vectors, 5, exclude=[top[0, :2].tolist(), []])
    assert not set(top[0, :2].tolist()) & set(again[0].tolist())
    assert again[1].tolist() == top[1].tolist()


def test_a_boost_adds_to_the_scores_of_its_items_before_ranking(encoder: Encoder) -> None:
    items, types = histories(encoder, 2)
    vectors = encoder.user_vectors(items, types)
    everything = encoder.score_items(vectors)
    last = int(np.argmin(everything[0])) + 1  # user 0's worst item
    lift = float(everything[0].max() - everything[0].min()) + 1.0
    top, scores = encoder.top_items(vectors, 3, boost=[(np.array([last]), np.array([lift])),
                                                       (np.zeros(0, np.int64), np.zeros(0))])
    assert top[0, 0] == last
    assert scores[0, 0] == pytest.approx(everything[0, last - 1] + lift, rel=1e-5)
    assert top[1].tolist() == encoder.top_items(vectors, 3)[0][1].tolist()
    excluded, _ = encoder.top_items(vectors, 3, exclude=[[last], []],
                                    boost=[(np.array([last]), np.array([lift])),
                                           (np.zeros(0, np.int64), np.zeros(0))])
    assert last not in excluded[0].tolist()  # exclusion wins over any boost


def test_popular_items_come_from_training_counts(encoder: Encoder) -> None:
    top = encoder.popular_items(3)
    counts = encoder.popularity[top]
    assert (np.diff(counts) <= 0).all()
    assert counts[0] == encoder.popularity[1 : 1 + encoder.config.n_items].max()


def test_item_vectors_are_the_embeddings_that_scores_are_dot_products_with(
        encoder: Encoder) -> None:
    items, types = histories(encoder, 3)
    vectors = encoder.user_vectors(items, types)
    candidates = np.array([2, 4, 6])
    embeddings = encoder.item_vectors(candidates)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (3, encoder.config.d_model)
    np.testing.assert_allclose(encoder.score_items(vectors, candidates),
                               vectors.astype(np.float32) @ embeddings.T, rtol=1e-4, atol=1e-5)
