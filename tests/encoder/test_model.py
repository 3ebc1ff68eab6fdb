from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoder.config import EncoderConfig
from encoder.model import EncoderModel
from tests.encoder.conftest import TINY


def random_batch(B: int, T: int, lengths: list[int] | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, TINY.n_items + 1, (B, T), generator=g)
    types = torch.randint(1, TINY.n_event_types + 1, (B, T), generator=g)
    if lengths is not None:
        real = torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]
        items, types = items * real, types * real
    return items, types


def test_future_events_do_not_change_past_outputs(tiny_model: EncoderModel) -> None:
    items, types = random_batch(3, 10, lengths=[10, 7, 4])
    before = tiny_model(items, types)
    changed = items.clone()
    changed[:, 8] = torch.where(changed[:, 8] > 0, changed[:, 8] % TINY.n_items + 1, 0)
    after = tiny_model(changed, types)
    torch.testing.assert_close(after[:, :8], before[:, :8], rtol=0, atol=0)
    assert not torch.allclose(after[:, 8:], before[:, 8:])


def test_padding_does_not_change_outputs(tiny_model: EncoderModel) -> None:
    items, types = random_batch(1, 5)
    alone = tiny_model(items, types)[0]
    wide = torch.zeros(1, TINY.max_len, dtype=torch.long)
    wide_types = torch.zeros_like(wide)
    wide[0, -5:], wide_types[0, -5:] = items[0], types[0]
    padded = tiny_model(wide, wide_types)[0]
    torch.testing.assert_close(padded[-5:], alone, rtol=1e-5, atol=1e-6)
    assert padded[:-5].abs().sum() == 0  # outputs at padding are zero, never garbage


def test_a_row_does_not_depend_on_its_batch_neighbours(tiny_model: EncoderModel) -> None:
    # 70 rows: more than one attention chunk, rows of every length in each.
    lengths = [1 + (7 * r) % TINY.max_len for r in range(70)]
    items, types = random_batch(70, TINY.max_len, lengths)
    batch = tiny_model.user_vectors(items, types)
    for r in (0, 5, 33, 64, 69):
        n = lengths[r]
        alone = tiny_model.user_vectors(items[r : r + 1, -n:], types[r : r + 1, -n:])
        torch.testing.assert_close(batch[r : r + 1], alone, rtol=1e-5, atol=1e-6)


def test_a_batch_without_padding_matches_the_padded_path(tiny_model: EncoderModel) -> None:
    full_items, full_types = random_batch(3, 8)
    dense = tiny_model(full_items, full_types)  # no padding: one is_causal call
    short = torch.zeros(1, 8, dtype=torch.long)
    short[0, -2:] = 1
    mixed = tiny_model(torch.cat([full_items, short]), torch.cat([full_types, short]))
    torch.testing.assert_close(mixed[:3], dense, rtol=1e-5, atol=1e-6)


def test_user_vector_is_the_newest_positions_output(tiny_model: EncoderModel) -> None:
    items, types = random_batch(4, 9, lengths=[9, 3, 1, 6])
    torch.testing.assert_close(tiny_model.user_vectors(items, types),
                               tiny_model(items, types)[:, -1], rtol=1e-5, atol=1e-6)


def test_dropout_acts_in_training_only(tiny_model: EncoderModel) -> None:
    items, types = random_batch(2, 8)
    assert torch.equal(tiny_model(items, types), tiny_model(items, types))
    tiny_model.train()
    assert not torch.equal(tiny_model(items, types), tiny_model(items, types))


def test_event_types_matter_only_when_enabled() -> None:
    items, types = random_batch(2, 6)
    other = types % TINY.n_event_types + 1
    for enabled in (True, False):
        torch.manual_seed(0)
        model = EncoderModel(EncoderConfig(**{**TINY.__dict__, "use_event_types": enabled}))
        model.eval()
        same = torch.equal(model(items, types), model(items, other))
        assert same is not enabled


def test_loss_counts_only_positions_with_a_target(tiny_model: EncoderModel) -> None:
    items, types = random_batch(2, 6, lengths=[6, 3])
    targets = torch.zeros_like(items)
    targets[0, 2], targets[1, 5] = 7, 9
    hidden = tiny_model(items, types)
    logits = torch.stack([hidden[0, 2], hidden[1, 5]]) @ tiny_model.item_embeddings().T
    expected = F.cross_entropy(logits, torch.tensor([6, 8]))
    torch.testing.assert_close(tiny_model.loss(items, types, targets), expected)


