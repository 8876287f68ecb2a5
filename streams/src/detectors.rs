//! Anomaly detection, pure: the state of one series (tenant, device, metric) under one detector,
//! and what a reading or the clock does to it.
//!
//! Each [`Rule`] keeps a small memory ([`Memory`]) and gives a verdict per reading: firing (with
//! its [`Evidence`]), clear, or no news (warming up). [`Series`] turns verdicts into an anomaly's
//! lifecycle — open, updates when the evidence grows or the condition flapped, resolved once the
//! condition stayed away for the detector's `clear_for` — with the cooldown and the deterministic
//! id ([`anomaly_id`]: tenant, device, metric, detector and start time, nothing else).
//!
//! Event time throughout: a reading at or before the series' last reading is out of order and
//! not detected on (counted; it is in the lake). The clock ([`Series::advance`]) only opens missing
//! heartbeats and resolves anomalies whose quiet period passed; the anomaly's id and start time do
//! not depend on when the clock ran.

use serde::{Deserialize, Serialize};
use tributary_schemas::Micros;
use tributary_schemas::avro::AnomalyState;
use tributary_schemas::detectors::{Detector, Direction, Rule};

/// An anomaly is updated at most this often (event time) while it grows.
pub const UPDATE_EVERY: Micros = 60_000_000;

/// The deterministic id of an anomaly: 32 hex digits of XXH3-128 over its identity.
pub fn anomaly_id(
    tenant: &str,
    device: &str,
    metric: &str,
    detector: &str,
    start: Micros,
) -> String {
    let mut bytes =
        Vec::with_capacity(tenant.len() + device.len() + metric.len() + detector.len() + 12);
    for part in [tenant, device, metric, detector] {
        bytes.extend_from_slice(part.as_bytes());
        bytes.push(0);
    }
    bytes.extend_from_slice(&start.to_be_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// What a detector saw, as the anomaly record carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
    pub score: Option<f64>,
    pub window_secs: Option<f64>,
    pub predicted_time: Option<Micros>,
    /// How extreme (to keep the peak): larger is more.
    pub strength: f64,
    /// When the condition began, if before this reading (a threshold held `for_secs`, a value
    /// stuck since).
    pub began: Option<Micros>,
}

/// A detector's verdict on one reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Firing(Evidence),
    Clear,
    /// Warming up, or nothing to compare with yet.
    NoNews,
}

/// A rule's memory of the series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "m")]
pub enum Memory {
    #[default]
    Empty,
    Threshold {
        since: Option<Micros>,
        count: u32,
        firing: bool,
    },
    /// EWMA of the value and of its absolute deviation.
    Spike {
        mean: f64,
        dev: f64,
        n: u32,
    },
    Flatline {
        reference: f64,
        since: Micros,
    },
    /// Welford's mean and M2 while learning the level, then the two CUSUM sums.
    LevelShift {
        n: u32,
        mean: f64,
        m2: f64,
        up: f64,
        down: f64,
    },
    /// Exponentially forgetting weighted sums of a regression with x = 0 at the last reading
    /// (seconds).
    Trend {
        w: f64,
        x: f64,
        y: f64,
        xx: f64,
        xy: f64,
        n: u32,
    },
}

/// level_shift: after the warm-up the level goes on being learned over at most this many
/// warm-ups' worth of readings (it forgets beyond).
const LEARN_SPAN: u32 = 10;

fn secs(us: Micros) -> f64 {
    us as f64 / 1e6
}

