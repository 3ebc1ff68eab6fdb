"""Run Apache Kafka in KRaft mode as plain JVM processes, no Docker.

One combined broker+controller node for development, the demo and most tests; three nodes on
one machine (replication factor 3, min.insync.replicas 2) for replication tests. The jars come
from Maven Central through ``deploy/kafka/pom.xml`` and are cached per Kafka version, so only
the first start on a machine touches the network.

A cluster lives in one data directory::

    <data_dir>/cluster.json          ports, cluster id, pids: what `status` and `stop` read
    <data_dir>/node-<id>/server.properties
    <data_dir>/node-<id>/log4j2.properties
    <data_dir>/node-<id>/server.log   the broker's own log (readiness is read from it)
    <data_dir>/node-<id>/data/       log.dirs

Starting a cluster whose directory already holds formatted storage restarts it on the same
ports with its data, which is what a broker-restart test needs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

POM = Path(__file__).with_name("pom.xml")
READY_LINE = "Kafka Server started"
STATE_FILE = "cluster.json"

# JVMs started by this process, kept so they are reaped (not left as zombies, not garbage-
# collected while running) when this same process stops them, as tests do.
_children: dict[int, subprocess.Popen[bytes]] = {}


class BrokerError(RuntimeError):
    """The broker could not be installed, started or stopped; the message says why."""


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pinned in the POM: the one place it is written down."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if match is None:
        raise BrokerError(f"{pom} does not define <kafka.version>")
    return match.group(1).strip()


def default_cache_dir() -> Path:
    root = os.environ.get("PROMO_CACHE_DIR") or Path.home() / ".cache" / "promo-stream"
    return Path(root)


def jars_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"kafka-{kafka_version()}" / "libs"


def ensure_jars(cache_dir: Path | None = None, mvn: str | None = None) -> Path:
    """Return the directory of Kafka's jars, resolving them with Maven only if not cached.

    The ``.complete`` marker (the POM's digest) is written last, so an interrupted download is
    redone rather than half-used, and a changed POM is resolved again.
    """
    libs = jars_dir(cache_dir)
    marker = libs / ".complete"
    if marker.exists() and marker.read_text().strip() == _pom_digest():
        return libs
    mvn = mvn or os.environ.get("PROMO_MVN") or "mvn"
    if shutil.which(mvn) is None:
        raise BrokerError(
            f"Kafka jars are not cached in {libs} and Maven ({mvn}) is not on PATH")
    partial = libs.with_name(f"libs.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={partial}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        raise BrokerError(f"maven failed ({proc.returncode}):\n{output}")
    if not any(partial.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"maven finished but {partial} holds no kafka_2.13 jar")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    marker.write_text(_pom_digest() + "\n")
    return libs


def _pom_digest() -> str:
    """The cache is valid for this exact POM: a new dependency re-resolves."""
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_cluster_id() -> str:
    """16 random bytes, base64url without padding: the form `kafka-storage format` expects.

    Like Kafka's own Uuid.randomUuid, never one starting with "-", which a command line would
    read as an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


@dataclass(frozen=True)
class Node:
    node_id: int
    broker_port: int
    controller_port: int
    directory_id: str  # the metadata log dir's id, named in --initial-controllers
    # With a secured client listener: a PLAINTEXT listener on loopback for brokers and admin
    # tools (their principal, ANONYMOUS, is a super user).
    internal_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


@dataclass
class Cluster:
    """A KRaft cluster on this machine, as recorded in ``<data_dir>/cluster.json``."""

    data_dir: Path
    cluster_id: str
    nodes: list[Node]
    heap: str = "512m"
    extra_properties: dict[str, str] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    # PEM file with the broker's private key and certificate chain: clients then connect with
    # SASL/SCRAM-SHA-512 over TLS, and ACLs apply (StandardAuthorizer).
    tls_keystore: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def internal_servers(self) -> str:
        """PLAINTEXT bootstrap for admin tools (same as clients' unless secured)."""
        return ",".join(f"127.0.0.1:{node.internal_port or node.broker_port}"
                        for node in self.nodes)

    def node_dir(self, node_id: int) -> Path:
        return self.data_dir / f"node-{node_id}"

    def node(self, node_id: int) -> Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise BrokerError(f"no node {node_id} in {self.data_dir}")

    def alive(self) -> dict[int, bool]:
        return {node.node_id: _pid_alive(self.pids.get(node.node_id)) for node in self.nodes}

    def save(self) -> None:
        state = asdict(self)
        state["data_dir"] = str(self.data_dir)
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.data_dir / STATE_FILE)

    @classmethod
    def load(cls, data_dir: Path) -> Cluster | None:
        path = Path(data_dir) / STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        return cls(
            data_dir=Path(data_dir),
            cluster_id=state["cluster_id"],
            nodes=[Node(**node) for node in state["nodes"]],
            heap=state.get("heap", "512m"),
            extra_properties=dict(state.get("extra_properties", {})),
            pids={int(k): int(v) for k, v in state.get("pids", {}).items()},
            tls_keystore=state.get("tls_keystore"),
        )


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None:
        # Our own JVM: ask waitpid. A JVM's main thread can show as a zombie while its other
        # threads are still exiting, and only waitpid knows when the process is gone.
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child we have not reaped) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def server_properties(cluster: Cluster, node: Node) -> dict[str, str]:
    """The broker configuration; docker-compose.kafka.yml mirrors these settings."""
    n = len(cluster.nodes)
    voters = ",".join(f"127.0.0.1:{other.controller_port}" for other in cluster.nodes)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.bootstrap.servers": voters,
        "listeners": (f"PLAINTEXT://127.0.0.1:{node.broker_port},"
                      f"CONTROLLER://127.0.0.1:{node.controller_port}"),
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.broker_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(cluster.node_dir(node.node_id) / "data"),
        "num.partitions": "1",
        "default.replication.factor": str(n),
        "min.insync.replicas": str(min(2, n)),
        "offsets.topic.replication.factor": str(n),
        # One partition for __consumer_offsets and the transaction log: start-up creates
        # them on first use, and 50 partitions each cost seconds on a 2-core machine.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": str(n),
        "transaction.state.log.min.isr": str(min(2, n)),
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": str(n),
        "share.coordinator.state.topic.min.isr": str(min(2, n)),
        "group.initial.rebalance.delay.ms": "0",
    }
    if cluster.tls_keystore:
        assert node.internal_port is not None
        props.update({
            "listeners": (f"SASL_SSL://127.0.0.1:{node.broker_port},"
                          f"INTERNAL://127.0.0.1:{node.internal_port},"
                          f"CONTROLLER://127.0.0.1:{node.controller_port}"),
            "advertised.listeners": (f"SASL_SSL://127.0.0.1:{node.broker_port},"
                                     f"INTERNAL://127.0.0.1:{node.internal_port}"),
            "inter.broker.listener.name": "INTERNAL",
            "listener.security.protocol.map":
                "SASL_SSL:SASL_SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": cluster.tls_keystore,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        })
    props.update(cluster.extra_properties)
    return props


LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise BrokerError("java not found: install Java 17+ or set JAVA_HOME")
    return java


def _classpath(libs: Path) -> str:
    return str(libs / "*")


def _write_config(cluster: Cluster, node: Node) -> Path:
    node_dir = cluster.node_dir(node.node_id)
    node_dir.mkdir(parents=True, exist_ok=True)
    props = server_properties(cluster, node)
    (node_dir / "server.properties").write_text(
        "".join(f"{key}={value}\n" for key, value in props.items()))
    (node_dir / "log4j2.properties").write_text(LOG4J2.format(log=node_dir / "server.log"))
    return node_dir


def _format(cluster: Cluster, node: Node, libs: Path,
            scram_users: Mapping[str, str] | None = None) -> None:
    node_dir = cluster.node_dir(node.node_id)
    if (node_dir / "data" / "meta.properties").exists():
        return  # formatted before: this is a restart
    cmd = [_java(), "-cp", _classpath(libs),
           f"-Dlog4j2.configurationFile={node_dir / 'log4j2.properties'}",
           "kafka.tools.StorageTool", "format", f"--cluster-id={cluster.cluster_id}",
           f"--config={node_dir / 'server.properties'}"]
    if len(cluster.nodes) == 1:
        cmd.append("--standalone")
    else:
        controllers = ",".join(
            f"{n.node_id}@127.0.0.1:{n.controller_port}:{n.directory_id}" for n in cluster.nodes)
        cmd += ["--initial-controllers", controllers]
    for user, password in (scram_users or {}).items():
        # KRaft stores SCRAM credentials in its metadata: they are created at format time.
        cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"formatting node {node.node_id} failed:\n{proc.stdout}{proc.stderr}")


