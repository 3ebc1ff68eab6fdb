"""The time cut and the decision moments of the offline simulator."""

from __future__ import annotations

import pytest

from encoder.data import Interaction
from encoder.inference import Encoder
from stream.offline.moments import time_split
from stream.offline.run import simulate
from tests.stream.offline.conftest import CONFIG

pytestmark = pytest.mark.slow


def test_the_cut_is_in_time_and_loses_no_event(rows: list[Interaction]) -> None:
    before, after, cut = time_split(rows, 0.8)
    assert len(before) + len(after) == len(rows)
    assert max(r.ts_ms for r in before) < cut <= min(r.ts_ms for r in after)
    assert 0.7 < len(before) / len(rows) <= 0.8


def test_a_log_without_cart_adds_makes_every_event_a_moment(
        rows: list[Interaction], encoder: Encoder) -> None:
    purchases = [r for r in rows if r.event_type == "purchase"]
    report = simulate(purchases, encoder, CONFIG)
    assert report["moment_kinds"].keys() == {"visit"}
    assert report["moments"] == report["events_replayed"]
    assert report["policies"]["ours"]["decisions"] > 0