/// What `rule` says of the reading `(t, v)`, given the series' previous reading `last`.
pub fn evaluate(
    rule: &Rule,
    memory: &mut Memory,
    last: Option<(Micros, f64)>,
    t: Micros,
    v: f64,
) -> Verdict {
    match rule {
        Rule::Threshold {
            above,
            below,
            hold,
            min_count,
        } => {
            let (mut since, mut count, mut firing) = match memory {
                Memory::Threshold {
                    since,
                    count,
                    firing,
                } => (*since, *count, *firing),
                _ => (None, 0, false),
            };
            let high =
                above.is_some_and(|(trigger, clear)| v > if firing { clear } else { trigger });
            let low =
                below.is_some_and(|(trigger, clear)| v < if firing { clear } else { trigger });
            let verdict = if high || low {
                let began = *since.get_or_insert(t);
                count = count.saturating_add(1);
                if !firing && t.saturating_sub(began) >= *hold && count >= *min_count {
                    firing = true;
                }
                if firing {
                    // How far past the trigger (negative inside the hysteresis band).
                    let (level, past) = match (high, above, below) {
                        (true, Some((a, _)), _) => (*a, v - *a),
                        (_, _, Some((b, _))) => (*b, *b - v),
                        _ => (v, 0.0),
                    };
                    Verdict::Firing(Evidence {
                        value: v,
                        threshold: Some(level),
                        score: Some(past),
                        strength: past,
                        began: Some(began),
                        ..Evidence::default()
                    })
                } else {
                    Verdict::Clear
                }
            } else {
                since = None;
                count = 0;
                firing = false;
                Verdict::Clear
            };
            *memory = Memory::Threshold {
                since,
                count,
                firing,
            };
            verdict
        }
        Rule::Spike {
            window,
            k,
            warmup,
            direction,
            min_deviation,
        } => {
            let Memory::Spike { mean, dev, n } = memory else {
                *memory = Memory::Spike {
                    mean: v,
                    dev: 0.0,
                    n: 1,
                };
                return Verdict::NoNews;
            };
            let dt = last.map_or(0.0, |(lt, _)| secs(t.saturating_sub(lt)));
            // Learn fast while warming up (a running mean), then forget over the window.
            let alpha = (1.0 - (-dt / secs(*window)).exp())
                .max(1.0 / f64::from(n.saturating_add(1)).max(1.0));
            let floor = 1e-9 * mean.abs().max(1.0);
            let scale = (1.2533 * *dev).max(floor);
            let d = v - *mean;
            let score = d.abs() / scale;
            let warmed = *n >= *warmup;
            let firing = warmed && direction.counts(d) && d.abs() >= *min_deviation && score > *k;
            let verdict = if firing {
                Verdict::Firing(Evidence {
                    value: v,
                    baseline: Some(*mean),
                    threshold: Some(*mean + d.signum() * *k * scale),
                    score: Some(score),
                    window_secs: Some(secs(*window)),
                    strength: score,
                    ..Evidence::default()
                })
            } else if warmed {
                Verdict::Clear
            } else {
                Verdict::NoNews
            };
            // An outlier enters the baseline clipped to k deviations: it cannot drag it along.
            let clipped = if warmed {
                d.clamp(-*k * scale, *k * scale)
            } else {
                d
            };
            *mean += alpha * clipped;
            *dev += alpha * (clipped.abs() - *dev);
            *n = n.saturating_add(1);
            if !mean.is_finite() || !dev.is_finite() {
                // Values near ±f64::MAX overflowed the baseline: learn again from the next one.
                *memory = Memory::Empty;
            }
            verdict
        }
        Rule::RateOfChange { max_per_sec } => match last {
            Some((lt, lv)) if t > lt => {
                let rate = (v - lv) / secs(t.saturating_sub(lt));
                if rate.is_finite() && rate.abs() > *max_per_sec {
                    Verdict::Firing(Evidence {
                        value: v,
                        baseline: Some(lv),
                        threshold: Some(*max_per_sec),
                        score: Some(rate),
                        strength: rate.abs(),
                        ..Evidence::default()
                    })
                } else {
                    Verdict::Clear
                }
            }
            _ => Verdict::NoNews,
        },
        Rule::Flatline { epsilon, hold } => match memory {
            Memory::Flatline { reference, since } if (v - *reference).abs() <= *epsilon => {
                let stuck = t.saturating_sub(*since);
                if stuck >= *hold {
                    Verdict::Firing(Evidence {
                        value: v,
                        baseline: Some(*reference),
                        threshold: Some(secs(*hold)),
                        score: Some(secs(stuck)),
                        strength: secs(stuck),
                        began: Some(*since),
                        ..Evidence::default()
                    })
                } else {
                    Verdict::Clear
                }
            }
            _ => {
                let first = matches!(memory, Memory::Empty);
                *memory = Memory::Flatline {
                    reference: v,
                    since: t,
                };
                if first {
                    Verdict::NoNews
                } else {
                    Verdict::Clear
                }
            }
        },
        // Heartbeats are about time between readings: see `Series::observe` and `advance`.
        Rule::Heartbeat { .. } => Verdict::Clear,
        Rule::LevelShift {
            slack,
            k,
            warmup,
            direction,
        } => {
            let (mut n, mut mean, mut m2, mut up, mut down) = match memory {
                Memory::LevelShift {
                    n,
                    mean,
                    m2,
                    up,
                    down,
                } => (*n, *mean, *m2, *up, *down),
                _ => (0, 0.0, 0.0, 0.0, 0.0),
            };
            let verdict = if n < *warmup {
                n += 1;
                let d = v - mean;
                mean += d / f64::from(n);
                m2 += d * (v - mean);
                Verdict::NoNews
            } else {
                let sd = (m2 / f64::from(n.saturating_sub(1).max(1)))
                    .sqrt()
                    .max(1e-9 * mean.abs().max(1.0));
                let z = (v - mean) / sd;
                up = (up + z - *slack).max(0.0);
                down = (down - z - *slack).max(0.0);
                let shifted_up = up > *k && direction.counts(1.0);
                let shifted_down = down > *k && direction.counts(-1.0);
                if shifted_up || shifted_down {
                    let score = up.max(down);
                    let before = mean;
                    // Learn the new level from here.
                    (n, mean, m2, up, down) = (0, 0.0, 0.0, 0.0, 0.0);
                    Verdict::Firing(Evidence {
                        value: v,
                        baseline: Some(before),
                        threshold: Some(*k),
                        score: Some(score),
                        strength: score,
                        ..Evidence::default()
                    })
                } else {
                    // Keep learning the level while nothing builds up towards a shift: the
                    // warm-up's estimate sharpens (an error of σ/√warmup in the mean eats the
                    // slack and makes false alarms hundreds of times likelier), a change that
                    // builds up is not learned, and the last `LEARN_SPAN × warmup` readings count.
                    if up.max(down) < *k / 2.0 {
                        let span = warmup.saturating_mul(LEARN_SPAN).max(2);
                        let learned = n.saturating_add(1).min(span);
                        let w = 1.0 / f64::from(learned);
                        let d = v - mean;
                        mean += w * d;
                        if learned == n {
                            m2 *= 1.0 - w;
                        }
                        m2 += d * (v - mean);
                        n = learned;
                    }
                    Verdict::Clear
                }
            };
            if ![mean, m2, up, down].iter().all(|s| s.is_finite()) {
                // Values near ±f64::MAX overflowed the statistics: learn the level again.
                (n, mean, m2, up, down) = (0, 0.0, 0.0, 0.0, 0.0);
            }
            *memory = Memory::LevelShift {
                n,
                mean,
                m2,
                up,
                down,
            };
            verdict
        }
        Rule::Trend {
            limit,
            horizon,
            window,
            warmup,
            direction,
        } => {
            let (mut w, mut x, mut y, mut xx, mut xy, mut n) = match memory {
                Memory::Trend { w, x, y, xx, xy, n } => (*w, *x, *y, *xx, *xy, *n),
                _ => (0.0, 0.0, 0.0, 0.0, 0.0, 0),
            };
            let dt = last.map_or(0.0, |(lt, _)| secs(t.saturating_sub(lt)));
            // Move the origin to this reading (x = 0 now) and forget.
            let decay = (-dt / secs(*window)).exp();
            xx = (xx - 2.0 * dt * x + dt * dt * w) * decay;
            xy = (xy - dt * y) * decay;
            x = (x - dt * w) * decay;
            y *= decay;
            w *= decay;
            // Add this reading at x = 0.
            w += 1.0;
            y += v;
            n = n.saturating_add(1);
            if ![w, x, y, xx, xy].iter().all(|s| s.is_finite()) {
                // Values near ±f64::MAX overflowed the sums: learn again from the next one.
                *memory = Memory::Empty;
                return Verdict::NoNews;
            }
            *memory = Memory::Trend { w, x, y, xx, xy, n };
            let denominator = w * xx - x * x;
            if n < *warmup || denominator <= 1e-12 * w * w.max(1.0) {
                return Verdict::NoNews;
            }
            let slope = (w * xy - x * y) / denominator;
            let now = (y - slope * x) / w;
            if !slope.is_finite() || !now.is_finite() {
                return Verdict::NoNews;
            }
            // Seconds until the trend reaches the limit: 0 once past it on the watched side,
            // none while it moves away (or does not move).
            let eta = match direction {
                Direction::Down if now <= *limit => Some(0.0),
                Direction::Up if now >= *limit => Some(0.0),
                _ => Some((limit - now) / slope).filter(|e| e.is_finite() && *e >= 0.0),
            };
            match eta {
                Some(eta) if eta <= secs(*horizon) => {
                    let predicted = t.saturating_add((eta * 1e6).round() as Micros);
                    Verdict::Firing(Evidence {
                        value: v,
                        baseline: Some(now),
                        threshold: Some(*limit),
                        score: Some(slope),
                        window_secs: Some(secs(*window)),
                        predicted_time: Some(predicted),
                        strength: secs(*horizon) - eta,
                        ..Evidence::default()
                    })
                }
                _ => Verdict::Clear,
            }
        }
    }
}

