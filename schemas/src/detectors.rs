//! The detector catalog: which anomaly detectors watch which metrics, per tenant.
//!
//! Configured under `[anomalies.detectors.<name>]` (every tenant) and
//! `[anomalies.tenants.<tenant>.detectors.<name>]` (one tenant; a name there replaces the global
//! detector of that name for that tenant). A detector is one flat table, like a Prometheus rule:
//!
//! ```toml
//! [anomalies.detectors.overheating]
//! metric = "temperature"
//! kind = "threshold"
//! above = 80.0
//! clear_above = 75.0   # hysteresis: stays open until the value is back below 75
//! for_secs = 30        # and only after 30 s above 80
//! severity = "critical"
//! ```
//!
//! [`DetectorSpec`] is what is written; [`DetectorSpec::check`] turns it into a [`Detector`] or
//! refuses it naming the field and the reason (a clear level past the trigger, a window of 0, a
//! parameter of another kind, an unknown metric).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::catalog::TenantOverrides;

/// The kinds of detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// The value above `above` or below `below`, with a separate clear level and a minimum
    /// duration or count.
    Threshold,
    /// A spike or dip against a robust baseline that forgets (EWMA of the value and of its absolute
    /// deviation over `window_secs`, outliers clipped before they enter it), after a warm-up.
    Spike,
    /// The rate of change (per second) beyond `max_per_sec`.
    RateOfChange,
    /// No change beyond `epsilon` for `for_secs`: a stuck sensor.
    Flatline,
    /// No reading for longer than `interval_secs`.
    Heartbeat,
    /// A change of level: two-sided CUSUM in units of the warm-up's standard deviation.
    LevelShift,
    /// The recent trend (regression over `window_secs` that forgets) predicts crossing `limit`
    /// within `horizon_secs`.
    Trend,
}

impl DetectorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Threshold => "threshold",
            Self::Spike => "spike",
            Self::RateOfChange => "rate_of_change",
            Self::Flatline => "flatline",
            Self::Heartbeat => "heartbeat",
            Self::LevelShift => "level_shift",
            Self::Trend => "trend",
        }
    }

    /// Every kind, in a fixed order.
    pub const ALL: [DetectorKind; 7] = [
        Self::Threshold,
        Self::Spike,
        Self::RateOfChange,
        Self::Flatline,
        Self::Heartbeat,
        Self::LevelShift,
        Self::Trend,
    ];
}

/// How urgent an anomaly of a detector is.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// Which way a spike, a shift or a trend counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Both,
    Up,
    Down,
}

impl Direction {
    /// Whether a deviation of sign `d` counts.
    pub fn counts(self, d: f64) -> bool {
        match self {
            Self::Both => d != 0.0,
            Self::Up => d > 0.0,
            Self::Down => d < 0.0,
        }
    }
}

/// One detector as written in the config file (or sent to the admin API).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorSpec {
    /// The metric watched (a name of the metric catalog).
    pub metric: String,
    pub kind: Option<DetectorKind>,
    pub severity: Severity,
    /// Once its condition is gone, an anomaly resolves only after this long without it (event
    /// time): a detector that opens and clears within it makes one long anomaly, its flaps
    /// counted, not an alert storm. Default 60.
    pub clear_for_secs: Option<f64>,
    /// After an anomaly resolved, none opens for this long; the firings meanwhile are counted in
    /// the next one's evidence. Default 0.
    pub cooldown_secs: Option<f64>,
    /// Only devices of this group.
    pub group: Option<String>,
    /// Only devices of this model.
    pub model: Option<String>,
    /// Only devices under this site prefix (zone, section, …).
    pub site: Vec<String>,

    // threshold
    pub above: Option<f64>,
    pub below: Option<f64>,
    pub clear_above: Option<f64>,
    pub clear_below: Option<f64>,
    /// threshold: the condition must hold this long (flatline: no change for this long).
    pub for_secs: Option<f64>,
    /// threshold: and for this many readings in a row.
    pub min_count: Option<u32>,
    // spike, level_shift, trend
    pub window_secs: Option<f64>,
    /// spike: deviations from the baseline, in robust standard deviations (default 6);
    /// level_shift: CUSUM decision limit h, in standard deviations (default 8).
    pub k: Option<f64>,
    /// spike, level_shift, trend: readings before it may fire (default 20).
    pub warmup: Option<u32>,
    pub direction: Option<Direction>,
    /// spike: the smallest deviation that counts, in the metric's unit (default 0).
    pub min_deviation: Option<f64>,
    /// level_shift: CUSUM slack, in standard deviations (default 0.5).
    pub slack: Option<f64>,
    // rate_of_change
    pub max_per_sec: Option<f64>,
    // flatline
    pub epsilon: Option<f64>,
    // heartbeat
    pub interval_secs: Option<f64>,
    // trend
    pub limit: Option<f64>,
    pub horizon_secs: Option<f64>,
}

