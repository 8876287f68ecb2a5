//! Alert reduction on correlated failures: how many anomalies (what per-device alarms page:
//! ThingsBoard, AWS IoT Events, an Alertmanager rule per series) become how many incidents, with
//! the live stages' code: `Detection` (the anomaly stage) → `route` (incident routing) →
//! `Correlator` (the incident stage), partition by partition as in Kafka.
//!
//! ```text
//! cargo bench -p tributary-streams --bench incident_reduction                # seed 20261207, 4 zones × 10 sections × 8 devices, 4 h at 10 s
//! cargo bench -p tributary-streams --bench incident_reduction -- 77 8 6     # seed, zones, hours
//! ```
//!
//! The scenario (deterministic in the seed): every device reports temperature (60 ± 3 °C) and
//! pressure (300 ± 2 kPa) every 10 s; per zone and hour, one **section failure** (5 of a section's
//! 8 devices overheat, starting within 40 s of each other, for 4 to 10 min), two **pump
//! failures** (one device overheats and loses pressure within 30 s, for 3 to 8 min) and four
//! **lone overheats** (one device, alone in its section at the time). The rules are the ones the
//! end-to-end test uses: `section` (site level 2, ≥ 3 devices within 120 s) and `pump` (one
//! device, ≥ 2 metrics within 120 s). Expected: exactly one incident per section failure naming
//! the section, one per pump failure naming the device, none for a lone overheat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tributary_schemas::Reading;
use tributary_schemas::avro::{self, AnomalyState, IncidentChange};
use tributary_streams::anomaly::{AnomalyConfig, Detection};
use tributary_streams::incidents::{Correlator, IncidentConfig, input_partition, route};

const T0: i64 = 1_796_000_000_000_000;
const STEP: i64 = 10_000_000;
const PARTITIONS: i32 = 4;
const SECTIONS: usize = 10;
const PER_SECTION: usize = 8;

const CONFIG: &str = r#"
[anomalies.detectors.hot]
metric = "temperature"
kind = "threshold"
above = 80.0
clear_above = 75.0
severity = "critical"

[anomalies.detectors.low_pressure]
metric = "pressure"
kind = "threshold"
below = 250.0
clear_below = 270.0

[incidents.rules.section]
correlate = "site"
level = 2
min_devices = 3
window_secs = 120
quiet_secs = 60

[incidents.rules.pump]
correlate = "device"
min_metrics = 2
window_secs = 120
quiet_secs = 60
"#;

#[derive(serde::Deserialize)]
struct Sections {
    anomalies: AnomalyConfig,
    incidents: IncidentConfig,
}

/// A failure put into the fleet: devices `devices` run hot over `[start, end)` (per device),
/// `pressure` also loses pressure.
struct Failure {
    kind: &'static str,
    /// What the incident should name: the section (`zone-z / section-s`) or the device.
    scope: String,
    /// (device index, start, end) in event time.
    hot: Vec<(usize, i64, i64)>,
    pressure: Option<(usize, i64, i64)>,
}

/// SplitMix64: the scenario's only randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Roughly normal noise in [-1, 1] × scale.
    fn noise(&mut self, scale: f64) -> f64 {
        let u = (0..4)
            .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64)
            .sum::<f64>();
        (u / 2.0 - 1.0) * scale
    }
}

fn device_name(d: usize) -> String {
    format!("pump-{d:05}")
}

fn site_of(d: usize) -> Vec<String> {
    let section = d / PER_SECTION;
    vec![
        format!("zone-{}", section / SECTIONS),
        format!("section-{}", section % SECTIONS),
    ]
}

