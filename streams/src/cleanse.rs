//! The cleanse stage: `raw` → `telemetry` (clean readings) + `deadletter` (everything refused, with
//! the rule, the field, the reason and the raw record's position).
//!
//! Outputs of raw partition *p* go to partition *p* (mod the output's partition count) of each output
//! topic, in raw order, each stamped with its source position (topic, partition, offset, index). The
//! stage is at-least-once (offsets committed after the outputs are acknowledged); the lake sink drops
//! re-emitted outputs by that position, which makes the whole path exactly-once without Kafka
//! transactions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use serde::{Deserialize, Serialize};
use tributary_schemas::avro::decode;
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::payload::{self, Measurement, parse_message};
use tributary_schemas::{
    DeadLetter, Micros, RawEnvelope, Reading, Source, micros_of_secs, now_micros,
};

use crate::StreamError;
use crate::containment::{self, STAGE_FAILURE};
use crate::dedup::{self, DedupWindow, Key, ReadingWindow};
use crate::runtime::{self, Batching, Emit, Restarts, Stage};
use tributary_schemas::catalog::{
    Catalog, CatalogBase, CatalogError, CatalogOverrides, ConflictingReadings, LateData,
    MetricSpec, Policy, Rules, TenantCatalog, UnknownMetrics, ValueType, default_metrics,
};

/// The name of this stage (consumer group suffix, `stage` of its dead letters).
pub const STAGE: &str = "cleanse";

/// `[cleanse]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanseConfig {
    /// Events with the same (tenant, device, event id) within this many seconds are duplicates.
    pub dedup_horizon_secs: u64,
    /// Most messages one raw partition's dedup window holds (≈ 95 bytes each); beyond, the oldest
    /// are forgotten before the horizon (logged). The same bound holds for readings remembered for
    /// conflicts.
    pub dedup_max_entries: usize,
    /// A reading of the same (tenant, device, metric, event time) as one accepted within this many
    /// seconds (of receipt) is a duplicate (same value) or a conflict (another value: the tenant's
    /// `conflicting_readings` policy decides). Costs ≈ 95 bytes per reading inside it.
    pub conflict_horizon_secs: u64,
    /// Most raw records processed before outputs are awaited and offsets committed.
    pub batch_size: usize,
    /// Longest wait for a batch to fill (milliseconds).
    pub batch_ms: u64,
    /// `[cleanse.policy]`: every tenant's policy unless `[cleanse.tenants.<t>.policy]` replaces it.
    pub policy: Policy,
    /// `[cleanse.metrics.<name>]`: metrics every tenant has.
    pub metrics: BTreeMap<String, MetricSpec>,
    /// `[cleanse.tenants.<tenant>]`: a tenant's own metrics and policy.
    pub tenants: BTreeMap<String, TenantCatalog>,
}

impl Default for CleanseConfig {
    fn default() -> Self {
        Self {
            dedup_horizon_secs: 24 * 3600,
            dedup_max_entries: 4_000_000,
            conflict_horizon_secs: 3600,
            batch_size: 2000,
            batch_ms: 100,
            policy: Policy::default(),
            metrics: default_metrics(),
            tenants: BTreeMap::new(),
        }
    }
}

impl CleanseConfig {
    /// The metric names of every catalog in this config; `None` when any tenant accepts metrics
    /// the catalog does not know (then any name may come).
    pub fn metric_names(&self) -> Option<std::collections::BTreeSet<String>> {
        let accepts = |p: &Policy| p.unknown_metrics == UnknownMetrics::Accept;
        if accepts(&self.policy)
            || self
                .tenants
                .values()
                .any(|t| t.policy.as_ref().is_some_and(accepts))
        {
            return None;
        }
        let mut names: std::collections::BTreeSet<String> = self.metrics.keys().cloned().collect();
        for t in self.tenants.values() {
            names.extend(t.metrics.keys().cloned());
        }
        Some(names)
    }

    /// The checked catalog of the file alone; the error names the bad key.
    pub fn catalog(&self) -> Result<Catalog, CatalogError> {
        self.catalog_base().compile(&BTreeMap::new())
    }

    /// The file's catalog, for API entries to lay over.
    pub fn catalog_base(&self) -> CatalogBase {
        CatalogBase {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            tenants: self.tenants.clone(),
        }
    }
}

/// One output of the cleanse logic.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reading(Reading),
    DeadLetter(DeadLetter),
}

pub use crate::runtime::Position;

/// What the cleanse logic keeps per raw partition; rebuilt after a restart by re-reading the
/// dedup horizon of `raw` before the committed offset (see [`CleanseStage`]).
#[derive(Debug, Clone)]
pub struct PartitionState {
    pub dedup: DedupWindow,
    /// Values accepted per (tenant, device, metric, event time), for conflicts.
    pub readings: ReadingWindow,
    /// The latest event time accepted in this partition.
    pub watermark: Option<Micros>,
    /// Last (event time, value) per (tenant, device, metric) for metrics with a rate limit.
    last: HashMap<Key, (Micros, f64)>,
    processed: u64,
}

impl PartitionState {
    /// Approximate heap bytes of this partition's state.
    pub fn approx_bytes(&self) -> usize {
        self.dedup.approx_bytes()
            + self.readings.approx_bytes()
            + self.last.capacity() * (std::mem::size_of::<(Key, (Micros, f64))>() + 1)
    }
}

/// Counts of what the cleanse logic did (beyond its outputs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanseCounts {
    /// Messages dropped as duplicates (expected redundancy, not rejections).
    pub duplicates: u64,
    /// Readings flagged late.
    pub late: u64,
    /// Readings converted to their canonical unit.
    pub converted: u64,
    /// Readings dropped because the same value of the same (device, metric, event time) was
    /// accepted before, under another event id.
    pub duplicate_readings: u64,
    /// Readings with another value for an accepted (device, metric, event time): dead-lettered,
    /// dropped or kept and flagged, as the tenant's policy says.
    pub conflicts: u64,
}

/// The pure cleanse logic: validation against the catalog, unit normalisation, dedup, event time.
/// No I/O; the same raw records in the same order give the same outputs.
pub struct Cleanser {
    catalog: Arc<Catalog>,
    horizon: Micros,
    conflict_horizon: Micros,
    max_entries: usize,
    partitions: HashMap<i32, PartitionState>,
    pub counts: CleanseCounts,
}

struct Rejection<'a> {
    tenant: &'a str,
    device: &'a str,
    event_id: Option<&'a str>,
    rule: &'a str,
    field: Option<String>,
    reason: String,
    received_at: Micros,
    original: &'a [u8],
    measurement: Option<i32>,
}

const SECOND: f64 = 1_000_000.0;

impl Cleanser {
    pub fn new(config: &CleanseConfig) -> Result<Self, CatalogError> {
        Ok(Self {
            catalog: Arc::new(config.catalog()?),
            horizon: micros_of_secs(config.dedup_horizon_secs),
            conflict_horizon: micros_of_secs(config.conflict_horizon_secs),
            max_entries: config.dedup_max_entries,
            partitions: HashMap::new(),
            counts: CleanseCounts::default(),
        })
    }

    /// Applies a new catalog (e.g. a tenant's, changed through the API) to what comes next.
    pub fn set_catalog(&mut self, catalog: Catalog) {
        self.catalog = Arc::new(catalog);
    }

    /// A cleanser with the same rules and no state (to rebuild a partition's state apart).
    pub fn fresh(&self) -> Self {
        Self {
            catalog: self.catalog.clone(),
            horizon: self.horizon,
            conflict_horizon: self.conflict_horizon,
            max_entries: self.max_entries,
            partitions: HashMap::new(),
            counts: CleanseCounts::default(),
        }
    }

