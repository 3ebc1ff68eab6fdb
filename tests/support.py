"""Helpers for tests that talk to the real broker or run `promo` processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from encoder.data import Interaction
from stream.config import Settings, as_environment

PROMO = str(Path(sys.executable).with_name("promo"))
# Files in the research datasets' formats, written for the tests (ours to ship); the
# Instacart sample comes with the project (encoder/data.py says from where).
FIXTURE_DATASETS = Path(__file__).resolve().parent / "fixtures" / "datasets"


async def produce_raw(bootstrap: str, topic: str,
                      records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await producer.flush()
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def consume_all(bootstrap: str, topic: str, *, expect: int | None = None,
                      timeout: float = 60.0, idle: float = 3.0,
                      isolation_level: str = "read_uncommitted") -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning until ``expect`` records arrived (or, without
    ``expect``, until nothing new came for ``idle`` seconds). Never waits past ``timeout``."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level=isolation_level)
    await consumer.start()
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
                last_new = time.monotonic()
            if expect is not None and len(records) >= expect:
                break
            if expect is None and time.monotonic() - last_new > idle:
                break
        return records
    finally:
        await consumer.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Samples of a /metrics endpoint as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


class PromoProcess:
    """A `promo` subcommand running in the background, stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([PROMO, *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            if not self.alive():
                raise AssertionError(f"process exited ({self.proc.returncode}) before "
                                     f"logging {text!r}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in log after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def certificate_for_localhost(workdir: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 and localhost signed by it, made with openssl:
    (ca.pem, <name>.pem, <name>.pk8: its PKCS#8 key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    if not (workdir / "ca.pem").exists():
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                "/CN=promo-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (workdir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem")
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", f"{name}.key", "-out", f"{name}.pk8")
    return workdir / "ca.pem", workdir / f"{name}.pem", workdir / f"{name}.pk8"


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a `promo` subprocess."""
    return as_environment(settings)


def run_bench(script: str, tmp_path: Path, *args: str) -> tuple[str, dict[str, float]]:
    """Run ``bench/<script> --quick`` writing into ``tmp_path``, merging into a summary.json
    that already holds someone else's key: (its last stdout line, the merged summary)."""
    root = Path(__file__).resolve().parents[1]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"someone_elses_key": 1.5}))
    done = subprocess.run(
        [sys.executable, str(root / "bench" / script), "--quick", *args,
         "--out-dir", str(tmp_path), "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, check=False, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads(summary.read_text())
    assert merged["someone_elses_key"] == 1.5
    return done.stdout.strip().splitlines()[-1], merged


def first_users(rows: Iterable[Interaction], n: int) -> list[Interaction]:
    """The whole histories of the first ``n`` users to appear, in the rows' (time) order."""
    users: set[str] = set()
    out = []
    for row in rows:
        if row.user_id in users or len(users) < n:
            users.add(row.user_id)
            out.append(row)
    return out
