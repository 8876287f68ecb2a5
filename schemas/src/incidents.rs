//! Incident rules: which anomalies are correlated into one incident, per tenant.
//!
//! Configured under `[incidents.rules.<name>]` (every tenant) and
//! `[incidents.tenants.<tenant>.rules.<name>]` (one tenant; a name there replaces the global rule
//! of that name for that tenant). A rule is one flat table:
//!
//! ```toml
//! [incidents.rules.section_down]
//! correlate = "site"     # site: the same site level; group: the same device group;
//!                        # device: several metrics of one device; anomaly: each anomaly alone
//! level = 2              # site: levels of the site path compared (1 = zone, 2 = zone/section)
//! min_devices = 3        # site, group: distinct devices with an anomaly within the window
//! window_secs = 300      # anomalies starting within this long of each other are correlated
//! quiet_secs = 60        # resolved when every member has resolved, and this long after
//! min_severity = "warning"
//! detectors = ["overheating", "pressure_drop"]   # only these (all when absent)
//! ```
//!
//! [`IncidentRuleSpec`] is what is written; [`IncidentRuleSpec::check`] turns it into an
//! [`IncidentRule`] or refuses it naming the field and the reason.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::avro::Anomaly;
use crate::catalog::TenantOverrides;
use crate::detectors::Severity;

/// What a rule correlates anomalies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Correlate {
    /// Distinct devices under the same site prefix of `level` levels.
    Site,
    /// Distinct devices of the same device group.
    Group,
    /// Distinct metrics of one device.
    Device,
    /// Every anomaly on its own: an incident of one member (for alerts on single anomalies with
    /// the incident lifecycle: acknowledge, snooze, resolve).
    Anomaly,
}

impl Correlate {
    pub const ALL: [Correlate; 4] = [Self::Site, Self::Group, Self::Device, Self::Anomaly];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Site => "site",
            Self::Group => "group",
            Self::Device => "device",
            Self::Anomaly => "anomaly",
        }
    }
}

/// One rule as written in the config file (or sent to the admin API).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentRuleSpec {
    pub correlate: Option<Correlate>,
    /// site: how many levels of the device's site path must be equal (default 1).
    pub level: Option<u32>,
    /// site, group: distinct devices (default 2).
    pub min_devices: Option<u32>,
    /// device: distinct metrics (default 2).
    pub min_metrics: Option<u32>,
    /// Default 300.
    pub window_secs: Option<f64>,
    /// Default 60.
    pub quiet_secs: Option<f64>,
    /// Only anomalies at least this severe (default: all).
    pub min_severity: Option<Severity>,
    /// Only anomalies of these detectors (default: all).
    pub detectors: Option<Vec<String>>,
}

