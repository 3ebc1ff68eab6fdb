"""The coupon catalog: every worker reads the whole compacted `coupons` topic, live.

Campaigns are few and every worker needs all of them, so this is a plain consumer outside the
consumer group (like a faust GlobalTable): assigned every partition, reading from the beginning,
then following new records. A tombstone (null value) ends a campaign; an unreadable record is
logged and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from stream.config import KafkaSettings
from stream.contracts import Coupon
from stream.topics import follow_topic

log = logging.getLogger(__name__)


class CouponCatalog:
    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._coupons: dict[str, Coupon] = {}
        self._caught_up = asyncio.Event()

    def snapshot(self) -> Mapping[str, Coupon]:
        return self._coupons

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            log.warning("coupon record without key skipped")
            return
        coupon_id = key.decode(errors="replace")
        if value is None:
            self._coupons.pop(coupon_id, None)
            return
        try:
            self._coupons[coupon_id] = Coupon.from_json(coupon_id, value)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable coupon %s skipped: %s", coupon_id, exc)

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._caught_up.wait(), timeout)

    async def run(self) -> None:
        """Follow the topic forever; a failure is logged and retried, never fatal."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("coupon catalog reader failed; retrying in 5 s")
                await asyncio.sleep(5)

    async def _follow(self) -> None:
        def caught_up() -> None:
            self._caught_up.set()
            log.info("coupon catalog loaded", extra={"coupons": len(self._coupons)})

        await follow_topic(self.kafka, self.kafka.coupons_topic, self.apply,
                           on_caught_up=caught_up)
