"""The micro-batch consumer's bookkeeping: which fetched records a batch processes, and how
many handled batches may still be on their way to the broker.

The consumer itself runs against the real broker in tests/stream/test_streaming_core.py and
tests/reliability (rebalances, crashes); these pin the rule it applies to each partition's
records, which a rebalance makes hard to provoke on demand.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from stream.batching import Settle, Settling, unprocessed


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


# --- batches settling: handled, their writes not yet acknowledged by the broker -----------


class Broker:
    """Acknowledges each batch's writes when the test says so."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[None]] = {}

    def settle(self, batch: int) -> Settle:
        async def wait() -> None:
            self.pending[batch] = asyncio.get_running_loop().create_future()
            await self.pending[batch]
        return wait

    async def acknowledge(self, batch: int, error: Exception | None = None) -> None:
        while batch not in self.pending:
            await asyncio.sleep(0)
        if error is None:
            self.pending[batch].set_result(None)
        else:
            self.pending[batch].set_exception(error)
        await asyncio.sleep(0)


def test_one_batch_settles_while_the_next_is_handled_and_no_more() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        settling, broker, acked = Settling(), Broker(), []
        await settling.hand_over(broker.settle(1), lambda: acked.append(1))
        in_flight = [settling.in_flight]
        # Batch 2 is handed over: that waits for batch 1, which the broker has not acknowledged.
        second = asyncio.ensure_future(settling.hand_over(broker.settle(2),
                                                          lambda: acked.append(2)))
        await asyncio.sleep(0.01)
        assert not second.done() and acked == []
        await broker.acknowledge(1)
        await second
        in_flight.append(settling.in_flight)
        await broker.acknowledge(2)
        await settling.wait()
        in_flight.append(settling.in_flight)
        return acked, in_flight

    acked, in_flight = asyncio.run(scenario())
    assert acked == [1, 2]  # offsets acknowledged in the order the batches were handled
    assert in_flight == [1, 1, 0]


def test_a_batch_is_acknowledged_only_once_its_writes_settled() -> None:
    async def scenario() -> list[str]:
        settling, broker, events = Settling(), Broker(), []
        await settling.hand_over(broker.settle(1), lambda: events.append("acked"))
        await asyncio.sleep(0.01)
        events.append("still settling")
        await broker.acknowledge(1)
        await settling.wait()
        return events

    assert asyncio.run(scenario()) == ["still settling", "acked"]


def test_a_failed_settle_acknowledges_nothing_and_raises_where_it_is_waited_for() -> None:
    async def scenario() -> list[int]:
        settling, broker, acked = Settling(), Broker(), []
        await settling.hand_over(broker.settle(1), lambda: acked.append(1))
        await broker.acknowledge(1, error=ConnectionError("broker gone"))
        with pytest.raises(ConnectionError):
            await settling.hand_over(broker.settle(2), lambda: acked.append(2))
        await settling.wait()  # nothing left: the failure was reported once
        return acked

    assert asyncio.run(scenario()) == []
