//! Labelled anomalies: a fleet of devices whose signals carry anomalies of every detector kind at
//! known times, and how detections score against those labels. The ground truth shared by
//! `tributary simulate --anomalies` (which sends it through MQTT or HTTP and writes the labels) and
//! the quality benchmark (`cargo bench -p tributary-streams --bench anomaly_quality`, which runs
//! the live stage's [`crate::anomaly::Detection`] over it).
//!
//! Each device reports seven metrics every `step` seconds, one per kind, each a plausible signal
//! (slow cycles and Gaussian-like noise, deterministic in the seed) into which episodes are put:
//!
//! | metric | normal | episode (labelled kind) |
//! |---|---|---|
//! | `temperature` (Cel) | 60 ± 5 cycle | 85 for 2 to 12 min (`threshold`) |
//! | `vibration` | 2.0 ± noise | one or two readings 12 to 20 robust deviations off (`spike`) |
//! | `pressure` (kPa) | 300 ± 2 cycle | a drop of 60 to 120 kPa between two readings, recovering over minutes (`rate_of_change`) |
//! | `humidity` (%RH) | 45 ± noise | the same value for 10 to 20 min (`flatline`) |
//! | `rssi` | every reading | the device silent (every metric) for 5 to 15 min (`heartbeat`) |
//! | `current` (A) | 12 ± noise | the level moves by 5 to 8 deviations and stays (`level_shift`) |
//! | `battery_health` (%) | 95 ± noise | a decline crossing 80 near the end; labelled from an hour before the crossing (`trend`) |
//!
//! Episodes of one device never overlap in time (a silent device shows nothing else), the first
//! half hour is left for baselines to warm up. [`DETECTORS`] is the catalog that watches them; it
//! was set from the kinds' definitions above, not fitted to a seed (e.g. the CUSUM limit of 10
//! deviations: about 10^5 readings between false alarms on noise, a 5-deviation shift found in
//! 2 to 3 readings).

use std::collections::BTreeMap;

use serde::Serialize;
use tributary_schemas::Micros;
use tributary_schemas::detectors::DetectorKind;

/// The detector catalog (an `[anomalies]` section) watching the labelled metrics.
pub const DETECTORS: &str = r#"
[detectors.overheating]
metric = "temperature"
kind = "threshold"
above = 80.0
clear_above = 75.0
for_secs = 30
severity = "critical"

[detectors.vibration_spike]
metric = "vibration"
kind = "spike"
window_secs = 600
k = 6
warmup = 30

[detectors.pressure_drop]
metric = "pressure"
kind = "rate_of_change"
max_per_sec = 2.0

[detectors.stuck_humidity]
metric = "humidity"
kind = "flatline"
epsilon = 0.001
for_secs = 300

[detectors.offline]
metric = "rssi"
kind = "heartbeat"
interval_secs = 120

[detectors.current_shift]
metric = "current"
kind = "level_shift"
warmup = 30
k = 10

[detectors.battery_wear]
metric = "battery_health"
kind = "trend"
limit = 80.0
horizon_secs = 3600
window_secs = 3600
warmup = 30
direction = "down"
"#;

/// The metric each kind's episodes are put into.
pub fn metric_of(kind: DetectorKind) -> &'static str {
    match kind {
        DetectorKind::Threshold => "temperature",
        DetectorKind::Spike => "vibration",
        DetectorKind::RateOfChange => "pressure",
        DetectorKind::Flatline => "humidity",
        DetectorKind::Heartbeat => "rssi",
        DetectorKind::LevelShift => "current",
        DetectorKind::Trend => "battery_health",
    }
}

/// The metrics of a sample, in [`DetectorKind::ALL`] order.
pub const METRICS: [&str; 7] = [
    "temperature",
    "vibration",
    "pressure",
    "humidity",
    "rssi",
    "current",
    "battery_health",
];

/// One labelled anomaly: what a detector of `kind` should report on `device`'s `metric`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Label {
    pub device: String,
    pub metric: String,
    pub kind: DetectorKind,
    /// Event time it begins and ends (µs).
    pub start: Micros,
    pub end: Micros,
}

const S: Micros = 1_000_000;
const MIN: Micros = 60 * S;
/// Room per episode; the first slot is the warm-up.
const SLOT: Micros = 30 * MIN;

#[derive(Debug, Clone)]
struct Episode {
    kind: DetectorKind,
    start: Micros,
    end: Micros,
    /// Kind-specific size (a level, a drop, a shift in deviations).
    size: f64,
}

#[derive(Debug, Clone)]
struct Device {
    name: String,
    salt: u64,
    phase: f64,
    episodes: Vec<Episode>,
}