    /// Forgets a partition's state (after a revocation).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Takes a partition's state out (after a warm-up).
    pub fn take(&mut self, partition: i32) -> Option<PartitionState> {
        self.partitions.remove(&partition)
    }

    /// Installs a partition's state (after a warm-up).
    pub fn install(&mut self, partition: i32, state: PartitionState) {
        self.partitions.insert(partition, state);
    }

    /// The state of every partition held.
    pub fn partitions(&self) -> impl Iterator<Item = (&i32, &PartitionState)> {
        self.partitions.iter()
    }

    fn state(&mut self, partition: i32) -> &mut PartitionState {
        Self::state_in(
            &mut self.partitions,
            (self.horizon, self.conflict_horizon),
            self.max_entries,
            partition,
        )
    }

    fn state_in(
        partitions: &mut HashMap<i32, PartitionState>,
        (horizon, conflict_horizon): (Micros, Micros),
        max: usize,
        partition: i32,
    ) -> &mut PartitionState {
        partitions
            .entry(partition)
            .or_insert_with(|| PartitionState {
                dedup: DedupWindow::new(horizon, max),
                readings: ReadingWindow::new(conflict_horizon, max),
                watermark: None,
                last: HashMap::new(),
                processed: 0,
            })
    }

    /// Cleanses one raw record.
    pub fn process(&mut self, pos: Position<'_>, record: &[u8]) -> Vec<Output> {
        self.process_with(pos, record, None)
    }

    /// The dead letter of a raw record the stage gave up on after it failed
    /// [`containment::MAX_ATTEMPTS`] times (rule `stage_failure`, the error as the reason). It
    /// names the tenant, device and event id when the envelope can be read.
    pub fn stage_failure(pos: Position<'_>, record: &[u8], error: &str) -> Output {
        let envelope = containment::guard(|| decode::<RawEnvelope>(record).ok())
            .ok()
            .flatten();
        let mut out = Outputs {
            pos,
            out: Vec::with_capacity(1),
        };
        let reason = format!(
            "the {STAGE} stage failed on this record {} times in a row: {error}",
            containment::MAX_ATTEMPTS
        );
        out.reject(Rejection {
            tenant: envelope.as_ref().map_or("", |e| e.tenant.as_str()),
            device: envelope.as_ref().map_or("", |e| e.device.as_str()),
            event_id: envelope.as_ref().map(|e| e.event_id.as_str()),
            rule: STAGE_FAILURE,
            field: None,
            reason,
            received_at: envelope.as_ref().map_or(pos.written_at, |e| e.received_at),
            original: envelope.as_ref().map_or(record, |e| e.payload.as_slice()),
            measurement: None,
        });
        out.out
            .pop()
            .unwrap_or_else(|| unreachable!("one dead letter was pushed"))
    }

    /// Brings the state up to date with a record cleansed before (warm-up), given the measurements
    /// refused then ([`dedup::bit`]s, from its dead letters): the catalog may have changed since,
    /// and replays must see what was refused, not what would be now.
    pub fn recall(&mut self, pos: Position<'_>, record: &[u8], refused: u64) {
        self.process_with(pos, record, Some(refused));
    }

    fn process_with(
        &mut self,
        pos: Position<'_>,
        record: &[u8],
        refused: Option<u64>,
    ) -> Vec<Output> {
        let mut out = Outputs {
            pos,
            out: Vec::new(),
        };
        let envelope = match decode::<RawEnvelope>(record) {
            Ok(e) => e,
            Err(e) => {
                out.reject(Rejection {
                    tenant: "",
                    device: "",
                    event_id: None,
                    rule: "bad_envelope",
                    field: None,
                    reason: format!("not a raw envelope: {e}"),
                    received_at: pos.written_at,
                    original: record,
                    measurement: None,
                });
                return out.out;
            }
        };
        let e = &envelope;
        // Ingest stamps these; a record written by anything else may carry any number.
        let stamped = [Some(e.received_at), e.replayed_at];
        if let Some(t) = stamped
            .into_iter()
            .flatten()
            .find(|t| !(payload::EARLIEST_EVENT_TIME..=payload::LATEST_EVENT_TIME).contains(t))
        {
            out.reject(Rejection {
                tenant: &e.tenant,
                device: &e.device,
                event_id: Some(&e.event_id),
                rule: "bad_envelope",
                field: Some("received_at".into()),
                reason: format!(
                    "the envelope's receipt time {t} µs is outside the years 1970..9999"
                ),
                received_at: pos.written_at,
                original: &e.payload,
                measurement: None,
            });
            return out.out;
        }
        let key = dedup::key(&e.tenant, &e.device, &e.event_id);
        let clock = e.dedup_clock();
        let seen = self.state(pos.partition).dedup.get(key, clock);
        // A replay names the measurements it re-drives (those refused; all when it names none);
        // of those, only the ones still refused here go again. Anything else seen is a duplicate.
        let (indexes, requested) = match (e.source, &e.replay_measurements) {
            (Source::Replay, Some(ix)) => (
                Some(ix.as_slice()),
                ix.iter().fold(0, |mask, i| {
                    mask | dedup::bit(usize::try_from(*i).unwrap_or(usize::MAX))
                }),
            ),
            _ => (None, dedup::ALL),
        };
        let mask = match (seen, e.source) {
            (None, _) => requested,
            (Some(s), Source::Replay) => s.rejected & requested,
            (Some(_), _) => 0,
        };
        if mask == 0 {
            self.counts.duplicates += 1;
            tracing::debug!(device = %e.device, event_id = %e.event_id, "duplicate dropped");
            return out.out;
        }
        let refused_now = self.cleanse(&mut out, e, Redo { indexes, mask }, refused);
        // What was really refused (warm-up knows it from the dead letters written then).
        let refused_now = refused.unwrap_or(refused_now);
        let still_refused = seen.map_or(0, |s| s.rejected & !mask) | refused_now;
        self.state(pos.partition)
            .dedup
            .record(key, clock, still_refused);
        let horizon = self.horizon;
        let state = self.state(pos.partition);
        state.processed += 1;
        if state.processed.is_multiple_of(65_536) {
            // Rate-of-change memory older than the horizon (behind the watermark) is let go.
            let floor = state.watermark.unwrap_or(0).saturating_sub(horizon);
            state.last.retain(|_, (t, _)| *t >= floor);
        }
        out.out
    }