/// A rule refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incident rule `{rule}`: field `{field}`: {reason}")]
pub struct IncidentRuleError {
    pub rule: String,
    pub field: String,
    pub reason: String,
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentRule {
    pub name: String,
    pub correlate: Correlate,
    pub level: usize,
    /// Distinct devices (site, group) or metrics (device) an incident needs; 1 for `anomaly`.
    pub min_members: usize,
    pub window: Micros,
    pub quiet: Micros,
    pub min_severity: Severity,
    pub detectors: Option<Vec<String>>,
}

impl IncidentRuleSpec {
    pub fn check(&self, name: &str) -> Result<IncidentRule, IncidentRuleError> {
        let refuse = |field: &str, reason: String| IncidentRuleError {
            rule: name.to_owned(),
            field: field.to_owned(),
            reason,
        };
        if name.is_empty() || name.len() > 128 || name.contains(char::is_control) {
            return Err(refuse(
                "name",
                "must be 1 to 128 characters, none a control character".into(),
            ));
        }
        let Some(correlate) = self.correlate else {
            let all: Vec<&str> = Correlate::ALL.iter().map(|c| c.as_str()).collect();
            return Err(refuse(
                "correlate",
                format!("is required: one of {}", all.join(", ")),
            ));
        };
        let not_for = |field: &str, takes: &str| {
            refuse(
                field,
                format!(
                    "is not a parameter of a `{}` rule (it takes: {takes})",
                    correlate.as_str()
                ),
            )
        };
        let count = |field: &str, v: Option<u32>, default: u32| -> Result<usize, _> {
            match v.unwrap_or(default) {
                0 => Err(refuse(field, "must be at least 1".into())),
                n if n > 10_000 => Err(refuse(field, format!("{n} is more than 10 000"))),
                n => Ok(n as usize),
            }
        };
        let common = "window_secs, quiet_secs, min_severity, detectors";
        let (level, min_members) = match correlate {
            Correlate::Site => {
                if self.min_metrics.is_some() {
                    return Err(not_for(
                        "min_metrics",
                        &format!("level, min_devices, {common}"),
                    ));
                }
                let level = count("level", self.level, 1)?;
                if level > 16 {
                    return Err(refuse(
                        "level",
                        format!("{level} is more than 16 site levels"),
                    ));
                }
                (level, count("min_devices", self.min_devices, 2)?)
            }
            Correlate::Group | Correlate::Device => {
                let (own, other, default) = if correlate == Correlate::Group {
                    (
                        "min_devices",
                        self.min_metrics.map(|_| "min_metrics"),
                        self.min_devices,
                    )
                } else {
                    (
                        "min_metrics",
                        self.min_devices.map(|_| "min_devices"),
                        self.min_metrics,
                    )
                };
                if let Some(field) = self.level.map(|_| "level").or(other) {
                    return Err(not_for(field, &format!("{own}, {common}")));
                }
                (0, count(own, default, 2)?)
            }
            Correlate::Anomaly => {
                if let Some(field) = [
                    self.level.map(|_| "level"),
                    self.min_devices.map(|_| "min_devices"),
                    self.min_metrics.map(|_| "min_metrics"),
                ]
                .into_iter()
                .flatten()
                .next()
                {
                    return Err(not_for(field, common));
                }
                (0, 1)
            }
        };
        let window = seconds(
            &refuse,
            "window_secs",
            self.window_secs.unwrap_or(300.0),
            true,
        )?;
        let quiet = seconds(
            &refuse,
            "quiet_secs",
            self.quiet_secs.unwrap_or(60.0),
            false,
        )?;
        if let Some(list) = &self.detectors {
            if list.is_empty() {
                return Err(refuse(
                    "detectors",
                    "is empty: leave it out for every detector".into(),
                ));
            }
            if let Some(bad) = list.iter().find(|d| d.is_empty() || d.len() > 128) {
                return Err(refuse(
                    "detectors",
                    format!("`{bad}` is not a detector name (1 to 128 characters)"),
                ));
            }
        }
        Ok(IncidentRule {
            name: name.to_owned(),
            correlate,
            level,
            min_members,
            window,
            quiet,
            min_severity: self.min_severity.unwrap_or(Severity::Info),
            detectors: self.detectors.clone(),
        })
    }
}

fn seconds(
    refuse: &impl Fn(&str, String) -> IncidentRuleError,
    field: &str,
    secs: f64,
    positive: bool,
) -> Result<Micros, IncidentRuleError> {
    if !secs.is_finite() || secs < 0.0 || (positive && secs == 0.0) {
        return Err(refuse(
            field,
            format!(
                "must be a {} number of seconds, not {secs}",
                if positive { "positive" } else { "non-negative" }
            ),
        ));
    }
    if secs > 3.2e9 {
        return Err(refuse(field, format!("{secs} s is more than 100 years")));
    }
    Ok((secs * 1e6).round() as Micros)
}

impl IncidentRule {
    /// Whether `a` is an anomaly this rule correlates, and if so on what: the correlation key
    /// (site prefix, group, device, or the anomaly's id).
    pub fn key_of(&self, a: &Anomaly) -> Option<String> {
        let severe = severity_of(&a.severity) >= self.min_severity;
        let detector = self
            .detectors
            .as_ref()
            .is_none_or(|d| d.contains(&a.detector));
        if !severe || !detector {
            return None;
        }
        match self.correlate {
            Correlate::Site => {
                (a.site.len() >= self.level).then(|| a.site[..self.level].join("\u{1f}"))
            }
            Correlate::Group => a.device_group.clone(),
            Correlate::Device => Some(a.device.clone()),
            Correlate::Anomaly => Some(a.anomaly_id.clone()),
        }
    }

