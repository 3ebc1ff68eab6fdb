"""Logging set-up: plain text for people, JSON lines for log pipelines.

User ids never reach a log line raw: call :func:`user_ref` and log the pseudonym.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import Any

import orjson

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def user_ref(user_id: str) -> str:
    """A stable pseudonym for a user id, for logs: 12 hex chars of a salted BLAKE2b hash.

    Set ``PROMO_LOG_SALT`` per deployment so pseudonyms cannot be joined across systems.
    """
    salt = os.environ.get("PROMO_LOG_SALT", "promo-stream").encode()
    return hashlib.blake2b(user_id.encode(), digest_size=6, key=salt[:64]).hexdigest()


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with ``extra=`` fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [f"{k}={v}" for k, v in vars(record).items()
                  if k not in _STANDARD_ATTRS and not k.startswith("_")]
        return text + (" " + " ".join(extras) if extras else "")


#: Errors Kafka clients report, and retry, while a broker elects leaders or a group
#: coordinator starts: every healthy start (or new topic) shows some. Not worth an ERROR line.
TRANSIENT_KAFKA_ERRORS = ("GroupCoordinatorNotAvailableError", "NotLeaderForPartitionError",
                          "LeaderNotAvailableError", "NotCoordinatorForGroupError",
                          "CoordinatorLoadInProgressError")


class TransientKafkaErrors(logging.Filter):
    """Report the Kafka clients' retried start-up errors at debug level, not as errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and any(
                name in record.getMessage() for name in TRANSIENT_KAFKA_ERRORS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every logger to stderr in the chosen format; quiet the chattiest libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TransientKafkaErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    noisy_level = max(logging.WARNING, root.level)
    # httpx and httpcore log every request's URL at info: a pull-API URL holds a raw user id.
    for name in ("aiokafka", "kafka", "faust", "mode", "asyncio", "matplotlib", "httpx",
                 "httpcore"):
        logging.getLogger(name).setLevel(noisy_level)