    /// Cleanses the measurements of `e` that `redo` selects; returns the refused ones' bits.
    /// `refused_then` (warm-up): what was refused when the record was first cleansed; those
    /// measurements leave the state alone now too (whatever today's catalog would say).
    fn cleanse(
        &mut self,
        out: &mut Outputs<'_>,
        e: &RawEnvelope,
        redo: Redo<'_>,
        refused_then: Option<u64>,
    ) -> u64 {
        let base = |rule: &'static str, field: Option<String>, reason: String| Rejection {
            measurement: None,
            tenant: &e.tenant,
            device: &e.device,
            event_id: Some(&e.event_id),
            rule,
            field,
            reason,
            received_at: e.received_at,
            original: &e.payload,
        };
        // The ingest stamped the tenant from the registry as it was when the event arrived: an
        // empty tenant means the device was unknown then. Replaying `raw` later gives the same
        // answer whatever the registry says by then.
        if e.tenant.is_empty() {
            let reason = if e.device.is_empty() {
                "the event names no device".to_owned()
            } else {
                format!("device `{}` is not in the registry", e.device)
            };
            out.reject(base("unknown_device", Some("device".into()), reason));
            return dedup::ALL;
        }
        let message = match parse_message(&e.content_type, &e.payload, &e.device, e.received_at) {
            Ok(m) => m,
            Err(err) => {
                out.reject(base(err.rule, err.field.clone(), err.to_string()));
                return dedup::ALL;
            }
        };
        if let Some(claimed) = message.device.as_deref().filter(|d| *d != e.device) {
            out.reject(base(
                "device_mismatch",
                Some("device".into()),
                format!(
                    "payload names device `{claimed}` but was sent by `{}`",
                    e.device
                ),
            ));
            return dedup::ALL;
        }
        let catalog = self.catalog.clone();
        let rules = catalog.rules(&e.tenant);
        let state = Self::state_in(
            &mut self.partitions,
            (self.horizon, self.conflict_horizon),
            self.max_entries,
            out.pos.partition,
        );
        // Lateness is judged against the watermark before this message, so the readings of one
        // batch do not make each other late.
        let watermark = state.watermark;
        let mut refused = 0u64;
        for (index, m) in message.measurements.into_iter().enumerate() {
            if !redo.selects(index) {
                continue;
            }
            if refused_then.is_some_and(|r| r & dedup::bit(index) != 0) {
                refused |= dedup::bit(index);
                continue;
            }
            let m = match m {
                Ok(m) => m,
                Err(err) => {
                    refused |= dedup::bit(index);
                    out.reject(Rejection {
                        measurement: Some(index as i32),
                        ..base(err.rule, err.field.clone(), err.to_string())
                    });
                    continue;
                }
            };
            match check(rules, state, watermark, e, m) {
                Ok(Checked::Duplicate) => self.counts.duplicate_readings += 1,
                Ok(Checked::Dropped) => self.counts.conflicts += 1,
                Ok(Checked::Reading(reading)) => {
                    if reading.conflict {
                        self.counts.conflicts += 1;
                    }
                    if reading.late {
                        self.counts.late += 1;
                    }
                    if reading.original_unit.is_some() {
                        self.counts.converted += 1;
                    }
                    state.watermark = Some(
                        state
                            .watermark
                            .map_or(reading.event_time, |w| w.max(reading.event_time)),
                    );
                    let source_index = out.next_index();
                    out.out.push(Output::Reading(Reading {
                        source_topic: out.pos.topic.to_owned(),
                        source_partition: out.pos.partition,
                        source_offset: out.pos.offset,
                        source_index,
                        measurement: Some(index as i32),
                        ..reading
                    }));
                }
                Err((rule, field, reason)) => {
                    if rule == CONFLICTING_READING {
                        self.counts.conflicts += 1;
                    }
                    refused |= dedup::bit(index);
                    out.reject(Rejection {
                        measurement: Some(index as i32),
                        ..base(rule, Some(field), reason)
                    });
                }
            }
        }
        refused
    }
}

/// Which measurements of a message to cleanse.
#[derive(Clone, Copy)]
struct Redo<'a> {
    /// The indexes a replay names (`None`: every index).
    indexes: Option<&'a [i32]>,
    /// [`dedup::bit`]s still to do.
    mask: u64,
}

impl Redo<'_> {
    fn selects(&self, index: usize) -> bool {
        self.mask & dedup::bit(index) != 0
            && self.indexes.is_none_or(|ix| ix.contains(&(index as i32)))
    }
}

/// A refused measurement: rule, field, reason.
type Refusal = (&'static str, String, String);

/// The rule of a reading refused for another value of an accepted (device, metric, event time).
pub const CONFLICTING_READING: &str = "conflicting_reading";

/// A time span for a reason: `1234 s`.
fn span(us: Micros) -> String {
    format!("{:.0} s", us as f64 / SECOND)
}

/// What a measurement that passed every rule becomes.
// Returned and moved into its output at once: a box would cost an allocation per reading.
#[allow(clippy::large_enum_variant)]
enum Checked {
    Reading(Reading),
    /// The same value for the same (device, metric, event time) was accepted before.
    Duplicate,
    /// Another value came first and the tenant keeps the first (`keep_first`).
    Dropped,
}

/// Checks one measurement against the tenant's rules and the partition's state; the reading it
/// becomes (without its position) or why it is refused. Every field it names is where the device
/// put it (`metrics.x.unit`, `[2].u`). Arithmetic on what a device sent saturates or is checked:
/// no value, time or config makes it panic or wrap.
fn check(
    rules: &Rules,
    state: &mut PartitionState,
    watermark: Option<Micros>,
    e: &RawEnvelope,
    m: Measurement,
) -> Result<Checked, Refusal> {
    let fields = &m.fields;
    let policy = &rules.policy;
    let (name, metric) = rules.resolve(&m.metric, m.name.as_deref());
    let name = name.to_owned();
    let (mut value, mut unit, mut original_value, mut original_unit) =
        (m.value, m.unit.clone(), None, None);
    match metric {
        None if policy.unknown_metrics == UnknownMetrics::Reject => {
            let mut known: Vec<&str> = rules.metrics.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err((
                "unknown_metric",
                fields.value.clone(),
                format!(
                    "metric `{}` is not in tenant `{}`'s catalog (known: {})",
                    m.metric,
                    e.tenant,
                    known.join(", ")
                ),
            ));
        }
        None => {}
        Some(metric) => {
            let Some(from) = metric.accepts(m.unit.as_deref()) else {
                return Err((
                    "unknown_unit",
                    fields.unit.clone(),
                    format!(
                        "unit `{}` is not accepted for `{name}` (accepted: {})",
                        m.unit.as_deref().unwrap_or_default(),
                        metric.accepted_names()
                    ),
                ));
            };
            if metric.spec.value_type == ValueType::Integer && m.value.fract() != 0.0 {
                return Err((
                    "type_mismatch",
                    fields.value.clone(),
                    format!("`{name}` is an integer metric; got {}", m.value),
                ));
            }
            value = from.convert(m.value, metric.unit).unwrap_or(m.value);
            if !value.is_finite() {
                return Err((
                    "non_finite_value",
                    fields.value.clone(),
                    format!(
                        "{} {} is not a finite number in {}",
                        payload::shown_f64(m.value),
                        from.name,
                        metric.unit.name
                    ),
                ));
            }
            if m.unit.as_deref().is_some_and(|u| u != metric.spec.unit) {
                original_value = Some(m.value);
                original_unit = m.unit.clone();
            }
            unit = Some(metric.spec.unit.clone());
            let shown = |v: f64| format!("{v} {}", metric.spec.unit);
            if let Some(min) = metric.spec.min.filter(|min| value < *min) {
                return Err((
                    "out_of_range",
                    fields.value.clone(),
                    format!(
                        "{} is below the minimum {} of `{name}`",
                        shown(value),
                        shown(min),
                    ),
                ));
            }
            if let Some(max) = metric.spec.max.filter(|max| value > *max) {
                return Err((
                    "out_of_range",
                    fields.value.clone(),
                    format!(
                        "{} is above the maximum {} of `{name}`",
                        shown(value),
                        shown(max),
                    ),
                ));
            }
        }
    }
    let ahead = m.time.saturating_sub(e.received_at);
    if ahead > micros_of_secs(policy.clock_skew_secs) {
        return Err((
            "future_event_time",
            fields.time.clone(),
            format!(
                "event time is {} after it was received (clock skew tolerance {} s)",
                span(ahead),
                policy.clock_skew_secs
            ),
        ));
    }
    let age = e.received_at.saturating_sub(m.time);
    if age > micros_of_secs(policy.max_age_secs) {
        return Err((
            "too_old",
            fields.time.clone(),
            format!(
                "event time is {} before it was received (maximum age {} s)",
                span(age),
                policy.max_age_secs
            ),
        ));
    }
    let behind = watermark.map_or(0, |w| w.saturating_sub(m.time));
    let late = behind > micros_of_secs(policy.allowed_lateness_secs);
    if late
        && policy.late_data == LateData::Reject
        && behind > micros_of_secs(policy.max_lateness_secs)
    {
        return Err((
            "late_event",
            fields.time.clone(),
            format!(
                "event time is {} behind the partition's watermark (at most {} s accepted)",
                span(behind),
                policy.max_lateness_secs
            ),
        ));
    }
    if let Some(max_rate) = metric.and_then(|x| x.spec.max_rate_per_sec) {
        let k = dedup::key(&e.tenant, &e.device, &name);
        match state.last.get(&k).copied() {
            Some((t0, v0)) if m.time > t0 => {
                // Both finite; the difference may overflow to ∞, which is above any limit.
                let elapsed = m.time.saturating_sub(t0) as f64 / SECOND;
                let rate = (value - v0).abs() / elapsed;
                if rate > max_rate {
                    return Err((
                        "rate_of_change",
                        fields.value.clone(),
                        format!(
                            "changed from {v0} to {value} in {elapsed} s: {rate:.3}/s, more than the {max_rate}/s allowed"
                        ),
                    ));
                }
                state.last.insert(k, (m.time, value));
            }
            Some(_) => {}
            None => {
                state.last.insert(k, (m.time, value));
            }
        }
    }
    // Only a time the device said can conflict: readings stamped with the receipt time (one
    // request's messages share it) are the device's distinct readings, whatever their values.
    let mut conflict = false;
    if m.device_time {
        let instant = ReadingWindow::key(&e.tenant, &e.device, &name, m.time);
        let clock = e.dedup_clock();
        match state.readings.get(instant, clock) {
            None => state.readings.record(instant, clock, value),
            Some(first) if first.to_bits() == value.to_bits() => return Ok(Checked::Duplicate),
            Some(first) => match policy.conflicting_readings {
                ConflictingReadings::Reject => {
                    return Err((
                        CONFLICTING_READING,
                        fields.value.clone(),
                        format!(
                            "`{name}` at {} already has the value {first}; {value} conflicts with it",
                            shown_time(m.time)
                        ),
                    ));
                }
                ConflictingReadings::KeepFirst => return Ok(Checked::Dropped),
                ConflictingReadings::KeepBoth => conflict = true,
            },
        }
    }
    Ok(Checked::Reading(Reading {
        tenant: e.tenant.clone(),
        device: e.device.clone(),
        metric: name,
        value,
        unit,
        original_value,
        original_unit,
        late,
        event_time: m.time,
        ingest_time: e.received_at,
        event_id: e.event_id.clone(),
        source_topic: String::new(),
        source_partition: 0,
        source_offset: 0,
        source_index: 0,
        measurement: None,
        name: m.name,
        conflict,
        device_group: e.device_group.clone(),
        device_model: e.device_model.clone(),
        site: e.site.clone(),
    }))
}

/// An event time for a reason: RFC 3339 (times are in range by then).
fn shown_time(t: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(t).map_or_else(|| format!("{t} µs"), |d| d.to_rfc3339())
}

/// The outputs of one raw record, numbered in order.
struct Outputs<'a> {
    pos: Position<'a>,
    out: Vec<Output>,
}

