"""`promo demo`: the whole product end to end on this machine, then everything stopped.

train (or reuse) a small encoder on real data -> local KRaft broker -> a coupon catalog and a
few users' preferences -> `promo worker` subprocess -> replay of a real dataset slice (plus a
few malformed records, to show the dead-letter path) -> wait until the worker has accounted for
every record -> print what happened, a few decisions with their reasons, and one question to the
pull API -> stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import launcher
from encoder.data import Interaction
from stream.config import Settings, as_environment
from stream.contracts import Coupon, Preferences
from stream.policy import daytime_timezone
from stream.replay import produce
from stream.topics import client_kwargs, ensure_topics


def malformed_records() -> list[tuple[bytes | None, bytes | None]]:
    """Records that break the contract in different ways; each must end up in the DLQ."""
    now = int(time.time() * 1000)
    return [
        (b"demo-user", b"{this is not json"),
        (b"demo-user", b'["an", "array"]'),
        (b"demo-user", b'{"event_id": "m1", "user_id": "demo-user", "type": "view", "ts": 1}'),
        (b"demo-user", orjson.dumps({"event_id": "m2", "user_id": "demo-user",
                                     "type": "teleport", "item_id": "x", "ts": now})),
        (None, orjson.dumps({"event_id": "m3", "user_id": "demo-user", "type": "view",
                             "item_id": "x", "ts": now})),
    ]


def demo_catalog(rows: list[Interaction]) -> list[Coupon]:
    """Campaigns on the slice's most bought items, plus a store-wide one; small budgets, so
    the demo shows budgets binding."""
    bought = Counter(r.item_id for r in rows if r.event_type in ("purchase", "add_to_cart"))
    top = [item for item, _ in bought.most_common(6)]
    day = 86_400_000
    now = int(time.time() * 1000)
    return [
        Coupon("fresh-favourites", value=2.0, budget=40.0, items=tuple(top[:3]),
               valid_from_ms=now - day, valid_to_ms=now + 7 * day),
        Coupon("pantry-staples", value=1.0, budget=15.0, items=tuple(top[3:6]),
               valid_from_ms=now - day, valid_to_ms=now + 7 * day, max_exposures=12),
        Coupon("welcome-5", value=5.0, budget=400.0, min_spend=30.0,
               valid_from_ms=now - day, valid_to_ms=now + 7 * day),
    ]


def demo_preferences(rows: list[Interaction]) -> dict[str, Preferences]:
    users = sorted({r.user_id for r in rows})
    prefs = {u: Preferences(push_opt_in=False, coupon_opt_in=False) for u in users[:5]}
    prefs |= {u: Preferences(push_opt_in=True, coupon_opt_in=False) for u in users[5:10]}
    return prefs


def _scrape(url: str) -> dict[str, dict[str, float]]:
    """{sample name: {label values, in the order of their sorted names, joined by '/': value}}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})["/".join(v for _, v in sorted(s.labels.items()))] = \
                s.value
    return out


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def ensure_model(dataset: str, models_dir: Path, minutes: float) -> Path:
    """Reuse the demo model if one was trained before, else train one (bounded in time)."""
    out = models_dir / f"{dataset}-demo"
    if (out / "manifest.json").exists():
        click.secho(f"    reusing the model in {out}", err=True)
        return out
    click.secho(f"    training a small encoder on {dataset} (at most {minutes:g} min)...",
                err=True)
    subprocess.run([sys.executable, "-m", "stream", "train", "--dataset", dataset, "--out",
                    str(out), "--max-minutes", str(minutes), "--overwrite"], check=True)
    return out


