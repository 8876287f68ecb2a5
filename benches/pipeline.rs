//! End-to-end pipeline benchmark: simulated devices → ingest (HTTP, MQTT) → `raw` → cleanse →
//! `telemetry` → rows in the Delta table, on a private local stack (Tansu, Mosquitto) started by
//! the project's own scripts, as the end-to-end tests do.
//!
//! ```text
//! cargo bench --bench pipeline                      # defaults below
//! cargo bench --bench pipeline -- --messages 100000 --mqtt-rate 8000
//! ```
//!
//! It prints, for the same broker in the same run:
//! - `bare-producer`: a bare rdkafka producer (the same settings as the ingest producer) writing
//!   envelope-sized records: the ceiling any Kafka-backed ingest can reach here;
//! - `mosquitto-alone`: the same simulated MQTT devices publishing to the same Mosquitto before the
//!   pipeline runs (no subscriber): the ceiling the broker and the simulator set for MQTT here;
//! - `http` and `mqtt`: messages acknowledged to the devices per second (HTTP: 202 after Kafka
//!   acknowledged every message of the request, compared with the bare producer; MQTT: the broker's
//!   PUBACK), and messages and readings per second from the first send until the last row is
//!   queryable in `telemetry`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use support::{Stack, summary};
use tributary_schemas::avro::{self, RawEnvelope, Source};
use tributary_schemas::kafka::KafkaConfig;

struct Options {
    messages: u64,
    mqtt_rate: u64,
    devices: usize,
}

fn options() -> Options {
    let mut o = Options {
        messages: 60_000,
        mqtt_rate: 10_000,
        devices: 50,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match args[i].as_str() {
            "--messages" => o.messages = value().unwrap_or(o.messages),
            "--mqtt-rate" => o.mqtt_rate = value().unwrap_or(o.mqtt_rate),
            "--devices" => o.devices = value().map(|v| v as usize).unwrap_or(o.devices),
            _ => {} // `cargo bench` passes `--bench`
        }
        i += 1;
    }
    o
}

