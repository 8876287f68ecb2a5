//! The anomaly stage through Kafka, on a private local stack (Tansu, Mosquitto) started by the
//! project's own scripts:
//!
//! ```text
//! cargo bench --bench anomalies                                  # 45 000 readings; MQTT at 10 000 msg/s for 30 s
//! cargo bench --bench anomalies -- --readings 200000 --series 10000  # larger fills stall Tansu here
//! cargo bench --bench anomalies -- --latency-only --rate 5000 --seconds 20
//! ```
//!
//! - **Throughput**: `telemetry` filled with Avro readings of 1 500 series (one metric, watched
//!   by four detectors: threshold with hysteresis, spike, rate of change, heartbeat), then a bare
//!   consumer of the topic (records/s, nothing else done), then the `AnomalyStage` (the live
//!   stage, consumer group, state changelog, anomaly records produced): readings/s until its
//!   committed offsets reach the end, from its first commit (after the group join) to its last.
//! - **Latency**: `tributary run mqtt cleanse anomalies` (a release build of this repository)
//!   with a threshold at 20 °C and no hold or quiet period (so the simulated temperatures that
//!   cross it make anomalies all the time), the simulator publishing QoS 1 to Mosquitto at
//!   `--rate` messages/s (3 readings each), and a consumer of `anomalies` outside the stage
//!   measuring, for every record made by a reading, the time from the reading's event time (the
//!   simulator stamps it as it publishes) to the record's arrival: p50, p99, max.

#[path = "../tests/support/mod.rs"]
mod support;
mod topic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use support::Stack;
use tributary_schemas::Reading;
use tributary_schemas::avro::{self, Anomaly};
use tributary_schemas::detectors::DetectorOverrides;
use tributary_schemas::kafka::KafkaConfig;
use tributary_streams::anomaly::{AnomalyConfig, AnomalyStage, STAGE};

struct Options {
    readings: u64,
    series: u64,
    rate: u64,
    seconds: u64,
    /// `--latency-only`: skip the throughput part.
    latency_only: bool,
}

fn options() -> Options {
    let mut o = Options {
        readings: 45_000,
        series: 1_500,
        rate: 10_000,
        seconds: 30,
        latency_only: false,
    };
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        let value = || args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--readings" => o.readings = value().unwrap_or(o.readings),
            "--series" => o.series = value().unwrap_or(o.series),
            "--rate" => o.rate = value().unwrap_or(o.rate),
            "--seconds" => o.seconds = value().unwrap_or(o.seconds),
            "--latency-only" => o.latency_only = true,
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    o
}

const FOUR: &str = r#"
[detectors.hot]
metric = "temperature"
kind = "threshold"
above = 40.0
clear_above = 35.0
[detectors.jump]
metric = "temperature"
kind = "spike"
window_secs = 600
[detectors.surge]
metric = "temperature"
kind = "rate_of_change"
max_per_sec = 5.0
[detectors.silent]
metric = "temperature"
kind = "heartbeat"
interval_secs = 120
"#;

fn reading(i: u64, series: u64, start: i64) -> Reading {
    let d = i % series;
    let step = (i / series) as i64;
    let value =
        20.0 + ((i * 7919) % 100) as f64 / 100.0 + if i.is_multiple_of(5003) { 30.0 } else { 0.0 };
    Reading {
        tenant: format!("tenant-{}", d % 3),
        device: format!("device-{d:06}"),
        metric: "temperature".into(),
        value,
        unit: Some("Cel".into()),
        original_value: None,
        original_unit: None,
        late: false,
        event_time: start + step * 1_000_000 + d as i64,
        ingest_time: start + step * 1_000_000 + d as i64,
        event_id: format!("m-{d}-{step}"),
        source_topic: "raw".into(),
        source_partition: 0,
        source_offset: i as i64,
        source_index: 0,
        measurement: Some(0),
        name: None,
        conflict: false,
        device_group: Some("pumps".into()),
        device_model: None,
        site: vec!["north".into(), "hall 3".into()],
    }
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let kafka_of = |stack: &Stack| KafkaConfig {
        brokers: format!("127.0.0.1:{}", stack.kafka_port),
        ..KafkaConfig::default()
    };
    if !o.latency_only {
        // sqlite: the memory engine stalls producing past ~50 000 records of this shape.
        let stack = Stack::start_with_storage(50, &[], "sqlite://tansu.db");
        throughput(&runtime, &kafka_of(&stack), &o);
    }
    // The memory engine: sqlite's produce path cannot take 10 000 msg/s here.
    let mut stack = Stack::start_with_storage(50, &[], "memory://tansu/");
    let kafka = kafka_of(&stack);
    latency(&runtime, &mut stack, &kafka, &o);
}

