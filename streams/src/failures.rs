//! Correlated failures: a fleet laid out in zones and sections into which failures are put at
//! known times, and the incidents they should give. The ground truth shared by `tributary simulate
//! --failures` (which lays the devices out through the admin API, sends the fleet through MQTT or
//! HTTP and writes the expected incidents) and the alert-reduction benchmark (`cargo bench -p
//! tributary-streams --bench incident_reduction`, which runs the live stages' code over it).
//!
//! Every device reports `temperature` (60 ± 1 °C) and `pressure` (300 ± 1 kPa) every `step`.
//! Devices are laid out `per_section` to a section and [`SECTIONS`] sections to a zone (site
//! `zone-z / section-s / spot-k`). Per zone and hour, after a quiet first half hour, seven
//! failures in seven distinct sections, each in its own 8-minute slot:
//!
//! | failure | what | expected incident |
//! |---|---|---|
//! | section | ⌈5/8⌉ of a section's devices (≥ 3) overheat (90 °C), starting within 40 s of each other, for 4 to 6 min | one, rule `section`, naming the section |
//! | pump (×2) | one device overheats and loses pressure (200 kPa) within 30 s, for 3 to 6 min | one, rule `pump`, naming the device |
//! | lone (×4) | one device overheats, alone in its section at the time | none |
//!
//! [`CONFIG`] holds the detectors and rules that watch them.

use serde::Serialize;
use tributary_schemas::Micros;

use crate::labelled::{Fleet, mix, normal};

/// The detectors and incident rules (sections of a Tributary config file) the scenario is
/// written for; the end-to-end test and the benchmark use them as they are.
pub const CONFIG: &str = r#"
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

/// Sections per zone: one per failure of a zone-hour, so failures never share a section.
pub const SECTIONS: usize = 7;
/// The metrics every device reports.
pub const METRICS: [&str; 2] = ["temperature", "pressure"];

const S: Micros = 1_000_000;
const MIN: Micros = 60 * S;

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Several devices of one section overheat together.
    Section,
    /// One device overheats and loses pressure.
    Pump,
    /// One device overheats alone: no incident.
    Lone,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Section => "section",
            Self::Pump => "pump",
            Self::Lone => "lone",
        }
    }
}

/// A failure put into the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The section's site (`zone-z`, `section-s`).
    pub section: Vec<String>,
    /// (device, start, end) of each overheating device, in event time.
    pub hot: Vec<(usize, Micros, Micros)>,
    /// (device, start, end) of a pressure loss.
    pub low_pressure: Option<(usize, Micros, Micros)>,
}

impl Failure {
    /// The incident it should give: (rule, scope), or none for a lone overheat.
    pub fn expected(&self, fleet: &FailureFleet) -> Option<(&'static str, String)> {
        match self.kind {
            FailureKind::Section => Some(("section", self.section.join(" / "))),
            FailureKind::Pump => Some(("pump", fleet.device(self.hot[0].0).to_owned())),
            FailureKind::Lone => None,
        }
    }

    /// The anomalies it puts in: one per overheating device, one per pressure loss.
    pub fn anomalies(&self) -> usize {
        self.hot.len() + usize::from(self.low_pressure.is_some())
    }

    /// Its first and last event time.
    pub fn span(&self) -> (Micros, Micros) {
        let all = self.hot.iter().copied().chain(self.low_pressure);
        let start = all.clone().map(|h| h.1).min().unwrap_or(0);
        let end = all.map(|h| h.2).max().unwrap_or(0);
        (start, end)
    }
}

/// A fleet with correlated failures over `[t0, t0 + duration)`.
#[derive(Debug, Clone)]
pub struct FailureFleet {
    devices: Vec<String>,
    per_section: usize,
    failures: Vec<Failure>,
    /// Per device: its (start, end, low pressure too) intervals.
    spans: Vec<Vec<(Micros, Micros, bool)>>,
    salt: u64,
    t0: Micros,
    step: Micros,
    steps: u64,
}

