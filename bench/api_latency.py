"""Pull API latency with the stream running, and the stream's throughput beside it.

    .venv/bin/python bench/api_latency.py            # about 4 minutes
    .venv/bin/python bench/api_latency.py --quick    # a smoke run in about a minute

In one run, on one real broker, with the API on (stream/api.py):

1. maximum: one worker beside an unthrottled producer, as bench/latency.py measures it;
2. one worker, four partitions: a warm-up slice of real Instacart events makes the *known
   users*; then three phases, each replaying the next slice at half the maximum rate for
   ``--seconds``: no requests, 200 requests/s, 1,000 requests/s. The load generator is a
   separate process on loopback (aiohttp), open loop: request i is due at ``i / rate`` and its
   latency counts from then, so a stalled server cannot hide its queue (no coordinated
   omission). Each request asks ``GET /v1/users/{id}/offers`` for a random known user. The
   stream's throughput of a phase is its slice's events over the time from its first to its
   last processed;
3. two workers, four partitions: every user of a replayed slice is asked of both workers; the
   answers must be identical. Then each user is asked, one request at a time on a quiet
   stream, of the worker that owns them and of the other one (which forwards): forwarding's
   cost is the difference of the two medians.

Goals (issue 27): p99 <= 20 ms at 200 requests/s; the stream's throughput at 1,000
requests/s >= 0.8x without requests; forwarding <= 5 ms at p50; identical answers. Writes
bench/results/api_latency.json and merges ``api_p99_ms_at_200rps``, ``api_p99_ms_at_1000rps``,
``api_stream_throughput_ratio`` and ``api_forwarding_p50_ms`` into summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import _common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
from _common import add_output_options, merge_summary, summary_path, write_json
from _stream import (
    WorkerProcess,
    accounted,
    add_worker_options,
    broker,
    processing_rate_and_cpu,
    quick_checkpoint,
    rate_beside_producer,
    real_events,
    start_worker,
    stream_facts,
    with_topics,
)

from deploy.kafka import launcher
from encoder.data import Interaction
from stream.config import ApiSettings, Settings
from stream.replay import produce
from stream.topics import ensure_topics, expected_partition

TOKEN = "bench-token"
LOADS = (0, 200, 1000)


def with_api(settings: Settings, port: int) -> Settings:
    return dataclasses.replace(settings, api=ApiSettings(
        enabled=True, port=port, tokens=(TOKEN,), rate_limit_per_second=10_000.0,
        rate_limit_burst=10_000))


def api_worker(settings: Settings, workdir: Path, checkpoint: Path, name: str
               ) -> tuple[WorkerProcess, str]:
    port = launcher.free_port()
    worker = start_worker(with_api(settings, port), workdir, checkpoint, name)
    return worker, f"http://127.0.0.1:{port}"


# --- the load generator (a process of its own) -------------------------------------------------

def generate_load(url: str, users: list[str], rate: float, seconds: float,
                  results: Any) -> None:  # noqa: ANN401 (a multiprocessing queue)
    results.put(asyncio.run(_load(url, users, rate, seconds)))


async def _load(url: str, users: list[str], rate: float, seconds: float) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(0)
    n = int(rate * seconds)
    picks = [quote(rng.choice(users), safe="") for _ in range(n)]
    statuses: Counter[str] = Counter()
    waited: list[float] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {TOKEN}"},
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=5)) as session:
        start = loop.time() + 0.2

        async def one(i: int) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with session.get(f"{url}/v1/users/{picks[i]}/offers") as answer:
                    await answer.read()
                    statuses[str(answer.status)] += 1
            except (aiohttp.ClientError, TimeoutError):
                statuses["error"] += 1
            waited.append(loop.time() - due)

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = loop.time() - start
    return {"requests": n, "seconds": elapsed, "statuses": dict(statuses),
            "latency_ms": [round(w * 1000, 3) for w in waited]}


# --- phases --------------------------------------------------------------------------------------

def replay(settings: Settings, rows: list[Interaction], rate: float, prefix: str) -> None:
    asyncio.run(produce(settings.kafka, rows, id_prefix=prefix, rate=rate, clock="now",
                        progress=False))


def server_side(port: int) -> dict[str, float]:
    """The worker's own account of its offers answers: count, total seconds, and how many
    took at most 20 ms (its histogram's bucket)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {"count": 0.0, "sum": 0.0, "within_20ms": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("endpoint") != "offers":
                continue
            if s.name == "promo_api_request_duration_seconds_count":
                out["count"] = s.value
            elif s.name == "promo_api_request_duration_seconds_sum":
                out["sum"] = s.value
            elif s.name == "promo_api_request_duration_seconds_bucket" \
                    and s.labels.get("le") == "0.02":
                out["within_20ms"] = s.value
    return out


def wait_accounted(worker: WorkerProcess, target: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while accounted(worker.port) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not reach {target:,.0f} records")
        time.sleep(0.1)


def phase(settings: Settings, worker: WorkerProcess, url: str, rows: list[Interaction],
          rate: float, load: int, seconds: float, users: list[str]) -> dict[str, Any]:
    """Replay ``rows`` at ``rate`` with ``load`` requests/s beside; the stream's rate and the
    requests' latencies."""
    base = accounted(worker.port)
    server_before = server_side(worker.port)
    producer = threading.Thread(target=replay, args=(settings, rows, rate, f"load{load}"),
                                daemon=True)
    results: Any = multiprocessing.get_context("spawn").Queue()
    generator = None
    if load:
        generator = multiprocessing.get_context("spawn").Process(
            target=generate_load, args=(url, users, load, seconds, results))
        generator.start()
    producer.start()
    rate, _ = processing_rate_and_cpu([worker], len(rows), timeout=seconds + 300, base=base)
    producer.join(60)
    out: dict[str, Any] = {"load_rps": load, "events": len(rows),
                           "stream_events_per_second": rate}
    if generator is not None:
        got = results.get(timeout=seconds + 120)
        generator.join(30)
        latency = np.asarray(got.pop("latency_ms"))
        time.sleep(1.5)  # the exporter serves the worker's snapshot of a second ago
        server = {k: v - server_before[k] for k, v in server_side(worker.port).items()}
        out |= got | {"achieved_rps": got["requests"] / got["seconds"],
                      # In the worker, from the handler's start: the rest of a request's
                      # latency is waiting (for the event loop, for a core) and the client.
                      "server_mean_ms": 1000 * server["sum"] / max(1.0, server["count"]),
                      "server_share_over_20ms": 1 - server["within_20ms"]
                      / max(1.0, server["count"]),
                      "p50_ms": float(np.percentile(latency, 50)),
                      "p99_ms": float(np.percentile(latency, 99)),
                      "max_ms": float(latency.max())}
    return out


def compare_workers(base: Settings, workdir: Path, checkpoint: Path, rows: list[Interaction],
                    partitions: int) -> dict[str, Any]:
    """Two workers: identical answers for every user, and what forwarding adds at p50."""
    import httpx

    settings = with_topics(base, "pair")
    asyncio.run(ensure_topics(settings.kafka))
    pair = [api_worker(settings, workdir, checkpoint, f"pair-{i}") for i in range(2)]
    try:
        for worker, _ in pair:
            worker.wait_ready()
        urls = [url for _, url in pair]
        owners = _wait_owners(urls, partitions)
        asyncio.run(produce(settings.kafka, rows, id_prefix="pair", progress=False))
        while sum(accounted(w.port) for w, _ in pair) < len(rows):
            time.sleep(0.2)
        users = sorted({r.user_id for r in rows})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        local: list[float] = []
        forwarded: list[float] = []
        differ = 0
        with httpx.Client(headers=auth, timeout=5) as client:
            for user in users:
                answers = []
                home = owners[expected_partition(user.encode(), partitions)]
                for index, url in enumerate(urls):
                    started = time.perf_counter()
                    answer = client.get(f"{url}/v1/users/{quote(user, safe='')}/offers")
                    took = (time.perf_counter() - started) * 1000
                    (local if index == home else forwarded).append(took)
                    answers.append((answer.status_code, answer.json()))
                differ += answers[0] != answers[1]
        return {"users": len(users), "identical": len(users) - differ, "differ": differ,
                "local_p50_ms": statistics.median(local),
                "forwarded_p50_ms": statistics.median(forwarded),
                "forwarding_p50_ms": statistics.median(forwarded) - statistics.median(local)}
    finally:
        for worker, _ in pair:
            worker.stop()


def _wait_owners(urls: list[str], partitions: int, timeout: float = 120) -> dict[int, int]:
    """partition -> index of the worker that owns it, once the two share all partitions."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners: dict[int, int] = {}
        for index, url in enumerate(urls):
            try:
                answer = httpx.get(f"{url}/readyz", timeout=2)
            except httpx.HTTPError:
                continue
            if answer.status_code == 200:
                owners |= dict.fromkeys(answer.json()["partitions"], index)
        if len(owners) == partitions and len(set(owners.values())) == 2:
            return owners
        time.sleep(0.5)
    raise RuntimeError("the two workers did not share the partitions in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=60_000,
                        help="events replayed unthrottled to measure the maximum rate")
    parser.add_argument("--warmup", type=int, default=10_000,
                        help="events replayed first: their users are the known users")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--pair-events", type=int, default=3_000,
                        help="events whose users are compared across two workers")
    add_worker_options(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.events, args.warmup, args.seconds, args.pair_events = 6_000, 1_000, 3.0, 300
    summary = summary_path(args)
    out = args.out_dir / ("api_latency_quick.json" if args.quick else "api_latency.json")

    with tempfile.TemporaryDirectory(prefix="promo-bench-") as tmp, \
            broker(Path(tmp), args.partitions, args.bootstrap_servers) as base:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or quick_checkpoint(workdir)
        print("maximum: one worker beside an unthrottled producer...", file=sys.stderr)
        max_rate, _ = rate_beside_producer(with_topics(base, "max"), args.events, workdir,
                                           checkpoint)
        rate = 0.5 * max_rate
        per_phase = int(rate * args.seconds)
        rows = real_events(args.warmup + per_phase * len(LOADS) + args.pair_events)
        warmup, rest = rows[:args.warmup], rows[args.warmup:]
        users = sorted({r.user_id for r in warmup})
        settings = with_topics(base, "api")
        asyncio.run(ensure_topics(settings.kafka))
        worker, url = api_worker(settings, workdir, checkpoint, "api-worker")
        phases = []
        try:
            worker.wait_ready()
            asyncio.run(produce(settings.kafka, warmup, id_prefix="warmup", progress=False))
            wait_accounted(worker, len(warmup))
            for k, load in enumerate(LOADS):
                print(f"phase: {per_phase:,} events at {rate:,.0f}/s, {load} requests/s...",
                      file=sys.stderr)
                phases.append(phase(settings, worker, url,
                                    rest[k * per_phase:(k + 1) * per_phase], rate, load,
                                    args.seconds, users))
        finally:
            worker.stop()
        print("two workers: answers compared, forwarding timed...", file=sys.stderr)
        pair = compare_workers(base, workdir, checkpoint, rest[len(LOADS) * per_phase:],
                               args.partitions)

    quiet, at200, at1000 = phases
    ratio200 = at200["stream_events_per_second"] / quiet["stream_events_per_second"]
    ratio1000 = at1000["stream_events_per_second"] / quiet["stream_events_per_second"]
    result = {
        "benchmark": "api_latency", "machine": stream_facts(),
        "config": {"max_events": args.events, "warmup_events": args.warmup,
                   "seconds_per_phase": args.seconds, "partitions": args.partitions,
                   "known_users": len(users), "replay_events_per_second": rate,
                   "batch_max_seconds": base.worker.batch_max_seconds},
        "max_events_per_second": max_rate, "phases": phases,
        "stream_throughput_ratio": {"200": ratio200, "1000": ratio1000},
        "two_workers": pair,
    }
    write_json(out, result)
    if summary is not None:
        merge_summary(summary, api_p99_ms_at_200rps=round(at200["p99_ms"], 2),
                      api_p99_ms_at_1000rps=round(at1000["p99_ms"], 2),
                      api_stream_throughput_ratio=round(ratio1000, 3),
                      api_forwarding_p50_ms=round(pair["forwarding_p50_ms"], 2))
    for p in phases[1:]:
        print(f"{p['load_rps']} requests/s (achieved {p['achieved_rps']:,.0f}): "
              f"p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, max {p['max_ms']:.0f} ms, "
              f"statuses {p['statuses']}; in the worker mean {p['server_mean_ms']:.2f} ms, "
              f"{p['server_share_over_20ms']:.2%} over 20 ms; "
              f"stream {p['stream_events_per_second']:,.0f} ev/s")
    print(f"stream without requests {quiet['stream_events_per_second']:,.0f} ev/s; "
          f"two workers: {pair['identical']} of {pair['users']} answers identical, "
          f"local p50 {pair['local_p50_ms']:.2f} ms, forwarded {pair['forwarded_p50_ms']:.2f} ms")
    print(f"p99 at 200/s = {at200['p99_ms']:.1f} ms (goal <= 20); at 1000/s = "
          f"{at1000['p99_ms']:.1f} ms; stream ratio at 1000/s = {ratio1000:.2f} (goal >= 0.8); "
          f"forwarding p50 = {pair['forwarding_p50_ms']:.2f} ms (goal <= 5)")


if __name__ == "__main__":
    main()