/// The anomaly open on a series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Open {
    pub id: String,
    pub start: Micros,
    pub seq: i32,
    pub readings: i64,
    pub flaps: i32,
    pub suppressed: i32,
    pub peak: Evidence,
    /// The condition is gone since (event time).
    pub clearing_since: Option<Micros>,
    pub last_update: Micros,
    /// The peak grew or the condition flapped since the last record.
    pub changed: bool,
}

/// One record of an anomaly's lifecycle, before the stage adds who and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: String,
    pub seq: i32,
    pub state: AnomalyState,
    pub start: Micros,
    pub end: Option<Micros>,
    pub event_time: Micros,
    pub evidence: Evidence,
    pub readings: i64,
    pub flaps: i32,
    pub suppressed: i32,
}

/// One series under one detector: its memory and the anomaly open on it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub last: Option<(Micros, f64)>,
    pub memory: Memory,
    pub open: Option<Open>,
    /// No anomaly opens before this (the cooldown after the last one).
    pub quiet_until: Micros,
    /// Firings the cooldown held back, for the next anomaly's evidence.
    pub suppressed: i32,
    /// Readings at or before the last one's time, not detected on.
    pub out_of_order: u64,
}

/// Who a series is: what the id is made of.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
    pub metric: &'a str,
}