impl FailureFleet {
    /// The devices `devices` laid out `per_section` (at least 4) to a section; failures placed by
    /// `seed` in every full zone, one round of seven per hour of `duration_secs` after the first
    /// half hour (at least 90 minutes: the quiet half hour, one round, the time to resolve); a
    /// sample every `step_secs`. Devices past the last full zone report normally.
    pub fn new(
        devices: &[String],
        per_section: usize,
        seed: u64,
        t0: Micros,
        duration_secs: u64,
        step_secs: u64,
    ) -> Self {
        let per_section = per_section.max(4);
        let duration = Micros::try_from(duration_secs.max(5400))
            .unwrap_or(Micros::MAX / 4)
            .saturating_mul(S);
        let step = Micros::try_from(step_secs.max(1))
            .unwrap_or(1)
            .saturating_mul(S);
        let zones = devices.len() / (SECTIONS * per_section);
        let rounds = ((duration - 30 * MIN) / (60 * MIN)).max(1);
        let mut fleet = Self {
            devices: devices.to_vec(),
            per_section,
            failures: Vec::new(),
            spans: vec![Vec::new(); devices.len()],
            salt: mix(seed ^ 0xFA11),
            t0,
            step,
            steps: (duration / step) as u64,
        };
        let mut draw = seed;
        let mut below = |n: usize| {
            draw = mix(draw);
            (draw % n.max(1) as u64) as usize
        };
        let hot_per_section = (per_section * 5).div_ceil(8).max(3);
        for z in 0..zones {
            for round in 0..rounds {
                // The seven failures of a round go to the sections in a shuffled order.
                let mut sections: Vec<usize> = (0..SECTIONS).collect();
                for i in (1..sections.len()).rev() {
                    sections.swap(i, below(i + 1));
                }
                let kinds = [
                    FailureKind::Section,
                    FailureKind::Pump,
                    FailureKind::Pump,
                    FailureKind::Lone,
                    FailureKind::Lone,
                    FailureKind::Lone,
                    FailureKind::Lone,
                ];
                for (slot, kind) in kinds.into_iter().enumerate() {
                    let section = z * SECTIONS + sections[slot];
                    let first = section * per_section;
                    let start = t0
                        + 30 * MIN
                        + round * 60 * MIN
                        + slot as Micros * 8 * MIN
                        + below(60) as Micros * S;
                    let minutes = |n: usize| (3 + n as Micros) * MIN;
                    let failure = match kind {
                        FailureKind::Section => {
                            let mut members: Vec<usize> = (first..first + per_section).collect();
                            for i in (1..members.len()).rev() {
                                members.swap(i, below(i + 1));
                            }
                            let hot = members[..hot_per_section]
                                .iter()
                                .map(|&d| {
                                    let s = start + below(40) as Micros * S;
                                    (d, s, s + minutes(1 + below(3)))
                                })
                                .collect();
                            Failure {
                                kind,
                                section: Vec::new(),
                                hot,
                                low_pressure: None,
                            }
                        }
                        FailureKind::Pump => {
                            let d = first + below(per_section);
                            let end = start + minutes(below(4));
                            let p = start + below(30) as Micros * S;
                            Failure {
                                kind,
                                section: Vec::new(),
                                hot: vec![(d, start, end)],
                                low_pressure: Some((d, p, end)),
                            }
                        }
                        FailureKind::Lone => {
                            let d = first + below(per_section);
                            Failure {
                                kind,
                                section: Vec::new(),
                                hot: vec![(d, start, start + minutes(below(4)))],
                                low_pressure: None,
                            }
                        }
                    };
                    fleet.failures.push(failure);
                }
            }
        }
        for i in 0..fleet.failures.len() {
            let d = fleet.failures[i].hot[0].0;
            fleet.failures[i].section = fleet.site(d)[..2].to_vec();
            let f = &fleet.failures[i];
            let mut spans: Vec<(usize, Micros, Micros, bool)> =
                f.hot.iter().map(|h| (h.0, h.1, h.2, false)).collect();
            spans.extend(f.low_pressure.map(|l| (l.0, l.1, l.2, true)));
            for (d, start, end, low) in spans {
                fleet.spans[d].push((start, end, low));
            }
        }
        fleet
    }

    /// Where device `d` is: `zone-z`, `section-s`, `spot-k`.
    pub fn site(&self, d: usize) -> Vec<String> {
        let section = d / self.per_section;
        vec![
            format!("zone-{}", section / SECTIONS),
            format!("section-{}", section % SECTIONS),
            format!("spot-{}", d % self.per_section),
        ]
    }

