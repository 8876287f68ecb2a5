//! The metric catalog: per tenant, which metrics exist, their value type, canonical unit, the other
//! units accepted (converted to the canonical one), physical range and maximum rate of change, and
//! the tenant's policies (unknown metrics, clock skew, old and late data).
//!
//! Configured under `[cleanse]`: `[cleanse.policy]` and `[cleanse.metrics.<name>]` apply to every
//! tenant; `[cleanse.tenants.<tenant>]` adds or replaces metrics (`metrics.<name>`) and, when it has
//! a `policy` table, replaces the whole policy for that tenant. A tenant's catalog set through the
//! admin API (`PUT /v1/tenants/{tenant}/catalog`, recorded on the compacted `catalog` topic as a
//! [`CatalogEvent`]) replaces its `[cleanse.tenants.<tenant>]` entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::units::{self, Unit};

/// What happens to a metric the catalog does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownMetrics {
    /// Kept as sent (value and unit unchanged).
    Accept,
    /// Dead-lettered (rule `unknown_metric`).
    Reject,
}

/// What happens to a reading behind its partition's watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateData {
    /// Kept and flagged `late`.
    Accept,
    /// Kept and flagged when late by at most `max_lateness_secs`, dead-lettered (rule
    /// `late_event`) beyond.
    Reject,
}

/// A tenant's cleansing policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub unknown_metrics: UnknownMetrics,
    /// Event times more than this ahead of the time ingest received them are refused
    /// (`future_event_time`).
    pub clock_skew_secs: u64,
    /// Event times more than this before the time ingest received them are refused (`too_old`).
    pub max_age_secs: u64,
    /// A reading whose event time is behind its partition's watermark (the latest event time
    /// accepted there) by more than this is late.
    pub allowed_lateness_secs: u64,
    pub late_data: LateData,
    /// With `late_data = "reject"`: how far behind the watermark a late reading may still be.
    pub max_lateness_secs: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            unknown_metrics: UnknownMetrics::Accept,
            clock_skew_secs: 300,
            max_age_secs: 30 * 86_400,
            allowed_lateness_secs: 600,
            late_data: LateData::Accept,
            max_lateness_secs: 7 * 86_400,
        }
    }
}

/// The value type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Float,
    /// Whole numbers only (counters, states); `2.5` is refused (`type_mismatch`).
    Integer,
}

/// One metric of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    #[serde(rename = "type", default = "float")]
    pub value_type: ValueType,
    /// The canonical unit: readings are stored in it. A reading sent without a unit is taken to be
    /// in it.
    pub unit: String,
    /// Other units accepted and converted (e.g. `["degF", "K"]` for `Cel`).
    #[serde(default)]
    pub units: Vec<String>,
    /// Physical range, in the canonical unit (inclusive).
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Largest change per second between consecutive readings of a device (canonical unit).
    #[serde(default)]
    pub max_rate_per_sec: Option<f64>,
}

fn float() -> ValueType {
    ValueType::Float
}

/// `[cleanse.tenants.<tenant>]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantCatalog {
    /// Replaces the default policy for this tenant (fields not given take the built-in defaults).
    pub policy: Option<Policy>,
    /// Added to (or replacing, by name) the default metrics.
    pub metrics: BTreeMap<String, MetricSpec>,
}

/// The metrics every tenant has unless it says otherwise.
pub fn default_metrics() -> BTreeMap<String, MetricSpec> {
    let spec = |unit: &str, units: &[&str], min: Option<f64>, max: Option<f64>| MetricSpec {
        value_type: ValueType::Float,
        unit: unit.into(),
        units: units.iter().map(|u| (*u).into()).collect(),
        min,
        max,
        max_rate_per_sec: None,
    };
    BTreeMap::from([
        (
            "temperature".into(),
            spec("Cel", &["degF", "K"], Some(-90.0), Some(150.0)),
        ),
        ("humidity".into(), spec("%RH", &[], Some(0.0), Some(100.0))),
        (
            "battery_voltage".into(),
            spec("V", &["mV"], Some(0.0), Some(60.0)),
        ),
        (
            "pressure".into(),
            spec(
                "kPa",
                &["Pa", "hPa", "mbar", "bar", "psi"],
                Some(0.0),
                Some(100_000.0),
            ),
        ),
        (
            "energy".into(),
            spec("kWh", &["Wh", "MWh"], Some(0.0), None),
        ),
    ])
}

/// The catalog as configured (the `[cleanse]` file section): the base API entries lay over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogBase {
    pub policy: Policy,
    pub metrics: BTreeMap<String, MetricSpec>,
    pub tenants: BTreeMap<String, TenantCatalog>,
}

