"""The worker's app (stream/app.py): the readiness gate (events wait until the preferences read
up to the ends noted at assignment, however the gate's checks interleave) and how its consumer
reads."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from stream.app import PreferencesCatchUp, create_app
from stream.config import Settings
from stream.metrics import Metrics

PREFS = "user-preferences"


class Positions:
    """The consumer calls the gate makes. ``position`` yields to the event loop, as the real
    one does, so two checks can interleave."""

    def __init__(self, ends: dict[TP, int | None]) -> None:
        self.ends = ends
        self.positions = dict.fromkeys(ends, 0)

    def assignment(self) -> set[TP]:
        return set(self.ends)

    async def highwaters(self, *tps: TP) -> dict[TP, int | None]:
        return {tp: self.ends[tp] for tp in tps}

    def highwater(self, tp: TP) -> int | None:
        return self.ends[tp]

    async def position(self, tp: TP) -> int:
        await asyncio.sleep(0)
        return self.positions[tp]


def gate(consumer: Positions) -> tuple[PreferencesCatchUp, Metrics]:
    metrics = Metrics()
    app: Any = SimpleNamespace(consumer=consumer)
    return PreferencesCatchUp(app, {PREFS}, metrics), metrics


def test_concurrent_checks_that_both_see_a_partition_caught_up_open_the_gate_once() -> None:
    # Found live: a second worker joining ran the batch gate's check beside arm()'s, both
    # saw partition 0 caught up, and the second removal raised KeyError in the fetcher.
    tps = {TP(PREFS, 0): 5, TP(PREFS, 1): 3}
    consumer = Positions(tps)

    async def scenario() -> tuple[bool, bool, bool]:
        catch_up, _ = gate(consumer)
        await catch_up.arm()
        assert not catch_up.ready  # nothing read yet
        consumer.positions = dict(tps)  # both partitions read to their ends
        first, second = await asyncio.gather(catch_up.check(), catch_up.check())
        return first, second, catch_up.ready

    first, second, ready = asyncio.run(scenario())
    assert ready and (first or second)


def test_a_rebalance_during_a_check_leaves_the_gate_closed() -> None:
    tps = {TP(PREFS, 0): 5}
    consumer = Positions(tps)

    async def scenario() -> tuple[bool, bool]:
        catch_up, _ = gate(consumer)
        await catch_up.arm()
        consumer.positions = dict(tps)
        checking = asyncio.ensure_future(catch_up.check())
        await asyncio.sleep(0)  # the check is waiting on a position
        catch_up.reset()  # partitions revoked meanwhile
        return await checking, catch_up.ready

    opened, ready = asyncio.run(scenario())
    assert (opened, ready) == (False, False)


def test_an_end_not_known_at_assignment_keeps_the_gate_closed_until_it_is_read_up_to() -> None:
    # Under exactly-once, highwaters() is the last stable offset: None until the partition's
    # first fetch returns. A worker restarted by the SIGKILL test crashed on it.
    tp = TP(PREFS, 0)
    consumer = Positions({tp: None})

    async def scenario() -> list[bool]:
        catch_up, _ = gate(consumer)
        await catch_up.arm()
        seen = [catch_up.ready]
        consumer.ends[tp] = 4  # the first fetch told the end
        seen.append(await catch_up.check())
        consumer.positions[tp] = 4  # and the table read up to it
        seen.append(await catch_up.check())
        return seen

    assert asyncio.run(scenario()) == [False, False, True]


def test_the_consumer_reads_committed_records_and_never_waits_on_the_broker_past_a_window(
        ) -> None:
    # faust's own fetch wait (1.5 s) let a fetch of idle partitions (preferences, coupons)
    # hold back the events partitions' next fetch: decisions waited 1-2 s at 5,000 events/s.
    async def created(window: float) -> tuple[int, str]:
        settings = Settings()
        settings = dataclasses.replace(settings, worker=dataclasses.replace(
            settings.worker, batch_max_seconds=window))
        app: Any = create_app(settings).app
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms, consumer._isolation_level
        finally:
            await consumer.stop()

    assert asyncio.run(created(0.25)) == (250, "read_committed")
    assert asyncio.run(created(0.0)) == (10, "read_committed")  # no linger: a short wait