impl Outputs<'_> {
    fn next_index(&self) -> i32 {
        self.out.len() as i32
    }

    fn reject(&mut self, r: Rejection<'_>) {
        let source_index = self.next_index();
        self.out.push(Output::DeadLetter(DeadLetter {
            tenant: r.tenant.to_owned(),
            device: r.device.to_owned(),
            event_id: r.event_id.map(str::to_owned),
            stage: STAGE.into(),
            rule: r.rule.into(),
            field: r.field,
            reason: r.reason,
            source_topic: self.pos.topic.to_owned(),
            source_partition: self.pos.partition,
            source_offset: self.pos.offset,
            source_index,
            received_at: r.received_at,
            original: r.original.to_vec(),
            measurement: r.measurement,
        }));
    }
}

/// The cleanse stage: one member of the `<prefix>-cleanse` consumer group, on [`runtime::run`].
///
/// Its state (per raw partition: dedup window, watermark, rate-of-change memory, the conflict
/// window) is a bounded horizon of `raw`, so it is restored by cleansing that horizon again
/// ([`CleanseStage::warm_up`]) rather than from a changelog: nothing to write per batch, and a
/// catalog changed in between cannot rewrite history (what was refused is read back from the dead
/// letters written then).
pub struct CleanseStage {
    kafka: KafkaConfig,
    config: CleanseConfig,
    /// Tenants' catalogs set through the API (followed from the `catalog` topic by the caller).
    overrides: Arc<CatalogOverrides>,
    restarts: Restarts,
}

impl CleanseStage {
    pub fn new(
        kafka: KafkaConfig,
        config: CleanseConfig,
        overrides: Arc<CatalogOverrides>,
    ) -> Self {
        Self {
            kafka,
            config,
            overrides,
            restarts: Restarts::new(),
        }
    }

    /// Rebuilds a partition's state (dedup window, watermark, rate memory) by cleansing again,
    /// outputs discarded, the raw records before `until` within the horizon, with what was
    /// refused then taken from the dead letters written then (the catalog may have changed).
    fn warm_up(
        kafka: &KafkaConfig,
        partition: i32,
        deadletter_parts: i32,
        until: i64,
        mut cleanser: Cleanser,
        horizon: Micros,
    ) -> Result<Option<PartitionState>, StreamError> {
        let topics = &kafka.topics;
        let reader: BaseConsumer = kafka
            .reader(&format!("cleanse-warmup-{partition}"))
            .create()?;
        let since_ms = now_micros().saturating_sub(horizon) / 1000;
        let start = kafka::offset_at_time(&reader, &topics.raw, partition, since_ms)?;
        if start >= until {
            return Ok(None);
        }
        // Raw offset → refused measurements, from this partition's dead letters; records the stage
        // gave up on were never cleansed, so they are not recalled either.
        let mut refused: HashMap<i64, u64> = HashMap::new();
        let mut given_up: HashSet<i64> = HashSet::new();
        let q = partition % deadletter_parts;
        let from = kafka::offset_at_time(&reader, &topics.deadletter, q, since_ms)?;
        kafka::read_from(&reader, &topics.deadletter, &[(q, from)], |m| {
            if let Some(d) = m.payload().and_then(|p| decode::<DeadLetter>(p).ok())
                && d.stage == STAGE
                && d.source_topic == topics.raw
                && d.source_partition == partition
                && (start..until).contains(&d.source_offset)
            {
                if d.rule == STAGE_FAILURE {
                    given_up.insert(d.source_offset);
                }
                let bits = d.measurement.map_or(dedup::ALL, |i| {
                    dedup::bit(usize::try_from(i).unwrap_or(usize::MAX))
                });
                *refused.entry(d.source_offset).or_default() |= bits;
            }
        })?;
        let read = kafka::read_range(&reader, &topics.raw, partition, start, until, |m| {
            if given_up.contains(&m.offset()) {
                return;
            }
            let was_refused = refused.get(&m.offset()).copied().unwrap_or(0);
            let recalled = containment::guard(|| {
                cleanser.recall(
                    Position::of(m),
                    m.payload().unwrap_or_default(),
                    was_refused,
                )
            });
            if let Err(error) = recalled {
                tracing::error!(partition, offset = m.offset(), %error, "a raw record failed the warm-up; state goes on without it");
            }
        })?;
        let state = cleanser.take(partition);
        tracing::info!(
            partition,
            from = start,
            until,
            read,
            refused = refused.len(),
            entries = state.as_ref().map_or(0, |s| s.dedup.len()),
            "cleanse state rebuilt from raw and its dead letters"
        );
        Ok(state)
    }

