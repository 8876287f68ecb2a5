//! A topic filled once and read by a bare consumer: the baseline of the benches that drain a topic
//! (`sinks`, `anomalies`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary_schemas::Reading;
use tributary_schemas::avro;
use tributary_schemas::kafka::KafkaConfig;

/// Writes `n` readings (`reading(i)`) to `topic`, device `i % devices` on partition
/// `(i % devices) % partitions`; returns each partition's end offset (from the delivery reports)
/// and the Avro bytes written.
pub async fn fill(
    kafka: &KafkaConfig,
    topic: &str,
    n: u64,
    devices: u64,
    reading: impl Fn(u64) -> Reading,
) -> (HashMap<i32, i64>, u64) {
    let producer: FutureProducer = kafka
        .producer("bench-fill")
        .set("enable.idempotence", "false")
        .create()
        .expect("producer");
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut avro_bytes = 0u64;
    let mut i = 0;
    while i < n {
        // A chunk of records, owned while their sends are in flight.
        let chunk: Vec<(i32, String, Vec<u8>)> = (i..(i + 2_000).min(n))
            .map(|i| {
                let r = reading(i);
                let bytes = avro::encode(&r).expect("encode");
                ((i % devices) as i32 % kafka.partitions, r.device, bytes)
            })
            .collect();
        i += chunk.len() as u64;
        let sends: Vec<_> = chunk
            .iter()
            .map(|(p, key, bytes)| {
                producer.send(
                    FutureRecord::to(topic)
                        .key(key)
                        .partition(*p)
                        .payload(bytes),
                    Duration::from_secs(60),
                )
            })
            .collect();
        for s in sends {
            let d = s.await.expect("delivered");
            let end = ends.entry(d.partition).or_default();
            *end = (*end).max(d.offset + 1);
        }
        avro_bytes += chunk.iter().map(|(_, _, b)| b.len() as u64).sum::<u64>();
        if i % 50_000 == 0 {
            eprintln!("  filled {i}");
        }
    }
    (ends, avro_bytes)
}

/// A bare consumer group reading every record up to `ends`, nothing else done: records/s.
pub async fn bare_consume(kafka: &KafkaConfig, topic: &str, ends: &HashMap<i32, i64>) -> f64 {
    let consumer: StreamConsumer = kafka
        .consumer("bench-bare-consumer")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut left = ends.clone();
    let mut records = 0u64;
    let mut bytes = 0usize;
    while !left.is_empty() {
        let m = consumer.recv().await.expect("record");
        records += 1;
        bytes += m.payload().map(<[u8]>::len).unwrap_or(0);
        if left
            .get(&m.partition())
            .is_some_and(|e| m.offset() + 1 >= *e)
        {
            left.remove(&m.partition());
        }
    }
    std::hint::black_box(bytes);
    records as f64 / started.elapsed().as_secs_f64()
}