def test_sampled_loss_is_cross_entropy_over_the_target_and_the_negatives(
        tiny_model: EncoderModel) -> None:
    items, types = random_batch(1, 4)
    targets = torch.zeros_like(items)
    targets[0, 3] = 5
    negatives = torch.tensor([2, 5, 9])  # 5 is the target: masked, not a negative
    h = tiny_model(items, types)[0, 3]
    emb = tiny_model.item_emb.weight
    logits = torch.stack([h @ emb[5], h @ emb[2], h @ emb[9]])
    expected = F.cross_entropy(logits[None], torch.tensor([0]))
    torch.testing.assert_close(tiny_model.loss(items, types, targets, negatives), expected)


def test_every_copy_of_the_target_among_the_negatives_is_masked(
        tiny_model: EncoderModel) -> None:
    items, types = random_batch(1, 4)
    targets = torch.zeros_like(items)
    targets[0, 3] = 5
    negatives = torch.tensor([5, 2, 5, 9, 2])  # drawn with replacement: copies happen
    h = tiny_model(items, types)[0, 3]
    emb = tiny_model.item_emb.weight
    logits = torch.stack([h @ emb[5], h @ emb[2], h @ emb[9], h @ emb[2]])
    expected = F.cross_entropy(logits[None], torch.tensor([0]))
    torch.testing.assert_close(tiny_model.loss(items, types, targets, negatives), expected)


def test_targets_further_ahead_add_their_weighted_cross_entropy(
        tiny_model: EncoderModel) -> None:
    items, types = random_batch(2, 5, lengths=[5, 2])
    targets = torch.zeros(2, 5, 3, dtype=torch.long)
    targets[0, 3] = torch.tensor([4, 6, 0])  # next event, two ahead, nothing three ahead
    targets[0, 4] = torch.tensor([6, 0, 0])
    targets[1, 4] = torch.tensor([2, 8, 11])
    negatives = torch.tensor([1, 6, 9, 12])
    weights = torch.tensor([1.0, 0.3, 0.5])
    h = tiny_model(items, types)
    emb = tiny_model.item_emb.weight

    def ce(rows: list[tuple[int, int, int]]) -> torch.Tensor:
        terms = []
        for b, t, k in rows:
            target = int(targets[b, t, k])
            others = [int(n) for n in negatives if int(n) != target]
            logits = torch.stack([h[b, t] @ emb[target]] + [h[b, t] @ emb[n] for n in others])
            terms.append(F.cross_entropy(logits[None], torch.tensor([0])))
        return torch.stack(terms).sum()

    # Each target weighs its column's weight; the sum is per next-event target (3 of them).
    expected = (ce([(0, 3, 0), (0, 4, 0), (1, 4, 0)]) + 0.3 * ce([(0, 3, 1), (1, 4, 1)])
                + 0.5 * ce([(1, 4, 2)])) / 3
    loss = tiny_model.loss(items, types, targets, negatives, weights)
    torch.testing.assert_close(loss, expected)
    # Only the next event counts when the others weigh nothing, as with (B, T) targets.
    torch.testing.assert_close(
        tiny_model.loss(items, types, targets, negatives, torch.tensor([1.0, 0.0, 0.0])),
        tiny_model.loss(items, types, targets[:, :, 0], negatives))


def test_scores_are_dot_products_with_item_embeddings(tiny_model: EncoderModel) -> None:
    vectors = torch.randn(3, TINY.d_model)
    emb = tiny_model.item_emb.weight
    torch.testing.assert_close(tiny_model.scores(vectors), vectors @ emb[1 : 1 + TINY.n_items].T)
    shared = torch.tensor([3, 1, 40])
    torch.testing.assert_close(tiny_model.scores(vectors, shared), vectors @ emb[shared].T)
    per_row = torch.tensor([[1, 2], [3, 4], [5, 6]])
    expected = (vectors[:, None, :] * emb[per_row]).sum(-1)
    torch.testing.assert_close(tiny_model.scores(vectors, per_row), expected)


def test_rows_must_be_left_padded(tiny_model: EncoderModel) -> None:
    items, types = random_batch(1, 4)
    items[0, -1] = 0
    with pytest.raises(AssertionError, match="left padding"):
        tiny_model(items, types)


def test_sequences_longer_than_max_len_are_refused(tiny_model: EncoderModel) -> None:
    items, types = random_batch(1, TINY.max_len + 1)
    with pytest.raises(AssertionError, match="at most 12"):
        tiny_model(items, types)


def test_padding_and_oov_rows_start_at_zero(tiny_model: EncoderModel) -> None:
    weight = tiny_model.item_emb.weight
    assert weight[0].abs().sum() == 0
    assert weight[1 + TINY.n_items :].abs().sum() == 0