    /// The failures put in, in the order they were placed.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// Device `d`'s sample number `i`: its event time and the value of each of [`METRICS`].
    pub fn sample(&self, d: usize, i: u64) -> Option<(Micros, [f64; 2])> {
        if d >= self.devices.len() || i >= self.steps {
            return None;
        }
        // A millisecond apart per device, so the fleet's readings are not all at one instant.
        let t = self.t0 + i as Micros * self.step + (d % 1000) as Micros * 1000;
        let during = |low: bool| {
            self.spans[d]
                .iter()
                .any(|&(start, end, l)| l == low && start <= t && t < end)
        };
        let (hot, low) = (during(false), during(true));
        let noise = |metric: u64| {
            normal(self.salt ^ mix((d as u64) << 32 ^ i.wrapping_mul(4).wrapping_add(metric)))
        };
        let temperature = if hot { 90.0 } else { 60.0 } + 0.5 * noise(0);
        let pressure = if low { 200.0 } else { 300.0 } + 0.5 * noise(1);
        Some((t, [temperature, pressure]))
    }
}

impl Fleet for FailureFleet {
    fn steps(&self) -> u64 {
        self.steps
    }

    fn devices(&self) -> usize {
        self.devices.len()
    }

    fn device(&self, d: usize) -> &str {
        self.devices.get(d).map_or("", String::as_str)
    }

    fn readings(&self, d: usize, i: u64) -> Option<(Micros, Vec<(&'static str, f64)>)> {
        let (t, values) = self.sample(d, i)?;
        Some((t, METRICS.into_iter().zip(values).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(devices: usize, per_section: usize) -> FailureFleet {
        let names: Vec<String> = (0..devices).map(|d| format!("d{d}")).collect();
        FailureFleet::new(&names, per_section, 7, 0, 5400, 10)
    }

    #[test]
    fn every_full_zone_gets_a_round_of_seven_in_distinct_sections() {
        let f = fleet(2 * SECTIONS * 4 + 3, 4);
        assert_eq!(f.failures().len(), 14, "two full zones, one round each");
        for zone in f.failures().chunks(7) {
            let mut sections: Vec<&Vec<String>> = zone.iter().map(|x| &x.section).collect();
            sections.sort();
            sections.dedup();
            assert_eq!(sections.len(), 7);
        }
        let kinds: Vec<FailureKind> = f.failures()[..7].iter().map(|x| x.kind).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == FailureKind::Section).count(),
            1
        );
        assert_eq!(kinds.iter().filter(|k| **k == FailureKind::Pump).count(), 2);
        // A section failure: 3 of 4 devices, all of that section.
        let s = &f.failures()[0];
        assert_eq!(s.hot.len(), 3);
        assert!(s.hot.iter().all(|h| f.site(h.0)[..2] == s.section[..]));
        // The three devices past the last zone never fail.
        let spare = 2 * SECTIONS * 4;
        assert!(
            f.failures()
                .iter()
                .all(|x| x.hot.iter().all(|h| h.0 < spare))
        );
    }

    #[test]
    fn samples_are_hot_exactly_inside_a_failure_and_normal_elsewhere() {
        let f = fleet(SECTIONS * 8, 8);
        let pump = f
            .failures()
            .iter()
            .find(|x| x.kind == FailureKind::Pump)
            .unwrap();
        let (d, start, end) = pump.hot[0];
        let mut hot = 0;
        for i in 0..f.steps() {
            let (t, [temp, pressure]) = f.sample(d, i).unwrap();
            assert!(temp.is_finite() && pressure.is_finite());
            let inside = f
                .failures()
                .iter()
                .any(|x| x.hot.iter().any(|h| h.0 == d && h.1 <= t && t < h.2));
            assert_eq!(temp > 80.0, inside, "sample {i} at {t}");
            hot += usize::from(t >= start && t < end);
        }
        assert!(hot >= 18, "3 to 6 minutes at 10 s");
        assert_eq!(f.sample(d, f.steps()), None);
        assert_eq!(f.sample(f.devices(), 0), None);
    }

    #[test]
    fn the_same_seed_gives_the_same_fleet() {
        let a = fleet(SECTIONS * 4, 4);
        let b = fleet(SECTIONS * 4, 4);
        assert_eq!(a.failures(), b.failures());
        assert_eq!(a.sample(3, 100), b.sample(3, 100));
        assert_eq!(a.failures()[1].expected(&a).map(|e| e.0), Some("pump"));
    }
}
