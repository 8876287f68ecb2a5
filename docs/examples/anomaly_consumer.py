#!/usr/bin/env python3
"""Follow Tributary's `anomalies` topic from outside the pipeline: an ordinary Kafka consumer.

Records are Confluent-framed Avro (byte 0x00, the schema id as a big-endian u32, then the datum),
schema `schemas/avro/anomaly.avsc` (id 12). Each record is one step of an anomaly's lifecycle
(open, update, resolved) with its id; fold them by `anomaly_id` into the anomaly's current state.
A consumer may see a record twice after a crash of the pipeline, never a different id for the same
anomaly: deduplicate on (anomaly_id, seq).

    pip install confluent-kafka fastavro
    python anomaly_consumer.py --brokers 127.0.0.1:9092 --schema schemas/avro/anomaly.avsc

Prints one JSON object per record (times as RFC 3339). With --count N it stops after N distinct
records, with --idle S after S seconds without a new one.
"""

import argparse
import datetime
import io
import json
import struct
import sys
import time

import fastavro
from confluent_kafka import Consumer, KafkaException

ANOMALY_SCHEMA_ID = 12


def rfc3339(value):
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    return value


def decode(schema, payload):
    if len(payload) < 5 or payload[0] != 0:
        raise ValueError("not a Confluent-framed record")
    (schema_id,) = struct.unpack(">I", payload[1:5])
    if schema_id != ANOMALY_SCHEMA_ID:
        raise ValueError(f"schema id {schema_id}, this consumer reads {ANOMALY_SCHEMA_ID}")
    record = fastavro.schemaless_reader(io.BytesIO(payload[5:]), schema)
    return {k: rfc3339(v) for k, v in record.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="anomalies")
    parser.add_argument("--group", default="my-alerting")
    parser.add_argument("--schema", default="schemas/avro/anomaly.avsc")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--idle", type=float, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with open(args.schema) as f:
        schema = fastavro.parse_schema(json.load(f))
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
            record = decode(schema, msg.value())
            key = (record["anomaly_id"], record["seq"])
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