/// The failures of `zones` zones over `hours` hours; episodes never overlap within a section
/// (each hour of a zone is cut into slots, one failure per slot, in distinct sections).
fn scenario(seed: u64, zones: usize, hours: u64) -> Vec<Failure> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let minute = 60_000_000i64;
    for z in 0..zones {
        for h in 0..hours as i64 {
            // The first half hour of the run is left quiet; 7 failures per zone-hour, in 7
            // distinct sections, each in its own 8-minute slot.
            let mut sections: Vec<usize> = (0..SECTIONS).collect();
            for i in (1..sections.len()).rev() {
                sections.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for (slot, kind) in ["section", "pump", "pump", "lone", "lone", "lone", "lone"]
                .into_iter()
                .enumerate()
            {
                let section = z * SECTIONS + sections[slot];
                let first = section * PER_SECTION;
                let start = T0
                    + 30 * minute
                    + h * 60 * minute
                    + slot as i64 * 8 * minute
                    + rng.below(60) as i64 * 1_000_000;
                let pick = |rng: &mut Rng| first + rng.below(PER_SECTION as u64) as usize;
                let f = match kind {
                    "section" => {
                        let mut devices: Vec<usize> = (first..first + PER_SECTION).collect();
                        for i in (1..devices.len()).rev() {
                            devices.swap(i, rng.below(i as u64 + 1) as usize);
                        }
                        let hot = devices[..5]
                            .iter()
                            .map(|&d| {
                                let s = start + rng.below(40) as i64 * 1_000_000;
                                (d, s, s + (4 + rng.below(3) as i64) * minute)
                            })
                            .collect();
                        Failure {
                            kind,
                            scope: site_of(first).join(" / "),
                            hot,
                            pressure: None,
                        }
                    }
                    "pump" => {
                        let d = pick(&mut rng);
                        let end = start + (3 + rng.below(4) as i64) * minute;
                        let p = start + rng.below(30) as i64 * 1_000_000;
                        Failure {
                            kind,
                            scope: device_name(d),
                            hot: vec![(d, start, end)],
                            pressure: Some((d, p, end)),
                        }
                    }
                    _ => {
                        let d = pick(&mut rng);
                        let end = start + (3 + rng.below(4) as i64) * minute;
                        Failure {
                            kind,
                            scope: device_name(d),
                            hot: vec![(d, start, end)],
                            pressure: None,
                        }
                    }
                };
                out.push(f);
            }
        }
    }
    out
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seed = args.first().copied().unwrap_or(20_261_207);
    let zones = args.get(1).copied().unwrap_or(4) as usize;
    let hours = args.get(2).copied().unwrap_or(4);
    let devices = zones * SECTIONS * PER_SECTION;
    let failures = scenario(seed, zones, hours);
    // Per device: its hot and low-pressure intervals.
    let mut hot: BTreeMap<usize, Vec<(i64, i64)>> = BTreeMap::new();
    let mut low: BTreeMap<usize, Vec<(i64, i64)>> = BTreeMap::new();
    for f in &failures {
        for &(d, s, e) in &f.hot {
            hot.entry(d).or_default().push((s, e));
        }
        if let Some((d, s, e)) = f.pressure {
            low.entry(d).or_default().push((s, e));
        }
    }
    let within = |m: &BTreeMap<usize, Vec<(i64, i64)>>, d: usize, t: i64| {
        m.get(&d)
            .is_some_and(|v| v.iter().any(|&(s, e)| s <= t && t < e))
    };

    let config: Sections = toml::from_str(CONFIG).expect("bench config");
    let catalog = Arc::new(config.anomalies.catalog(None).expect("detectors"));
    let rules = Arc::new(config.incidents.compile().expect("rules"));
    let mut detection = Detection::new(catalog, &config.anomalies, "reduction-anomalies");
    let mut correlator = Correlator::new(rules.clone(), &config.incidents, "reduction-incidents");
    for p in 0..PARTITIONS {
        detection.start_empty(p);
        correlator.start_empty(p);
    }
    let mut rng = Rng(seed ^ 0xA5A5);
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut input_offsets = [0i64; PARTITIONS as usize];
    let mut anomalies = 0u64;
    let mut readings = 0u64;
    let mut incidents: BTreeMap<String, (String, String)> = BTreeMap::new(); // id → (rule, scope)
    let mut records = 0u64;
    let steps = (hours as i64 * 3600 + 3600) * 1_000_000 / STEP;
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
    for step in 0..steps {
        for d in 0..devices {
            let t = T0 + step * STEP + d as i64 * 1_000;
            let p = (d as i32) % PARTITIONS;
            let temperature = if within(&hot, d, t) { 90.0 } else { 60.0 } + rng.noise(3.0);
            let pressure = if within(&low, d, t) { 200.0 } else { 300.0 } + rng.noise(2.0);
            for (metric, value) in [("temperature", temperature), ("pressure", pressure)] {
                let r = Reading {
                    tenant: "acme".into(),
                    device: device_name(d),
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
                    site: site_of(d),
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
    let end = T0 + steps * STEP + 3_600_000_000;
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
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new(); // failures, anomalies planted
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for f in &failures {
        let e = by_kind.entry(f.kind).or_default();
        e.0 += 1;
        e.1 += f.hot.len() + usize::from(f.pressure.is_some());
        if f.kind != "lone" {
            *expected
                .entry((f.kind.to_owned(), f.scope.clone()))
                .or_default() += 1;
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
    let found_of = |kind: &str| -> usize {
        expected
            .iter()
            .filter(|((rule, _), _)| rule == kind)
            .map(|(k, n)| count(k).min(*n))
            .sum()
    };
    let pages = incidents.len();
    println!(
        "incident reduction: seed {seed}, {devices} devices ({zones} zones × {SECTIONS} sections × {PER_SECTION}), {hours} h at 10 s: {readings} readings, {} failures ({:.1} s)",
        failures.len(),
        elapsed
    );
    println!(
        "{:<10} {:>9} {:>18} {:>20}",
        "failure", "failures", "anomalies planted", "incidents (1 each)"
    );
    for (kind, (n, planted)) in &by_kind {
        let shown = if *kind == "lone" {
            "none expected".to_owned()
        } else {
            format!("{} of {n}", found_of(kind))
        };
        println!("{kind:<10} {n:>9} {planted:>18} {shown:>20}");
    }
    let lone = by_kind.get("lone").map_or(0, |k| k.1);
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