fn throughput(runtime: &tokio::runtime::Runtime, kafka: &KafkaConfig, o: &Options) {
    let topic = kafka.topics.telemetry.clone();
    println!(
        "anomalies bench: {} readings of {} series on `{topic}` ({} partitions), 4 detectors",
        o.readings, o.series, kafka.partitions
    );
    let start = tributary_schemas::now_micros() - (o.readings / o.series) as i64 * 1_000_000;
    let (ends, _) = runtime.block_on(topic::fill(kafka, &topic, o.readings, o.series, |i| {
        reading(i, o.series, start)
    }));

    let bare = runtime.block_on(topic::bare_consume(kafka, &topic, &ends));
    println!("bare-consumer     {bare:>10.0} records/s");

    let config: AnomalyConfig = toml::from_str(FOUR).expect("bench detectors");
    let base = config.base(None);
    let committed: BaseConsumer = kafka.consumer(STAGE).create().expect("offsets reader");
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(&topic, *p);
    }
    let (all, steady) = runtime.block_on(async {
        let stage = AnomalyStage::new(
            kafka.clone(),
            config.clone(),
            base,
            Arc::new(DetectorOverrides::default()),
        );
        let started = Instant::now();
        let task = tokio::spawn(async move { stage.run().await });
        let mut first: Option<(Instant, i64)> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!task.is_finished(), "the anomaly stage stopped");
            let offsets = tokio::task::block_in_place(|| {
                committed.committed_offsets(tpl.clone(), Duration::from_secs(10))
            })
            .expect("committed offsets");
            let done: i64 = offsets
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(n) => n,
                    _ => 0,
                })
                .sum();
            if done > 0 && first.is_none() {
                first = Some((Instant::now(), done));
            }
            if ends.iter().all(|(p, end)| {
                match offsets.find_partition(&topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(n)) => n >= *end,
                    _ => false,
                }
            }) {
                break;
            }
        }
        let all = o.readings as f64 / started.elapsed().as_secs_f64();
        let steady = first.map_or(all, |(at, done)| {
            (o.readings as i64 - done) as f64 / at.elapsed().as_secs_f64().max(1e-9)
        });
        task.abort();
        (all, steady)
    });
    println!(
        "anomaly-stage     {steady:>10.0} readings/s from its first commit ({:.0} % of the bare consumer); {all:.0}/s with the group join",
        100.0 * steady / bare
    );
}

fn latency(runtime: &tokio::runtime::Runtime, stack: &mut Stack, kafka: &KafkaConfig, o: &Options) {
    let config = stack.path().join("latency.toml");
    std::fs::write(
        &config,
        "[anomalies.detectors.crossing]\nmetric = \"temperature\"\nkind = \"threshold\"\nabove = 20.0\nclear_for_secs = 0\n",
    )
    .expect("config");
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let topic = kafka.topics.anomalies.clone();
    // Follow `anomalies` from its end, before anything is published.
    let _entered = runtime.enter();
    let consumer: StreamConsumer = kafka.reader("bench-latency").create().expect("consumer");
    let partitions = kafka.partitions;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p, Offset::End)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut pipeline = stack.spawn_stages(&["mqtt", "cleanse", "anomalies"], "latency", &[]);
    // The stage is up once its group holds the partitions: give it the time the join takes here.
    std::thread::sleep(Duration::from_secs(15));
    println!(
        "latency: MQTT QoS 1 at {} msg/s (3 readings each) for {} s through mqtt → raw → cleanse → telemetry → anomalies",
        o.rate, o.seconds
    );
    let sim = stack.spawn_simulate(&[
        "--via",
        "mqtt",
        "--devices",
        "50",
        "--rate",
        &o.rate.to_string(),
        "--duration",
        &format!("{}s", o.seconds),
        "--malformed",
        "0",
        "--duplicates",
        "0",
    ]);
    let mut latencies: Vec<i64> = runtime.block_on(async {
        let mut out = Vec::new();
        let quiet_for = Duration::from_secs(15);
        let deadline = Instant::now() + Duration::from_secs(o.seconds + 120);
        while Instant::now() < deadline {
            match tokio::time::timeout(quiet_for, consumer.recv()).await {
                Ok(Ok(m)) => {
                    let arrived = tributary_schemas::now_micros();
                    if let Some(Ok(a)) = m.payload().map(avro::decode::<Anomaly>)
                        && a.source_offset >= 0
                    {
                        out.push(arrived - a.event_time);
                    }
                }
                Ok(Err(e)) => panic!("consumer: {e}"),
                Err(_) if !out.is_empty() => break,
                Err(_) => {}
            }
        }
        out
    });
    let summary = stack.finish_simulator(sim);
    support::kill(&mut pipeline);
    latencies.sort_unstable();
    let q = |f: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * f).round() as usize)
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    println!(
        "simulator         {} msg/s acked ({} messages)",
        summary["acked_per_sec"].as_f64().unwrap_or(0.0).round(),
        summary["acked"]
    );
    println!(
        "publish → anomaly {} records: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < 250 ms)",
        latencies.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}
