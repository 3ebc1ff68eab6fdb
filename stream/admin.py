"""What a marketer or a CRM publishes: campaigns and consent, read from files and checked before
anything reaches Kafka (`promo coupons ...`, `promo preferences publish`).

Files: a JSON list of objects, or JSON lines (one object per line); preferences may also be a
CSV with a header (``user_id,push_opt_in,coupon_opt_in,timezone``). Every record is checked
with the same rules the worker reads them by (:meth:`Coupon.from_fields`,
:meth:`Preferences.from_fields`), strictly: an unknown field is an error, the likeliest typo. A
file with any bad record publishes nothing; the error names the line and the rule.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from stream.config import KafkaSettings
from stream.contracts import Coupon, Preferences
from stream.topics import ensure_topics, produce_records, read_compacted


class AdminFileError(ValueError):
    """A campaigns or preferences file that cannot be published (the message says where)."""


def _objects(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line, object) for a JSON list or JSON lines file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AdminFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise AdminFileError(f"{path}: not JSON: {exc}") from exc
        for n, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise AdminFileError(f"{path}: item {n} is not a JSON object")
            yield n, item
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise AdminFileError(f"{path}:{n}: not a JSON object: {exc}") from exc
        if not isinstance(item, dict):
            raise AdminFileError(f"{path}:{n}: not a JSON object")
        yield n, item


def load_campaigns(path: Path) -> list[Coupon]:
    """Every campaign of a file, checked; ``coupon_id`` names each (unique in the file)."""
    campaigns: dict[str, Coupon] = {}
    for n, body in _objects(path):
        coupon_id = body.get("coupon_id")
        if not isinstance(coupon_id, str):
            raise AdminFileError(f"{path}:{n}: coupon_id (a string) is required")
        if coupon_id in campaigns:
            raise AdminFileError(f"{path}:{n}: coupon_id {coupon_id!r} appears twice")
        try:
            campaigns[coupon_id] = Coupon.from_fields(coupon_id, body, strict=True)
        except ValueError as exc:
            raise AdminFileError(f"{path}:{n}: campaign {coupon_id!r}: {exc}") from exc
    if not campaigns:
        raise AdminFileError(f"{path}: no campaigns in it")
    return list(campaigns.values())


_CSV_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False,
              "": None}


def load_preferences(path: Path) -> dict[str, Preferences]:
    """Every user's preferences in a file, checked (JSON, JSON lines or CSV)."""
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _objects(path)
    found: dict[str, Preferences] = {}
    for n, body in rows:
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not user_id.strip():
            raise AdminFileError(f"{path}:{n}: user_id (a non-empty string) is required")
        try:
            found[user_id] = Preferences.from_fields(body, strict=True)
        except ValueError as exc:
            raise AdminFileError(f"{path}:{n}: user {user_id!r}: {exc}") from exc
    if not found:
        raise AdminFileError(f"{path}: no preferences in it")
    return found


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                body: dict[str, Any] = {}
                for name, value in row.items():
                    value = (value or "").strip()
                    if name in ("push_opt_in", "coupon_opt_in"):
                        if value.lower() not in _CSV_FLAGS:
                            raise AdminFileError(f"{path}:{reader.line_num}: {name} {value!r} "
                                                 "is not true/false/yes/no/1/0 or empty")
                        body[name] = _CSV_FLAGS[value.lower()]
                    else:
                        body[name] = value or None
                yield reader.line_num, body
    except OSError as exc:
        raise AdminFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def publish_campaigns(kafka: KafkaSettings, campaigns: list[Coupon]) -> int:
    asyncio.run(ensure_topics(kafka))
    return asyncio.run(produce_records(kafka, kafka.coupons_topic, [
        (c.coupon_id.encode(), c.to_json()) for c in campaigns]))


def retire_campaigns(kafka: KafkaSettings, coupon_ids: list[str]) -> list[str]:
    """Tombstone each campaign (workers drop it within a second); those not in the catalog
    are returned, and retired anyway (a tombstone is harmless)."""
    known = set(read_campaigns(kafka))
    asyncio.run(produce_records(kafka, kafka.coupons_topic,
                                [(coupon_id.encode(), None) for coupon_id in coupon_ids]))
    return [c for c in coupon_ids if c not in known]


def read_campaigns(kafka: KafkaSettings) -> dict[str, Coupon]:
    """The live catalog (a campaign the worker could not read is left out, as it does)."""
    found: dict[str, Coupon] = {}
    for key, raw in asyncio.run(read_compacted(kafka, kafka.coupons_topic)).items():
        try:
            coupon = Coupon.from_json(key.decode(), raw)
        except (ValueError, UnicodeDecodeError):
            continue
        found[coupon.coupon_id] = coupon
    return found


def publish_preferences(kafka: KafkaSettings, preferences: dict[str, Preferences]) -> int:
    asyncio.run(ensure_topics(kafka))
    return asyncio.run(produce_records(kafka, kafka.preferences_topic, [
        (user_id.encode(), prefs.to_json()) for user_id, prefs in preferences.items()]))


def describe_window(coupon: Coupon, now_ms: int) -> str:
    """``2026-12-01 .. 2026-12-24 (valid)``, for people."""
    def day(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")

    start = day(coupon.valid_from_ms) if coupon.valid_from_ms else "always"
    end = day(coupon.valid_to_ms) if coupon.valid_to_ms < 2**61 else "no end"
    state = ("valid" if coupon.is_valid(now_ms) else
             "not yet" if now_ms < coupon.valid_from_ms else "ended")
    return f"{start} .. {end} ({state})"
