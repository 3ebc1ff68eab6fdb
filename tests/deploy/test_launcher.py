"""The Kafka launcher: real KRaft brokers as JVM processes, cached jars, clean stops."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from deploy.kafka import launcher
from tests.support import PROMO, consume_all, produce_raw

pytestmark = pytest.mark.kafka


def test_kafka_version_is_read_from_the_pom() -> None:
    assert launcher.kafka_version().startswith("4.")


def test_cluster_ids_are_16_random_bytes_in_base64url_never_starting_with_a_dash() -> None:
    ids = [launcher.new_cluster_id() for _ in range(2000)]
    assert all(len(cid) == 22 and "=" not in cid for cid in ids)
    assert len(set(ids)) == len(ids)
    assert not [cid for cid in ids if cid.startswith("-")]


def test_server_properties_scale_replication_with_the_node_count(tmp_path: Path) -> None:
    nodes = [launcher.Node(i, 9000 + i, 9100 + i, f"d{i}") for i in (1, 2, 3)]
    three = launcher.Cluster(tmp_path, "cid", nodes)
    props = launcher.server_properties(three, nodes[1])
    assert props["node.id"] == "2"
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == "2"
    assert props["controller.quorum.bootstrap.servers"] == \
        "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103"
    one = launcher.Cluster(tmp_path, "cid", nodes[:1])
    assert launcher.server_properties(one, nodes[0])["min.insync.replicas"] == "1"


def test_start_twice_uses_cached_jars_and_stop_leaves_no_jvm(tmp_path: Path) -> None:
    launcher.ensure_jars()  # the first start on a machine may download; not under test here
    failing_mvn = tmp_path / "mvn"
    failing_mvn.write_text("#!/bin/sh\necho 'maven must not run: jars are cached' >&2\nexit 3\n")
    failing_mvn.chmod(0o755)
    env = {**os.environ, "PROMO_MVN": str(failing_mvn)}
    data_dir = tmp_path / "broker"
    for attempt in (1, 2):
        start = subprocess.run([PROMO, "broker", "start", "--data-dir", str(data_dir)],
                               env=env, capture_output=True, text=True, timeout=180, check=False)
        assert start.returncode == 0, f"start #{attempt} failed:\n{start.stderr}"
        bootstrap = start.stdout.strip()
        assert bootstrap.startswith("127.0.0.1:")
        status = subprocess.run([PROMO, "broker", "status", "--data-dir", str(data_dir)],
                                capture_output=True, text=True, check=False)
        assert status.returncode == 0 and "running" in status.stdout
        assert list(launcher.java_processes(data_dir))
        stop = subprocess.run([PROMO, "broker", "stop", "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=90, check=False)
        assert stop.returncode == 0, stop.stderr
        assert list(launcher.java_processes(data_dir)) == []
        status = subprocess.run([PROMO, "broker", "status", "--data-dir", str(data_dir)],
                                capture_output=True, text=True, check=False)
        assert status.returncode == 1 and "stopped" in status.stdout


def test_a_restarted_broker_keeps_its_data(tmp_path: Path) -> None:
    cluster = launcher.start(tmp_path, nodes=1)
    try:
        asyncio.run(produce_raw(cluster.bootstrap_servers, "kept",
                                [(b"k", f"v{i}".encode()) for i in range(10)]))
        launcher.stop(tmp_path)
        restarted = launcher.start(tmp_path, nodes=1)
        assert restarted.bootstrap_servers == cluster.bootstrap_servers
        records = asyncio.run(consume_all(restarted.bootstrap_servers, "kept", expect=10))
        assert [r.value for r in records] == [f"v{i}".encode() for i in range(10)]
    finally:
        launcher.stop(tmp_path)
    assert list(launcher.java_processes(tmp_path)) == []


# A three-node cluster (three bootstrap servers, replication following the node count, every
# replica in sync, one node killed and restarted, no JVM left after stop) is started once per
# run, by
# tests/reliability/test_faults.py::test_losing_one_of_three_brokers_keeps_processing.


def test_a_failing_start_reports_the_broker_log(tmp_path: Path) -> None:
    with pytest.raises(launcher.BrokerError,
                       match=r"exited during start-up|not ready|formatting node"):
        launcher.start(tmp_path, nodes=1, extra_properties={"log.retention.ms": "not-a-number"},
                       timeout=60)
    assert list(launcher.java_processes(tmp_path)) == []
