"""`promo broker`: a local Apache Kafka (KRaft) broker or 3-node cluster as JVM processes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deploy.kafka import launcher

DEFAULT_BROKER_DIR = Path(".promo/broker")


@click.group()
def broker() -> None:
    """Run a local Apache Kafka (KRaft) broker or 3-node cluster as JVM processes."""


def _data_dir_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_BROKER_DIR,
                        help="Directory holding the cluster's config, logs and data.")(f)


@broker.command("install")
def broker_install() -> None:
    """Resolve Kafka's jars with Maven into the cache (no-op when cached)."""
    try:
        libs = launcher.ensure_jars()
    except launcher.BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka {launcher.kafka_version()} jars: {libs}", err=True)


@broker.command("start")
@_data_dir_option
@click.option("--nodes", type=click.Choice(["1", "3"]), default="1",
              help="1 for development; 3 for replication factor 3 on one machine.")
@click.option("--port", type=click.IntRange(1, 65_535), default=None,
              help="Client port of a single node [default: 9092, what kafka.bootstrap_servers "
                   "expects].")
@click.option("--controller-port", type=int, default=None, help="KRaft controller port.")
@click.option("--heap", default="512m", help="JVM -Xmx per node.")
@click.option("--timeout", type=float, default=90.0, help="Seconds to wait for readiness.")
def broker_start(data_dir: Path, nodes: str, port: int | None, controller_port: int | None,
                 heap: str, timeout: float) -> None:
    """Start the broker(s) and wait until ready; print the bootstrap servers on stdout."""
    n = int(nodes)
    if n == 1 and port is None and launcher.Cluster.load(data_dir) is None:
        if not _port_free(9092):
            raise click.ClickException(
                "127.0.0.1:9092 is in use (another broker? `promo broker status`); pass "
                "--port N and then set PROMO_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:N")
        port = 9092
    try:
        cluster = launcher.start(data_dir, nodes=n, broker_port=port,
                                 controller_port=controller_port, heap=heap, timeout=timeout)
    except launcher.BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka {launcher.kafka_version()} ready: {n} node(s), data in "
               f"{cluster.data_dir}", err=True)
    click.echo(cluster.bootstrap_servers)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@broker.command("stop")
@_data_dir_option
@click.option("--timeout", type=float, default=30.0, help="Seconds between SIGTERM and SIGKILL.")
@click.option("--purge", is_flag=True, help="Also delete the data directory.")
def broker_stop(data_dir: Path, timeout: float, purge: bool) -> None:
    """Stop the broker(s): SIGTERM, then SIGKILL after --timeout."""
    was_running = launcher.stop(data_dir, timeout=timeout)
    if purge and data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    click.echo("stopped" if was_running else "not running", err=True)


@broker.command("status")
@_data_dir_option
def broker_status(data_dir: Path) -> None:
    """Show each node's pid, ports and whether it runs; exit 1 if any node is down."""
    cluster = launcher.status(data_dir)
    if cluster is None:
        click.echo(f"no cluster in {data_dir}")
        sys.exit(1)
    alive = cluster.alive()
    for node in cluster.nodes:
        state = "running" if alive[node.node_id] else "stopped"
        click.echo(f"node {node.node_id}: {state:8} pid={cluster.pids.get(node.node_id, '-')} "
                   f"broker=127.0.0.1:{node.broker_port} "
                   f"controller=127.0.0.1:{node.controller_port}")
    click.echo(f"bootstrap servers: {cluster.bootstrap_servers}")
    if not all(alive.values()):
        sys.exit(1)


COMMANDS = [broker]