    /// What distinguishes members: devices (site, group), metrics (device), anomalies.
    pub fn member_of<'a>(&self, a: &'a Anomaly) -> &'a str {
        match self.correlate {
            Correlate::Site | Correlate::Group => &a.device,
            Correlate::Device => &a.metric,
            Correlate::Anomaly => &a.anomaly_id,
        }
    }
}

/// The severity an anomaly record names (unknown names rank lowest).
pub fn severity_of(name: &str) -> Severity {
    match name {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        _ => Severity::Info,
    }
}

/// A tenant's own rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantIncidentRules {
    pub rules: BTreeMap<String, IncidentRuleSpec>,
}

/// Topic `incident-rules` (compacted, key = tenant): a tenant's rules as set through the admin
/// API. Schema: `schemas/avro/incident_rules_event.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentRulesEvent {
    pub tenant: String,
    pub at: Micros,
    pub actor: String,
    /// `None`: the API entry was removed (the config file's applies again).
    pub rules: Option<BTreeMap<String, IncidentRuleSpec>>,
}

/// The tenants' rules set through the API, as a process follows them on `incident-rules`.
pub type IncidentRuleOverrides = TenantOverrides<TenantIncidentRules>;

impl IncidentRuleOverrides {
    pub fn apply(&self, event: &IncidentRulesEvent) {
        let entry = event
            .rules
            .clone()
            .map(|rules| TenantIncidentRules { rules });
        self.set(&event.tenant, entry);
    }
}

/// The config file's rules: what the API's entries are laid over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncidentRuleBase {
    pub global: BTreeMap<String, IncidentRuleSpec>,
    pub tenants: BTreeMap<String, TenantIncidentRules>,
}

impl IncidentRuleBase {
    /// The rules in effect: each tenant's API entry (in `api`) replaces its config entry.
    pub fn compile(
        &self,
        api: &BTreeMap<String, TenantIncidentRules>,
    ) -> Result<IncidentRules, IncidentRuleError> {
        let mut tenants = self.tenants.clone();
        tenants.extend(api.iter().map(|(t, r)| (t.clone(), r.clone())));
        IncidentRules::new(&self.global, &tenants)
    }

    /// The specs of `tenant` in effect and where its own come from (`api`, `config`, `default`).
    pub fn effective(
        &self,
        tenant: &str,
        api: &BTreeMap<String, TenantIncidentRules>,
    ) -> (&'static str, BTreeMap<String, IncidentRuleSpec>) {
        crate::catalog::effective_entries(
            &self.global,
            api.get(tenant).map(|r| &r.rules),
            self.tenants.get(tenant).map(|r| &r.rules),
        )
    }
}

/// The checked rules of every tenant: global ones, replaced by name per tenant.
#[derive(Debug, Clone, Default)]
pub struct IncidentRules {
    global: Vec<IncidentRule>,
    tenants: BTreeMap<String, Vec<IncidentRule>>,
}

impl IncidentRules {
    /// Checks every rule; the first refused one is the error.
    pub fn new(
        global: &BTreeMap<String, IncidentRuleSpec>,
        tenants: &BTreeMap<String, TenantIncidentRules>,
    ) -> Result<Self, IncidentRuleError> {
        let (global, per_tenant) = crate::catalog::layer_by_tenant(
            global,
            tenants.iter().map(|(t, r)| (t.clone(), r.rules.clone())),
            |r: &IncidentRule| r.name.as_str(),
            |name, spec: &IncidentRuleSpec| spec.check(name),
        )?;
        Ok(Self {
            global,
            tenants: per_tenant,
        })
    }

