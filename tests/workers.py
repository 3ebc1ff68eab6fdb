"""Running `promo worker` against the real broker in tests, and talking to its topics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from stream.config import Settings
from stream.contracts import Coupon, Event, Preferences
from stream.policy import daytime_timezone
from tests.support import consume_all, produce_raw, scrape, settings_env, wait_until


def worker_env(settings: Settings, port: int, checkpoint: Path | None,
               **policy: str) -> dict[str, str]:
    """Environment for a test worker: fast timers, daytime for users without a time zone (so
    quiet hours never depend on when the suite runs), and ``policy`` overrides by field name."""
    env = settings_env(settings) | {
        "PROMO_POLICY_DEFAULT_TIMEZONE": daytime_timezone(int(time.time() * 1000)),
        "PROMO_WORKER_METRICS_PORT": str(port),
        "PROMO_WORKER_CHECKPOINT": str(checkpoint or ""),
        "PROMO_WORKER_MODEL_POLL_SECONDS": "1",
        "PROMO_POLICY_CART_CHECK_SECONDS": "1",
    }
    env.update({f"PROMO_POLICY_{k.upper()}": v for k, v in policy.items()})
    return env


def send_events(settings: Settings, events: list[Event]) -> None:
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.events_topic,
                            [(e.user_id.encode(), e.to_json()) for e in events]))


def send_coupons(settings: Settings, coupons: list[Coupon]) -> None:
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.coupons_topic,
                            [(c.coupon_id.encode(), c.to_json()) for c in coupons]))


def send_preferences(settings: Settings, prefs: dict[str, Preferences]) -> None:
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.preferences_topic,
                            [(uid.encode(), p.to_json()) for uid, p in prefs.items()]))


def accounted(port: int) -> float:
    """Records the worker has accounted for: events consumed, records rejected, and records
    skipped as redelivered (already in state before a restart)."""
    return sum(v for (name, _), v in scrape(port).items()
               if name in ("promo_stream_events_consumed_total",
                           "promo_stream_records_rejected_total",
                           "promo_stream_records_redelivered_total"))


def read_decisions(settings: Settings, idle: float = 3.0,
                   isolation_level: str = "read_uncommitted") -> list[dict]:  # type: ignore[type-arg]
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers,
                                      settings.kafka.decisions_topic, idle=idle,
                                      isolation_level=isolation_level))
    return [orjson.loads(r.value) for r in records]


def wait_for_decisions(settings: Settings, n: int, timeout: float = 30.0,
                       isolation_level: str = "read_uncommitted") -> list[dict]:  # type: ignore[type-arg]
    found: list[dict] = []  # type: ignore[type-arg]

    def enough() -> bool:
        found[:] = read_decisions(settings, idle=1.0, isolation_level=isolation_level)
        return len(found) >= n

    wait_until(enough, timeout=timeout, what=f"{n} decisions")
    return found


def table_contents(settings: Settings, table: str) -> dict[bytes, bytes]:
    """A worker table's final value per key, read back from its changelog topic."""
    topic = f"{settings.worker.app_id}-{table}-changelog"
    records = asyncio.run(consume_all(settings.kafka.bootstrap_servers, topic, idle=3.0))
    final: dict[bytes, bytes | None] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        final[r.key] = r.value
    return {k: v for k, v in final.items() if v is not None}
