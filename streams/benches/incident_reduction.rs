//! Alert reduction on correlated failures: how many anomalies (what per-device alarms page:
//! ThingsBoard, AWS IoT Events, an Alertmanager rule per series) become how many incidents, with
//! the live stages' code: `Detection` (the anomaly stage) → `route` (incident routing) →
//! `Correlator` (the incident stage), partition by partition as in Kafka.
//!
//! ```text
//! cargo bench -p tributary-streams --bench incident_reduction                # seed 20261207, 4 zones × 7 sections × 8 devices, 4 h at 10 s
//! cargo bench -p tributary-streams --bench incident_reduction -- 77 8 6     # seed, zones, hours
//! ```
//!
//! The scenario is the simulator's (`tributary simulate --failures`, `tributary_streams::failures`):
//! per zone and hour one **section failure** (5 of a section's 8 devices overheat together), two
//! **pump failures** (one device overheats and loses pressure) and four **lone overheats**, watched
//! by the scenario's detectors and rules (`section`: site level 2, ≥ 3 devices within 120 s;
//! `pump`: one device, ≥ 2 metrics within 120 s). Expected: exactly one incident per section
//! failure naming the section, one per pump failure naming the device, none for a lone overheat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tributary_schemas::Reading;
use tributary_schemas::avro::{self, AnomalyState, IncidentChange};
use tributary_streams::anomaly::{AnomalyConfig, Detection};
use tributary_streams::failures::{self, FailureFleet, FailureKind};
use tributary_streams::incidents::{Correlator, IncidentConfig, input_partition, route};
use tributary_streams::labelled::Fleet;

const T0: i64 = 1_796_000_000_000_000;
const PARTITIONS: i32 = 4;
const PER_SECTION: usize = 8;