def _spawn(cluster: Cluster, node: Node, libs: Path) -> tuple[int, int]:
    """Start one node's JVM; return its pid and the log offset from which to await readiness."""
    node_dir = cluster.node_dir(node.node_id)
    log = node_dir / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    cmd = [_java(), "-Xms256m", f"-Xmx{cluster.heap}", "-XX:+UseG1GC",
           "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={node_dir / 'log4j2.properties'}",
           "-cp", _classpath(libs), "kafka.Kafka", str(node_dir / "server.properties")]
    with open(node_dir / "stdout.log", "ab") as out:
        # A session of its own: the broker outlives `promo broker start` and is not hit by
        # the terminal's Ctrl-C aimed at a worker.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=node_dir,
                                start_new_session=True)
    _children[proc.pid] = proc
    return proc.pid, offset


def _await_ready(cluster: Cluster, waiting: Mapping[int, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(waiting)
    while pending:
        for node_id, offset in list(pending.items()):
            log = cluster.node_dir(node_id) / "server.log"
            if log.exists():
                with open(log, "rb") as f:
                    f.seek(offset)
                    if READY_LINE.encode() in f.read():
                        del pending[node_id]
                        continue
            if not _pid_alive(cluster.pids.get(node_id)):
                raise BrokerError(f"node {node_id} exited during start-up; last log lines:\n"
                                  + _tail(cluster.node_dir(node_id)))
        if pending and time.monotonic() > deadline:
            raise BrokerError(f"nodes {sorted(pending)} not ready after {timeout:.0f}s; "
                              f"see {cluster.data_dir}/node-*/server.log")
        if pending:
            time.sleep(0.2)


def _tail(node_dir: Path, lines: int = 30) -> str:
    text = ""
    for name in ("stdout.log", "server.log"):
        path = node_dir / name
        if path.exists():
            last = path.read_text(errors="replace").splitlines()[-lines:]
            text += f"--- {path}\n" + "\n".join(last) + "\n"
    return text


def start(
    data_dir: Path,
    *,
    nodes: int = 1,
    broker_port: int | None = None,
    controller_port: int | None = None,
    heap: str = "512m",
    extra_properties: Mapping[str, str] | None = None,
    tls_keystore: Path | None = None,
    scram_users: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    timeout: float = 90.0,
) -> Cluster:
    """Start (or restart) the cluster kept in ``data_dir`` and wait until every node is ready.

    Ports are free ones unless given (``broker_port``/``controller_port`` apply to a single
    node). A directory with an existing cluster restarts it with the ports it had: KRaft
    stores the controllers' addresses in its metadata, so they must not change.

    With ``tls_keystore`` (a PEM file: private key and certificate chain) clients must connect
    with SASL/SCRAM-SHA-512 over TLS as one of ``scram_users`` (name -> password, created when
    the storage is formatted), and ACLs decide what each may do (:func:`acl`).
    """
    if nodes not in (1, 3):
        raise BrokerError(f"nodes must be 1 or 3, not {nodes}")
    libs = ensure_jars(cache_dir)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster.load(data_dir)
    if cluster is None:
        if nodes > 1 and (broker_port or controller_port):
            raise BrokerError("fixed ports are only supported for a single node")
        cluster = Cluster(
            data_dir=data_dir,
            cluster_id=new_cluster_id(),
            nodes=[Node(node_id=i + 1,
                        broker_port=(broker_port if nodes == 1 and broker_port else free_port()),
                        controller_port=(controller_port if nodes == 1 and controller_port
                                         else free_port()),
                        directory_id=new_cluster_id(),
                        internal_port=free_port() if tls_keystore else None)
                   for i in range(nodes)],
            heap=heap,
            extra_properties=dict(extra_properties or {}),
            tls_keystore=str(tls_keystore) if tls_keystore else None,
        )
    elif len(cluster.nodes) != nodes:
        raise BrokerError(f"{data_dir} holds a {len(cluster.nodes)}-node cluster, not {nodes}")
    elif extra_properties:
        cluster.extra_properties.update(extra_properties)
    waiting: dict[int, int] = {}
    for node in cluster.nodes:
        if _pid_alive(cluster.pids.get(node.node_id)):
            continue
        _write_config(cluster, node)
        _format(cluster, node, libs, scram_users)
        cluster.pids[node.node_id], waiting[node.node_id] = _spawn(cluster, node, libs)
    cluster.save()
    try:
        _await_ready(cluster, waiting, timeout)
    except BrokerError:
        stop(data_dir, timeout=10)
        raise
    return cluster


def start_node(data_dir: Path, node_id: int, *, timeout: float = 90.0) -> Cluster:
    """Bring one stopped node of an existing cluster back (broker-failure tests)."""
    cluster = Cluster.load(Path(data_dir))
    if cluster is None:
        raise BrokerError(f"no cluster in {data_dir}")
    node = cluster.node(node_id)
    if not _pid_alive(cluster.pids.get(node_id)):
        libs = ensure_jars()
        _write_config(cluster, node)
        cluster.pids[node_id], offset = _spawn(cluster, node, libs)
        cluster.save()
        _await_ready(cluster, {node_id: offset}, timeout)
    return cluster


def stop_node(data_dir: Path, node_id: int, *, kill: bool = False, timeout: float = 30.0) -> None:
    """Stop one node: SIGTERM and wait (or SIGKILL at once with ``kill``)."""
    cluster = Cluster.load(Path(data_dir))
    if cluster is None:
        raise BrokerError(f"no cluster in {data_dir}")
    pid = cluster.pids.get(node_id)
    _terminate(pid, kill=kill, timeout=timeout)
    cluster.pids.pop(node_id, None)
    cluster.save()


def stop(data_dir: Path, *, timeout: float = 30.0) -> bool:
    """Stop every node (SIGTERM, then SIGKILL after ``timeout``); True if any was running."""
    cluster = Cluster.load(Path(data_dir))
    if cluster is None:
        return False
    pids = [pid for pid in cluster.pids.values() if _pid_alive(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        _terminate(pid, kill=False, timeout=max(0.0, deadline - time.monotonic()),
                   already_signalled=True)
    cluster.pids.clear()
    cluster.save()
    return bool(pids)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _terminate(pid: int | None, *, kill: bool, timeout: float,
               already_signalled: bool = False) -> None:
    if pid is None:
        return
    if not _pid_alive(pid):
        _reap(pid)  # it may have exited between the signal and this check: collect it
        return
    if kill:
        _signal(pid, signal.SIGKILL)
    elif not already_signalled:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        _reap(pid)
        if time.monotonic() > deadline:
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if the JVM is our child, so it does not linger as a zombie."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def acl(cluster: Cluster, *args: str) -> str:
    """Run Kafka's AclCommand against the cluster's internal listener; return its output.

    Example: ``acl(cluster, "--add", "--allow-principal", "User:worker", "--operation",
    "Read", "--topic", "events")``.
    """
    log4j = cluster.node_dir(cluster.nodes[0].node_id) / "log4j2.properties"
    cmd = [_java(), "-cp", _classpath(ensure_jars()), f"-Dlog4j2.configurationFile={log4j}",
           "org.apache.kafka.tools.AclCommand", "--bootstrap-server", cluster.internal_servers,
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"AclCommand {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def status(data_dir: Path) -> Cluster | None:
    return Cluster.load(Path(data_dir))


def java_processes(data_dir: Path) -> Iterator[int]:
    """Pids of any JVM whose command line names this data directory (leak checks)."""
    marker = str(Path(data_dir).resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "kafka.Kafka" in cmdline and marker in cmdline and _pid_alive(int(proc.name)):
            yield int(proc.name)