fn main() {
    let o = options();
    println!(
        "pipeline bench: {} messages per protocol (3 readings each), {} devices, MQTT paced at {} msg/s",
        o.messages, o.devices, o.mqtt_rate
    );
    let stack = Stack::start(o.devices, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");

    let bare = runtime.block_on(bare_producer(stack.kafka_port, o.messages));
    println!(
        "bare-producer  {:>8} records  {:>9.0} acked/s",
        o.messages, bare
    );

    // The MQTT baseline: the same simulated devices publishing to the same Mosquitto before the
    // pipeline starts (nobody subscribed): what the broker and the simulator reach on this machine.
    let users: String = stack
        .secrets()
        .iter()
        .map(|d| {
            format!(
                "{}:{}\n",
                d["device"].as_str().unwrap_or_default(),
                d["token"].as_str().unwrap_or_default()
            )
        })
        .collect();
    std::fs::write(stack.path().join("stack/mqtt-users.plain"), users).expect("mqtt users");
    stack.service("down", &["mosquitto"]);
    stack.service("up", &["mosquitto"]);
    let out = simulator(&stack, "mqtt", o.messages, o.mqtt_rate, o.devices)
        .output()
        .expect("broker-only run");
    assert!(out.status.success(), "broker-only MQTT run failed");
    let broker_only = summary(&String::from_utf8_lossy(&out.stdout))["acked_per_sec"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "mosquitto-alone {:>8} messages  acked {:>7.0} msg/s (no subscriber)",
        o.messages, broker_only
    );

    let mut pipeline = stack.spawn_pipeline(0);
    // Warm-up: consumer groups joined, tables created, so the timed runs measure steady state.
    let warm = simulator(&stack, "http", 200, 1_000_000, o.devices)
        .output()
        .expect("warm-up");
    assert!(warm.status.success(), "warm-up failed");
    stack.wait_for_rows(600, 0, Duration::from_secs(120));

    let http = timed_run(&stack, "http", o.messages, 1_000_000, o.devices);
    let mqtt = timed_run(&stack, "mqtt", o.messages, o.mqtt_rate, o.devices);
    support::kill(&mut pipeline);

    for (via, r, baseline) in [("http", http, None), ("mqtt", mqtt, Some(broker_only))] {
        let share = match baseline {
            Some(b) => format!(
                "{:.0}% of bare, {:.0}% of mosquitto alone",
                100.0 * r.device_acked_per_sec / bare,
                100.0 * r.device_acked_per_sec / b
            ),
            None => format!("{:.0}% of bare", 100.0 * r.device_acked_per_sec / bare),
        };
        println!(
            "{via:<13}  {:>8} messages  acked {:>7.0} msg/s ({share})  in the lake {:>7.0} msg/s = {:>7.0} readings/s ({:.1} s to the last row)",
            r.messages,
            r.device_acked_per_sec,
            r.messages as f64 / r.landed_secs,
            r.readings as f64 / r.landed_secs,
            r.landed_secs
        );
    }
}

struct RunResult {
    messages: u64,
    readings: u64,
    /// Messages acked to the devices per second (HTTP: 202 after Kafka; MQTT: the broker's PUBACK).
    device_acked_per_sec: f64,
    /// Seconds from the first send until every reading was a row in `telemetry`.
    landed_secs: f64,
}

/// Sends `messages` over `via`, and times until they are all in `raw` and all rows in `telemetry`.
fn timed_run(stack: &Stack, via: &str, messages: u64, rate: u64, devices: usize) -> RunResult {
    let before_rows = stack.count("telemetry");
    let started = Instant::now();
    let child = simulator(stack, via, messages, rate, devices)
        .spawn()
        .expect("simulator starts");
    let deadline = Instant::now() + Duration::from_secs(600);
    // Every message lands in telemetry as 3 readings.
    let readings = 3 * messages;
    loop {
        let rows = stack.count("telemetry");
        if rows >= before_rows + readings {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{via}: only {} of {readings} readings landed\n{}",
            rows - before_rows,
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let landed_secs = started.elapsed().as_secs_f64();
    let out = child.wait_with_output().expect("simulator ends");
    assert!(out.status.success(), "simulate --via {via} failed");
    let s: Value = summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["expected_readings"].as_u64(), Some(readings), "{s}");
    RunResult {
        messages,
        readings,
        device_acked_per_sec: s["acked_per_sec"].as_f64().unwrap_or(0.0),
        landed_secs,
    }
}

/// The simulator (no malformed messages, no duplicates), HTTP in batches of 100.
fn simulator(stack: &Stack, via: &str, messages: u64, rate: u64, devices: usize) -> Command {
    let mut c = stack.cmd(&[
        "simulate",
        "--via",
        via,
        "--messages",
        &messages.to_string(),
        "--rate",
        &rate.to_string(),
        "--devices",
        &devices.to_string(),
        "--batch",
        "100",
        "--concurrency",
        "8",
        "--malformed",
        "0",
        "--duplicates",
        "0",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

/// The baseline: a bare rdkafka producer with the ingest producer's settings, sending `n` raw
/// envelopes of the simulator's size to a topic of its own, all in flight at once. Returns acked/s.
async fn bare_producer(kafka_port: u16, n: u64) -> f64 {
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{kafka_port}"),
        ..KafkaConfig::default()
    };
    let topic = "bench-bare-producer";
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create().expect("admin client");
    admin
        .create_topics(
            &[NewTopic::new(
                topic,
                kafka.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create baseline topic");
    let producer: FutureProducer = kafka.producer("bench-bare").create().expect("producer");
    let body = br#"{"id":"r0000abcd-dev-00042-123456","time":"2026-11-27T22:39:01.123Z","metrics":{"temperature":{"value":21.37,"unit":"Cel"},"humidity":{"value":47.12,"unit":"%RH"},"battery_voltage":{"value":3.91,"unit":"V"}}}"#;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        let envelope = RawEnvelope {
            event_id: format!("bench-{i}"),
            tenant: "tenant-1".into(),
            device: format!("dev-{:05}", i % 50),
            source: Source::Http,
            received_at: tributary_schemas::now_micros(),
            content_type: "application/json".into(),
            payload: body.to_vec(),
            subject: None,
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        };
        let bytes = avro::encode(&envelope).expect("encode");
        loop {
            let record = FutureRecord::to(topic)
                .key(&envelope.device)
                .payload(&bytes);
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in pending {
        d.await.expect("delivered").expect("acked");
    }
    n as f64 / started.elapsed().as_secs_f64()
}
