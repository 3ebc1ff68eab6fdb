"""Decision reasons are faithful: the recent items a push names as what drove it really do.

On a model trained on a slice of real Instacart histories, for many users: take the first
pushed item's score, then take the top-named recent item out of the user's history and score
again, and do the same with a random recent item that was not named. Taking out the named item
must lower the score more, on average.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from encoder.config import EncoderConfig, TrainConfig
from encoder.data import load_dataset
from encoder.inference import Encoder, item_key
from encoder.train import train
from stream.config import PolicyConfig
from stream.contracts import Trigger
from stream.policy import Context, decide
from stream.state import TYPE_ID, UserState
from tests.support import first_users

pytestmark = pytest.mark.slow

USERS = 150


@pytest.fixture(scope="module")
def histories() -> dict[str, list[tuple[str, str]]]:
    """The first USERS users of the Instacart sample: (item, event type), oldest first."""
    by_user: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in first_users(load_dataset("instacart"), USERS):
        by_user[row.user_id].append((row.item_id, row.event_type))
    return by_user


@pytest.fixture(scope="module")
def encoder(histories: dict[str, list[tuple[str, str]]]) -> Encoder:
    from encoder.data import Interaction

    rows = [Interaction(user, item, kind, 1_000_000 + k * 1000)
            for user, events in histories.items() for k, (item, kind) in enumerate(events)]
    rows.sort(key=lambda r: r.ts_ms)
    result = train(rows, EncoderConfig(d_model=32, d_ff=64, max_len=30),
                   TrainConfig(epochs=8, max_minutes=1.0, seed=0), progress=False,
                   log=lambda _: None)
    return Encoder(result.model, result.vocab, result.split.popularity, "0" * 16)


def _state(events: list[tuple[str, str]]) -> UserState:
    return UserState(items=np.asarray([item_key(i) for i, _ in events], dtype=np.int64),
                     types=np.asarray([TYPE_ID[t] for _, t in events], dtype=np.uint8),
                     ts_s=np.arange(len(events), dtype=np.int64), purchases=len(events))


def _score(encoder: Encoder, events: list[tuple[str, str]], target: int) -> float:
    vector = encoder.user_vectors([encoder.item_indices([i for i, _ in events])],
                                  [np.asarray([TYPE_ID[t] for _, t in events])])
    return float(encoder.score_items(vector.astype(np.float32), np.asarray([target]))[0, 0])


def test_removing_the_named_item_lowers_the_score_more_than_removing_a_random_one(
        encoder: Encoder, histories: dict[str, list[tuple[str, str]]]) -> None:
    config = PolicyConfig(quiet_start_hour=0, quiet_end_hour=0, explain_items=1,
                          default_coupon_opt_in=False, exploration_share=0.0)
    rng = np.random.default_rng(0)
    named_drops, random_drops = [], []
    for user, events in histories.items():
        recent = events[-encoder.config.max_len:]
        state = _state(recent)
        vector = encoder.user_vectors([encoder.item_indices([i for i, _ in recent])],
                                      [state.types.astype(np.int64)])[0]
        ctx = Context(config=config, coupons={}, budgets={}, model=encoder, now_ms=10**12)
        decision = decide(user, state, vector, Trigger("cart_add", "e", (recent[-1][0],), 0),
                          None, ctx)
        assert decision is not None
        assert decision.push is not None
        named = next(r["items"] for r in decision.reasons if r["code"] == "similar_to_recent")
        others = sorted({i for i, _ in recent} - set(named))
        if not named or not others:
            continue
        target = int(encoder.item_indices([decision.push["items"][0]])[0])
        full = _score(encoder, recent, target)
        without_named = [e for e in recent if e[0] != named[0]]
        other = others[int(rng.integers(len(others)))]
        without_other = [e for e in recent if e[0] != other]
        if not without_named or not without_other:
            continue
        named_drops.append(full - _score(encoder, without_named, target))
        random_drops.append(full - _score(encoder, without_other, target))
    assert len(named_drops) >= 100  # judged over many users, not a lucky few
    print(f"\nmean score drop: named item {np.mean(named_drops):.4f}, random item "
          f"{np.mean(random_drops):.4f} over {len(named_drops)} users")
    assert np.mean(named_drops) > np.mean(random_drops)