    /// Runs until the task is cancelled or Kafka fails for good.
    pub async fn run(&self) -> Result<(), StreamError> {
        let topics = &self.kafka.topics;
        let run = CleanseRun {
            cleanser: Cleanser::new(&self.config)?,
            base: self.config.catalog_base(),
            overrides: self.overrides.clone(),
            generation: u64::MAX,
            horizon: micros_of_secs(self.config.dedup_horizon_secs),
            input: topics.raw.clone(),
            telemetry: Arc::from(topics.telemetry.as_str()),
            deadletter: Arc::from(topics.deadletter.as_str()),
            telemetry_parts: 1,
            deadletter_parts: 1,
            readings: 0,
            rejected: 0,
        };
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

/// One run of the cleanse stage (from a start or restart to its end): the [`Stage`] the runtime
/// drives.
struct CleanseRun {
    cleanser: Cleanser,
    base: CatalogBase,
    overrides: Arc<CatalogOverrides>,
    /// The catalog generation applied.
    generation: u64,
    horizon: Micros,
    input: String,
    telemetry: Arc<str>,
    deadletter: Arc<str>,
    telemetry_parts: i32,
    deadletter_parts: i32,
    readings: u64,
    rejected: u64,
}

impl CleanseRun {
    fn emits(&mut self, partition: i32, outputs: Vec<Output>) -> Result<Vec<Emit>, StreamError> {
        outputs
            .into_iter()
            .map(|output| match &output {
                Output::Reading(r) => {
                    self.readings += 1;
                    Emit::record(
                        &self.telemetry,
                        partition % self.telemetry_parts,
                        &r.device,
                        r,
                    )
                }
                Output::DeadLetter(d) => {
                    self.rejected += 1;
                    tracing::debug!(rule = %d.rule, reason = %d.reason, offset = d.source_offset, "dead letter");
                    Emit::record(
                        &self.deadletter,
                        runtime::dead_letter_partition(partition, self.deadletter_parts),
                        &d.device,
                        d,
                    )
                }
            })
            .collect()
    }
}

impl Stage for CleanseRun {
    const NAME: &'static str = STAGE;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.telemetry.to_string(), self.deadletter.to_string()]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.telemetry_parts = partitions[&*self.telemetry];
        self.deadletter_parts = partitions[&*self.deadletter];
        Ok(())
    }

    fn restore(
        &mut self,
        kafka: &KafkaConfig,
        partition: i32,
        offset: i64,
    ) -> Result<(), StreamError> {
        let fresh = self.cleanser.fresh();
        let state = CleanseStage::warm_up(
            kafka,
            partition,
            self.deadletter_parts,
            offset,
            fresh,
            self.horizon,
        )?;
        match state {
            Some(state) => self.cleanser.install(partition, state),
            None => self.cleanser.forget(partition),
        }
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.cleanser.forget(partition);
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let outputs = self.cleanser.process(at, record);
        self.emits(at.partition, outputs)
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let output = Cleanser::stage_failure(at, record, error);
        self.emits(at.partition, vec![output]).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the stage_failure dead letter could not be encoded");
            Vec::new()
        })
    }

    /// Applies the tenants' API catalogs when they changed.
    fn refresh(&mut self) {
        let generation = self.overrides.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        match self.base.compile(&self.overrides.snapshot()) {
            Ok(c) => {
                self.cleanser.set_catalog(c);
                tracing::info!(generation, "metric catalog applied");
            }
            // The API checks a catalog before recording it; keep the last good one.
            Err(e) => {
                tracing::error!(error = %e, "metric catalog refused; keeping the previous one")
            }
        }
    }

    fn summary(&self) -> String {
        let c = &self.cleanser.counts;
        format!(
            "readings={} rejected={} duplicates={} late={} converted={}",
            self.readings, self.rejected, c.duplicates, c.late, c.converted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_schemas::avro::encode;

    const T0: Micros = 1_763_780_000_000_000;
    const HOUR: Micros = 3_600_000_000;

    fn config() -> CleanseConfig {
        let mut c = CleanseConfig {
            dedup_horizon_secs: 3600,
            ..CleanseConfig::default()
        };
        c.metrics.insert(
            "flow".into(),
            MetricSpec {
                value_type: ValueType::Integer,
                unit: "count".into(),
                units: vec![],
                min: None,
                max: None,
                max_rate_per_sec: Some(10.0),
                names: vec![],
            },
        );
        c.tenants.insert(
            "strict".into(),
            TenantCatalog {
                policy: Some(Policy {
                    unknown_metrics: UnknownMetrics::Reject,
                    late_data: LateData::Reject,
                    max_lateness_secs: 3 * 3600,
                    ..Policy::default()
                }),
                metrics: BTreeMap::new(),
            },
        );
        c
    }

    fn cleanser() -> Cleanser {
        Cleanser::new(&config()).unwrap()
    }

    fn envelope(tenant: &str, device: &str, id: &str, payload: &str) -> RawEnvelope {
        RawEnvelope {
            event_id: id.into(),
            tenant: tenant.into(),
            device: device.into(),
            source: Source::Mqtt,
            received_at: T0,
            content_type: "application/json".into(),
            payload: payload.as_bytes().to_vec(),
            subject: None,
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    fn raw(device: &str, id: &str, payload: &str) -> Vec<u8> {
        let tenant = if device == "d1" { "acme" } else { "" };
        encode(&envelope(tenant, device, id, payload)).unwrap()
    }

    fn pos(offset: i64) -> Position<'static> {
        Position {
            topic: "raw",
            partition: 1,
            offset,
            written_at: T0,
        }
    }

    fn dead(out: &[Output]) -> Vec<&DeadLetter> {
        out.iter()
            .filter_map(|o| match o {
                Output::DeadLetter(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    fn readings(out: &[Output]) -> Vec<&Reading> {
        out.iter()
            .filter_map(|o| match o {
                Output::Reading(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The one dead letter of `out`: (rule, field).
    fn refused(out: &[Output]) -> (String, String) {
        let d = dead(out);
        assert_eq!(d.len(), 1, "{out:?}");
        (d[0].rule.clone(), d[0].field.clone().unwrap_or_default())
    }

    fn at(t: Micros) -> String {
        chrono::DateTime::from_timestamp_micros(t)
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn valid_message_becomes_readings_with_provenance() {
        let mut c = cleanser();
        let out = c.process(
            pos(7),
            &raw("d1", "m1", r#"{"id":"m1","metrics":{"t":1.5,"h":40}}"#),
        );
        assert_eq!(out.len(), 2);
        let Output::Reading(r) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!((r.tenant.as_str(), r.event_id.as_str()), ("acme", "m1"));
        assert_eq!(
            (r.source_partition, r.source_offset, r.source_index),
            (1, 7, 1)
        );
        assert!(!r.late && r.original_unit.is_none());
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let mut c = cleanser();
        let rec = raw("d1", "m1", r#"{"metrics":{"t":1}}"#);
        assert_eq!(c.process(pos(1), &rec).len(), 1);
        assert!(c.process(pos(2), &rec).is_empty());
        assert_eq!(c.counts.duplicates, 1);
        // A bad message sent twice is dead-lettered once.
        let bad = raw("d1", "m2", r#"{"metrics":{"temperature":"hot"}}"#);
        assert_eq!(c.process(pos(3), &bad).len(), 1);
        assert!(c.process(pos(4), &bad).is_empty());
    }

    #[test]
    fn payload_rejections_name_rule_field_and_keep_original() {
        let mut c = cleanser();
        let out = c.process(pos(3), &raw("d1", "m2", "{\"metrics\":"));
        let d = dead(&out);
        assert_eq!(d[0].rule, "malformed_json");
        assert_eq!(d[0].original, b"{\"metrics\":");
        assert_eq!((d[0].source_topic.as_str(), d[0].source_offset), ("raw", 3));

        let out = c.process(pos(4), &raw("ghost", "m3", r#"{"metrics":{"t":1}}"#));
        assert_eq!(refused(&out), ("unknown_device".into(), "device".into()));

        let out = c.process(
            pos(5),
            &raw(
                "d1",
                "m4",
                r#"{"metrics":{"t":"hot","u":"-Infinity","ok":2}}"#,
            ),
        );
        let d = dead(&out);
        assert_eq!(out.len(), 3);
        let rules: HashSet<_> = d
            .iter()
            .map(|d| (d.rule.as_str(), d.field.clone().unwrap_or_default()))
            .collect();
        assert!(rules.contains(&("non_numeric_value", "metrics.t".into())));
        assert!(rules.contains(&("non_finite_value", "metrics.u".into())));

        let out = c.process(pos(6), b"garbage");
        assert_eq!(dead(&out)[0].rule, "bad_envelope");
        assert_eq!(dead(&out)[0].original, b"garbage");

        let out = c.process(
            pos(8),
            &raw("d1", "m5", r#"{"device":"d2","metrics":{"t":1}}"#),
        );
        assert_eq!(dead(&out)[0].rule, "device_mismatch");
    }

    #[test]
    fn units_are_normalised_and_originals_kept() {
        let mut c = cleanser();
        let out = c.process(
            pos(1),
            &raw(
                "d1",
                "u1",
                r#"{"metrics":{"temperature":{"value":212,"unit":"degF"},"battery_voltage":{"value":3300,"unit":"mV"},"humidity":{"value":40,"unit":"%RH"},"pressure":{"value":1,"unit":"bar"}}}"#,
            ),
        );
        let r = readings(&out);
        let by: HashMap<&str, &Reading> = r.iter().map(|r| (r.metric.as_str(), *r)).collect();
        let t = by["temperature"];
        assert!((t.value - 100.0).abs() < 1e-9);
        assert_eq!(t.unit.as_deref(), Some("Cel"));
        assert_eq!(
            (t.original_value, t.original_unit.as_deref()),
            (Some(212.0), Some("degF"))
        );
        assert!((by["battery_voltage"].value - 3.3).abs() < 1e-9);
        assert!((by["pressure"].value - 100.0).abs() < 1e-9);
        assert_eq!(by["pressure"].unit.as_deref(), Some("kPa"));
        let h = by["humidity"];
        assert_eq!((h.value, h.original_unit.as_deref()), (40.0, None));
        assert_eq!(c.counts.converted, 3);
        // No unit: the canonical one.
        let out = c.process(
            pos(2),
            &raw("d1", "u2", r#"{"metrics":{"temperature":20}}"#),
        );
        assert_eq!(readings(&out)[0].unit.as_deref(), Some("Cel"));
        // A unit the metric does not accept.
        let out = c.process(
            pos(3),
            &raw(
                "d1",
                "u3",
                r#"{"metrics":{"temperature":{"value":1,"unit":"V"}}}"#,
            ),
        );
        assert_eq!(
            refused(&out),
            ("unknown_unit".into(), "metrics.temperature.unit".into())
        );
        assert!(
            dead(&out)[0].reason.contains("accepted: Cel, K, degF"),
            "{}",
            dead(&out)[0].reason
        );
    }

    #[test]
    fn range_type_and_rate_rules() {
        let mut c = cleanser();
        let out = c.process(pos(1), &raw("d1", "r1", r#"{"metrics":{"humidity":101}}"#));
        assert_eq!(
            refused(&out),
            ("out_of_range".into(), "metrics.humidity".into())
        );
        assert!(dead(&out)[0].reason.contains("above the maximum 100 %RH"));
        // The range is checked after conversion: -200 °F is -128.9 °C, below -90 °C.
        let out = c.process(
            pos(2),
            &raw(
                "d1",
                "r2",
                r#"{"metrics":{"temperature":{"value":-200,"unit":"degF"}}}"#,
            ),
        );
        assert_eq!(refused(&out).0, "out_of_range");
        let out = c.process(pos(3), &raw("d1", "r3", r#"{"metrics":{"flow":2.5}}"#));
        assert_eq!(
            refused(&out),
            ("type_mismatch".into(), "metrics.flow".into())
        );
        // flow may change by 10 per second.
        let flow = |id: &str, secs: i64, v: i64| {
            raw(
                "d1",
                id,
                &format!(
                    r#"{{"time":"{}","metrics":{{"flow":{v}}}}}"#,
                    at(T0 - 100_000_000 + secs * 1_000_000)
                ),
            )
        };
        assert_eq!(readings(&c.process(pos(4), &flow("f1", 0, 100))).len(), 1);
        assert_eq!(readings(&c.process(pos(5), &flow("f2", 10, 190))).len(), 1);
        let out = c.process(pos(6), &flow("f3", 11, 300));
        assert_eq!(
            refused(&out),
            ("rate_of_change".into(), "metrics.flow".into())
        );
        // The refused value does not become the reference.
        assert_eq!(readings(&c.process(pos(7), &flow("f4", 12, 200))).len(), 1);
    }

    #[test]
    fn event_time_rules_and_unknown_metric_policy() {
        let mut c = cleanser();
        let msg = |id: &str, t: Micros| {
            format!(
                r#"{{"id":"{id}","time":"{}","metrics":{{"temperature":20}}}}"#,
                at(t)
            )
        };
        let out = c.process(pos(1), &raw("d1", "e1", &msg("e1", T0 + 301_000_000)));
        assert_eq!(
            refused(&out),
            ("future_event_time".into(), "time".into()),
            "the message's own time is at fault"
        );
        assert_eq!(
            readings(&c.process(pos(2), &raw("d1", "e2", &msg("e2", T0 + 299_000_000)))).len(),
            1
        );
        let out = c.process(pos(3), &raw("d1", "e3", &msg("e3", T0 - 31 * 24 * HOUR)));
        assert_eq!(refused(&out).0, "too_old");
        // Unknown metrics: accepted as sent by default, refused where the tenant says so.
        let out = c.process(
            pos(4),
            &raw("d1", "e4", r#"{"metrics":{"rpm":{"value":5,"unit":"Hz"}}}"#),
        );
        assert_eq!(readings(&out)[0].unit.as_deref(), Some("Hz"));
        let strict = encode(&envelope("strict", "s1", "e5", r#"{"metrics":{"rpm":5}}"#)).unwrap();
        let out = c.process(pos(5), &strict);
        assert_eq!(
            refused(&out),
            ("unknown_metric".into(), "metrics.rpm".into())
        );
    }

    /// Spiio: hourly readings delivered in 5-hour batches are kept, in their own hours, flagged
    /// late; a tenant that refuses late data refuses them beyond its bound only.
    #[test]
    fn late_batches_are_flagged_or_refused_by_policy() {
        for (tenant, device) in [("acme", "d1"), ("strict", "s1")] {
            let mut c = cleanser();
            let now = encode(&envelope(
                tenant,
                device,
                "now",
                &format!(r#"{{"time":"{}","metrics":{{"temperature":20}}}}"#, at(T0)),
            ))
            .unwrap();
            assert!(!readings(&c.process(pos(1), &now))[0].late);
            let batch: Vec<String> = (1..=5)
                .map(|h| {
                    format!(
                        r#"{{"n":"temperature","u":"Cel","v":{h},"t":{}}}"#,
                        (T0 - h * HOUR) as f64 / 1e6
                    )
                })
                .collect();
            let mut e = envelope(tenant, device, "batch", &format!("[{}]", batch.join(",")));
            e.content_type = "application/senml+json".into();
            let out = c.process(pos(2), &encode(&e).unwrap());
            let r = readings(&out);
            assert!(r.iter().all(|r| r.late), "{out:?}");
            let hours: Vec<Micros> = r.iter().map(|r| (T0 - r.event_time) / HOUR).collect();
            if tenant == "acme" {
                assert_eq!(hours, [1, 2, 3, 4, 5]);
                assert_eq!(c.counts.late, 5);
            } else {
                // At most 3 h behind the watermark.
                assert_eq!(hours, [1, 2, 3]);
                let d = dead(&out);
                assert_eq!(d.len(), 2);
                assert!(d.iter().all(|d| d.rule == "late_event"));
            }
        }
    }

    #[test]
    fn replays_redrive_only_what_is_still_refused() {
        let mut c = cleanser();
        let mut e = envelope(
            "acme",
            "d1",
            "p1",
            r#"{"metrics":{"humidity":120,"temperature":21}}"#,
        );
        let original = encode(&e).unwrap();
        let first = c.process(pos(1), &original);
        assert_eq!((readings(&first).len(), dead(&first).len()), (1, 1));
        let refused = dead(&first)[0].measurement;
        assert_eq!(refused, Some(0), "humidity is read first");
        assert_eq!(readings(&first)[0].measurement, Some(1));

        // The catalog is fixed (humidity up to 150) and the stage restarted: its state is
        // rebuilt from raw under the new catalog, but with what was refused *then*.
        let mut fixed = config();
        fixed.metrics.get_mut("humidity").unwrap().max = Some(150.0);
        let mut warm = Cleanser::new(&fixed).unwrap();
        warm.recall(pos(1), &original, dedup::bit(0));
        let mut c2 = Cleanser::new(&fixed).unwrap();
        c2.install(1, warm.take(1).unwrap());

        e.source = Source::Replay;
        e.replayed_at = Some(T0 + HOUR / 2);
        e.replay_measurements = refused.map(|m| vec![m]);
        let replay = encode(&e).unwrap();
        let out = c2.process(pos(9), &replay);
        let r = readings(&out);
        assert_eq!(r.len(), 1, "only the refused measurement: {out:?}");
        assert_eq!(
            (r[0].metric.as_str(), r[0].value, r[0].measurement),
            ("humidity", 120.0, Some(0))
        );
        assert!(
            c2.process(pos(10), &replay).is_empty(),
            "a second replay adds nothing"
        );
        // A plain duplicate of the original adds nothing either.
        assert!(c2.process(pos(11), &original).is_empty());

        // Rebuilt from the start under the fixed catalog: the original is accepted whole and the
        // replay finds nothing left to do.
        let mut rebuilt = Cleanser::new(&fixed).unwrap();
        assert_eq!(readings(&rebuilt.process(pos(1), &original)).len(), 2);
        assert!(rebuilt.process(pos(9), &replay).is_empty());

        // Long after (the original forgotten), a replay still re-drives only what it names.
        let mut later = Cleanser::new(&fixed).unwrap();
        let out = later.process(pos(12), &replay);
        assert_eq!(
            readings(&out)
                .iter()
                .map(|r| r.metric.as_str())
                .collect::<Vec<_>>(),
            ["humidity"]
        );
    }

    #[test]
    fn state_rebuilt_by_reprocessing_gives_the_same_decisions() {
        let records: Vec<Vec<u8>> = (0..20)
            .map(|i| {
                raw(
                    "d1",
                    &format!("m{}", i % 7),
                    &format!(r#"{{"metrics":{{"flow":{}}}}}"#, i % 7),
                )
            })
            .collect();
        let mut live = cleanser();
        let mut first = Vec::new();
        for (i, r) in records.iter().enumerate() {
            first.push(live.process(pos(i as i64), r));
        }
        // A restart after record 10: state rebuilt from records 0..10, then 10.. processed.
        let mut warm = cleanser();
        for (i, r) in records[..10].iter().enumerate() {
            warm.process(pos(i as i64), r);
        }
        let mut restarted = cleanser();
        restarted.install(1, warm.take(1).unwrap());
        for (i, r) in records.iter().enumerate().skip(10) {
            assert_eq!(restarted.process(pos(i as i64), r), first[i], "record {i}");
        }
    }

    fn policy_tenant(name: &str, conflicts: ConflictingReadings) -> (String, TenantCatalog) {
        (
            name.to_owned(),
            TenantCatalog {
                policy: Some(Policy {
                    conflicting_readings: conflicts,
                    ..Policy::default()
                }),
                metrics: BTreeMap::new(),
            },
        )
    }

    /// A second, different value for one (device, metric, event time) is the tenant's decision;
    /// the same value again (another event id) is a duplicate reading.
    #[test]
    fn conflicting_readings_follow_the_tenant_policy() {
        let mut config = config();
        config.tenants.extend([
            policy_tenant("first", ConflictingReadings::KeepFirst),
            policy_tenant("both", ConflictingReadings::KeepBoth),
        ]);
        for tenant in ["acme", "first", "both"] {
            let mut c = Cleanser::new(&config).unwrap();
            let send = |c: &mut Cleanser, offset: i64, id: &str, v: f64| {
                let body = format!(
                    r#"{{"id":"{id}","time":"{}","metrics":{{"temperature":{v}}}}}"#,
                    at(T0 - 1_000)
                );
                c.process(
                    pos(offset),
                    &encode(&envelope(tenant, "d1", id, &body)).unwrap(),
                )
            };
            assert_eq!(readings(&send(&mut c, 1, "m1", 20.0)).len(), 1);
            assert!(
                send(&mut c, 2, "m2", 20.0).is_empty(),
                "same value: a duplicate"
            );
            assert_eq!(c.counts.duplicate_readings, 1);
            let out = send(&mut c, 3, "m3", 21.5);
            match tenant {
                "acme" => {
                    assert_eq!(
                        refused(&out),
                        (CONFLICTING_READING.into(), "metrics.temperature".into())
                    );
                    let reason = &dead(&out)[0].reason;
                    assert!(reason.contains("20") && reason.contains("21.5"), "{reason}");
                }
                "first" => assert!(out.is_empty(), "{out:?}"),
                _ => {
                    let r = readings(&out);
                    assert_eq!((r.len(), r[0].conflict, r[0].value), (1, true, 21.5));
                }
            }
            assert_eq!(c.counts.conflicts, 1, "{tenant}");
            // Another instant is no conflict.
            let body = format!(
                r#"{{"id":"m4","time":"{}","metrics":{{"temperature":22}}}}"#,
                at(T0 - 999)
            );
            let out = c.process(
                pos(4),
                &encode(&envelope(tenant, "d1", "m4", &body)).unwrap(),
            );
            assert!(!readings(&out)[0].conflict);
            // Messages without a time take the receipt time, which one request's messages share:
            // distinct readings of the device, never conflicts.
            for (offset, v) in [(5, 1.0), (6, 2.0)] {
                let body = format!(r#"{{"metrics":{{"humidity":{v}}}}}"#);
                let id = format!("u{offset}");
                let out = c.process(
                    pos(offset),
                    &encode(&envelope(tenant, "d1", &id, &body)).unwrap(),
                );
                assert_eq!(readings(&out).len(), 1, "{out:?}");
            }
        }
    }

    /// The shapes that once stopped the pipeline, and envelopes no ingest wrote.
    #[test]
    fn hostile_times_values_and_envelopes_are_dead_letters_naming_the_field() {
        let mut c = cleanser();
        let senml = |id: &str, body: &str| {
            let mut e = envelope("acme", "d1", id, body);
            e.content_type = "application/senml+json".into();
            encode(&e).unwrap()
        };
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (
                senml("s1", r#"[{"bn":"x:","bt":-1e300,"n":"temperature","v":1}]"#),
                "bad_time",
                "[0].bt",
            ),
            (
                senml("s2", r#"[{"n":"temperature","v":1,"t":1e300}]"#),
                "bad_time",
                "[0].t",
            ),
            (
                raw(
                    "d1",
                    "j1",
                    r#"{"time":-9223372036854775,"metrics":{"temperature":1}}"#,
                ),
                "bad_time",
                "time",
            ),
            (
                raw(
                    "d1",
                    "j2",
                    r#"{"metrics":{"energy":{"value":1e300,"unit":"MWh"}}}"#,
                ),
                "non_finite_value",
                "metrics.energy",
            ),
            (
                senml("s3", r#"[{"bv":1e308,"n":"temperature","v":1e308}]"#),
                "non_finite_value",
                "[0].v",
            ),
            (
                senml(
                    "s4",
                    r#"[{"n":"temperature","u":"degF","v":1},{"n":"temperature","u":"V","v":1,"t":1}]"#,
                ),
                "unknown_unit",
                "[1].u",
            ),
        ];
        for (i, (record, rule, field)) in cases.iter().enumerate() {
            let out = c.process(pos(i as i64), record);
            let d = dead(&out);
            assert_eq!(d.len(), 1, "{out:?}");
            assert_eq!(
                (d[0].rule.as_str(), d[0].field.as_deref()),
                (*rule, Some(*field))
            );
        }
        for t in [i64::MIN, -1, i64::MAX] {
            let mut e = envelope("acme", "d1", "e", r#"{"metrics":{"temperature":1}}"#);
            e.received_at = t;
            let out = c.process(pos(99), &encode(&e).unwrap());
            assert_eq!(
                refused(&out),
                ("bad_envelope".into(), "received_at".into()),
                "{t}"
            );
        }
        // Policies at their extremes saturate instead of overflowing.
        let mut extreme = config();
        extreme.policy.clock_skew_secs = u64::MAX;
        extreme.policy.max_age_secs = u64::MAX;
        extreme.policy.allowed_lateness_secs = u64::MAX;
        extreme.dedup_horizon_secs = u64::MAX;
        let mut c = Cleanser::new(&extreme).unwrap();
        let out = c.process(
            pos(1),
            &raw("d1", "old", r#"{"time":0,"metrics":{"temperature":1}}"#),
        );
        assert_eq!(readings(&out).len(), 1, "{out:?}");
    }

    #[test]
    fn senml_names_become_distinct_metrics_and_the_catalog_aliases_them() {
        let mut config = config();
        config
            .metrics
            .get_mut("temperature")
            .unwrap()
            .names
            .push("*:temp".into());
        let mut c = Cleanser::new(&config).unwrap();
        let mut e = envelope(
            "acme",
            "gw",
            "g1",
            r#"[{"bn":"gw:sensor1:","n":"temp","u":"degF","v":212},{"bn":"gw:sensor2:","n":"rh","v":40}]"#,
        );
        e.content_type = "application/senml+json".into();
        let out = c.process(pos(1), &encode(&e).unwrap());
        let r = readings(&out);
        let got: Vec<(&str, Option<&str>, f64)> = r
            .iter()
            .map(|r| {
                (
                    r.metric.as_str(),
                    r.name.as_deref(),
                    (r.value * 1e6).round() / 1e6,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("temperature", Some("gw:sensor1:temp"), 100.0),
                ("sensor2:rh", Some("gw:sensor2:rh"), 40.0)
            ]
        );
    }

    #[test]
    fn stage_failures_name_the_record() {
        let record = raw("d1", "p1", r#"{"metrics":{"t":1}}"#);
        let Output::DeadLetter(d) = Cleanser::stage_failure(pos(5), &record, "boom") else {
            panic!("a dead letter")
        };
        assert_eq!(
            (
                d.rule.as_str(),
                d.tenant.as_str(),
                d.event_id.as_deref(),
                d.source_offset
            ),
            (STAGE_FAILURE, "acme", Some("p1"), 5)
        );
        assert!(
            d.reason.contains("boom") && d.reason.contains("3 times"),
            "{}",
            d.reason
        );
        assert_eq!(d.original, br#"{"metrics":{"t":1}}"#);
        let Output::DeadLetter(d) = Cleanser::stage_failure(pos(6), b"garbage", "boom") else {
            panic!("a dead letter")
        };
        assert_eq!(
            (d.tenant.as_str(), d.original.as_slice()),
            ("", &b"garbage"[..])
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn number() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "0",
                    "-0.0",
                    "5e-324",
                    "1e308",
                    "-1e308",
                    "1.7976931348623157e308",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "268435456",
                    "1e300",
                    "\"NaN\"",
                    "\"7\"",
                    "null",
                    "[]",
                ])
                .prop_map(str::to_owned),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(|f| format!("{f:?}")),
                any::<i64>().prop_map(|i| i.to_string()),
            ]
        }

        fn unit() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "Cel", "degF", "K", "V", "mV", "MWh", "J", "kPa", "psi", "x",
            ])
            .prop_map(|u| format!("{u:?}"))
        }

        fn payload() -> impl Strategy<Value = (String, &'static str)> {
            let metric =
                prop::sample::select(vec!["temperature", "energy", "flow", "humidity", "rpm"]);
            prop_oneof![
                (metric.clone(), number(), unit(), number()).prop_map(|(m, v, u, t)| (
                    format!(r#"{{"time":{t},"metrics":{{"{m}":{{"value":{v},"unit":{u}}}}}}}"#),
                    "application/json"
                )),
                (metric, number(), unit(), number(), number(), number()).prop_map(
                    |(m, v, u, bt, t, bv)| (
                        format!(r#"[{{"bn":"d1:","bt":{bt},"bv":{bv},"n":"{m}","u":{u},"v":{v},"t":{t}}},{{"n":"{m}","s":{v}}}]"#),
                        "application/senml+json"
                    )
                ),
            ]
        }

        fn received_at() -> impl Strategy<Value = Micros> {
            prop_oneof![
                Just(T0),
                Just(i64::MIN),
                Just(i64::MAX),
                Just(0),
                any::<i64>()
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1500))]

            /// Whatever a device sends and whatever an envelope says: no panic, readings finite,
            /// refused measurements name their field.
            #[test]
            fn cleanse_never_panics_and_names_fields(
                messages in prop::collection::vec((payload(), received_at()), 1..6),
            ) {
                let mut c = cleanser();
                for (i, ((body, content_type), at)) in messages.into_iter().enumerate() {
                    let mut e = envelope("acme", "d1", &format!("p{i}"), &body);
                    e.content_type = content_type.into();
                    e.received_at = at;
                    for o in c.process(pos(i as i64), &encode(&e).unwrap()) {
                        match o {
                            Output::Reading(r) => prop_assert!(r.value.is_finite(), "{r:?}"),
                            Output::DeadLetter(d) => {
                                prop_assert!(!d.rule.is_empty() && !d.reason.is_empty());
                                if d.measurement.is_some() {
                                    prop_assert!(d.field.is_some(), "{d:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
