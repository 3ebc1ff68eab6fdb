"""The real peer of bench/pipeline_throughput.py: promo-stream's stateful work written as a user of
Quix Streams would write it, with Quix's own features and nothing hand-rolled.

Quix Streams is the Python stream library users most often pick instead of faust; underneath it
is confluent-kafka (librdkafka, C), so it is the fair "what else would you use" reference where
bench/naive_faust.py is only the floor.

Per input record (key = user_id bytes, value = a JSON event): Quix's JSON deserializer decodes it;
a stateful ``apply`` keeps, per user in Quix's RocksDB state store (changelog topic on, Quix's
default, so the state is fault tolerant like ours), the user's last 50 events as
``[item_id, type, ts]`` and counts of events and purchases; each ``add_to_cart`` (a trigger)
emits one JSON record ``{"user_id", "trigger_event_id", "item_id", "events_seen",
"recent_items"}`` (the last 5 item ids), keyed by user_id, to the output topic, which is created
with the input topic's partitions. Other events emit nothing. Processing guarantee: at-least-once
(Quix's default); ``auto_offset_reset`` is "earliest".

What it does NOT do, compared to promo-stream: no validation contract (a malformed event is
Quix's processing error), no encoder, no policy (every trigger is emitted), no attribution.

Run by the benchmark as a subprocess; configured by environment variables:
QUIX_BOOTSTRAP, QUIX_TOPIC (input, already filled), QUIX_OUT (output topic), QUIX_EVENTS (stop
after this many input records, triggers or not), QUIX_STATE_DIR, QUIX_APP_ID (consumer group).
After the QUIX_EVENTS-th record it prints one JSON line, {"events": n, "seconds": s,
"cpu_seconds": c}: wall time and this process's CPU (every thread, librdkafka's included) from
the first record entering the dataframe (decoded) to the n-th record fully processed; then
``Application.stop()`` ends the run loop, which commits the last checkpoint (producer flush,
changelog, offsets) and the process exits 0. (``Application.run(count=...)`` counts outputs, not
input records, so it cannot express this stop condition.)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import orjson
from quixstreams import Application, State
from quixstreams.models import TopicConfig

HISTORY = 50  # events kept per user
RECENT = 5  # item ids in an output record
TRIGGER = "add_to_cart"


@dataclasses.dataclass
class Progress:
    target: int
    seen: int = 0
    started: float = 0.0
    cpu: float = 0.0


def remember(event: dict[str, Any], state: State) -> dict[str, Any] | None:
    """Fold ``event`` into its user's state; the output record if it is a trigger, else None."""
    user = state.get("user") or {"recent": [], "events": 0, "purchases": 0}
    recent: list[list[Any]] = user["recent"]
    recent.append([event["item_id"], event["type"], event["ts"]])
    del recent[:-HISTORY]
    user["events"] += 1
    if event["type"] == "purchase":
        user["purchases"] += 1
    state.set("user", user)
    if event["type"] != TRIGGER:
        return None
    return {"user_id": event["user_id"], "trigger_event_id": event["event_id"],
            "item_id": event["item_id"], "events_seen": user["events"],
            "recent_items": [item for item, _, _ in recent[-RECENT:]]}


def main() -> None:
    env = os.environ.get
    progress = Progress(target=int(env("QUIX_EVENTS", "20000")))

    def start_clock(event: dict[str, Any]) -> None:
        if not progress.started:
            progress.started, progress.cpu = time.perf_counter(), time.process_time()

    def on_processed(topic: str, partition: int, offset: int) -> None:
        progress.seen += 1
        if progress.seen == progress.target:
            elapsed = time.perf_counter() - progress.started
            cpu = time.process_time() - progress.cpu
            print(orjson.dumps({"events": progress.seen, "seconds": elapsed,
                                "cpu_seconds": cpu}).decode(), flush=True)
            app.stop()  # only leaves the run loop: the last checkpoint is still committed

    app = Application(
        broker_address=env("QUIX_BOOTSTRAP", "127.0.0.1:9092"),
        consumer_group=env("QUIX_APP_ID", "quix-bench"),
        state_dir=env("QUIX_STATE_DIR", "/tmp/quix-bench"),
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",  # Quix's default, spelled out
        on_message_processed=on_processed,
        loglevel="WARNING",
    )
    events = app.topic(env("QUIX_TOPIC", "events"), key_deserializer="bytes",
                       value_deserializer="json")
    shape = events.broker_config  # auto-created topics would otherwise get 1 partition
    out = app.topic(env("QUIX_OUT", "quix-out"), key_serializer="bytes", value_serializer="json",
                    config=TopicConfig(num_partitions=shape.num_partitions,
                                       replication_factor=shape.replication_factor))
    sdf = app.dataframe(events).update(start_clock)
    sdf = sdf.apply(remember, stateful=True).filter(lambda record: record is not None)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