impl CatalogBase {
    /// The checked catalog with `overrides` (tenant → catalog set through the API) in place of the
    /// file's entries of those tenants.
    pub fn compile(
        &self,
        overrides: &BTreeMap<String, TenantCatalog>,
    ) -> Result<Catalog, CatalogError> {
        let mut tenants = self.tenants.clone();
        tenants.extend(overrides.iter().map(|(t, c)| (t.clone(), c.clone())));
        Catalog::new(&self.policy, &self.metrics, &tenants)
    }
}

/// Topic `catalog` (compacted, key = tenant): a tenant's catalog as set through the admin API.
/// Schema: `schemas/avro/catalog_event.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEvent {
    pub tenant: String,
    pub at: Micros,
    pub actor: String,
    /// `None`: the API entry was removed (the config file's applies again).
    pub catalog: Option<TenantCatalog>,
}

/// The tenants' catalogs set through the API, as a process follows them on the `catalog` topic.
#[derive(Debug, Default)]
pub struct CatalogOverrides {
    tenants: RwLock<BTreeMap<String, TenantCatalog>>,
    generation: AtomicU64,
}

impl CatalogOverrides {
    pub fn apply(&self, event: &CatalogEvent) {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        match &event.catalog {
            Some(c) => tenants.insert(event.tenant.clone(), c.clone()),
            None => tenants.remove(&event.tenant),
        };
        drop(tenants);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Every API entry now.
    pub fn snapshot(&self) -> BTreeMap<String, TenantCatalog> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped by every change: a reader recompiles its catalog when it moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A catalog entry that cannot be used, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cleanse.{key}: {reason}")]
pub struct CatalogError {
    pub key: String,
    pub reason: String,
}

/// A metric ready to check readings against.
#[derive(Debug, Clone)]
pub struct Metric {
    pub spec: MetricSpec,
    pub unit: &'static Unit,
    accepted: HashMap<String, &'static Unit>,
}

impl Metric {
    fn new(key: &str, spec: MetricSpec) -> Result<Self, CatalogError> {
        let err = |field: &str, reason: String| CatalogError {
            key: format!("{key}.{field}"),
            reason,
        };
        let unit = units::lookup(&spec.unit)
            .ok_or_else(|| err("unit", format!("unknown unit `{}`", spec.unit)))?;
        let mut accepted = HashMap::from([(spec.unit.clone(), unit), (unit.name.into(), unit)]);
        for name in &spec.units {
            let u = units::lookup(name)
                .ok_or_else(|| err("units", format!("unknown unit `{name}`")))?;
            if u.quantity != unit.quantity {
                return Err(err(
                    "units",
                    format!(
                        "`{name}` ({:?}) cannot be converted to `{}` ({:?})",
                        u.quantity, spec.unit, unit.quantity
                    ),
                ));
            }
            accepted.insert(name.clone(), u);
            accepted.insert(u.name.into(), u);
        }
        if let (Some(min), Some(max)) = (spec.min, spec.max)
            && min > max
        {
            return Err(err("min", format!("min {min} is above max {max}")));
        }
        if spec
            .max_rate_per_sec
            .is_some_and(|r| r.is_nan() || r <= 0.0)
        {
            return Err(err("max_rate_per_sec", "must be positive".into()));
        }
        Ok(Self {
            spec,
            unit,
            accepted,
        })
    }

    /// The unit a reading was sent in, if this metric accepts it (`None`: the canonical unit).
    pub fn accepts(&self, unit: Option<&str>) -> Option<&'static Unit> {
        match unit {
            None => Some(self.unit),
            Some(u) => self.accepted.get(u).copied().or_else(|| {
                // Another spelling of an accepted unit (`°F` for `degF`).
                units::lookup(u).and_then(|unit| self.accepted.get(unit.name).copied())
            }),
        }
    }

    /// The units this metric accepts, for error messages.
    pub fn accepted_names(&self) -> String {
        let mut names: Vec<&str> = std::iter::once(self.spec.unit.as_str())
            .chain(self.spec.units.iter().map(String::as_str))
            .collect();
        names.dedup();
        names.join(", ")
    }
}

/// One tenant's rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policy: Policy,
    pub metrics: HashMap<String, Metric>,
}

/// The whole catalog, checked: the default rules and each tenant's.
#[derive(Debug, Clone)]
pub struct Catalog {
    default: Rules,
    tenants: HashMap<String, Rules>,
}