#[derive(serde::Deserialize)]
struct Sections {
    anomalies: AnomalyConfig,
    incidents: IncidentConfig,
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seed = args.first().copied().unwrap_or(20_261_207);
    let zones = args.get(1).copied().unwrap_or(4) as usize;
    let hours = args.get(2).copied().unwrap_or(4);
    let devices = zones * failures::SECTIONS * PER_SECTION;
    let names: Vec<String> = (0..devices).map(|d| format!("pump-{d:05}")).collect();
    // The rounds of `hours` and the hour after them, for the last ones to resolve.
    let fleet = FailureFleet::new(&names, PER_SECTION, seed, T0, hours * 3600 + 3600, 10);
    let failures = fleet.failures();
    let config: Sections = toml::from_str(failures::CONFIG).expect("the scenario's config");
    let catalog = Arc::new(config.anomalies.catalog(None).expect("detectors"));
    let rules = Arc::new(config.incidents.compile().expect("rules"));
    let mut detection = Detection::new(catalog, &config.anomalies, "reduction-anomalies");
    let mut correlator = Correlator::new(rules.clone(), &config.incidents, "reduction-incidents");
    for p in 0..PARTITIONS {
        detection.start_empty(p);
        correlator.start_empty(p);
    }
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut input_offsets = [0i64; PARTITIONS as usize];
    let mut anomalies = 0u64;
    let mut readings = 0u64;
    let mut incidents: BTreeMap<String, (String, String)> = BTreeMap::new(); // id → (rule, scope)
    let mut records = 0u64;
    let started = Instant::now();
    let mut correlate =
        |out: Vec<tributary_schemas::avro::Incident>,
         incidents: &mut BTreeMap<String, (String, String)>| {
            for i in out {
                records += 1;
                if i.change == IncidentChange::Open {
                    incidents.insert(i.incident_id.clone(), (i.rule.clone(), i.scope.clone()));
                }
            }
        };
    for step in 0..fleet.steps() {
        for d in 0..devices {
            let Some((t, values)) = fleet.sample(d, step) else {
                continue;
            };
            let p = (d as i32) % PARTITIONS;
            for (metric, value) in failures::METRICS.into_iter().zip(values) {
                let r = Reading {
                    tenant: "acme".into(),
                    device: fleet.device(d).to_owned(),
                    metric: metric.into(),
                    value,
                    unit: None,
                    original_value: None,
                    original_unit: None,
                    late: false,
                    event_time: t,
                    ingest_time: t,
                    event_id: format!("{d}-{step}"),
                    source_topic: "raw".into(),
                    source_partition: p,
                    source_offset: offsets[p as usize],
                    source_index: 0,
                    measurement: None,
                    name: None,
                    conflict: false,
                    device_group: None,
                    device_model: None,
                    site: fleet.site(d),
                };
                offsets[p as usize] += 1;
                readings += 1;
                for a in detection.reading(p, offsets[p as usize], t, &r, "telemetry") {
                    if a.state == AnomalyState::Open {
                        anomalies += 1;
                    }
                    let bytes = avro::encode(&a).expect("anomaly encodes");
                    for (key, input) in route(&rules, &a, &bytes) {
                        let ip = input_partition(&key, PARTITIONS);
                        input_offsets[ip as usize] += 1;
                        let out = correlator.input(
                            ip,
                            input_offsets[ip as usize],
                            a.event_time,
                            &input,
                            "incident-inputs",
                        );
                        correlate(out, &mut incidents);
                    }
                }
            }
        }
    }
    // The quiet periods end: every incident resolves.
    let end = T0 + fleet.steps() as i64 * 10_000_000 + 3_600_000_000;
    for p in 0..PARTITIONS {
        let out = correlator.advance_to(p, end, "incident-inputs");
        correlate(out, &mut incidents);
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Scoring: each failure's expected incident found once; nothing else.
    let found: BTreeMap<(String, String), usize> =
        incidents.values().fold(BTreeMap::new(), |mut m, k| {
            *m.entry(k.clone()).or_default() += 1;
            m
        });
    let mut by_kind: BTreeMap<FailureKind, (usize, usize)> = BTreeMap::new(); // failures, anomalies planted
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for f in failures {
        let e = by_kind.entry(f.kind).or_default();
        e.0 += 1;
        e.1 += f.anomalies();
        if let Some((rule, scope)) = f.expected(&fleet) {
            *expected.entry((rule.to_owned(), scope)).or_default() += 1;
        }
    }
    // A failure found: its (rule, scope) has as many incidents as failures; more are duplicates.
    let count = |key: &(String, String)| found.get(key).copied().unwrap_or(0);
    let missed: usize = expected
        .iter()
        .map(|(k, n)| n.saturating_sub(count(k)))
        .sum();
    let duplicates: usize = expected
        .iter()
        .map(|(k, n)| count(k).saturating_sub(*n))
        .sum();
    let unexpected: usize = found
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .map(|(_, n)| n)
        .sum();
    let found_of = |kind: FailureKind| -> usize {
        expected
            .iter()
            .filter(|((rule, _), _)| rule == kind.as_str())
            .map(|(k, n)| count(k).min(*n))
            .sum()
    };
    let pages = incidents.len();
    println!(
        "incident reduction: seed {seed}, {devices} devices ({zones} zones × {} sections × {PER_SECTION}), {hours} h at 10 s: {readings} readings, {} failures ({:.1} s)",
        failures::SECTIONS,
        failures.len(),
        elapsed
    );
    println!(
        "{:<10} {:>9} {:>18} {:>20}",
        "failure", "failures", "anomalies planted", "incidents (1 each)"
    );
    for (kind, (n, planted)) in &by_kind {
        let shown = if *kind == FailureKind::Lone {
            "none expected".to_owned()
        } else {
            format!("{} of {n}", found_of(*kind))
        };
        println!("{:<10} {n:>9} {planted:>18} {shown:>20}", kind.as_str());
    }
    let lone = by_kind.get(&FailureKind::Lone).map_or(0, |k| k.1);
    println!(
        "anomalies opened: {anomalies}; incidents opened: {pages} ({} records); missed {missed}, duplicates {duplicates}, unexpected {unexpected}",
        records
    );
    println!(
        "alert reduction: {:.1} anomalies per incident on the correlated failures ({} anomalies → {pages} pages); with each lone overheat paging on its own too: {:.1} ({} → {})",
        (anomalies as f64 - lone as f64) / pages.max(1) as f64,
        anomalies as usize - lone.min(anomalies as usize),
        anomalies as f64 / (pages + lone).max(1) as f64,
        anomalies,
        pages + lone
    );
    let exact = missed == 0 && duplicates == 0 && unexpected == 0;
    for (key, n) in &found {
        if *n != expected.get(key).copied().unwrap_or(0) {
            println!("  {n} incidents of rule {} for {}", key.0, key.1);
        }
    }
    println!(
        "expected incidents exactly (one per section and pump failure, none for lone overheats): {}",
        if exact { "yes" } else { "NO" }
    );
}