impl Series {
    /// One reading `(t, v)`: the lifecycle records it makes.
    pub fn observe(
        &mut self,
        who: Identity<'_>,
        detector: &Detector,
        t: Micros,
        v: f64,
    ) -> Vec<Change> {
        if !v.is_finite() {
            return Vec::new();
        }
        if self.last.is_some_and(|(lt, _)| t <= lt) {
            self.out_of_order += 1;
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Rule::Heartbeat { interval } = detector.rule {
            if let Some((lt, _)) = self.last {
                let silence = secs(t.saturating_sub(lt));
                if t.saturating_sub(lt) > interval && self.open.is_none() {
                    let start = lt.saturating_add(interval);
                    self.open_anomaly(
                        who,
                        detector,
                        start,
                        t,
                        heartbeat_evidence(silence, interval),
                        &mut out,
                    );
                }
                // The device is back (also when the clock opened the anomaly a little early).
                if let Some(open) = self.open.as_mut() {
                    open.peak.value = open.peak.value.max(silence);
                    open.peak.score = Some(open.peak.value);
                    self.resolve(detector, t, t, &mut out);
                }
            }
            self.last = Some((t, v));
            return out;
        }
        // Gone for `clear_for` before this reading: resolved first, whether or not the clock
        // got there before it (so the outcome does not depend on when the clock ran).
        if let Some(since) = self.open.as_ref().and_then(|o| o.clearing_since)
            && t.saturating_sub(since) >= detector.clear_for
        {
            self.resolve(detector, since, t, &mut out);
        }
        let verdict = evaluate(&detector.rule, &mut self.memory, self.last, t, v);
        self.last = Some((t, v));
        match verdict {
            Verdict::Firing(evidence) => match self.open.as_mut() {
                Some(open) => {
                    open.readings += 1;
                    if open.clearing_since.take().is_some() {
                        open.flaps = open.flaps.saturating_add(1);
                        open.changed = true;
                    }
                    if evidence.strength > open.peak.strength {
                        open.peak = evidence;
                        open.changed = true;
                    }
                    if open.changed && t.saturating_sub(open.last_update) >= UPDATE_EVERY {
                        out.push(self.record(AnomalyState::Update, t, None));
                    }
                }
                None if t < self.quiet_until => {
                    self.suppressed = self.suppressed.saturating_add(1);
                }
                None => {
                    let start = evidence.began.unwrap_or(t).min(t);
                    self.open_anomaly(who, detector, start, t, evidence, &mut out);
                }
            },
            Verdict::Clear => {
                if let Some(open) = self.open.as_mut() {
                    open.readings += 1;
                    let since = *open.clearing_since.get_or_insert(t);
                    if t.saturating_sub(since) >= detector.clear_for {
                        self.resolve(detector, since, t, &mut out);
                    }
                }
            }
            Verdict::NoNews => {
                if let Some(open) = self.open.as_mut() {
                    open.readings += 1;
                }
            }
        }
        out
    }

    /// The clock stands at `now` (event time): a heartbeat missing for longer than its interval
    /// opens; an anomaly whose condition has been gone for `clear_for` resolves.
    pub fn advance(&mut self, who: Identity<'_>, detector: &Detector, now: Micros) -> Vec<Change> {
        let mut out = Vec::new();
        if let Rule::Heartbeat { interval } = detector.rule {
            if self.open.is_none()
                && let Some((lt, _)) = self.last
                && now.saturating_sub(lt) > interval
            {
                let start = lt.saturating_add(interval);
                let silence = secs(now.saturating_sub(lt));
                self.open_anomaly(
                    who,
                    detector,
                    start,
                    now,
                    heartbeat_evidence(silence, interval),
                    &mut out,
                );
            }
            return out;
        }
        if let Some(since) = self.open.as_ref().and_then(|o| o.clearing_since)
            && now.saturating_sub(since) >= detector.clear_for
        {
            self.resolve(detector, since, now, &mut out);
        }
        out
    }

    /// Whether `advance` could change anything before `now` (cheap, for the stage's sweep).
    pub fn has_timer(&self, detector: &Detector) -> bool {
        match detector.rule {
            Rule::Heartbeat { .. } => self.open.is_none() && self.last.is_some(),
            _ => self
                .open
                .as_ref()
                .is_some_and(|o| o.clearing_since.is_some()),
        }
    }

    fn open_anomaly(
        &mut self,
        who: Identity<'_>,
        detector: &Detector,
        start: Micros,
        t: Micros,
        evidence: Evidence,
        out: &mut Vec<Change>,
    ) {
        self.open = Some(Open {
            id: anomaly_id(who.tenant, who.device, who.metric, &detector.name, start),
            start,
            seq: -1,
            readings: 1,
            flaps: 0,
            suppressed: std::mem::take(&mut self.suppressed),
            peak: evidence,
            clearing_since: None,
            last_update: t,
            changed: false,
        });
        out.push(self.record(AnomalyState::Open, t, None));
    }

    fn resolve(&mut self, detector: &Detector, end: Micros, t: Micros, out: &mut Vec<Change>) {
        if self.open.is_none() {
            return;
        }
        out.push(self.record(AnomalyState::Resolved, t, Some(end)));
        self.open = None;
        // The cooldown counts from the earliest the anomaly could resolve (its end plus
        // `clear_for`; a heartbeat resolves at its end), not from when the clock or a reading got
        // there: an event-time function of the readings, the same on replay.
        let resolvable = match detector.rule {
            Rule::Heartbeat { .. } => end,
            _ => end.saturating_add(detector.clear_for),
        };
        self.quiet_until = resolvable.saturating_add(detector.cooldown);
    }

    /// The next record of the open anomaly.
    fn record(&mut self, state: AnomalyState, t: Micros, end: Option<Micros>) -> Change {
        let Some(open) = self.open.as_mut() else {
            unreachable!("records are made of an open anomaly")
        };
        open.seq = open.seq.saturating_add(1);
        open.last_update = t;
        open.changed = false;
        Change {
            id: open.id.clone(),
            seq: open.seq,
            state,
            start: open.start,
            end,
            event_time: t,
            evidence: open.peak.clone(),
            readings: open.readings,
            flaps: open.flaps,
            suppressed: open.suppressed,
        }
    }
}

fn heartbeat_evidence(silence: f64, interval: Micros) -> Evidence {
    Evidence {
        value: silence,
        threshold: Some(secs(interval)),
        score: Some(silence),
        strength: silence,
        ..Evidence::default()
    }
}

/// One sentence about an anomaly record, for people.
pub fn message(detector: &Detector, metric: &str, change: &Change) -> String {
    let e = &change.evidence;
    let n = |x: Option<f64>| {
        x.map_or_else(
            || "?".to_owned(),
            |v| {
                format!("{v:.4}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_owned()
            },
        )
    };
    let what = match &detector.rule {
        Rule::Threshold { above, .. } => {
            let side = if above.is_some_and(|(a, _)| e.threshold == Some(a)) {
                "above"
            } else {
                "below"
            };
            format!("{metric} {} {side} {}", n(Some(e.value)), n(e.threshold))
        }
        Rule::Spike { .. } => format!(
            "{metric} {} is {} robust deviations from its baseline {}",
            n(Some(e.value)),
            n(e.score),
            n(e.baseline)
        ),
        Rule::RateOfChange { .. } => format!(
            "{metric} changed at {}/s (limit {}/s), from {} to {}",
            n(e.score),
            n(e.threshold),
            n(e.baseline),
            n(Some(e.value))
        ),
        Rule::Flatline { .. } => format!(
            "{metric} stuck at {} for {} s (limit {} s)",
            n(e.baseline),
            n(e.score),
            n(e.threshold)
        ),
        Rule::Heartbeat { .. } => format!(
            "no {metric} reading for {} s (expected every {} s)",
            n(Some(e.value)),
            n(e.threshold)
        ),
        Rule::LevelShift { .. } => format!(
            "{metric} shifted from level {} (CUSUM {} > {})",
            n(e.baseline),
            n(e.score),
            n(e.threshold)
        ),
        Rule::Trend { .. } => format!(
            "{metric} trend (now {}, {}/s) reaches {} at {}",
            n(e.baseline),
            n(e.score),
            n(e.threshold),
            e.predicted_time
                .and_then(chrono::DateTime::from_timestamp_micros)
                .map_or_else(
                    || "?".into(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
        ),
    };
    match change.state {
        AnomalyState::Open => what,
        AnomalyState::Update => format!("{what} (still open; {} flaps)", change.flaps),
        AnomalyState::Resolved => format!("resolved: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tributary_schemas::detectors::DetectorSpec;

    const S: Micros = 1_000_000;
    const T0: Micros = 1_700_000_000 * S;
    const WHO: Identity<'static> = Identity {
        tenant: "acme",
        device: "d1",
        metric: "temperature",
    };

    fn detector(toml_text: &str) -> Detector {
        let spec: DetectorSpec = toml::from_str(toml_text).unwrap();
        spec.check("d", None::<&BTreeSet<String>>).unwrap()
    }

    /// Feeds `values` one per `step` seconds from T0; every change, with the reading's index.
    fn run(d: &Detector, step: f64, values: &[f64]) -> Vec<(usize, Change)> {
        let mut s = Series::default();
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let t = T0 + (i as f64 * step * 1e6) as Micros;
            for c in s.observe(WHO, d, t, *v) {
                out.push((i, c));
            }
        }
        out
    }

    fn states(changes: &[(usize, Change)]) -> Vec<(usize, AnomalyState)> {
        changes.iter().map(|(i, c)| (*i, c.state)).collect()
    }

    /// A deterministic noisy signal around `level`.
    fn noisy(n: usize, level: f64, amplitude: f64, seed: u64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                level + amplitude * (((x >> 33) as f64 / (1u64 << 31) as f64) - 0.5)
            })
            .collect()
    }

    #[test]
    fn the_same_readings_give_the_same_anomalies_whenever_the_clock_runs() {
        // Open, clear, and the condition back after the quiet period (and the cooldown): a new
        // anomaly, whether the clock resolved the first one in the gap or the reading did.
        let d = detector(
            "metric = 'temperature'\nkind = 'threshold'\nabove = 80.0\nclear_for_secs = 5\ncooldown_secs = 3",
        );
        let readings = [(0, 81.0), (1, 70.0), (30, 81.0), (31, 70.0), (32, 81.0)];
        let feed = |clock_at: Option<i64>| {
            let mut s = Series::default();
            let mut out = Vec::new();
            for (secs, v) in readings {
                let t = T0 + secs * S;
                if let Some(c) = clock_at
                    && secs == 30
                {
                    out.extend(s.advance(WHO, &d, T0 + c * S));
                }
                out.extend(s.observe(WHO, &d, t, v));
            }
            out.iter()
                .map(|c| (c.id.clone(), c.seq, c.state, c.start, c.end))
                .collect::<Vec<_>>()
        };
        let without = feed(None);
        assert_eq!(without, feed(Some(10)), "clock in the gap");
        assert_eq!(without, feed(Some(29)), "clock just before the reading");
        let opened: BTreeSet<&String> = without
            .iter()
            .filter(|c| c.2 == AnomalyState::Open)
            .map(|c| &c.0)
            .collect();
        assert_eq!(opened.len(), 2, "{without:?}");
        assert_eq!(
            without[1].4,
            Some(T0 + S),
            "the first ended when it cleared"
        );
    }

    #[test]
    fn threshold_hysteresis_holds_and_the_quiet_period_folds_flaps() {
        let d = detector(
            "metric = 'temperature'\nkind = 'threshold'\nabove = 80.0\nclear_above = 75.0\nfor_secs = 2\nclear_for_secs = 5",
        );
        // 81 for 2 s → open at index 3 (held 2 s); 77 stays open (hysteresis); 70 clears, but
        // 81 again for 2 s within the quiet period is a flap of the same anomaly; then 5 s of 70
        // resolve it.
        let values = [
            70.0, 81.0, 81.0, 81.0, 77.0, 70.0, 81.0, 81.0, 81.0, 70.0, 70.0, 70.0, 70.0, 70.0,
            70.0, 70.0,
        ];
        let changes = run(&d, 1.0, &values);
        assert_eq!(
            states(&changes),
            vec![(3, AnomalyState::Open), (14, AnomalyState::Resolved)]
        );
        let (open, resolved) = (&changes[0].1, &changes[1].1);
        assert_eq!(
            open.start,
            T0 + S,
            "the anomaly starts when the condition began"
        );
        assert_eq!(resolved.id, open.id);
        assert_eq!(resolved.flaps, 1);
        assert_eq!(
            resolved.end,
            Some(T0 + 9 * S),
            "it ended at the first clear reading that stayed clear"
        );
        // A single reading above the trigger does not fire (for_secs), nor does the band.
        assert!(run(&d, 1.0, &[70.0, 81.0, 77.0, 70.0]).is_empty());
        assert_eq!(
            open.id,
            anomaly_id("acme", "d1", "temperature", "d", T0 + S)
        );
    }

    #[test]
    fn a_spike_fires_once_and_does_not_poison_the_baseline() {
        let d = detector(
            "metric = 'temperature'\nkind = 'spike'\nwindow_secs = 300\nk = 6\nwarmup = 20\nclear_for_secs = 0",
        );
        let mut values = noisy(200, 20.0, 1.0, 7);
        values[100] = 35.0;
        values[150] = 5.0;
        let changes = run(&d, 1.0, &values);
        let opens: Vec<usize> = changes
            .iter()
            .filter(|(_, c)| c.state == AnomalyState::Open)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(opens, vec![100, 150], "{changes:?}");
        let spike = &changes[0].1.evidence;
        assert!((spike.baseline.unwrap() - 20.0).abs() < 0.5, "{spike:?}");
        assert!(spike.score.unwrap() > 6.0);
        // Right after the spike the baseline is still ~20: ordinary values do not fire.
        assert!(changes.iter().all(|(i, _)| {
            ![101, 102, 103].contains(i)
                || changes
                    .iter()
                    .any(|(j, c)| j == i && c.state == AnomalyState::Resolved)
        }));
    }

    #[test]
    fn a_spike_detector_forgets_an_old_level() {
        let d = detector(
            "metric = 'temperature'\nkind = 'spike'\nwindow_secs = 60\nk = 6\nwarmup = 10\nclear_for_secs = 0",
        );
        let mut values = noisy(100, 20.0, 1.0, 3);
        values.extend(noisy(400, 40.0, 1.0, 4));
        let changes = run(&d, 1.0, &values);
        // The step fires, then the baseline learns the new level: nothing open at the end.
        assert!(
            changes
                .iter()
                .any(|(i, c)| *i == 100 && c.state == AnomalyState::Open),
            "{changes:?}"
        );
        assert_eq!(changes.last().unwrap().1.state, AnomalyState::Resolved);
        assert!(
            changes.iter().all(|(i, _)| *i < 300),
            "still firing long after: {changes:?}"
        );
    }

    #[test]
    fn rate_of_change_is_per_second_of_event_time() {
        let d = detector(
            "metric = 'temperature'\nkind = 'rate_of_change'\nmax_per_sec = 2\nclear_for_secs = 0",
        );
        // +1 per 1 s is fine; +10 in 2 s is 5/s.
        let changes = run(&d, 2.0, &[10.0, 11.0, 12.0, 22.0, 23.0]);
        assert_eq!(
            states(&changes),
            vec![(3, AnomalyState::Open), (4, AnomalyState::Resolved)]
        );
        assert_eq!(changes[0].1.evidence.score, Some(5.0));
    }

    #[test]
    fn a_flatline_starts_where_the_value_got_stuck() {
        let d = detector(
            "metric = 'temperature'\nkind = 'flatline'\nepsilon = 0.01\nfor_secs = 10\nclear_for_secs = 0",
        );
        let mut values = noisy(5, 20.0, 1.0, 1);
        values.extend([21.5; 20]);
        values.push(25.0);
        let changes = run(&d, 1.0, &values);
        assert_eq!(
            states(&changes),
            vec![(15, AnomalyState::Open), (25, AnomalyState::Resolved)]
        );
        assert_eq!(changes[0].1.start, T0 + 5 * S);
    }

    #[test]
    fn a_missing_heartbeat_opens_by_the_clock_and_has_the_same_id_when_found_by_the_next_reading() {
        let d = detector("metric = 'temperature'\nkind = 'heartbeat'\ninterval_secs = 60");
        // Live: the clock passes the interval while the device is silent, then it comes back.
        let mut live = Series::default();
        assert!(live.observe(WHO, &d, T0, 1.0).is_empty());
        assert!(live.advance(WHO, &d, T0 + 59 * S).is_empty());
        let opened = live.advance(WHO, &d, T0 + 90 * S);
        assert_eq!(opened.len(), 1);
        assert!(live.advance(WHO, &d, T0 + 120 * S).is_empty(), "opens once");
        let back = live.observe(WHO, &d, T0 + 300 * S, 1.0);
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].state, back[0].end),
            (AnomalyState::Resolved, Some(T0 + 300 * S))
        );
        // Replay without a clock: the reading that comes back finds the gap; same id and start.
        let mut replay = Series::default();
        replay.observe(WHO, &d, T0, 1.0);
        let found = replay.observe(WHO, &d, T0 + 300 * S, 1.0);
        assert_eq!(
            found.iter().map(|c| c.state).collect::<Vec<_>>(),
            vec![AnomalyState::Open, AnomalyState::Resolved]
        );
        assert_eq!(found[0].id, opened[0].id);
        assert_eq!(found[0].start, T0 + 60 * S);
        assert_eq!(found[1].seq, back[0].seq);
    }

    #[test]
    fn a_level_shift_is_found_by_cusum() {
        let d = detector(
            "metric = 'temperature'\nkind = 'level_shift'\nwarmup = 30\nk = 8\nslack = 0.5\nclear_for_secs = 30",
        );
        let mut values = noisy(100, 50.0, 2.0, 11);
        values.extend(noisy(100, 53.0, 2.0, 12));
        let changes = run(&d, 1.0, &values);
        let opens: Vec<usize> = changes
            .iter()
            .filter(|(_, c)| c.state == AnomalyState::Open)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(opens.len(), 1, "{changes:?}");
        assert!(
            (100..115).contains(&opens[0]),
            "detected soon after the shift: {opens:?}"
        );
        assert!((changes[0].1.evidence.baseline.unwrap() - 50.0).abs() < 0.5);
    }

    #[test]
    fn a_falling_trend_predicts_when_it_crosses_the_limit() {
        let d = detector(
            "metric = 'battery_health'\nkind = 'trend'\nlimit = 70.0\nhorizon_secs = 86400\nwindow_secs = 864000\nwarmup = 5\nclear_for_secs = 0",
        );
        // Health falls 1 point per hour from 100: crosses 70 at hour 30; within a day from hour 6.
        let values: Vec<f64> = (0..12).map(|h| 100.0 - h as f64).collect();
        let changes = run(&d, 3600.0, &values);
        let (i, open) = &changes[0];
        assert_eq!((*i, open.state), (6, AnomalyState::Open));
        let predicted = open.evidence.predicted_time.unwrap();
        assert!(
            (predicted - (T0 + 30 * 3600 * S)).abs() < 60 * S,
            "{}",
            predicted - T0
        );
    }

    #[test]
    fn cooldown_holds_new_anomalies_back_and_counts_them() {
        let d = detector(
            "metric = 'temperature'\nkind = 'threshold'\nabove = 80.0\nclear_for_secs = 0\ncooldown_secs = 10",
        );
        let values = [
            90.0, 70.0, 90.0, 70.0, 90.0, 70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 90.0,
        ];
        let changes = run(&d, 1.0, &values);
        assert_eq!(
            states(&changes),
            vec![
                (0, AnomalyState::Open),
                (1, AnomalyState::Resolved),
                (13, AnomalyState::Open)
            ]
        );
        assert_eq!(changes[2].1.suppressed, 2);
    }

    #[test]
    fn out_of_order_and_non_finite_readings_change_nothing() {
        let d = detector("metric = 'temperature'\nkind = 'threshold'\nabove = 80.0");
        let mut s = Series::default();
        s.observe(WHO, &d, T0 + 10 * S, 20.0);
        let before = s.clone();
        assert!(s.observe(WHO, &d, T0, 99.0).is_empty());
        assert!(s.observe(WHO, &d, T0 + 11 * S, f64::NAN).is_empty());
        assert_eq!(
            (s.out_of_order, s.last, s.open.clone()),
            (1, before.last, None)
        );
    }

    #[test]
    fn extremes_never_panic() {
        let kinds = [
            "kind = 'threshold'\nabove = 1e308\nbelow = -1e308",
            "kind = 'spike'\nwindow_secs = 1e-6",
            "kind = 'rate_of_change'\nmax_per_sec = 1e-300",
            "kind = 'flatline'\nfor_secs = 1e-6",
            "kind = 'heartbeat'\ninterval_secs = 1e-6",
            "kind = 'level_shift'\nwarmup = 2",
            "kind = 'trend'\nlimit = 0.0\nhorizon_secs = 1\nwarmup = 3",
        ];
        let values = [
            0.0,
            -0.0,
            1e308,
            -1e308,
            f64::MIN_POSITIVE,
            5e-324,
            1e308,
            -1e308,
            0.0,
        ];
        let times = [
            i64::MIN / 2,
            -1,
            0,
            1,
            2,
            i64::MAX / 2,
            i64::MAX - 1,
            i64::MAX,
        ];
        for k in kinds {
            let d = detector(&format!("metric = 'm'\n{k}"));
            let mut s = Series::default();
            for (i, t) in times.iter().enumerate() {
                for v in values {
                    for c in s.observe(WHO, &d, *t, v) {
                        let _ = message(&d, "m", &c);
                    }
                }
                s.advance(WHO, &d, times[(i + 3) % times.len()]);
            }
        }
    }
}