impl Catalog {
    pub fn new(
        policy: &Policy,
        metrics: &BTreeMap<String, MetricSpec>,
        tenants: &BTreeMap<String, TenantCatalog>,
    ) -> Result<Self, CatalogError> {
        let compile = |prefix: &str, specs: &BTreeMap<String, MetricSpec>| {
            specs
                .iter()
                .map(|(name, spec)| {
                    Ok((
                        name.clone(),
                        Metric::new(&format!("{prefix}metrics.{name}"), spec.clone())?,
                    ))
                })
                .collect::<Result<HashMap<_, _>, CatalogError>>()
        };
        let default = Rules {
            policy: policy.clone(),
            metrics: compile("", metrics)?,
        };
        let mut out = HashMap::new();
        for (tenant, t) in tenants {
            let mut rules = default.clone();
            if let Some(p) = &t.policy {
                rules.policy = p.clone();
            }
            rules
                .metrics
                .extend(compile(&format!("tenants.{tenant}."), &t.metrics)?);
            out.insert(tenant.clone(), rules);
        }
        Ok(Self {
            default,
            tenants: out,
        })
    }

    /// The rules of `tenant`.
    pub fn rules(&self, tenant: &str) -> &Rules {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Whether `tenant` has rules of its own (else the defaults).
    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::{decode, encode};

    #[test]
    fn catalog_events_round_trip_and_overrides_replace_file_entries() {
        let catalog = TenantCatalog {
            policy: Some(Policy {
                late_data: LateData::Reject,
                ..Policy::default()
            }),
            metrics: BTreeMap::from([("flow".to_owned(), spec("count", &[]))]),
        };
        let event = CatalogEvent {
            tenant: "acme".into(),
            at: 1,
            actor: "admin".into(),
            catalog: Some(catalog.clone()),
        };
        assert_eq!(
            decode::<CatalogEvent>(&encode(&event).unwrap()).unwrap(),
            event
        );
        let overrides = CatalogOverrides::default();
        overrides.apply(&event);
        assert_eq!(overrides.generation(), 1);
        let base = CatalogBase {
            policy: Policy::default(),
            metrics: default_metrics(),
            tenants: BTreeMap::from([("acme".to_owned(), TenantCatalog::default())]),
        };
        let c = base.compile(&overrides.snapshot()).unwrap();
        assert!(c.rules("acme").metrics.contains_key("flow"));
        assert_eq!(c.rules("acme").policy.late_data, LateData::Reject);
        overrides.apply(&CatalogEvent {
            catalog: None,
            ..event
        });
        let c = base.compile(&overrides.snapshot()).unwrap();
        assert!(!c.rules("acme").metrics.contains_key("flow"));
    }

    fn spec(unit: &str, units: &[&str]) -> MetricSpec {
        MetricSpec {
            value_type: ValueType::Float,
            unit: unit.into(),
            units: units.iter().map(|u| (*u).into()).collect(),
            min: None,
            max: None,
            max_rate_per_sec: None,
        }
    }

    #[test]
    fn tenants_add_metrics_and_replace_policy() {
        let tenants = BTreeMap::from([(
            "acme".to_owned(),
            TenantCatalog {
                policy: Some(Policy {
                    unknown_metrics: UnknownMetrics::Reject,
                    ..Policy::default()
                }),
                metrics: BTreeMap::from([("flow".to_owned(), spec("count", &[]))]),
            },
        )]);
        let c = Catalog::new(&Policy::default(), &default_metrics(), &tenants).unwrap();
        assert_eq!(
            c.rules("acme").policy.unknown_metrics,
            UnknownMetrics::Reject
        );
        assert!(c.rules("acme").metrics.contains_key("flow"));
        assert!(c.rules("acme").metrics.contains_key("temperature"));
        assert!(!c.rules("other").metrics.contains_key("flow"));
        assert_eq!(
            c.rules("other").policy.unknown_metrics,
            UnknownMetrics::Accept
        );
        let t = &c.rules("other").metrics["temperature"];
        assert_eq!(t.accepts(Some("°F")).map(|u| u.name), Some("degF"));
        assert_eq!(t.accepts(None).map(|u| u.name), Some("Cel"));
        assert!(t.accepts(Some("V")).is_none());
    }

    #[test]
    fn bad_entries_name_their_key() {
        let bad = |m: MetricSpec| {
            Catalog::new(
                &Policy::default(),
                &BTreeMap::from([("t".to_owned(), m)]),
                &BTreeMap::new(),
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            bad(spec("furlong", &[])),
            "cleanse.metrics.t.unit: unknown unit `furlong`"
        );
        assert!(bad(spec("Cel", &["V"])).starts_with("cleanse.metrics.t.units: `V`"));
        let mut m = spec("Cel", &[]);
        (m.min, m.max) = (Some(5.0), Some(1.0));
        assert_eq!(bad(m), "cleanse.metrics.t.min: min 5 is above max 1");
    }
}
