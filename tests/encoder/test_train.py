from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.config import EncoderConfig, TrainConfig
from encoder.data import Interaction, encode_split, leave_one_out, user_sequences
from encoder.evaluate import EvalSettings, evaluate_model
from encoder.model import EncoderModel
from encoder.train import TrainResult, build_vocabulary, decay_groups, make_windows, train
from tests.encoder.conftest import patterned_interactions


def test_training_lowers_the_loss_and_beats_an_untrained_model(trained: TrainResult) -> None:
    losses = [h["loss"] for h in trained.history]
    assert losses[-1] < losses[0] * 0.8
    torch.manual_seed(123)
    untrained = EncoderModel(trained.model.cfg).eval()
    settings = EvalSettings(exclude_history=False)
    before = evaluate_model(untrained, trained.split.popularity, trained.split.valid, settings)
    after = trained.valid
    assert after["model"]["full"]["NDCG@10"] > before["model"]["full"]["NDCG@10"] + 0.2
    assert after["model"]["sampled"]["HR@10"] > 0.9  # the walk is predictable
    assert after["model"]["full"]["NDCG@10"] > after["popularity"]["full"]["NDCG@10"]


def test_the_chosen_epoch_is_the_best_on_validation(trained: TrainResult) -> None:
    best = max(trained.history, key=lambda h: h["valid"]["full"]["NDCG@10"])
    assert trained.best_epoch == best["epoch"]
    assert trained.valid["model"]["full"] == best["valid"]["full"]
    assert set(trained.test) == {"model", "popularity"}


def test_the_epoch_can_be_chosen_by_the_sampled_protocol() -> None:
    rows = patterned_interactions(n_users=30, length=8)
    cfg = EncoderConfig(max_len=8, d_model=8, n_heads=2, d_ff=16, n_oov_buckets=2)
    result = train(rows, cfg, TrainConfig(epochs=4, patience=4, batch_size=8, seed=2,
                                          select_protocol="sampled"),
                   progress=False, log=lambda _: None)
    best = max(result.history, key=lambda h: h["valid"]["sampled"]["NDCG@10"])
    assert result.best_epoch == best["epoch"]
    assert result.valid["model"]["sampled"] == best["valid"]["sampled"]


def test_an_unknown_selection_protocol_is_refused() -> None:
    rows = patterned_interactions(n_users=5, length=8)
    with pytest.raises(ValueError, match="select_protocol"):
        train(rows, EncoderConfig(max_len=8, d_model=8, n_heads=2, d_ff=16),
              TrainConfig(epochs=1, select_protocol="paper"), progress=False, log=lambda _: None)


def test_weight_decay_shrinks_embeddings_and_weights_but_not_norms_or_biases() -> None:
    model = EncoderModel(EncoderConfig(n_items=10, d_model=8, n_heads=2, d_ff=16))
    groups = decay_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
    kept = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {"item_emb.weight", "pos_emb.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert {"ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight", "blocks.0.mlp.fc.bias"} <= kept


def test_windows_make_every_training_event_after_the_first_a_target_once() -> None:
    rows = patterned_interactions(n_users=5, length=30)
    vocab = build_vocabulary(rows, 4)
    split = encode_split(leave_one_out(user_sequences(rows)), vocab)
    windows = make_windows(split, max_len=12)
    # Each user trains on 28 events: 27 targets, in windows of at most 12 inputs.
    assert (windows.targets != 0).sum() == 5 * 27
    assert len(windows.lengths) == 5 * 3
    assert windows.items.shape[1] == 12
    for w in range(len(windows.lengths)):
        n = windows.lengths[w]
        assert (windows.items[w, : 12 - n] == 0).all() and (windows.items[w, 12 - n :] > 0).all()


def test_windows_give_each_position_the_items_of_the_next_events() -> None:
    rows = patterned_interactions(n_users=1, length=12)
    vocab = build_vocabulary(rows, 4)
    split = encode_split(leave_one_out(user_sequences(rows)), vocab)
    history = split.train_items[0]  # 10 training events
    windows = make_windows(split, max_len=4, horizon=3)
    assert windows.targets.shape == (len(windows.lengths), 4, 3)
    # Windows of inputs [5, 9), [1, 5), [0, 1); position p's targets are events p+1..p+3.
    newest, older, oldest = windows.targets
    assert newest[-1].tolist() == [history[9], 0, 0]
    assert newest[0].tolist() == history[6:9].tolist()
    assert older[-1].tolist() == history[5:8].tolist()  # across the window's end
    assert oldest[-1].tolist() == history[1:4].tolist()
    assert (oldest[:-1] == 0).all()


def test_training_is_reproducible_with_a_seed() -> None:
    rows = patterned_interactions(n_users=30, length=8)
    cfg = EncoderConfig(max_len=8, d_model=8, n_heads=2, d_ff=16, n_oov_buckets=2)
    config = TrainConfig(epochs=2, batch_size=8, seed=5)
    first = train(rows, cfg, config, progress=False, log=lambda _: None)
    second = train(rows, cfg, config, progress=False, log=lambda _: None)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert first.test == second.test


def test_target_types_restrict_what_is_predicted() -> None:
    rows = [Interaction("u", f"i{k}", "add_to_cart" if k % 2 else "view", k) for k in range(10)]
    rows += [Interaction("v", f"i{k}", "add_to_cart" if k % 2 else "view", k) for k in range(10)]
    vocab = build_vocabulary(rows, 2)
    split = encode_split(leave_one_out(user_sequences(rows), {"add_to_cart"}), vocab,
                         {"add_to_cart"})
    windows = make_windows(split, max_len=8)
    targets = windows.targets[windows.targets != 0]
    assert set(np.unique(targets).tolist()) <= {vocab.index(f"i{k}") for k in (1, 3, 5)}
