"""The engine benchmark's Quix Streams row: the same word count as flows' count rows.

    python quix_word_count.py <brokers> <total_messages> <at-least-once|exactly-once>

Reads topic `words` (key = value = the word) from the start in a fresh consumer group,
keeps each word's count in Quix's RocksDB state and sends every new count to
`bench-quix-<mode>-out` (key the word, value the count as JSON). Quix defaults
throughout (commit interval, changelog topics, a one-partition output topic created by
Quix); only what a one-shot benchmark needs is set. Stops once `total_messages` are
processed and committed, then prints `REPORT <messages> <seconds> <cpu> <peak_rss_mb>`,
the only line on stdout. Run it with the venv of scripts/quix-venv (quixstreams 3.28.1).
"""

import atexit
import os
import resource
import shutil
import sys
import tempfile
import time

from quixstreams import Application

brokers, total, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert mode in ("at-least-once", "exactly-once"), mode
# stdout carries the report alone: anything a library prints goes to stderr.
report_out, sys.stdout = sys.stdout, sys.stderr
state_dir = tempfile.mkdtemp(prefix="bench-quix-state-")
atexit.register(shutil.rmtree, state_dir, ignore_errors=True)  # on errors too

started = None
processed = 0


def count(_word, state):
    global started
    if started is None:
        # The clock starts with the first message: group join and topic checks excluded.
        started = time.monotonic()
    n = state.get("count", 0) + 1
    state.set("count", n)
    return n


def on_processed(_topic, _partition, _offset):
    global processed
    processed += 1
    if processed == total:
        # Ends the poll loop after this message; run() then commits the last checkpoint
        # (flushes the outputs, commits offsets or the transaction) before it returns.
        app.stop()


# The consumer overrides scripts/bench-engine gives every row (`key=value,...`): there
# session.timeout.ms=6000, as Tansu completes a group join in about half the session
# timeout (librdkafka's default 45 s); the join is outside the measured time.
overrides = os.environ.get("FLOWS_CONSUMER_PROPERTIES", "")
consumer_extra_config = dict(kv.split("=", 1) for kv in overrides.split(",") if kv)

app = Application(
    broker_address=brokers,
    # A group of its own each run, so the whole topic is read and no offsets are reused.
    consumer_group=f"bench-quix-{mode}-{os.getpid()}",
    auto_offset_reset="earliest",
    processing_guarantee=mode,
    state_dir=state_dir,
    on_message_processed=on_processed,
    consumer_extra_config=consumer_extra_config,
)
words = app.topic("words", key_deserializer="str", value_deserializer="str")
# Quix copies the input's retention.ms to the state's changelog topic and fails without
# it; Tansu describes only the configs a topic was created with, Kafka also its defaults.
# Fill in Kafka's default (7 days) when the broker leaves it out.
words.broker_config.extra_config.setdefault("retention.ms", "604800000")
out = app.topic(f"bench-quix-{mode}-out", key_serializer="str", value_serializer="json")

sdf = app.dataframe(words)
sdf = sdf.apply(count, stateful=True)
sdf.to_topic(out)

app.run()
seconds = time.monotonic() - (started or time.monotonic())

usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu = sum(u.ru_utime + u.ru_stime for u in usage)
peak_rss_mb = max(u.ru_maxrss for u in usage) / 1024  # KiB on Linux
print(f"REPORT {processed} {seconds:.3f} {cpu:.2f} {peak_rss_mb:.1f}", file=report_out)
sys.exit(0 if processed == total else 1)