/// A detector refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("detector `{detector}`: field `{field}`: {reason}")]
pub struct DetectorError {
    pub detector: String,
    pub field: String,
    pub reason: String,
}

/// A checked detector.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    pub name: String,
    pub metric: String,
    pub severity: Severity,
    pub clear_for: Micros,
    pub cooldown: Micros,
    pub scope: Scope,
    pub rule: Rule,
}

/// Which devices a detector watches (all when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub group: Option<String>,
    pub model: Option<String>,
    pub site: Vec<String>,
}

impl Scope {
    /// Whether a device of `group`, `model` and `site` is watched.
    pub fn covers(&self, group: Option<&str>, model: Option<&str>, site: &[String]) -> bool {
        self.group.as_deref().is_none_or(|g| group == Some(g))
            && self.model.as_deref().is_none_or(|m| model == Some(m))
            && site.starts_with(&self.site)
    }
}

/// A detector's rule, with its parameters checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    Threshold {
        /// (trigger, clear): fires above the trigger, clears at or below the clear level.
        above: Option<(f64, f64)>,
        /// (trigger, clear): fires below the trigger, clears at or above the clear level.
        below: Option<(f64, f64)>,
        hold: Micros,
        min_count: u32,
    },
    Spike {
        window: Micros,
        k: f64,
        warmup: u32,
        direction: Direction,
        min_deviation: f64,
    },
    RateOfChange {
        max_per_sec: f64,
    },
    Flatline {
        epsilon: f64,
        hold: Micros,
    },
    Heartbeat {
        interval: Micros,
    },
    LevelShift {
        slack: f64,
        k: f64,
        warmup: u32,
        direction: Direction,
    },
    Trend {
        limit: f64,
        horizon: Micros,
        window: Micros,
        warmup: u32,
        direction: Direction,
    },
}

impl Rule {
    pub fn kind(&self) -> DetectorKind {
        match self {
            Self::Threshold { .. } => DetectorKind::Threshold,
            Self::Spike { .. } => DetectorKind::Spike,
            Self::RateOfChange { .. } => DetectorKind::RateOfChange,
            Self::Flatline { .. } => DetectorKind::Flatline,
            Self::Heartbeat { .. } => DetectorKind::Heartbeat,
            Self::LevelShift { .. } => DetectorKind::LevelShift,
            Self::Trend { .. } => DetectorKind::Trend,
        }
    }
}

/// Seconds → µs, for a duration checked to be finite and within 100 years.
fn duration(
    refuse: &impl Fn(&str, String) -> DetectorError,
    field: &str,
    secs: f64,
    positive: bool,
) -> Result<Micros, DetectorError> {
    if !secs.is_finite() || secs < 0.0 || (positive && secs == 0.0) {
        let must = if positive {
            "must be a positive number of seconds"
        } else {
            "must be a number of seconds, 0 or more"
        };
        return Err(refuse(field, format!("{must}, not {secs}")));
    }
    if secs > 3.2e9 {
        return Err(refuse(field, format!("{secs} s is more than 100 years")));
    }
    Ok((secs * 1e6).round() as Micros)
}

fn finite(
    refuse: &impl Fn(&str, String) -> DetectorError,
    field: &str,
    v: Option<f64>,
) -> Result<Option<f64>, DetectorError> {
    match v {
        Some(x) if !x.is_finite() => Err(refuse(field, format!("must be finite, not {x}"))),
        other => Ok(other),
    }
}

