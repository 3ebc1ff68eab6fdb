"""The baselines: the same policy with other item rankings."""

from __future__ import annotations

import numpy as np
import pytest

from encoder.inference import Encoder
from stream.offline.baselines import BaselineItems

pytestmark = pytest.mark.slow


def test_the_repeat_baseline_offers_the_users_own_items_first(encoder: Encoder) -> None:
    baseline = BaselineItems(encoder, "repeat", np.arange(encoder.config.vocab_size,
                                                          dtype=np.float64),
                             history_first=True)
    vectors = np.zeros((2, encoder.config.d_model), np.float32)
    own = (np.array([5, 9]), np.array([np.log1p(1), np.log1p(3)]))
    top, _ = baseline.top_items(vectors, 3, boost=[own, (np.zeros(0, np.int64), np.zeros(0))])
    assert top[0].tolist()[:2] == [9, 5]  # most frequent first, above any item score
    assert top[1].tolist() == baseline.top_items(vectors[1:], 3)[0][0].tolist()
    plain = BaselineItems(encoder, "popularity", np.arange(encoder.config.vocab_size,
                                                           dtype=np.float64))
    assert plain.top_items(vectors[:1], 3, boost=[own])[0][0].tolist() == \
        plain.top_items(vectors[:1], 3)[0][0].tolist()  # other baselines ignore the history