/// A fleet of devices with labelled anomalies over `[t0, t0 + duration)`.
#[derive(Debug, Clone)]
pub struct LabelledFleet {
    devices: Vec<Device>,
    t0: Micros,
    step: Micros,
    steps: u64,
}

/// A deterministic 64-bit mix (SplitMix64's finaliser).
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Uniform in [0, 1) from `x`.
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// Roughly standard normal (the sum of four uniforms, scaled), from `x`.
pub(crate) fn normal(x: u64) -> f64 {
    let sum: f64 = (0..4u64).map(|k| unit(x ^ (k << 56))).sum();
    (sum - 2.0) * (3.0f64).sqrt()
}

/// A small generator for placing episodes.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> f64 {
        self.0 = mix(self.0);
        unit(self.0)
    }

    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

impl LabelledFleet {
    /// `devices` names, episodes placed by `seed`, a sample every `step_secs` from `t0` for
    /// `duration_secs` (at least an hour: the warm-up slot and one more).
    pub fn new(
        devices: &[String],
        seed: u64,
        t0: Micros,
        duration_secs: u64,
        step_secs: u64,
    ) -> Self {
        let step = Micros::try_from(step_secs.max(1))
            .unwrap_or(1)
            .saturating_mul(S);
        let duration = Micros::try_from(duration_secs.max(3600))
            .unwrap_or(Micros::MAX / 2)
            .saturating_mul(S);
        let slots = (duration / SLOT).max(2);
        let devices = devices
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let salt = mix(seed ^ mix(i as u64 + 1));
                let mut draw = Draw(salt);
                let phase = draw.between(0.0, std::f64::consts::TAU);
                // The kinds this device shows, one episode each (some twice), into distinct
                // slots after the warm-up, in a shuffled order; half the devices wear out.
                let mut kinds: Vec<DetectorKind> = DetectorKind::ALL
                    .into_iter()
                    .filter(|k| *k != DetectorKind::Trend)
                    .collect();
                for k in [
                    DetectorKind::Threshold,
                    DetectorKind::Spike,
                    DetectorKind::LevelShift,
                ] {
                    if draw.next() < 0.5 {
                        kinds.push(k);
                    }
                }
                let mut free: Vec<i64> = (1..slots).collect();
                let mut episodes = Vec::new();
                for kind in kinds {
                    if free.is_empty() {
                        break;
                    }
                    let pick = ((draw.next() * free.len() as f64) as usize).min(free.len() - 1);
                    let slot = free.swap_remove(pick);
                    let start = t0 + slot * SLOT + (draw.between(0.0, 5.0) * MIN as f64) as Micros;
                    let (len, size) = match kind {
                        DetectorKind::Threshold => (draw.between(2.0, 12.0) * MIN as f64, 85.0),
                        DetectorKind::Spike => (
                            if draw.next() < 0.3 { 2.0 } else { 1.0 },
                            draw.between(12.0, 20.0),
                        ),
                        DetectorKind::RateOfChange => (1.0, draw.between(60.0, 120.0)),
                        DetectorKind::Flatline => (draw.between(10.0, 20.0) * MIN as f64, 0.0),
                        DetectorKind::Heartbeat => (draw.between(5.0, 15.0) * MIN as f64, 0.0),
                        DetectorKind::LevelShift => (1.0, draw.between(5.0, 8.0)),
                        DetectorKind::Trend => (0.0, 0.0),
                    };
                    // Spikes, drops and shifts last that many readings; the others are durations.
                    let end = match kind {
                        DetectorKind::Spike
                        | DetectorKind::RateOfChange
                        | DetectorKind::LevelShift => start + (len as Micros) * step,
                        _ => start + len as Micros,
                    };
                    episodes.push(Episode {
                        kind,
                        start,
                        end,
                        size,
                    });
                }
                if draw.next() < 0.5 {
                    // Crosses 80 ten minutes before the end, after a three-hour decline.
                    let cross = t0 + duration - 10 * MIN;
                    episodes.push(Episode {
                        kind: DetectorKind::Trend,
                        start: cross - 60 * MIN,
                        end: cross,
                        size: 0.0,
                    });
                }
                episodes.sort_by_key(|e| e.start);
                Device {
                    name: name.clone(),
                    salt,
                    phase,
                    episodes,
                }
            })
            .collect();
        Self {
            devices,
            t0,
            step,
            steps: u64::try_from(duration / step).unwrap_or(0),
        }
    }

    /// Every label, by device then start.
    pub fn labels(&self) -> Vec<Label> {
        self.devices
            .iter()
            .flat_map(|d| {
                d.episodes.iter().map(|e| Label {
                    device: d.name.clone(),
                    metric: metric_of(e.kind).to_owned(),
                    kind: e.kind,
                    start: e.start,
                    end: e.end,
                })
            })
            .collect()
    }

    /// Device `d`'s sample number `i`: its event time and the value of each of [`METRICS`], or
    /// `None` while it is silent.
    pub fn sample(&self, d: usize, i: u64) -> Option<(Micros, [f64; 7])> {
        let dev = self.devices.get(d)?;
        if i >= self.steps {
            return None;
        }
        // A few milliseconds apart per device, so the fleet's readings are not all at one instant.
        let t = self.t0 + (i as Micros) * self.step + (dev.salt % 1000) as Micros * 1000;
        let during = |kind: DetectorKind| {
            dev.episodes
                .iter()
                .find(|e| e.kind == kind && e.start <= t && t < e.end)
        };
        if during(DetectorKind::Heartbeat).is_some() {
            return None;
        }
        let noise = |metric: u64| normal(dev.salt ^ mix(i.wrapping_mul(8).wrapping_add(metric)));
        let hours = (t - self.t0) as f64 / 3.6e9;
        let cycle = (hours * std::f64::consts::TAU / 3.0 + dev.phase).sin();

        let temperature = match during(DetectorKind::Threshold) {
            Some(e) => e.size + noise(0),
            None => 60.0 + 5.0 * cycle + 0.5 * noise(0),
        };
        let vibration =
            2.0 + 0.1 * noise(1) + during(DetectorKind::Spike).map_or(0.0, |e| e.size * 0.1);
        // Drops recover linearly over ten minutes (slower than the rate limit).
        let drop = dev
            .episodes
            .iter()
            .filter(|e| e.kind == DetectorKind::RateOfChange && e.start <= t)
            .map(|e| {
                let since = (t - e.start) as f64 / MIN as f64;
                e.size * (1.0 - since / 10.0).max(0.0)
            })
            .sum::<f64>();
        let pressure = 300.0 + 2.0 * cycle + 0.2 * noise(2) - drop;
        let humidity = match during(DetectorKind::Flatline) {
            // Stuck at the value it had when it stuck.
            Some(e) => {
                let at = e.start.saturating_sub(self.t0) / self.step;
                let v = 45.0 + 3.0 * normal(dev.salt ^ mix((at as u64).wrapping_mul(8) + 3));
                (v * 100.0).round() / 100.0
            }
            None => ((45.0 + 3.0 * noise(3)) * 100.0).round() / 100.0,
        };
        let rssi = -70.0 + 3.0 * noise(4);
        // Shifts accumulate, alternating up and down.
        let shift: f64 = dev
            .episodes
            .iter()
            .filter(|e| e.kind == DetectorKind::LevelShift && e.start <= t)
            .enumerate()
            .map(|(n, e)| if n % 2 == 0 { e.size } else { -e.size })
            .sum();
        let current = 12.0 + 0.3 * (noise(5) + shift);
        let battery = match dev.episodes.iter().find(|e| e.kind == DetectorKind::Trend) {
            // From 95 three hours before the crossing, linearly through 80.
            Some(e) => {
                let begin = e.end - 180 * MIN;
                let done = ((t - begin) as f64 / (180 * MIN) as f64).max(0.0);
                95.0 - 15.0 * done + 0.2 * noise(6)
            }
            None => 95.0 + 0.2 * noise(6),
        };
        Some((
            t,
            [
                temperature,
                vibration,
                pressure,
                humidity,
                rssi,
                current,
                battery,
            ],
        ))
    }
}

