"""The micro-batch consumer's bookkeeping: which fetched records a batch processes.

The consumer itself runs against the real broker in tests/stream/test_streaming_core.py and
tests/reliability (rebalances, crashes); these pin the rule it applies to each partition's
records, which a rebalance makes hard to provoke on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream.batching import unprocessed


@dataclass(frozen=True)
class Record:
    offset: int


def offsets(records: list[Record]) -> list[int]:
    return [r.offset for r in records]


def fetched(*ranges: tuple[int, int]) -> list[Record]:
    """The records of consecutive fetches of one partition, each a range of offsets."""
    return [Record(o) for first, last in ranges for o in range(first, last + 1)]


def test_a_fetch_repeating_offsets_after_a_seek_is_processed_once_each() -> None:
    # faust sought back to the committed offset (10) between the linger's two fetches.
    assert offsets(unprocessed(fetched((10, 14), (10, 17)), 10)) == list(range(10, 18))


def test_a_later_fetch_starting_below_the_earlier_one_is_put_back_in_offset_order() -> None:
    assert offsets(unprocessed(fetched((20, 24), (15, 26)), 15)) == list(range(15, 27))


def test_records_below_the_next_expected_offset_were_processed_already() -> None:
    assert offsets(unprocessed(fetched((5, 12)), 9)) == [9, 10, 11, 12]
    assert unprocessed(fetched((5, 8)), 9) == []


def test_without_a_known_position_every_record_counts_and_gaps_stay_gaps() -> None:
    # Offsets missing from a fetch (transaction markers) are not invented.
    assert offsets(unprocessed(fetched((3, 4), (7, 8)), None)) == [3, 4, 7, 8]


def test_each_offset_keeps_one_record_object() -> None:
    first, again = Record(7), Record(7)
    kept = unprocessed([first, again], 7)
    assert len(kept) == 1 and kept[0].offset == 7