impl DetectorSpec {
    /// The parameters each kind takes (beyond the common ones).
    fn parameters(kind: DetectorKind) -> &'static [&'static str] {
        match kind {
            DetectorKind::Threshold => &[
                "above",
                "below",
                "clear_above",
                "clear_below",
                "for_secs",
                "min_count",
            ],
            DetectorKind::Spike => &["window_secs", "k", "warmup", "direction", "min_deviation"],
            DetectorKind::RateOfChange => &["max_per_sec"],
            DetectorKind::Flatline => &["epsilon", "for_secs"],
            DetectorKind::Heartbeat => &["interval_secs"],
            DetectorKind::LevelShift => &["slack", "k", "warmup", "direction"],
            DetectorKind::Trend => &[
                "limit",
                "horizon_secs",
                "window_secs",
                "warmup",
                "direction",
            ],
        }
    }

    /// The kind-specific parameters that are set.
    fn set_parameters(&self) -> Vec<&'static str> {
        let set = [
            ("above", self.above.is_some()),
            ("below", self.below.is_some()),
            ("clear_above", self.clear_above.is_some()),
            ("clear_below", self.clear_below.is_some()),
            ("for_secs", self.for_secs.is_some()),
            ("min_count", self.min_count.is_some()),
            ("window_secs", self.window_secs.is_some()),
            ("k", self.k.is_some()),
            ("warmup", self.warmup.is_some()),
            ("direction", self.direction.is_some()),
            ("min_deviation", self.min_deviation.is_some()),
            ("slack", self.slack.is_some()),
            ("max_per_sec", self.max_per_sec.is_some()),
            ("epsilon", self.epsilon.is_some()),
            ("interval_secs", self.interval_secs.is_some()),
            ("limit", self.limit.is_some()),
            ("horizon_secs", self.horizon_secs.is_some()),
        ];
        set.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect()
    }

    /// Checks the spec named `name`; `metrics` are the metric names it may watch (`None`: any).
    pub fn check(
        &self,
        name: &str,
        metrics: Option<&BTreeSet<String>>,
    ) -> Result<Detector, DetectorError> {
        let refuse = |field: &str, reason: String| DetectorError {
            detector: name.to_owned(),
            field: field.to_owned(),
            reason,
        };
        if name.is_empty() || name.len() > 128 || name.contains(char::is_control) {
            return Err(refuse(
                "name",
                "must be 1 to 128 characters, none a control character".into(),
            ));
        }
        if self.metric.is_empty() {
            return Err(refuse("metric", "is required".into()));
        }
        if let Some(known) = metrics
            && !known.contains(&self.metric)
        {
            return Err(refuse(
                "metric",
                format!(
                    "`{}` is not in the metric catalog (known: {})",
                    self.metric,
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let Some(kind) = self.kind else {
            let kinds: Vec<&str> = DetectorKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(refuse(
                "kind",
                format!("is required: one of {}", kinds.join(", ")),
            ));
        };
        let allowed = Self::parameters(kind);
        if let Some(other) = self
            .set_parameters()
            .into_iter()
            .find(|p| !allowed.contains(p))
        {
            return Err(refuse(
                other,
                format!(
                    "is not a parameter of a {} detector (it takes: {})",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            ));
        }
        let clear_for = duration(
            &refuse,
            "clear_for_secs",
            self.clear_for_secs.unwrap_or(60.0),
            false,
        )?;
        let cooldown = duration(
            &refuse,
            "cooldown_secs",
            self.cooldown_secs.unwrap_or(0.0),
            false,
        )?;
        let warmup = self.warmup.unwrap_or(20);
        let positive = |field: &str, v: Option<f64>, default: f64| -> Result<f64, DetectorError> {
            let x = v.unwrap_or(default);
            if !x.is_finite() || x <= 0.0 {
                return Err(refuse(field, format!("must be a positive number, not {x}")));
            }
            Ok(x)
        };
        let rule = match kind {
            DetectorKind::Threshold => {
                let above = finite(&refuse, "above", self.above)?;
                let below = finite(&refuse, "below", self.below)?;
                let clear_above = finite(&refuse, "clear_above", self.clear_above)?;
                let clear_below = finite(&refuse, "clear_below", self.clear_below)?;
                if above.is_none() && below.is_none() {
                    return Err(refuse(
                        "above",
                        "a threshold needs `above` or `below`".into(),
                    ));
                }
                let above = match (above, clear_above) {
                    (Some(a), Some(c)) if c > a => {
                        return Err(refuse(
                            "clear_above",
                            format!(
                                "{c} is above the trigger {a}: it would clear while still firing"
                            ),
                        ));
                    }
                    (Some(a), c) => Some((a, c.unwrap_or(a))),
                    (None, Some(_)) => {
                        return Err(refuse("clear_above", "is set without `above`".into()));
                    }
                    (None, None) => None,
                };
                let below = match (below, clear_below) {
                    (Some(b), Some(c)) if c < b => {
                        return Err(refuse(
                            "clear_below",
                            format!(
                                "{c} is below the trigger {b}: it would clear while still firing"
                            ),
                        ));
                    }
                    (Some(b), c) => Some((b, c.unwrap_or(b))),
                    (None, Some(_)) => {
                        return Err(refuse("clear_below", "is set without `below`".into()));
                    }
                    (None, None) => None,
                };
                if let (Some((a, _)), Some((b, _))) = (above, below)
                    && b >= a
                {
                    return Err(refuse(
                        "below",
                        format!("{b} is not below `above` ({a}): every value would fire"),
                    ));
                }
                Rule::Threshold {
                    above,
                    below,
                    hold: duration(&refuse, "for_secs", self.for_secs.unwrap_or(0.0), false)?,
                    min_count: match self.min_count.unwrap_or(1) {
                        0 => return Err(refuse("min_count", "must be at least 1".into())),
                        n => n,
                    },
                }
            }
            DetectorKind::Spike => Rule::Spike {
                window: duration(
                    &refuse,
                    "window_secs",
                    self.window_secs.unwrap_or(600.0),
                    true,
                )?,
                k: positive("k", self.k, 6.0)?,
                warmup: warmup.max(2),
                direction: self.direction.unwrap_or_default(),
                min_deviation: match finite(&refuse, "min_deviation", self.min_deviation)? {
                    Some(d) if d < 0.0 => {
                        return Err(refuse(
                            "min_deviation",
                            format!("must be 0 or more, not {d}"),
                        ));
                    }
                    d => d.unwrap_or(0.0),
                },
            },
            DetectorKind::RateOfChange => Rule::RateOfChange {
                max_per_sec: match self.max_per_sec {
                    None => return Err(refuse("max_per_sec", "is required".into())),
                    v => positive("max_per_sec", v, 0.0)?,
                },
            },
            DetectorKind::Flatline => Rule::Flatline {
                epsilon: match finite(&refuse, "epsilon", self.epsilon)?.unwrap_or(0.0) {
                    e if e < 0.0 => {
                        return Err(refuse("epsilon", format!("must be 0 or more, not {e}")));
                    }
                    e => e,
                },
                hold: match self.for_secs {
                    None => return Err(refuse("for_secs", "is required".into())),
                    Some(s) => duration(&refuse, "for_secs", s, true)?,
                },
            },
            DetectorKind::Heartbeat => Rule::Heartbeat {
                interval: match self.interval_secs {
                    None => return Err(refuse("interval_secs", "is required".into())),
                    Some(s) => duration(&refuse, "interval_secs", s, true)?,
                },
            },
            DetectorKind::LevelShift => Rule::LevelShift {
                slack: match finite(&refuse, "slack", self.slack)?.unwrap_or(0.5) {
                    s if s < 0.0 => {
                        return Err(refuse("slack", format!("must be 0 or more, not {s}")));
                    }
                    s => s,
                },
                k: positive("k", self.k, 8.0)?,
                warmup: warmup.max(2),
                direction: self.direction.unwrap_or_default(),
            },
            DetectorKind::Trend => Rule::Trend {
                limit: match finite(&refuse, "limit", self.limit)? {
                    None => return Err(refuse("limit", "is required".into())),
                    Some(l) => l,
                },
                horizon: match self.horizon_secs {
                    None => return Err(refuse("horizon_secs", "is required".into())),
                    Some(s) => duration(&refuse, "horizon_secs", s, true)?,
                },
                window: duration(
                    &refuse,
                    "window_secs",
                    self.window_secs.unwrap_or(3600.0),
                    true,
                )?,
                warmup: warmup.max(3),
                direction: self.direction.unwrap_or(Direction::Down),
            },
        };
        Ok(Detector {
            name: name.to_owned(),
            metric: self.metric.clone(),
            severity: self.severity,
            clear_for,
            cooldown,
            scope: Scope {
                group: self.group.clone(),
                model: self.model.clone(),
                site: self.site.clone(),
            },
            rule,
        })
    }
}

/// A tenant's own detectors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantDetectors {
    pub detectors: BTreeMap<String, DetectorSpec>,
}

/// Topic `detector-catalog` (compacted, key = tenant): a tenant's detectors as set through the
/// admin API. Schema: `schemas/avro/detector_event.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorEvent {
    pub tenant: String,
    pub at: Micros,
    pub actor: String,
    /// `None`: the API entry was removed (the config file's applies again).
    pub detectors: Option<BTreeMap<String, DetectorSpec>>,
}

/// The tenants' detectors set through the API, as a process follows them on the
/// `detector-catalog` topic.
pub type DetectorOverrides = TenantOverrides<TenantDetectors>;

impl DetectorOverrides {
    pub fn apply(&self, event: &DetectorEvent) {
        let entry = event
            .detectors
            .clone()
            .map(|detectors| TenantDetectors { detectors });
        self.set(&event.tenant, entry);
    }
}

/// The config file's detectors and the metric names they may watch: what the API's entries are
/// laid over and checked against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetectorBase {
    pub global: BTreeMap<String, DetectorSpec>,
    pub tenants: BTreeMap<String, TenantDetectors>,
    /// `None`: any metric (the metric catalog accepts unknown metrics).
    pub metrics: Option<BTreeSet<String>>,
}

impl DetectorBase {
    /// The catalog in effect: each tenant's API entry (in `api`) replaces its config entry.
    pub fn compile(
        &self,
        api: &BTreeMap<String, TenantDetectors>,
    ) -> Result<DetectorCatalog, DetectorError> {
        let mut tenants = self.tenants.clone();
        tenants.extend(api.iter().map(|(t, d)| (t.clone(), d.clone())));
        DetectorCatalog::new(&self.global, &tenants, self.metrics.as_ref())
    }

    /// The specs of `tenant` in effect (global ones replaced by name), and where its own come
    /// from: `api`, `config` or `default` (none of its own).
    pub fn effective(
        &self,
        tenant: &str,
        api: &BTreeMap<String, TenantDetectors>,
    ) -> (&'static str, BTreeMap<String, DetectorSpec>) {
        crate::catalog::effective_entries(
            &self.global,
            api.get(tenant).map(|d| &d.detectors),
            self.tenants.get(tenant).map(|d| &d.detectors),
        )
    }
}

/// The checked detectors of every tenant: global ones, replaced by name per tenant.
#[derive(Debug, Clone, Default)]
pub struct DetectorCatalog {
    global: Vec<Detector>,
    tenants: BTreeMap<String, Vec<Detector>>,
}

impl DetectorCatalog {
    /// Checks every detector; the first refused one is the error.
    pub fn new(
        global: &BTreeMap<String, DetectorSpec>,
        tenants: &BTreeMap<String, TenantDetectors>,
        metrics: Option<&BTreeSet<String>>,
    ) -> Result<Self, DetectorError> {
        let (global, per_tenant) = crate::catalog::layer_by_tenant(
            global,
            tenants
                .iter()
                .map(|(t, d)| (t.clone(), d.detectors.clone())),
            |d: &Detector| d.name.as_str(),
            |name, spec: &DetectorSpec| spec.check(name, metrics),
        )?;
        Ok(Self {
            global,
            tenants: per_tenant,
        })
    }

    /// The detectors of `tenant`.
    pub fn of(&self, tenant: &str) -> &[Detector] {
        self.tenants.get(tenant).unwrap_or(&self.global)
    }

    /// Whether no tenant has any detector.
    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.tenants.values().all(Vec::is_empty)
    }

    /// The longest `clear_for` of any detector (0 with none).
    pub fn longest_clear_for(&self) -> Micros {
        self.global
            .iter()
            .chain(self.tenants.values().flatten())
            .map(|d| d.clear_for)
            .max()
            .unwrap_or(0)
    }

    /// The detector `name` of `tenant`.
    pub fn find(&self, tenant: &str, name: &str) -> Option<&Detector> {
        self.of(tenant).iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> DetectorSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn refused(toml_text: &str) -> (String, String) {
        let e = spec(toml_text).check("d", None).unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn a_threshold_with_hysteresis_is_checked() {
        let d = spec(
            "metric = 'temperature'\nkind = 'threshold'\nabove = 80.0\nclear_above = 75.0\nfor_secs = 30\nseverity = 'critical'",
        )
        .check("hot", None)
        .unwrap();
        assert_eq!(d.severity, Severity::Critical);
        assert_eq!(
            d.rule,
            Rule::Threshold {
                above: Some((80.0, 75.0)),
                below: None,
                hold: 30_000_000,
                min_count: 1
            }
        );
    }

    #[test]
    fn configs_that_cannot_work_are_refused_with_the_field() {
        let (f, r) = refused("metric = 't'\nkind = 'threshold'\nabove = 80.0\nclear_above = 85.0");
        assert_eq!(f, "clear_above");
        assert!(r.contains("above the trigger"), "{r}");
        assert_eq!(
            refused("metric = 't'\nkind = 'spike'\nwindow_secs = 0").0,
            "window_secs"
        );
        assert_eq!(
            refused("metric = 't'\nkind = 'heartbeat'").0,
            "interval_secs"
        );
        assert_eq!(
            refused("metric = 't'\nkind = 'spike'\nabove = 1.0").0,
            "above"
        );
        assert_eq!(refused("metric = 't'").0, "kind");
        assert_eq!(refused("kind = 'flatline'\nfor_secs = 1").0, "metric");
        assert_eq!(
            refused("metric = 't'\nkind = 'rate_of_change'\nmax_per_sec = -1").0,
            "max_per_sec"
        );
        assert_eq!(
            refused("metric = 't'\nkind = 'threshold'\nabove = 1.0\nbelow = 2.0").0,
            "below"
        );
        assert_eq!(
            refused("metric = 't'\nkind = 'trend'\nlimit = 1.0\nhorizon_secs = 1e300").0,
            "horizon_secs"
        );
        let metrics = BTreeSet::from(["temperature".to_owned()]);
        let e = spec("metric = 'tempreature'\nkind = 'heartbeat'\ninterval_secs = 60")
            .check("d", Some(&metrics))
            .unwrap_err();
        assert_eq!(e.field, "metric");
        assert!(e.to_string().contains("not in the metric catalog"), "{e}");
        assert!(toml::from_str::<DetectorSpec>("metric = 't'\nkindd = 'spike'").is_err());
    }

    #[test]
    fn a_tenant_detector_replaces_the_global_one_of_its_name() {
        let global = BTreeMap::from([
            (
                "hot".to_owned(),
                spec("metric = 't'\nkind = 'threshold'\nabove = 80.0"),
            ),
            (
                "quiet".to_owned(),
                spec("metric = 't'\nkind = 'heartbeat'\ninterval_secs = 60"),
            ),
        ]);
        let tenants = BTreeMap::from([(
            "acme".to_owned(),
            TenantDetectors {
                detectors: BTreeMap::from([(
                    "hot".to_owned(),
                    spec("metric = 't'\nkind = 'threshold'\nabove = 90.0"),
                )]),
            },
        )]);
        let c = DetectorCatalog::new(&global, &tenants, None).unwrap();
        assert_eq!(c.of("acme").len(), 2);
        assert!(matches!(
            c.find("acme", "hot").unwrap().rule,
            Rule::Threshold {
                above: Some((90.0, 90.0)),
                ..
            }
        ));
        assert!(matches!(
            c.find("other", "hot").unwrap().rule,
            Rule::Threshold {
                above: Some((80.0, 80.0)),
                ..
            }
        ));
    }

    #[test]
    fn scopes_narrow_by_group_model_and_site_prefix() {
        let s = Scope {
            group: Some("pumps".into()),
            model: None,
            site: vec!["north".into()],
        };
        let site = vec!["north".to_owned(), "hall 3".to_owned()];
        assert!(s.covers(Some("pumps"), Some("x"), &site));
        assert!(!s.covers(Some("fans"), None, &site));
        assert!(!s.covers(Some("pumps"), None, &["south".to_owned()]));
        assert!(Scope::default().covers(None, None, &[]));
    }
}