/// A fleet of known ground truth the simulator sends ([`LabelledFleet`],
/// [`crate::failures::FailureFleet`]): every device's samples, step by step.
pub trait Fleet: Send + Sync {
    /// Samples per device.
    fn steps(&self) -> u64;
    fn devices(&self) -> usize;
    /// The name of device `d`.
    fn device(&self, d: usize) -> &str;
    /// Device `d`'s sample `i`: its event time and (metric, value)s, or `None` while it is silent.
    fn readings(&self, d: usize, i: u64) -> Option<(Micros, Vec<(&'static str, f64)>)>;
}

impl Fleet for LabelledFleet {
    fn steps(&self) -> u64 {
        self.steps
    }

    fn devices(&self) -> usize {
        self.devices.len()
    }

    fn device(&self, d: usize) -> &str {
        self.devices.get(d).map_or("", |d| d.name.as_str())
    }

    fn readings(&self, d: usize, i: u64) -> Option<(Micros, Vec<(&'static str, f64)>)> {
        let (t, values) = self.sample(d, i)?;
        Some((t, METRICS.into_iter().zip(values).collect()))
    }
}

/// A detection to score: an anomaly that opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub device: String,
    pub metric: String,
    pub kind: DetectorKind,
    pub start: Micros,
}

/// Precision and recall of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quality {
    pub labels: usize,
    pub detections: usize,
    /// Labels found by at least one detection.
    pub found: usize,
    /// Detections that match a label.
    pub correct: usize,
}

impl Quality {
    pub fn precision(&self) -> f64 {
        if self.detections == 0 {
            1.0
        } else {
            self.correct as f64 / self.detections as f64
        }
    }

