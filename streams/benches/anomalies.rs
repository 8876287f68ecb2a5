//! Anomaly detection on one core, beside the bare decoding it cannot avoid, and the state it keeps
//! per (device, metric, detector).
//!
//! ```text
//! cargo bench -p tributary-streams --bench anomalies     # 1 000 000 readings of 10 000 series; 1 000 000 series of state
//! cargo bench -p tributary-streams --bench anomalies -- 200000 2000 100000   # readings, series, state series
//! ```
//!
//! Readings are Avro-framed `Reading`s (what the stage consumes from `telemetry`), one metric,
//! watched by four detectors (threshold with hysteresis, spike, rate of change, heartbeat) as
//! `Detection::reading` runs them in the live stage (state lookup, detection, lifecycle, anomaly
//! records, the partition clock's sweeps) and the state changelog at each commit (every
//! `runtime::COMMIT_EVERY` of wall time, as the stage). Baseline: decoding the same records,
//! nothing else.
//! State: the heap bytes (counted by the allocator) and the changelog bytes of one series under
//! one spike detector, at scale.

use std::sync::Arc;
use std::time::Instant;

use tributary_schemas::Reading;
use tributary_schemas::avro::{decode, encode};
use tributary_streams::anomaly::{AnomalyConfig, Detection};
use tributary_streams::runtime::COMMIT_EVERY;

mod heap;

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

const T0: i64 = 1_795_000_000_000_000;

fn reading(i: usize, series: usize) -> Reading {
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
        event_time: T0 + step * 1_000_000 + d as i64,
        ingest_time: T0 + step * 1_000_000 + d as i64,
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

fn config(detectors: &str) -> AnomalyConfig {
    toml::from_str(detectors).expect("bench detectors")
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let readings = args.first().copied().unwrap_or(1_000_000);
    let series = args.get(1).copied().unwrap_or(10_000);
    let state_series = args.get(2).copied().unwrap_or(1_000_000);

    let four = config(
        "[detectors.hot]\nmetric = 'temperature'\nkind = 'threshold'\nabove = 40.0\nclear_above = 35.0\n\
         [detectors.jump]\nmetric = 'temperature'\nkind = 'spike'\n\
         [detectors.surge]\nmetric = 'temperature'\nkind = 'rate_of_change'\nmax_per_sec = 100.0\n\
         [detectors.silent]\nmetric = 'temperature'\nkind = 'heartbeat'\ninterval_secs = 60\n",
    );
    let records: Vec<Vec<u8>> = (0..readings)
        .map(|i| encode(&reading(i, series)).expect("encode"))
        .collect();

    // Baseline: decode only.
    let started = Instant::now();
    let mut sum = 0.0;
    for r in &records {
        sum += decode::<Reading>(r).expect("decode").value;
    }
    let bare = started.elapsed();
    std::hint::black_box(sum);

    let catalog = Arc::new(four.catalog(None).expect("catalog"));
    let mut detection = Detection::new(catalog, &four, "bench-state");
    detection.start_empty(0);
    let started = Instant::now();
    let mut anomalies = 0usize;
    let mut changelog_bytes = 0usize;
    let mut committed = Instant::now();
    let flush = |detection: &mut Detection| {
        detection
            .changelog()
            .expect("changelog")
            .iter()
            .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
    };
    for (i, r) in records.iter().enumerate() {
        let reading = decode::<Reading>(r).expect("decode");
        anomalies += detection
            .reading(0, i as i64, reading.event_time, &reading, "telemetry")
            .len();
        // The live stage writes the changelog when it commits, every `runtime::COMMIT_EVERY`.
        if (i + 1).is_multiple_of(1000) && committed.elapsed() >= COMMIT_EVERY {
            changelog_bytes += flush(&mut detection);
            committed = Instant::now();
        }
    }
    changelog_bytes += flush(&mut detection);
    let detect = started.elapsed();
    let rate = |d: std::time::Duration| readings as f64 / d.as_secs_f64();
    println!(
        "readings: {readings} of {series} series, 4 detectors each ({anomalies} anomaly records)"
    );
    println!("  bare decode:        {:>10.0} readings/s", rate(bare));
    println!(
        "  decode + detect + changelog: {:>10.0} readings/s ({:.0} % of bare); changelog {:.0} bytes per reading",
        rate(detect),
        100.0 * bare.as_secs_f64() / detect.as_secs_f64(),
        changelog_bytes as f64 / readings as f64
    );

    // State at scale: one spike detector (the largest memory of the kinds but trend's) per series.
    let one = config("[detectors.jump]\nmetric = 'temperature'\nkind = 'spike'\n");
    let catalog = Arc::new(one.catalog(None).expect("catalog"));
    let before = heap::live();
    let mut detection = Detection::new(catalog, &one, "bench-state");
    detection.start_empty(0);
    for i in 0..state_series * 2 {
        let r = reading(i, state_series);
        detection.reading(0, i as i64, r.event_time, &r, "telemetry");
        if (i + 1).is_multiple_of(2000) {
            detection.changelog().expect("changelog");
        }
    }
    detection.changelog().expect("changelog");
    let held = (heap::live() - before).max(0) as f64;
    let per_series = held / state_series as f64;
    println!(
        "state: {} series under a spike detector: {:.0} MiB heap, {:.0} bytes per series; 1 M series ≈ {:.2} GiB",
        detection.series(0),
        held / (1u64 << 20) as f64,
        per_series,
        per_series * 1e6 / (1u64 << 30) as f64
    );
}
