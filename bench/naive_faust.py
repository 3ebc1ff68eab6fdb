"""The floor of bench/pipeline_throughput.py: a per-event faust agent, as faust's tutorials write
one. Every event is decoded, counted in a RocksDB table (a changelog write per event) and
forwarded with a send per event.

Run by the benchmark as a subprocess; configured by environment variables:
NAIVE_BOOTSTRAP, NAIVE_TOPIC, NAIVE_OUT, NAIVE_EVENTS (stop after this many), NAIVE_DATADIR,
NAIVE_APP_ID, NAIVE_PARTITIONS. Prints one JSON line: {"events": n, "seconds": s}.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import faust
import orjson

app = faust.App(
    os.environ.get("NAIVE_APP_ID", "naive-bench"),
    broker=f"kafka://{os.environ.get('NAIVE_BOOTSTRAP', '127.0.0.1:9092')}",
    store="rocksdb://", datadir=os.environ.get("NAIVE_DATADIR", "/tmp/naive-bench"),
    topic_partitions=int(os.environ.get("NAIVE_PARTITIONS", "4")), web_enabled=False,
    consumer_auto_offset_reset="earliest")
events = app.topic(os.environ.get("NAIVE_TOPIC", "events"), key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")
out = app.topic(os.environ.get("NAIVE_OUT", "naive-out"), key_type=bytes, value_type=bytes,
                key_serializer="raw", value_serializer="raw")
counts = app.Table("counts", default=int)
target = int(os.environ.get("NAIVE_EVENTS", "20000"))
progress = {"seen": 0, "started": 0.0, "cpu": 0.0}


@app.agent(events)
async def count_and_forward(stream: faust.StreamT) -> None:
    async for key, value in stream.items():
        if progress["seen"] == 0:
            progress["started"] = time.perf_counter()
            progress["cpu"] = time.process_time()  # this process's CPU, every thread
        event = orjson.loads(value)
        counts[event["user_id"]] += 1
        await out.send(key=key, value=value)
        progress["seen"] += 1
        if progress["seen"] == target:
            elapsed = time.perf_counter() - progress["started"]
            cpu = time.process_time() - progress["cpu"]
            print(orjson.dumps({"events": target, "seconds": elapsed,
                                "cpu_seconds": cpu}).decode(), flush=True)
            # Stopping the app from inside its own agent would wait for this very agent.
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    # faust's command line turns its web server on whatever the App says; this agent needs
    # none, and two of them (or anything else on port 6066) would collide.
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
