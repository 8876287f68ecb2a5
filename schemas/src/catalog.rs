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

/// What happens to a second, different value for the same (tenant, device, metric, event time):
/// decided once, in the cleanse stage, so the lake and the time-series store (which keeps one point
/// per series and timestamp) hold the same readings. An equal value is a duplicate, dropped and
/// counted whatever the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictingReadings {
    /// The first value is kept; later ones are dead-lettered (rule `conflicting_reading`).
    #[default]
    Reject,
    /// The first value is kept; later ones are dropped and counted.
    KeepFirst,
    /// Both are kept, the later flagged `conflict` (the time-series store writes it with the tag
    /// `conflict=true`, a series of its own, so it keeps both too).
    KeepBoth,
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
    /// A second, different value for the same (device, metric, event time).
    pub conflicting_readings: ConflictingReadings,
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
            conflicting_readings: ConflictingReadings::Reject,
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
    /// Other units named as accepted (e.g. `["degF", "K"]` for `Cel`); each must be of the
    /// canonical unit's quantity. Every unit of that quantity is accepted and converted anyway
    /// (`J`, `Wh`, `kWh`, `MWh` for energy): the list documents what a tenant's devices send.
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
    /// Names read as this metric: a metric name as sent, or a resolved SenML name; `*` matches
    /// any run of characters (`["temp", "*:temp_c"]`).
    #[serde(default)]
    pub names: Vec<String>,
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
        names: Vec::new(),
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

/// What tenants set through the admin API (their metric catalogs, their detectors), as a process
/// follows it on a compacted per-tenant topic: one entry per tenant, and a generation that moves
/// with every change.
#[derive(Debug, Default)]
pub struct TenantOverrides<T> {
    tenants: RwLock<BTreeMap<String, T>>,
    generation: AtomicU64,
}

