"""Logs name users only by pseudonym: no raw user id, email or other personal field, ever.

The end-to-end test replays a CSV whose user ids are e-mail addresses, at log level debug, into
a worker also at debug (JSON lines), with malformed records carrying the same personal data,
and scans every line both processes wrote.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import orjson
import pytest

from stream.config import Settings
from stream.logs import JsonLinesFormatter, user_ref
from tests.support import PROMO, produce_raw, settings_env, wait_until
from tests.workers import accounted

USERS = [f"jane.doe+{n}@example.com" for n in range(40)]
PHONE = "+44 7700 900123"


def test_pseudonyms_are_stable_salted_and_not_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = user_ref("jane@example.com")
    assert ref == user_ref("jane@example.com")
    assert "jane" not in ref and len(ref) == 12
    monkeypatch.setenv("PROMO_LOG_SALT", "another-deployment")
    assert user_ref("jane@example.com") != ref


def test_retried_broker_start_up_errors_are_not_reported_as_errors(
        capsys: pytest.CaptureFixture[str]) -> None:
    from stream.logs import configure

    configure("info")
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Error sending JoinGroupRequest: [Error 15] "
                      "GroupCoordinatorNotAvailableError: promo-stream")
    coordinator.error("something else went wrong")
    configure("debug")
    coordinator.error("GroupCoordinatorNotAvailableError again")
    printed = capsys.readouterr().err
    assert "JoinGroupRequest" not in printed  # at info level: not shown at all
    assert "ERROR aiokafka.consumer.group_coordinator: something else went wrong" in printed
    assert "DEBUG aiokafka.consumer.group_coordinator: GroupCoordinatorNotAvailableError" in \
        printed
    configure("info")


def test_json_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("promo", logging.INFO, __file__, 1, "batch %d", (7,), None)
    record.user = user_ref("jane@example.com")
    line = orjson.loads(JsonLinesFormatter().format(record))
    assert line["msg"] == "batch 7" and line["level"] == "info"
    assert line["user"] == user_ref("jane@example.com")


@pytest.mark.kafka
def test_a_debug_replay_and_worker_never_log_a_personal_field(
        tmp_path: Path, settings: Settings, run_worker) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "interactions.csv"
    rows = ["user_id,item_id,timestamp,event_type"]
    for step in range(6):
        for n, user in enumerate(USERS):
            kind = "add_to_cart" if step % 3 == 2 else "view"
            rows.append(f"{user},item-{(n + step) % 9},{1_700_000_000 + 60 * step + n},{kind}")
    csv.write_text("\n".join(rows) + "\n")
    good = len(rows) - 1

    debug_json = {"PROMO_WORKER_LOG_LEVEL": "debug", "PROMO_WORKER_LOG_FORMAT": "json"}
    worker, port = run_worker(None, env=debug_json)
    env = settings_env(settings) | debug_json
    replay = subprocess.run(
        [PROMO, "--log-level", "debug", "replay", "--interactions", str(csv),
         "--type-col", "event_type", "--clock", "now", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    bad = [(user.encode(), orjson.dumps({"user_id": user, "email": user, "phone": PHONE,
                                         "type": "teleport"}))
           for user in USERS[:10]]
    bad.append((None, f'{{"user_id": "{USERS[0]}", broken'.encode()))
    asyncio.run(produce_raw(settings.kafka.bootstrap_servers, settings.kafka.events_topic, bad))
    wait_until(lambda: accounted(port) >= good + len(bad), timeout=90,
               what="the worker to account for every record")
    assert worker.stop() == 0

    logs = {"replay": replay.stdout + replay.stderr, "worker": worker.log_path.read_text()}
    batches = [orjson.loads(line) for line in logs["worker"].splitlines()
               if line.startswith("{") and '"msg":"batch"' in line]
    assert batches and all(b["level"] == "debug" for b in batches)
    for source, text in logs.items():
        assert text.strip(), f"{source} wrote no log lines at debug level"
        for number, line in enumerate(text.splitlines(), 1):
            for secret in (*USERS, "jane.doe", "example.com", PHONE):
                assert secret not in line, f"{source} log line {number} leaks {secret!r}: {line}"