def run_demo(settings: Settings, *, dataset: str, rows: list[Interaction], limit: int,
             workdir: Path, models_dir: Path, train_minutes: float,
             keep_running: bool) -> None:
    def say(text: str) -> None:
        click.secho(text, bold=True, err=True)

    rows = rows[:limit]
    say(f"1/6 encoder model for {dataset}")
    checkpoint = ensure_model(dataset, models_dir, train_minutes)
    broker_dir = workdir / "broker"
    launcher.stop(broker_dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say(f"2/6 starting Kafka {launcher.kafka_version()} (KRaft) in {broker_dir}")
    cluster = launcher.start(broker_dir, nodes=1)
    metrics_port = launcher.free_port()
    settings = dataclasses.replace(
        settings,
        kafka=dataclasses.replace(settings.kafka, bootstrap_servers=cluster.bootstrap_servers),
        api=dataclasses.replace(settings.api, enabled=True, port=launcher.free_port(),
                                tokens=(secrets.token_urlsafe(16),)),
        worker=dataclasses.replace(settings.worker, data_dir=str(workdir / "worker"),
                                   metrics_port=metrics_port, checkpoint=str(checkpoint)),
        # Replayed users have no time zone; at night in the default one quiet hours would hold
        # back every push and coupon, so the demo places them where it is afternoon now.
        policy=dataclasses.replace(settings.policy,
                                   default_timezone=daytime_timezone(int(time.time() * 1000))))
    worker_log = workdir / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        coupons, prefs = demo_catalog(rows), demo_preferences(rows)
        asyncio.run(_publish_setup(settings, coupons, prefs))
        say(f"3/6 starting the worker (log: {worker_log}); users without a time zone are "
            f"placed in {settings.policy.default_timezone}, where it is daytime now")
        with open(worker_log, "wb") as log_file:
            worker = subprocess.Popen([sys.executable, "-m", "stream", "worker"],
                                      env=as_environment(settings), stdout=log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: b"worker ready" in worker_log.read_bytes() or worker.poll() is not None,
              120, "the worker to join its group")
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited:\n{worker_log.read_text()[-3000:]}")

        bad = malformed_records()
        say(f"4/6 replaying {len(rows):,} real events from {dataset}, "
            f"plus {len(bad)} malformed records")
        result = asyncio.run(produce(settings.kafka, rows, id_prefix=dataset))
        asyncio.run(_produce(settings, settings.kafka.events_topic, bad))
        expected = result.produced + len(bad)
        url = f"http://{settings.worker.metrics_host}:{metrics_port}/metrics"
        say(f"5/6 waiting for the worker to account for all {expected:,} records")

        def accounted() -> int:
            m = _scrape(url)
            return int(sum(m.get("promo_stream_events_consumed_total", {}).values())
                       + sum(m.get("promo_stream_records_rejected_total", {}).values()))

        _wait(lambda: accounted() >= expected, 600, f"{expected} records to be processed")
        # Let open carts get their reminders, and the budget gauges (every 5 s) catch up.
        time.sleep(max(settings.policy.cart_abandon_seconds + 2, 6))
        say("6/6 what happened")
        _summary(settings, _scrape(url), result.produced, result.seconds, coupons, url)
        for user_id in (rows[-1].user_id, "a-new-visitor"):
            _ask_the_api(settings, user_id)
        if keep_running:
            say("running until Ctrl-C (broker and worker stay up)")
            try:
                while worker.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        launcher.stop(broker_dir)
        say("stopped worker and broker")


def _summary(settings: Settings, metrics: dict[str, dict[str, float]], produced: int,
             seconds: float, coupons: list[Coupon], url: str) -> None:
    echo = click.echo
    echo(f"  replayed {produced:,} events in {seconds:.1f}s ({produced / seconds:,.0f}/s)")
    for event_type, n in sorted(metrics["promo_stream_events_consumed_total"].items()):
        if n:
            echo(f"  consumed  {int(n):>8,}  {event_type}")
    for reason, n in sorted(metrics["promo_stream_records_rejected_total"].items()):
        if n:
            echo(f"  rejected  {int(n):>8,}  {reason} -> {settings.kafka.dlq_topic}")
    echo("  triggers:")
    for kind, n in sorted(metrics["promo_decisions_triggers_total"].items()):
        echo(f"            {int(n):>8,}  {kind}")
    echo("  decisions by action / arm:")
    for key, n in sorted(metrics["promo_decisions_published_total"].items()):
        echo(f"            {int(n):>8,}  {key}")
    closed: Counter[tuple[str, str]] = Counter()
    for key, n in metrics.get("promo_outcomes_total", {}).items():
        _, arm, _, converted = key.split("/")  # action/arm/campaign/converted
        closed[(arm, converted)] += int(n)
    evicted = int(sum(metrics.get("promo_outcomes_evicted_total", {}).values()))
    still = int(sum(metrics.get("promo_outcomes_windows_open", {}).values()))
    echo(f"  outcomes ({settings.attribution.window_seconds / 86_400:g}-day attribution "
         "windows; `promo report uplift` shows the lift):")
    for arm in ("treatment", "holdout"):
        total = closed[(arm, "true")] + closed[(arm, "false")]
        echo(f"            {total:>8,}  {arm} decisions closed, {closed[(arm, 'true')]:,} "
             "converted by a later purchase")
    echo(f"            {evicted:>8,}  evicted (a user with too many open windows)")
    echo(f"            {still:>8,}  windows still open")
    decisions = asyncio.run(_read(settings, settings.kafka.decisions_topic))
    spent: Counter[str] = Counter()
    for d in decisions:
        if d["action"] == "coupon" and d["arm"] == "treatment":
            spent[d["coupon"]["coupon_id"]] += d["coupon"]["discount"]
    remaining = metrics.get("promo_coupon_budget_remaining_ratio", {})
    for coupon in coupons:
        gauge = remaining.get(coupon.coupon_id)
        echo(f"  coupon {coupon.coupon_id:<17} issued {spent[coupon.coupon_id]:>6.2f} "
             f"of budget {coupon.budget:.2f}; the worker's budget gauge: "
             + ("-" if gauge is None else f"{gauge:.1%} left"))
    echo("  example decisions:")
    shown: set[tuple[str, str]] = set()
    for d in decisions:
        kind = f"{d['action']}/{d['arm']}"
        trigger = d["reasons"][0]["code"]
        if (kind, trigger) in shown or len(shown) >= 5:
            continue
        shown.add((kind, trigger))
        what = d["coupon"] or d["push"] or {}
        reasons = ", ".join(r["code"] + (f" {r['items']}" if r.get("items") else "")
                            for r in d["reasons"])
        echo(f"    user {d['user_id']:>6}: {kind:<18} {orjson.dumps(what).decode()}")
        echo(f"                 reasons: {reasons}")
    echo(f"  model {decisions[0]['model_version'] if decisions else '-'}, "
         f"metrics were served at {url}")


def _ask_the_api(settings: Settings, user_id: str) -> None:
    """A pull-API question, as a shop's cart page would ask it (docs/api.md)."""
    from stream.client import OffersClient

    with OffersClient(settings.api.url(), settings.api.tokens[0]) as client:
        offer = client.offers(user_id, limit=3)
    shown = offer["coupon"] or offer["items"] or "-"
    click.echo(f"  pull API {settings.api.url()}: GET /v1/users/{user_id}/offers -> "
               f"{offer['action']} {orjson.dumps(shown).decode()} ({offer['arm']}; "
               f"reasons: {', '.join(r['code'] for r in offer['reasons'])})")


async def _publish_setup(settings: Settings, coupons: list[Coupon],
                         prefs: dict[str, Preferences]) -> None:
    await ensure_topics(settings.kafka)
    await _produce(settings, settings.kafka.coupons_topic,
                   [(c.coupon_id.encode(), c.to_json()) for c in coupons])
    await _produce(settings, settings.kafka.preferences_topic,
                   [(u.encode(), p.to_json()) for u, p in prefs.items()])


async def _produce(settings: Settings, topic: str,
                   records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _read(settings: Settings, topic: str) -> list[dict]:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(topic, **client_kwargs(settings.kafka), group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[dict] = []  # type: ignore[type-arg]
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1500)
            if not batch:
                return found
            for records in batch.values():
                found.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