    pub fn of(&self, tenant: &str) -> &[IncidentRule] {
        self.tenants.get(tenant).unwrap_or(&self.global)
    }

    pub fn find(&self, tenant: &str, name: &str) -> Option<&IncidentRule> {
        self.of(tenant).iter().find(|r| r.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.tenants.values().all(Vec::is_empty)
    }

    /// The longest quiet period plus window of any rule (how long a resolved incident's key is
    /// remembered for late members).
    pub fn longest_memory(&self) -> Micros {
        self.global
            .iter()
            .chain(self.tenants.values().flatten())
            .map(|r| r.window.saturating_add(r.quiet))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> (String, String) {
        let spec: IncidentRuleSpec = toml::from_str(text).unwrap();
        let e = spec.check("r").unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn rules_that_cannot_work_are_refused_naming_the_field() {
        assert_eq!(refused("level = 2").0, "correlate");
        assert_eq!(
            refused("correlate = 'site'\nmin_devices = 0").0,
            "min_devices"
        );
        assert_eq!(
            refused("correlate = 'site'\nwindow_secs = 0.0").0,
            "window_secs"
        );
        assert_eq!(
            refused("correlate = 'site'\nquiet_secs = -1.0").0,
            "quiet_secs"
        );
        assert_eq!(
            refused("correlate = 'site'\nwindow_secs = nan").0,
            "window_secs"
        );
        assert_eq!(
            refused("correlate = 'site'\nwindow_secs = 1e308").0,
            "window_secs"
        );
        assert_eq!(refused("correlate = 'device'\nlevel = 2").0, "level");
        assert_eq!(
            refused("correlate = 'group'\nmin_metrics = 2").0,
            "min_metrics"
        );
        assert_eq!(refused("correlate = 'site'\nlevel = 0").0, "level");
        assert_eq!(
            refused("correlate = 'anomaly'\nmin_devices = 2").0,
            "min_devices"
        );
        assert_eq!(refused("correlate = 'site'\ndetectors = []").0, "detectors");
        let (field, reason) = refused("correlate = 'device'\nmin_devices = 3");
        assert_eq!(field, "min_devices");
        assert!(reason.contains("min_metrics"), "{reason}");
    }

    #[test]
    fn defaults_and_keys() {
        let spec: IncidentRuleSpec =
            toml::from_str("correlate = 'site'\nlevel = 2\nmin_severity = 'warning'").unwrap();
        let rule = spec.check("sections").unwrap();
        assert_eq!(
            (rule.min_members, rule.window, rule.quiet),
            (2, 300_000_000, 60_000_000)
        );
        let mut a = Anomaly {
            anomaly_id: "x".into(),
            seq: 0,
            state: crate::avro::AnomalyState::Open,
            tenant: "acme".into(),
            device: "d1".into(),
            metric: "temperature".into(),
            detector: "hot".into(),
            kind: "threshold".into(),
            severity: "critical".into(),
            device_group: None,
            site: vec!["north".into(), "hall 3".into(), "spot 1".into()],
            start_time: 0,
            end_time: None,
            event_time: 0,
            value: 1.0,
            baseline: None,
            threshold: None,
            score: None,
            window_secs: None,
            predicted_time: None,
            readings: 1,
            flaps: 0,
            suppressed: 0,
            message: String::new(),
            source_topic: "telemetry".into(),
            source_partition: 0,
            source_offset: 0,
        };
        assert_eq!(rule.key_of(&a).as_deref(), Some("north\u{1f}hall 3"));
        a.severity = "info".into();
        assert_eq!(rule.key_of(&a), None, "below min_severity");
        a.severity = "warning".into();
        a.site.truncate(1);
        assert_eq!(
            rule.key_of(&a),
            None,
            "no section: not under any level-2 key"
        );
    }
}