impl<T: Clone> TenantOverrides<T> {
    /// `entry` for `tenant`, or none (`None`: the API entry was removed).
    pub fn set(&self, tenant: &str, entry: Option<T>) {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        match entry {
            Some(e) => tenants.insert(tenant.to_owned(), e),
            None => tenants.remove(tenant),
        };
        drop(tenants);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Every API entry now.
    pub fn snapshot(&self) -> BTreeMap<String, T> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped by every change: a reader rebuilds what it derived when it moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A tenant's entries in effect (the global ones, its own replacing them by name) and where its
/// own come from: `api`, `config` or `default` (none of its own). The API's entry wins.
pub fn effective_entries<S: Clone>(
    global: &BTreeMap<String, S>,
    api: Option<&BTreeMap<String, S>>,
    config: Option<&BTreeMap<String, S>>,
) -> (&'static str, BTreeMap<String, S>) {
    let (source, own) = match (api, config) {
        (Some(own), _) => ("api", Some(own)),
        (None, Some(own)) => ("config", Some(own)),
        (None, None) => ("default", None),
    };
    let mut all = global.clone();
    if let Some(own) = own {
        all.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    (source, all)
}

/// Checked entries: the global ones, and per tenant its own.
pub type Layered<T> = (Vec<T>, BTreeMap<String, Vec<T>>);

/// Global entries checked, and per tenant the global ones with the tenant's own replacing them by
/// name (the detector catalog's and the incident rules' layering). `check` turns (name, spec)
/// into the checked entry or the first error.
pub fn layer_by_tenant<S, T: Clone, E>(
    global: &BTreeMap<String, S>,
    tenants: impl IntoIterator<Item = (String, BTreeMap<String, S>)>,
    name: fn(&T) -> &str,
    check: impl Fn(&str, &S) -> Result<T, E>,
) -> Result<Layered<T>, E> {
    let check_all = |specs: &BTreeMap<String, S>| {
        specs
            .iter()
            .map(|(n, spec)| check(n, spec))
            .collect::<Result<Vec<_>, _>>()
    };
    let global = check_all(global)?;
    let mut per_tenant = BTreeMap::new();
    for (tenant, own) in tenants {
        let own = check_all(&own)?;
        let mut all: Vec<T> = global
            .iter()
            .filter(|g| !own.iter().any(|o| name(o) == name(g)))
            .cloned()
            .collect();
        all.extend(own);
        per_tenant.insert(tenant, all);
    }
    Ok((global, per_tenant))
}

/// The tenants' catalogs set through the API, as a process follows them on the `catalog` topic.
pub type CatalogOverrides = TenantOverrides<TenantCatalog>;

impl CatalogOverrides {
    pub fn apply(&self, event: &CatalogEvent) {
        self.set(&event.tenant, event.catalog.clone());
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
        if [spec.min, spec.max].iter().flatten().any(|v| v.is_nan()) {
            return Err(err("min", "min and max must be numbers".into()));
        }
        if let Some(n) = spec.names.iter().find(|n| n.is_empty() || n.len() > 256) {
            return Err(err("names", format!("`{n}` must be 1 to 256 bytes")));
        }
        Ok(Self {
            spec,
            unit,
            accepted,
        })
    }

    /// The unit a reading was sent in, if this metric accepts it (`None`: the canonical unit):
    /// every unit of the canonical unit's quantity, by any of its spellings (`°F` for `degF`).
    pub fn accepts(&self, unit: Option<&str>) -> Option<&'static Unit> {
        match unit {
            None => Some(self.unit),
            Some(u) => self
                .accepted
                .get(u)
                .copied()
                .or_else(|| units::lookup(u).filter(|u| u.quantity == self.unit.quantity)),
        }
    }

    /// The units this metric accepts, for error messages: the canonical one first.
    pub fn accepted_names(&self) -> String {
        let mut names: Vec<&str> = vec![self.unit.name];
        names.extend(
            units::of(self.unit.quantity)
                .map(|u| u.name)
                .filter(|n| *n != self.unit.name),
        );
        names.join(", ")
    }
}

/// One tenant's rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policy: Policy,
    pub metrics: HashMap<String, Metric>,
    /// (pattern, metric) for every `names` entry, in metric order.
    aliases: Vec<(String, String)>,
}

impl Rules {
    /// The catalog's metric of a measurement sent as `metric` (with its resolved SenML `name`):
    /// the metric itself when the catalog declares it, else the first metric one of whose `names`
    /// matches `metric` or `name`, else `metric` as sent (undeclared).
    pub fn resolve<'a>(
        &'a self,
        metric: &'a str,
        name: Option<&'a str>,
    ) -> (&'a str, Option<&'a Metric>) {
        if let Some((m, spec)) = self.metrics.get_key_value(metric) {
            return (m, Some(spec));
        }
        for (pattern, target) in &self.aliases {
            if (glob(pattern, metric) || name.is_some_and(|n| glob(pattern, n)))
                && let Some((m, spec)) = self.metrics.get_key_value(target)
            {
                return (m, Some(spec));
            }
        }
        (metric, None)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
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
        let aliases = |specs: &BTreeMap<String, MetricSpec>| -> Vec<(String, String)> {
            specs
                .iter()
                .flat_map(|(m, spec)| spec.names.iter().map(move |n| (n.clone(), m.clone())))
                .collect()
        };
        let default = Rules {
            policy: policy.clone(),
            metrics: compile("", metrics)?,
            aliases: aliases(metrics),
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
            // The tenant's own names are tried first.
            let mut own = aliases(&t.metrics);
            own.append(&mut rules.aliases);
            rules.aliases = own;
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
            names: Vec::new(),
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
        // Every unit of the quantity, listed or not: the SenML primary unit of energy is J.
        let e = &c.rules("other").metrics["energy"];
        assert_eq!(e.accepts(Some("J")).map(|u| u.name), Some("J"));
        assert!(e.accepted_names().starts_with("kWh, J, Wh"));
    }

    #[test]
    fn names_alias_metrics_tenant_first() {
        let mut metrics = default_metrics();
        metrics.get_mut("temperature").unwrap().names = vec!["temp".into(), "*:t*_c".into()];
        let mut own = spec("Cel", &[]);
        own.names = vec!["temp".into()];
        let tenants = BTreeMap::from([(
            "acme".to_owned(),
            TenantCatalog {
                policy: None,
                metrics: BTreeMap::from([("room".to_owned(), own)]),
            },
        )]);
        let c = Catalog::new(&Policy::default(), &metrics, &tenants).unwrap();
        let r = c.rules("other");
        assert_eq!(r.resolve("temp", None).0, "temperature");
        assert_eq!(r.resolve("sensor1:temp_c", None).0, "temperature");
        assert_eq!(r.resolve("x", Some("gw:sensor2:t2_c")).0, "temperature");
        assert_eq!(r.resolve("humidity", None).0, "humidity");
        let (m, spec) = r.resolve("sensor1:temp", None);
        assert_eq!((m, spec.is_none()), ("sensor1:temp", true));
        assert_eq!(c.rules("acme").resolve("temp", None).0, "room");
        assert!(glob("a*b*c", "a-b-c") && glob("*", "") && !glob("a*c", "ab") && glob("ab", "ab"));
        assert!(!glob("a*a", "a"), "the two ends may not overlap");
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