    pub fn recall(&self) -> f64 {
        if self.labels == 0 {
            1.0
        } else {
            self.found as f64 / self.labels as f64
        }
    }
}

/// How early (before a label's start) and late (after its end) a detection's start may be and
/// still be that label's. Early: a heartbeat starts one interval after the last reading, a trend
/// fires when its estimate (not the truth) is an hour from the limit. Late: the detectors' hold
/// times and warm-ups.
pub const EARLY: Micros = 15 * MIN;
pub const LATE: Micros = 10 * MIN;

/// Scores `detected` against `labels`, per kind: a detection is correct when a label of its
/// device, metric and kind spans its start (within [`EARLY`] and [`LATE`]).
pub fn score(labels: &[Label], detected: &[Detected]) -> BTreeMap<DetectorKind, Quality> {
    let mut q: BTreeMap<DetectorKind, Quality> = DetectorKind::ALL
        .into_iter()
        .map(|k| (k, Quality::default()))
        .collect();
    let matches = |l: &Label, d: &Detected| {
        l.kind == d.kind
            && l.device == d.device
            && l.metric == d.metric
            && d.start >= l.start.saturating_sub(EARLY)
            && d.start <= l.end.saturating_add(LATE)
    };
    for l in labels {
        let e = q.entry(l.kind).or_default();
        e.labels += 1;
        if detected.iter().any(|d| matches(l, d)) {
            e.found += 1;
        }
    }
    for d in detected {
        let e = q.entry(d.kind).or_default();
        e.detections += 1;
        if labels.iter().any(|l| matches(l, d)) {
            e.correct += 1;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(seed: u64) -> LabelledFleet {
        let names: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
        LabelledFleet::new(&names, seed, 1_790_000_000 * S, 6 * 3600, 10)
    }

    #[test]
    fn the_fleet_is_a_function_of_its_seed() {
        let (a, b) = (fleet(7), fleet(7));
        assert_eq!(a.labels(), b.labels());
        for i in [0, 100, 1000, 2000] {
            assert_eq!(a.sample(3, i), b.sample(3, i));
        }
        assert_ne!(fleet(8).labels(), a.labels());
    }

    #[test]
    fn every_kind_is_labelled_and_episodes_of_a_device_do_not_overlap() {
        let f = fleet(11);
        let labels = f.labels();
        for kind in DetectorKind::ALL {
            assert!(labels.iter().any(|l| l.kind == kind), "{kind:?}");
        }
        for d in 0..f.devices() {
            let mut own: Vec<&Label> = labels.iter().filter(|l| l.device == f.device(d)).collect();
            own.sort_by_key(|l| l.start);
            for pair in own.windows(2) {
                if pair[1].kind != DetectorKind::Trend && pair[0].kind != DetectorKind::Trend {
                    assert!(pair[0].end <= pair[1].start, "{pair:?}");
                }
            }
            assert!(own.iter().all(|l| l.start >= f.t0 + SLOT));
        }
    }

    #[test]
    fn episodes_are_in_the_samples() {
        let f = fleet(3);
        for l in f.labels() {
            let d = (0..f.devices()).find(|&d| f.device(d) == l.device).unwrap();
            let i = ((l.start - f.t0) / f.step) as u64 + 1;
            let sample = f.sample(d, i);
            match l.kind {
                DetectorKind::Heartbeat => assert!(sample.is_none(), "{l:?}"),
                DetectorKind::Threshold => assert!(sample.unwrap().1[0] > 80.0, "{l:?}"),
                _ => assert!(sample.is_some()),
            }
        }
    }

    #[test]
    fn scoring_counts_matches_per_kind() {
        let label = |kind, start, end| Label {
            device: "d".into(),
            metric: metric_of(kind).into(),
            kind,
            start,
            end,
        };
        let labels = vec![
            label(DetectorKind::Spike, 100 * MIN, 100 * MIN + S),
            label(DetectorKind::Spike, 200 * MIN, 200 * MIN + S),
        ];
        let detected = |start| Detected {
            device: "d".into(),
            metric: "vibration".into(),
            kind: DetectorKind::Spike,
            start,
        };
        let q = score(&labels, &[detected(100 * MIN + 5 * S), detected(150 * MIN)]);
        let spike = q[&DetectorKind::Spike];
        assert_eq!((spike.found, spike.labels), (1, 2));
        assert_eq!((spike.correct, spike.detections), (1, 2));
        assert_eq!(spike.recall(), 0.5);
        assert_eq!(q[&DetectorKind::Trend].precision(), 1.0);
    }
}
