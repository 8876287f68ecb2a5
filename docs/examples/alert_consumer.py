#!/usr/bin/env python3
"""Follow Tributary's `anomalies` or `incidents` topic from outside the pipeline: an ordinary Kafka consumer.

Records are Confluent-framed Avro (byte 0x00, the schema id as a big-endian u32, then the datum).
Each record is one step of a lifecycle with its id:

- `anomalies` (schema `schemas/avro/anomaly.avsc`, id 12): open, update, resolved; key = device.
- `incidents` (schema `schemas/avro/incident.avsc`, id 18; id 16 is its earlier version, read
  through Avro schema resolution): open, update, acknowledge, snooze, resolve, reopen; key =
  incident id. `status` is the incident's state after the record; `actor` and `comment` say who
  acknowledged, snoozed or resolved it.

Fold the records by id into the current state. A consumer may see a record twice after a crash of
the pipeline, never a different id for the same anomaly or incident: deduplicate on (id, seq).

    pip install confluent-kafka fastavro
    python alert_consumer.py --brokers 127.0.0.1:9092 --topic incidents --schemas schemas/avro

Prints one JSON object per record (times as RFC 3339). With --count N it stops after N distinct
records, with --idle S after S seconds without a new one.
"""

import argparse
import datetime
import io
import json
import os
import struct
import sys
import time

import fastavro
from confluent_kafka import Consumer, KafkaException

# Per topic: the id field, and the schema of each id a record may carry (the first is current).
TOPICS = {
    "anomalies": ("anomaly_id", {12: "anomaly.avsc"}),
    "incidents": ("incident_id", {18: "incident.avsc", 16: "incident.v1.avsc"}),
}


def rfc3339(value):
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    return value


class Decoder:
    def __init__(self, directory, files):
        def load(name):
            with open(os.path.join(directory, name)) as f:
                return fastavro.parse_schema(json.load(f))

        self.schemas = {schema_id: load(name) for schema_id, name in files.items()}
        self.current = self.schemas[next(iter(files))]

    def decode(self, payload):
        if len(payload) < 5 or payload[0] != 0:
            raise ValueError("not a Confluent-framed record")
        (schema_id,) = struct.unpack(">I", payload[1:5])
        writer = self.schemas.get(schema_id)
        if writer is None:
            raise ValueError(f"schema id {schema_id} unknown: upgrade this consumer")
        record = fastavro.schemaless_reader(io.BytesIO(payload[5:]), writer, self.current)
        return {k: rfc3339(v) for k, v in record.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="anomalies", help="anomalies or incidents (or a renamed one with --kind)")
    parser.add_argument("--kind", choices=sorted(TOPICS), help="what the topic holds (default: its name)")
    parser.add_argument("--group", default="my-alerting")
    parser.add_argument("--schemas", default="schemas/avro", help="the directory of Tributary's .avsc files")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--idle", type=float, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    kind = args.kind or args.topic
    if kind not in TOPICS:
        parser.error(f"--topic {args.topic}: give --kind (one of {', '.join(sorted(TOPICS))})")
    id_field, files = TOPICS[kind]
    decoder = Decoder(args.schemas, files)
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([args.topic])
    seen = set()
    started = last = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if args.count and len(seen) >= args.count:
                break
            if args.idle and seen and now - last > args.idle:
                break
            if now - started > args.timeout:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            record = decoder.decode(msg.value())
            key = (record[id_field], record["seq"])
            if key in seen:
                continue
            seen.add(key)
            last = time.monotonic()
            print(json.dumps(record), flush=True)
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
