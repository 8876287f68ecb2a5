//! Cleanse throughput on one core, beside the bare parsing it cannot avoid, and the dedup state it
//! keeps per device.
//!
//! ```text
//! cargo bench --bench cleanse                      # 1 000 000 messages from 10 000 devices
//! cargo bench --bench cleanse -- 200000 2000       # messages, devices
//! ```
//!
//! Messages look like the simulator's (three metrics, one in °F to convert, ~1 % bad values, ~1 %
//! duplicates), Avro-framed raw envelopes, processed by `Cleanser::process` (catalog, units, range,
//! event time, watermarks, dedup) on the bench's thread. Baseline: decoding the envelope and parsing
//! its JSON payload, nothing else, over the same records.

use std::time::Instant;

use tributary_schemas::avro::{decode, encode};
use tributary_schemas::payload::parse_message;
use tributary_schemas::{RawEnvelope, Source};
use tributary_streams::cleanse::{CleanseConfig, Cleanser, Output, Position};

const T0: i64 = 1_795_000_000_000_000;

fn records(messages: usize, devices: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(messages);
    let mut seq = vec![0u64; devices];
    for i in 0..messages {
        let d = (i * 7919) % devices;
        // ~1 % duplicates: the device's previous message again.
        let dup = i % 97 == 0 && seq[d] > 0;
        if !dup {
            seq[d] += 1;
        }
        let n = seq[d];
        let received_at = T0 + (i as i64) * 1_000;
        let time = received_at / 1_000; // epoch milliseconds
        let temperature = if i % 101 == 0 {
            "\"hot\"".to_owned()
        } else {
            format!(
                "{{\"value\": {:.2}, \"unit\": \"degF\"}}",
                68.0 + (i % 10) as f64
            )
        };
        let payload = format!(
            r#"{{"id":"m-{d}-{n}","time":{time},"metrics":{{"temperature":{temperature},"humidity":{{"value":{:.1},"unit":"%RH"}},"battery_voltage":{{"value":3.61,"unit":"V"}}}}}}"#,
            40.0 + (i % 20) as f64
        );
        let envelope = RawEnvelope {
            event_id: format!("m-{d}-{n}"),
            tenant: format!("tenant-{}", d % 3 + 1),
            device: format!("dev-{d:06}"),
            source: Source::Mqtt,
            received_at,
            content_type: "application/json".into(),
            payload: payload.into_bytes(),
            subject: None,
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        };
        out.push(encode(&envelope).expect("encodes"));
    }
    out
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let messages = args.first().copied().unwrap_or(1_000_000);
    let devices = args.get(1).copied().unwrap_or(10_000);
    let input = records(messages, devices);
    let pos = |offset: usize| Position {
        topic: "raw",
        partition: 0,
        offset: offset as i64,
        written_at: T0,
    };

    // Baseline: what any consumer of `raw` must do anyway.
    let started = Instant::now();
    let mut measurements = 0usize;
    for r in &input {
        let e: RawEnvelope = decode(r).expect("decodes");
        if let Ok(m) = parse_message(&e.content_type, &e.payload, &e.device, e.received_at) {
            measurements += m.measurements.len();
        }
    }
    let parse_secs = started.elapsed().as_secs_f64();

    let mut cleanser = Cleanser::new(&CleanseConfig::default()).expect("default catalog");
    let started = Instant::now();
    let (mut readings, mut dead) = (0usize, 0usize);
    for (i, r) in input.iter().enumerate() {
        for o in cleanser.process(pos(i), r) {
            match o {
                Output::Reading(_) => readings += 1,
                Output::DeadLetter(_) => dead += 1,
            }
        }
    }
    let cleanse_secs = started.elapsed().as_secs_f64();
    let (entries, bytes) = cleanser
        .partitions()
        .map(|(_, s)| (s.dedup.len(), s.approx_bytes()))
        .fold((0, 0), |(e, b), (e2, b2)| (e + e2, b + b2));

    println!("cleanse bench: {messages} messages from {devices} devices, one core");
    println!(
        "  baseline (decode + parse only): {:>9.0} msg/s  ({measurements} measurements)",
        messages as f64 / parse_secs
    );
    println!(
        "  cleanse (full):                 {:>9.0} msg/s = {:.0} readings/s  ({:.0} % of baseline)",
        messages as f64 / cleanse_secs,
        readings as f64 / cleanse_secs,
        100.0 * parse_secs / cleanse_secs
    );
    println!(
        "  outputs: {readings} readings, {dead} dead letters, {} duplicates dropped, {} converted",
        cleanser.counts.duplicates, cleanser.counts.converted
    );
    println!(
        "  state: {entries} dedup entries, {:.1} MB = {:.0} bytes/entry = {:.0} bytes/device ({} messages each)",
        bytes as f64 / 1e6,
        bytes as f64 / entries.max(1) as f64,
        bytes as f64 / devices as f64,
        messages / devices
    );
    println!(
        "  a device sending 1 msg/min holds {:.0} KB over the default 24 h horizon",
        bytes as f64 / entries.max(1) as f64 * 1440.0 / 1024.0
    );
}
