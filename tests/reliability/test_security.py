"""SASL/SCRAM-SHA-512 over TLS between the worker and a real broker, and topic ACLs.

The test makes its own certificate authority with openssl, starts a broker whose client
listener is SASL_SSL with ACLs enforced, and shows that the worker works with the right
credentials, is refused with wrong ones, and cannot touch what its ACLs do not grant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from deploy.kafka import launcher
from stream.config import Settings, load_settings
from stream.contracts import Event
from stream.topics import client_kwargs, ensure_topics
from tests.support import PromoProcess, certificate_for_localhost, wait_until
from tests.workers import accounted, worker_env

# One group: both tests share the module's secured cluster (started once, not per process).
pytestmark = [pytest.mark.kafka, pytest.mark.xdist_group("secure-cluster")]

WORKER_PASSWORD = "worker-s3cret"
APP_ID = "promo-secure"


def make_tls(workdir: Path) -> tuple[Path, Path]:
    """A CA, and a broker certificate for 127.0.0.1 signed by it: (ca.pem, broker keystore)."""
    ca, cert, key = certificate_for_localhost(workdir, "broker")
    keystore = workdir / "broker-keystore.pem"
    keystore.write_text("".join(path.read_text() for path in (key, cert, ca)))
    return ca, keystore


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[launcher.Cluster,
                                                                               Path]]:
    workdir = tmp_path_factory.mktemp("secure")
    ca, keystore = make_tls(workdir)
    cluster = launcher.start(workdir / "broker", tls_keystore=keystore,
                             scram_users={"worker": WORKER_PASSWORD, "tester": "tester-pw"})
    try:
        yield cluster, ca
    finally:
        launcher.stop(workdir / "broker")


def secure_settings(cluster: launcher.Cluster, ca: Path, tmp_path: Path, *, user: str,
                    password_file: Path) -> Settings:
    base = load_settings(environ={})
    kafka = dataclasses.replace(base.kafka, bootstrap_servers=cluster.bootstrap_servers,
                                security_protocol="SASL_SSL", sasl_username=user,
                                sasl_password_file=str(password_file), ssl_cafile=str(ca),
                                partitions=2)
    worker = dataclasses.replace(base.worker, app_id=APP_ID, data_dir=str(tmp_path / "w"))
    return dataclasses.replace(base, kafka=kafka, worker=worker)


def grant_worker(cluster: launcher.Cluster, settings: Settings) -> None:
    """What the worker needs, and nothing more: read its inputs, write its outputs, own its
    consumer group and its internal (changelog) topics."""
    k = settings.kafka
    user = ["--allow-principal", "User:worker"]
    for topic in (k.events_topic, k.preferences_topic, k.coupons_topic):
        launcher.acl(cluster, "--add", *user, "--operation", "Read", "--operation", "Describe",
                     "--topic", topic)
    for topic in (k.decisions_topic, k.dlq_topic, k.vectors_topic, k.outcomes_topic):
        launcher.acl(cluster, "--add", *user, "--operation", "Write", "--operation", "Describe",
                     "--topic", topic)
    launcher.acl(cluster, "--add", *user, "--operation", "All", "--topic", APP_ID,
                 "--resource-pattern-type", "prefixed")
    launcher.acl(cluster, "--add", *user, "--operation", "All", "--group", APP_ID,
                 "--resource-pattern-type", "prefixed")
    launcher.acl(cluster, "--add", *user, "--operation", "Describe", "--cluster")


def test_the_worker_works_over_sasl_ssl_and_only_within_its_acls(
        secure_cluster: tuple[launcher.Cluster, Path], tmp_path: Path) -> None:
    cluster, ca = secure_cluster
    password = tmp_path / "worker.password"
    password.write_text(WORKER_PASSWORD + "\n")
    settings = secure_settings(cluster, ca, tmp_path, user="worker", password_file=password)
    admin = dataclasses.replace(settings.kafka, bootstrap_servers=cluster.internal_servers,
                                security_protocol="PLAINTEXT")
    asyncio.run(ensure_topics(admin))  # operators create topics; the worker only checks them
    grant_worker(cluster, settings)
    launcher.acl(cluster, "--add", "--allow-principal", "User:tester", "--operation", "All",
                 "--topic", "*", "--group", "*")

    port = launcher.free_port()
    env = worker_env(settings, port, None)
    assert WORKER_PASSWORD not in " ".join(env.values())  # only the file's path travels
    worker = PromoProcess(["worker"], env, tmp_path / "worker.log")
    try:
        worker.wait_for_log("worker ready", timeout=120)
        tester = dataclasses.replace(settings.kafka, sasl_username="tester",
                                     sasl_password="tester-pw", sasl_password_file="")
        now = int(time.time() * 1000)
        events = [Event(f"s{n}", f"user-{n % 7}", "add_to_cart", f"item-{n}", now + n)
                  for n in range(40)]
        asyncio.run(_produce(tester, settings.kafka.events_topic,
                             [(e.user_id.encode(), e.to_json()) for e in events]))
        wait_until(lambda: accounted(port) >= len(events), timeout=90,
                   what="the worker to process events over SASL_SSL")
        assert asyncio.run(_count(tester, settings.kafka.decisions_topic)) > 0
        # The worker's own credentials may not write to its input nor read other topics.
        worker_kafka = dataclasses.replace(settings.kafka, sasl_password=WORKER_PASSWORD,
                                           sasl_password_file="")
        with pytest.raises(KafkaError):
            asyncio.run(_produce(worker_kafka, settings.kafka.events_topic, [(b"x", b"{}")]))
        asyncio.run(_produce(tester, "payments", [(b"x", b"secret")]))
        with pytest.raises(KafkaError):
            asyncio.run(_count(worker_kafka, "payments", strict=True))
        assert worker.alive()
        assert WORKER_PASSWORD not in worker.log_path.read_text()
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_wrong_credentials_are_refused(secure_cluster: tuple[launcher.Cluster, Path],
                                       tmp_path: Path) -> None:
    cluster, ca = secure_cluster
    password = tmp_path / "wrong.password"
    password.write_text("not-the-password\n")
    settings = secure_settings(cluster, ca, tmp_path, user="worker", password_file=password)
    worker = subprocess.run([str(Path(__file__).parents[2] / ".venv/bin/promo"), "worker"],
                            env=worker_env(settings, launcher.free_port(), None),
                            capture_output=True, text=True, timeout=180, check=False)
    assert worker.returncode != 0
    assert "Authentication failed" in worker.stdout + worker.stderr or \
        "authentication" in (worker.stdout + worker.stderr).lower()


async def _produce(kafka, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", request_timeout_ms=15000)
    try:
        await producer.start()
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _count(kafka, topic: str, strict: bool = False) -> int:
    consumer = AIOKafkaConsumer(topic, **client_kwargs(kafka), group_id=f"{APP_ID}-reader",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        await consumer.start()
        n = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            n += sum(len(records) for records in batch.values())
            if n and not strict:
                break
        return n
    finally:
        await consumer.stop()
