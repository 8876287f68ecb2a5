//! Incidents: anomalies correlated by the tenants' incident rules, `anomalies` → `incidents`.
//!
//! Two stages, the way Kafka Streams repartitions:
//! - [`IncidentRouting`] (group `<prefix>-incident-routing`, stateless) reads `anomalies` and
//!   writes each anomaly record once per rule it falls under to `incident-inputs`, keyed by
//!   (tenant, rule, correlation key) and partitioned by a hash of that key, so every anomaly of
//!   one site level, group or device meets in one partition whatever device partition it came
//!   from. People's actions (acknowledge, snooze, resolve through the API) are written to the same
//!   topic under the incident's key, so the incident stage is the single writer of each incident.
//! - [`IncidentRun`] (group `<prefix>-incidents`) folds `incident-inputs` into one
//!   [`Correlation`] per key, kept in a [`KeyedState`] restored from the compacted
//!   `incident-state` changelog, and writes lifecycle records to `incidents` (partition of the
//!   input partition, key = incident id, so an incident's records are in order).
//!
//! Correlation is in event time. Anomalies correlate when their start times lie within the
//! rule's window of each other: an incident opens when the anomalies of at least `min_devices`
//! distinct devices (or `min_metrics` metrics of one device) start within one window, and an
//! anomaly starting within the window of its members' span joins it. Arrival order does not
//! matter within the window, so a late batch (hours old) correlates with the anomalies of its own
//! time. An incident resolves when every member has resolved and the rule's quiet period has
//! passed on the partition's clock ([`PartitionClocks`]); a member joining afterwards (or, after a
//! manual resolve, a member firing again) reopens it with the same id. The id is XXH3-128 of
//! (tenant, rule, key, the earliest member's start when it opened).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tributary_schemas::avro::{
    self, Anomaly, AnomalyState, Incident, IncidentAction, IncidentActionKind, IncidentChange,
    IncidentInput, IncidentStatus,
};
use tributary_schemas::incidents::{
    Correlate, IncidentRule, IncidentRuleBase, IncidentRuleError, IncidentRuleOverrides,
    IncidentRuleSpec, IncidentRules, TenantIncidentRules, severity_of,
};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::{Micros, micros_of_secs};

use crate::StreamError;
use crate::clock::PartitionClocks;
use crate::runtime::{self, Batching, Emit, KeyedState, Position, Restarts, Stage};

/// The incident stage's name (consumer group suffix, `stage` of its dead letters).
pub const STAGE: &str = "incidents";
/// The routing stage's name.
pub const ROUTING: &str = "incident-routing";
/// Members, devices listed on a record at most (the counts count all).
pub const MAX_LISTED: usize = 1000;
/// Anomalies waiting for company per key at most (the oldest resolved ones go first).
const MAX_PENDING: usize = 10_000;

/// `[incidents]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentConfig {
    /// Rules of every tenant, by name.
    pub rules: BTreeMap<String, IncidentRuleSpec>,
    /// A tenant's own rules (a name there replaces the global one for that tenant).
    pub tenants: BTreeMap<String, TenantIncidentRules>,
    /// How far behind the newest anomaly's event time the clock stands.
    pub clock_grace_secs: u64,
    /// How often (clock time) quiet periods are checked.
    pub sweep_secs: u64,
    pub batch_size: usize,
    pub batch_ms: u64,
}

impl Default for IncidentConfig {
    fn default() -> Self {
        Self {
            rules: BTreeMap::new(),
            tenants: BTreeMap::new(),
            clock_grace_secs: 30,
            sweep_secs: 5,
            batch_size: 2000,
            batch_ms: 100,
        }
    }
}

impl IncidentConfig {
    /// The checked rules of the config file alone.
    pub fn compile(&self) -> Result<IncidentRules, IncidentRuleError> {
        self.base().compile(&BTreeMap::new())
    }

    /// The config file's rules, under which the API's are laid.
    pub fn base(&self) -> IncidentRuleBase {
        IncidentRuleBase {
            global: self.rules.clone(),
            tenants: self.tenants.clone(),
        }
    }
}

/// The rules in effect for a stage: the config file's under the tenants' entries set through the
/// admin API (followed from `incident-rules`), rebuilt between batches when those change.
#[derive(Clone)]
pub struct LiveRules {
    base: IncidentRuleBase,
    overrides: Arc<IncidentRuleOverrides>,
    generation: u64,
    current: Arc<IncidentRules>,
}

impl LiveRules {
    /// The rules now; waits (outside any consumer group) while no tenant has a rule.
    pub async fn first(
        base: IncidentRuleBase,
        overrides: Arc<IncidentRuleOverrides>,
        stage: &str,
    ) -> Result<Self, StreamError> {
        let mut logged = false;
        loop {
            let generation = overrides.generation();
            let rules = base
                .compile(&overrides.snapshot())
                .map_err(|e| StreamError::State(e.to_string()))?;
            if !rules.is_empty() {
                return Ok(Self {
                    base,
                    overrides,
                    generation,
                    current: Arc::new(rules),
                });
            }
            if !logged {
                tracing::info!(
                    stage,
                    "no incident rules yet (config file or admin API): the stage waits for one"
                );
                logged = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub fn current(&self) -> Arc<IncidentRules> {
        self.current.clone()
    }

    /// The new rules when the API's entries changed since the last call.
    pub fn changed(&mut self) -> Option<Arc<IncidentRules>> {
        let generation = self.overrides.generation();
        if generation == self.generation {
            return None;
        }
        self.generation = generation;
        match self.base.compile(&self.overrides.snapshot()) {
            Ok(rules) => {
                tracing::info!("incident rules changed; applied from the next batch");
                self.current = Arc::new(rules);
                Some(self.current.clone())
            }
            // Checked before it was recorded; only a config file changed since can refuse it.
            Err(e) => {
                tracing::error!(error = %e, "changed incident rules refused; the previous ones stay");
                None
            }
        }
    }
}

/// The state key of (tenant, rule, correlation key); the routing record's Kafka key too.
pub fn state_key(tenant: &str, rule: &str, key: &str) -> String {
    format!("{tenant}\u{1f}{rule}\u{1f}{key}")
}

fn parse_key(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.splitn(3, '\u{1f}');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// The `incident-inputs` partition of a state key.
pub fn input_partition(state_key: &str, partitions: i32) -> i32 {
    let n = partitions.max(1) as u64;
    (xxhash_rust::xxh3::xxh3_64(state_key.as_bytes()) % n) as i32
}

/// An incident's id: a function of what opened it.
pub fn incident_id(tenant: &str, rule: &str, key: &str, first_start: Micros) -> String {
    let mut bytes = Vec::with_capacity(tenant.len() + rule.len() + key.len() + 11);
    for part in [tenant, rule, key] {
        bytes.extend_from_slice(part.as_bytes());
        bytes.push(0);
    }
    bytes.extend_from_slice(&first_start.to_be_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// One member anomaly as the correlation keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// What distinguishes members for the rule: the device (site, group), the metric (device).
    pub member: String,
    pub device: String,
    pub metric: String,
    pub detector: String,
    pub severity: String,
    pub site: Vec<String>,
    pub group: Option<String>,
    pub start: Micros,
    pub end: Option<Micros>,
    /// The latest event time of its records.
    pub last: Micros,
    /// The latest `seq` applied (a record seen twice is applied once).
    pub seq: i32,
    /// The clock time it arrived (a pending anomaly is kept a window of clock time).
    pub seen: Micros,
}

impl Member {
    fn of(rule: &IncidentRule, a: &Anomaly, now: Micros) -> Self {
        Self {
            member: rule.member_of(a).to_owned(),
            device: a.device.clone(),
            metric: a.metric.clone(),
            detector: a.detector.clone(),
            severity: a.severity.clone(),
            site: a.site.clone(),
            group: a.device_group.clone(),
            start: a.start_time,
            end: None,
            last: a.event_time,
            seq: -1,
            seen: now,
        }
    }

    /// Applies a later record of the anomaly; whether it was new.
    fn apply(&mut self, a: &Anomaly) -> bool {
        if a.seq <= self.seq {
            return false;
        }
        self.seq = a.seq;
        self.last = self.last.max(a.event_time);
        if severity_of(&a.severity) > severity_of(&self.severity) {
            self.severity = a.severity.clone();
        }
        if a.state == AnomalyState::Resolved {
            self.end = Some(a.end_time.unwrap_or(a.event_time));
        }
        true
    }

    /// The end of its activity: when it ended, or its latest record while open.
    fn active_until(&self) -> Micros {
        self.end.unwrap_or(self.last).max(self.start)
    }
}

/// An incident as its key's correlation tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tracked {
    pub id: String,
    /// The seq of its latest record.
    pub seq: i32,
    pub status: IncidentStatus,
    /// Members by anomaly id, and the order they joined.
    pub members: BTreeMap<String, Member>,
    pub order: Vec<String>,
    pub records: i64,
    /// Clock time of its resolve (kept a window longer for late members).
    pub resolved_at: Option<Micros>,
    pub manual: bool,
    pub snoozed_until: Option<Micros>,
}

impl Tracked {
    fn first_time(&self) -> Micros {
        self.members.values().map(|m| m.start).min().unwrap_or(0)
    }

    fn last_time(&self) -> Micros {
        self.members.values().map(|m| m.last).max().unwrap_or(0)
    }

    fn active_until(&self) -> Micros {
        self.members
            .values()
            .map(Member::active_until)
            .max()
            .unwrap_or(0)
    }

    fn all_ended(&self) -> bool {
        self.members.values().all(|m| m.end.is_some())
    }

    /// Whether an anomaly starting at `start` belongs to this incident.
    fn takes(&self, start: Micros, window: Micros) -> bool {
        start >= self.first_time().saturating_sub(window)
            && start <= self.active_until().saturating_add(window)
    }

    fn join(&mut self, id: &str, member: Member) {
        if !self.members.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.members.insert(id.to_owned(), member);
    }
}

/// The state of one (tenant, rule, correlation key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Correlation {
    /// Anomalies not in an incident (yet), by id.
    pub pending: BTreeMap<String, Member>,
    /// The key's incident, open or resolved within a window of clock time.
    pub incident: Option<Tracked>,
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct Swept {
    pub changes: Vec<Change>,
    /// The state changed (its changelog record is due).
    pub changed: bool,
    /// Nothing left to remember: the key's state can go.
    pub gone: bool,
}

/// What happened to an incident, for its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub change: IncidentChange,
    pub event_time: Micros,
    pub action: Option<IncidentAction>,
}

impl Correlation {
    /// One anomaly record under `rule`, the clock standing at `now`: the incident's changes.
    pub fn anomaly(
        &mut self,
        rule: &IncidentRule,
        key: (&str, &str),
        a: &Anomaly,
        now: Micros,
    ) -> Vec<Change> {
        let (tenant, corr_key) = key;
        let at = |change| Change {
            change,
            event_time: a.event_time,
            action: None,
        };
        // A member's later record.
        if let Some(t) = self.incident.as_mut()
            && let Some(m) = t.members.get_mut(&a.anomaly_id)
        {
            if !m.apply(a) {
                return Vec::new();
            }
            t.records += 1;
            let fired_again = a.state != AnomalyState::Resolved;
            return match t.status {
                IncidentStatus::Resolved if t.manual && fired_again => {
                    reopen(t);
                    vec![at(IncidentChange::Reopen)]
                }
                IncidentStatus::Resolved => Vec::new(),
                _ if a.state == AnomalyState::Resolved => vec![at(IncidentChange::Update)],
                // Evidence grew: counted, not a record of its own.
                _ => Vec::new(),
            };
        }
        // A pending anomaly's later record.
        if let Some(m) = self.pending.get_mut(&a.anomaly_id) {
            if !m.apply(a) {
                return Vec::new();
            }
        } else {
            let mut m = Member::of(rule, a, now);
            m.apply(a);
            // Joins the incident when its start lies within the incident's span.
            if let Some(t) = self.incident.as_mut()
                && t.takes(m.start, rule.window)
            {
                t.join(&a.anomaly_id, m);
                t.records += 1;
                if t.status == IncidentStatus::Resolved {
                    reopen(t);
                    return vec![at(IncidentChange::Reopen)];
                }
                return vec![at(IncidentChange::Update)];
            }
            self.pending.insert(a.anomaly_id.clone(), m);
            self.trim_pending();
        }
        // Enough company within one window?
        let Some(members) = self.window_with(rule) else {
            return Vec::new();
        };
        let mut t = Tracked {
            id: String::new(),
            seq: -1,
            status: IncidentStatus::Open,
            members: BTreeMap::new(),
            order: Vec::new(),
            records: 0,
            resolved_at: None,
            manual: false,
            snoozed_until: None,
        };
        let mut chosen: Vec<(String, Member)> = members
            .into_iter()
            .filter_map(|id| self.pending.remove(&id).map(|m| (id, m)))
            .collect();
        chosen.sort_by(|a, b| (a.1.start, &a.0).cmp(&(b.1.start, &b.0)));
        for (id, m) in chosen {
            t.records += 1 + i64::from(m.seq.max(0));
            t.join(&id, m);
        }
        // Pending anomalies within the new incident's span join it at once.
        let near: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, m)| t.takes(m.start, rule.window))
            .map(|(id, _)| id.clone())
            .collect();
        for id in near {
            if let Some(m) = self.pending.remove(&id) {
                t.records += 1 + i64::from(m.seq.max(0));
                t.join(&id, m);
            }
        }
        t.id = incident_id(tenant, &rule.name, corr_key, t.first_time());
        self.incident = Some(t);
        vec![at(IncidentChange::Open)]
    }

    /// The pending anomalies of the earliest window holding `min_members` distinct members.
    fn window_with(&self, rule: &IncidentRule) -> Option<Vec<String>> {
        if self.pending.len() < rule.min_members {
            return None;
        }
        let mut by_start: Vec<(&String, &Member)> = self.pending.iter().collect();
        by_start.sort_by(|a, b| (a.1.start, a.0).cmp(&(b.1.start, b.0)));
        for i in 0..by_start.len() {
            let from = by_start[i].1.start;
            let mut distinct = BTreeSet::new();
            let mut ids = Vec::new();
            for (id, m) in &by_start[i..] {
                if m.start.saturating_sub(from) > rule.window {
                    break;
                }
                distinct.insert(m.member.as_str());
                ids.push((*id).clone());
            }
            if distinct.len() >= rule.min_members {
                return Some(ids);
            }
        }
        None
    }

    fn trim_pending(&mut self) {
        while self.pending.len() > MAX_PENDING {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(id, m)| (m.end.is_none(), m.seen, (*id).clone()))
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.pending.remove(&id),
                None => break,
            };
        }
    }

    /// A person's action.
    pub fn action(
        &mut self,
        action: &IncidentAction,
        now: Micros,
    ) -> Result<Vec<Change>, &'static str> {
        let Some(t) = self
            .incident
            .as_mut()
            .filter(|t| t.id == action.incident_id)
        else {
            return Err("no such incident under its key (expired or never opened)");
        };
        let change = match action.action {
            IncidentActionKind::Acknowledge => {
                if t.status == IncidentStatus::Resolved {
                    return Err("resolved incidents cannot be acknowledged");
                }
                t.status = IncidentStatus::Acknowledged;
                t.snoozed_until = None;
                IncidentChange::Acknowledge
            }
            IncidentActionKind::Snooze => {
                if t.status == IncidentStatus::Resolved {
                    return Err("resolved incidents cannot be snoozed");
                }
                t.status = IncidentStatus::Snoozed;
                t.snoozed_until = action.until;
                IncidentChange::Snooze
            }
            IncidentActionKind::Resolve => {
                if t.status == IncidentStatus::Resolved {
                    return Err("already resolved");
                }
                t.status = IncidentStatus::Resolved;
                t.manual = true;
                t.resolved_at = Some(now);
                t.snoozed_until = None;
                IncidentChange::Resolve
            }
        };
        Ok(vec![Change {
            change,
            event_time: now.max(t.last_time()),
            action: Some(action.clone()),
        }])
    }

    /// The clock stands at `now`: an incident whose members all ended `quiet` ago resolves.
    pub fn sweep(&mut self, rule: &IncidentRule, now: Micros) -> Swept {
        let mut out = Vec::new();
        let mut changed = false;
        if let Some(t) = self.incident.as_mut() {
            if t.status != IncidentStatus::Resolved && t.all_ended() {
                let ended = t.active_until();
                if now >= ended.saturating_add(rule.quiet) {
                    t.status = IncidentStatus::Resolved;
                    t.manual = false;
                    t.resolved_at = Some(now);
                    t.snoozed_until = None;
                    out.push(Change {
                        change: IncidentChange::Resolve,
                        event_time: ended.saturating_add(rule.quiet),
                        action: None,
                    });
                }
            }
            // A resolved incident is remembered a window (plus the quiet period) of clock time
            // for late members.
            if let Some(at) = t.resolved_at
                && t.status == IncidentStatus::Resolved
                && now > at.saturating_add(rule.window).saturating_add(rule.quiet)
            {
                self.incident = None;
                changed = true;
            }
        }
        // Pending anomalies that ended are kept a window of clock time after they arrived.
        let before = self.pending.len();
        self.pending
            .retain(|_, m| m.end.is_none() || now <= m.seen.saturating_add(rule.window));
        Swept {
            changed: changed || !out.is_empty() || self.pending.len() != before,
            gone: self.incident.is_none() && self.pending.is_empty(),
            changes: out,
        }
    }

    /// The newest event time the state holds (where a restored partition's clock starts).
    pub fn newest(&self) -> Option<Micros> {
        let incident = self.incident.iter().flat_map(|t| t.members.values());
        incident.chain(self.pending.values()).map(|m| m.last).max()
    }
}

fn reopen(t: &mut Tracked) {
    t.status = IncidentStatus::Open;
    t.manual = false;
    t.resolved_at = None;
}

impl Tracked {
    fn severity(&self) -> &str {
        self.members
            .values()
            .map(|m| m.severity.as_str())
            .max_by_key(|s| severity_of(s))
            .unwrap_or("info")
    }

    /// The record of `change` (its seq taken).
    pub fn record(
        &mut self,
        who: (&str, &IncidentRule, &str),
        change: &Change,
        source: (&str, i32, i64),
    ) -> Incident {
        let (tenant, rule, key) = who;
        self.seq += 1;
        let members: Vec<&Member> = self
            .order
            .iter()
            .filter_map(|id| self.members.get(id))
            .collect();
        let devices: BTreeSet<&str> = members.iter().map(|m| m.device.as_str()).collect();
        let metrics: BTreeSet<&str> = members.iter().map(|m| m.metric.as_str()).collect();
        let detectors: BTreeSet<&str> = members.iter().map(|m| m.detector.as_str()).collect();
        let site = common_prefix(members.iter().map(|m| m.site.as_slice()));
        let group = members
            .first()
            .and_then(|m| m.group.clone())
            .filter(|g| members.iter().all(|m| m.group.as_deref() == Some(g)));
        let open = members.iter().filter(|m| m.end.is_none()).count();
        let scope = match rule.correlate {
            Correlate::Site => key.split('\u{1f}').collect::<Vec<_>>().join(" / "),
            Correlate::Group | Correlate::Device => key.to_owned(),
            Correlate::Anomaly => members
                .first()
                .map(|m| format!("{} {} ({})", m.device, m.metric, m.detector))
                .unwrap_or_default(),
        };
        let first = self.first_time();
        let end = (self.status == IncidentStatus::Resolved).then(|| {
            if self.manual {
                change.event_time
            } else {
                self.active_until()
            }
        });
        let message = message(
            rule,
            &scope,
            members.len(),
            devices.len(),
            &metrics,
            open,
            first,
        );
        let action = change.action.as_ref();
        Incident {
            incident_id: self.id.clone(),
            seq: self.seq,
            change: change.change,
            status: self.status,
            tenant: tenant.to_owned(),
            rule: rule.name.clone(),
            correlate: rule.correlate.as_str().to_owned(),
            scope,
            site,
            device_group: group,
            severity: self.severity().to_owned(),
            first_time: first,
            last_time: self.last_time(),
            end_time: end,
            event_time: change.event_time,
            members: self.order.iter().take(MAX_LISTED).cloned().collect(),
            devices: devices
                .iter()
                .take(MAX_LISTED)
                .map(|d| (*d).to_owned())
                .collect(),
            metrics: metrics
                .iter()
                .take(MAX_LISTED)
                .map(|m| (*m).to_owned())
                .collect(),
            detectors: detectors.iter().map(|d| (*d).to_owned()).collect(),
            correlation_key: key.to_owned(),
            member_count: members.len() as i32,
            open_members: open as i32,
            device_count: devices.len() as i32,
            anomaly_records: self.records,
            actor: action.map(|a| a.actor.clone()),
            acted_at: action.map(|a| a.at),
            comment: action.and_then(|a| a.comment.clone()),
            snoozed_until: self.snoozed_until,
            message,
            source_topic: source.0.to_owned(),
            source_partition: source.1,
            source_offset: source.2,
        }
    }
}

fn common_prefix<'a>(mut sites: impl Iterator<Item = &'a [String]>) -> Vec<String> {
    let Some(first) = sites.next() else {
        return Vec::new();
    };
    let mut len = first.len();
    for s in sites {
        len = len.min(first.iter().zip(s).take_while(|(a, b)| a == b).count());
    }
    first[..len].to_vec()
}

fn message(
    rule: &IncidentRule,
    scope: &str,
    members: usize,
    devices: usize,
    metrics: &BTreeSet<&str>,
    open: usize,
    first: Micros,
) -> String {
    let since = chrono::DateTime::from_timestamp_micros(first)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| first.to_string());
    let metrics = metrics.iter().copied().collect::<Vec<_>>().join(", ");
    let what = match rule.correlate {
        Correlate::Site => format!("{devices} devices under {scope}"),
        Correlate::Group => format!("{devices} devices of group {scope}"),
        Correlate::Device => format!("device {scope}"),
        Correlate::Anomaly => scope.to_owned(),
    };
    format!("{what}: {members} anomalies ({metrics}) since {since}, {open} still open")
}

/// Correlation without Kafka: what the live stage does to one partition of `incident-inputs`,
/// for tests (the same code as the live stage).
pub struct Correlator {
    rules: Arc<IncidentRules>,
    state: KeyedState<Correlation>,
    clocks: PartitionClocks,
    pub inputs: u64,
    pub incidents: u64,
    pub ignored: u64,
}

impl Correlator {
    pub fn new(rules: Arc<IncidentRules>, config: &IncidentConfig, changelog: &str) -> Self {
        Self {
            rules,
            state: KeyedState::new(changelog),
            clocks: PartitionClocks::new(
                micros_of_secs(config.clock_grace_secs),
                micros_of_secs(config.sweep_secs),
            ),
            inputs: 0,
            incidents: 0,
            ignored: 0,
        }
    }

    /// Rules changed (through the admin API): applied from the next input. A key whose rule is
    /// gone keeps its state but is neither fed nor swept.
    pub fn set_rules(&mut self, rules: Arc<IncidentRules>) {
        self.rules = rules;
    }

    pub fn start_empty(&mut self, partition: i32) {
        self.state.start_empty(partition);
        self.clocks.forget(partition);
    }

    /// One input at `offset` of `partition`, written at `written_at`: the incident records.
    pub fn input(
        &mut self,
        partition: i32,
        offset: i64,
        written_at: Micros,
        input: &IncidentInput,
        topic: &str,
    ) -> Vec<Incident> {
        self.inputs += 1;
        let mut out = Vec::new();
        let rules = self.rules.clone();
        let Some(rule) = rules.find(&input.tenant, &input.rule) else {
            // The rule was removed since the record was routed.
            self.ignored += 1;
            return out;
        };
        let key = state_key(&input.tenant, &input.rule, &input.key);
        let anomaly = match &input.anomaly {
            Some(bytes) => match avro::decode::<Anomaly>(bytes) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(partition, offset, error = %e, "undecodable anomaly in an incident input skipped");
                    self.ignored += 1;
                    return out;
                }
            },
            None => None,
        };
        let now = self
            .clocks
            .now(partition)
            .unwrap_or_else(|| anomaly.as_ref().map_or(written_at, |a| a.event_time));
        if let Some(corr) = self.state.for_record(partition, &key, offset) {
            let changes = match (&anomaly, &input.action) {
                (Some(a), _) => corr.anomaly(rule, (&input.tenant, &input.key), a, now),
                (None, Some(action)) => match corr.action(action, now) {
                    Ok(c) => c,
                    Err(why) => {
                        tracing::info!(incident = %action.incident_id, actor = %action.actor, why, "incident action ignored");
                        self.ignored += 1;
                        Vec::new()
                    }
                },
                (None, None) => Vec::new(),
            };
            if let Some(t) = corr.incident.as_mut() {
                for c in &changes {
                    out.push(t.record(
                        (&input.tenant, rule, &input.key),
                        c,
                        (topic, partition, offset),
                    ));
                }
            }
        }
        if let Some(a) = &anomaly
            && let Some(now) = self.clocks.observe(partition, a.event_time, written_at)
        {
            out.extend(self.sweep_partition(partition, now, topic));
        }
        self.incidents += out.len() as u64;
        out
    }

    fn sweep_partition(&mut self, partition: i32, now: Micros, topic: &str) -> Vec<Incident> {
        let rules = self.rules.clone();
        let mut out = Vec::new();
        let mut gone = Vec::new();
        self.state.for_each(partition, |key, corr| {
            let Some((tenant, rule_name, corr_key)) = parse_key(key) else {
                return false;
            };
            let Some(rule) = rules.find(tenant, rule_name) else {
                return false;
            };
            let swept = corr.sweep(rule, now);
            if let Some(t) = corr.incident.as_mut() {
                for c in &swept.changes {
                    out.push(t.record((tenant, rule, corr_key), c, (topic, partition, -1)));
                }
            }
            if swept.gone {
                gone.push(key.to_owned());
            }
            swept.changed
        });
        for key in gone {
            self.state.remove(partition, &key);
        }
        out
    }

    /// The input is quiet and the wall clock stands at `wall`.
    pub fn idle(&mut self, wall: Micros, topic: &str) -> Vec<(i32, Incident)> {
        let mut out = Vec::new();
        for (partition, now) in self.clocks.idle(wall) {
            for i in self.sweep_partition(partition, now, topic) {
                out.push((partition, i));
            }
        }
        self.incidents += out.len() as u64;
        out
    }

    /// Advances `partition`'s clock to the event time `now` (tests).
    pub fn advance_to(&mut self, partition: i32, now: Micros, topic: &str) -> Vec<Incident> {
        let now = self.clocks.behind(now);
        self.sweep_partition(partition, now, topic)
    }

    fn restore(&mut self, kafka: &KafkaConfig, partition: i32) -> Result<(), StreamError> {
        self.state.restore(kafka, partition)?;
        let mut newest: Option<Micros> = None;
        self.state.for_each(partition, |_, c| {
            if let Some(t) = c.newest() {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
            false
        });
        self.clocks.restore(partition, newest);
        Ok(())
    }

    fn forget(&mut self, partition: i32) {
        self.state.forget(partition);
        self.clocks.forget(partition);
    }

    /// Keys held in `partition`.
    pub fn keys(&self, partition: i32) -> usize {
        self.state.len(partition)
    }
}

/// Decodes an anomaly and routes it by every rule of its tenant it falls under.
pub fn route(rules: &IncidentRules, a: &Anomaly, record: &[u8]) -> Vec<(String, IncidentInput)> {
    rules
        .of(&a.tenant)
        .iter()
        .filter_map(|rule| {
            let key = rule.key_of(a)?;
            Some((
                state_key(&a.tenant, &rule.name, &key),
                IncidentInput {
                    tenant: a.tenant.clone(),
                    rule: rule.name.clone(),
                    key,
                    anomaly: Some(record.to_vec()),
                    action: None,
                },
            ))
        })
        .collect()
}

/// `anomalies` → `incident-inputs`: one record per rule an anomaly falls under, partitioned by
/// its correlation key. Stateless.
pub struct IncidentRouting {
    kafka: KafkaConfig,
    overrides: Arc<IncidentRuleOverrides>,
    config: IncidentConfig,
    restarts: Restarts,
}

impl IncidentRouting {
    /// `overrides`: the tenants' rules set through the admin API, followed from `incident-rules`.
    pub fn new(
        kafka: KafkaConfig,
        config: IncidentConfig,
        overrides: Arc<IncidentRuleOverrides>,
    ) -> Self {
        Self {
            kafka,
            overrides,
            config,
            restarts: Restarts::new(),
        }
    }

    pub async fn run(&self) -> Result<(), StreamError> {
        let live = LiveRules::first(self.config.base(), self.overrides.clone(), ROUTING).await?;
        let topics = &self.kafka.topics;
        let run = RoutingRun {
            rules: live.current(),
            live,
            input: topics.anomalies.clone(),
            output: Arc::from(topics.incident_inputs.as_str()),
            deadletter: Arc::from(topics.deadletter.as_str()),
            output_parts: 1,
            deadletter_parts: 1,
            anomalies: 0,
            routed: 0,
        };
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

struct RoutingRun {
    rules: Arc<IncidentRules>,
    live: LiveRules,
    input: String,
    output: Arc<str>,
    deadletter: Arc<str>,
    output_parts: i32,
    deadletter_parts: i32,
    anomalies: u64,
    routed: u64,
}

impl Stage for RoutingRun {
    const NAME: &'static str = ROUTING;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.output.to_string(), self.deadletter.to_string()]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.output_parts = partitions[&*self.output];
        self.deadletter_parts = partitions[&*self.deadletter];
        Ok(())
    }

    fn restore(&mut self, _: &KafkaConfig, _: i32, _: i64) -> Result<(), StreamError> {
        Ok(())
    }

    fn revoke(&mut self, _: i32) {}

    fn refresh(&mut self) {
        if let Some(rules) = self.live.changed() {
            self.rules = rules;
        }
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let Ok(a) = avro::decode::<Anomaly>(record) else {
            tracing::debug!(
                partition = at.partition,
                offset = at.offset,
                "undecodable anomaly record skipped"
            );
            return Ok(Vec::new());
        };
        self.anomalies += 1;
        route(&self.rules, &a, record)
            .into_iter()
            .map(|(key, input)| {
                self.routed += 1;
                let partition = input_partition(&key, self.output_parts);
                Emit::record(&self.output, partition, &key, &input)
            })
            .collect()
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let subject = avro::decode::<Anomaly>(record)
            .map(|a| runtime::Subject {
                tenant: a.tenant,
                device: a.device,
                event_id: Some(a.anomaly_id),
            })
            .unwrap_or_default();
        runtime::stage_failure(
            ROUTING,
            at,
            record,
            subject,
            error,
            &self.deadletter,
            self.deadletter_parts,
        )
    }

    fn summary(&self) -> String {
        format!("anomalies={} routed={}", self.anomalies, self.routed)
    }
}

/// `incident-inputs` → `incidents`: one member of the `<prefix>-incidents` consumer group.
pub struct IncidentStage {
    kafka: KafkaConfig,
    config: IncidentConfig,
    overrides: Arc<IncidentRuleOverrides>,
    restarts: Restarts,
}

impl IncidentStage {
    /// `overrides`: the tenants' rules set through the admin API, followed from `incident-rules`.
    pub fn new(
        kafka: KafkaConfig,
        config: IncidentConfig,
        overrides: Arc<IncidentRuleOverrides>,
    ) -> Self {
        Self {
            kafka,
            config,
            overrides,
            restarts: Restarts::new(),
        }
    }

    pub async fn run(&self) -> Result<(), StreamError> {
        let live = LiveRules::first(self.config.base(), self.overrides.clone(), STAGE).await?;
        let topics = &self.kafka.topics;
        let run = IncidentRun {
            correlator: Correlator::new(live.current(), &self.config, &topics.incident_state),
            live,
            input: topics.incident_inputs.clone(),
            incidents: Arc::from(topics.incidents.as_str()),
            deadletter: Arc::from(topics.deadletter.as_str()),
            incident_parts: 1,
            deadletter_parts: 1,
            undecodable: 0,
            last_idle: Instant::now(),
            sweep: Duration::from_secs(self.config.sweep_secs.max(1)),
        };
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

/// One run of the incident stage: the [`Stage`] the runtime drives.
pub struct IncidentRun {
    correlator: Correlator,
    live: LiveRules,
    input: String,
    incidents: Arc<str>,
    deadletter: Arc<str>,
    incident_parts: i32,
    deadletter_parts: i32,
    undecodable: u64,
    last_idle: Instant,
    sweep: Duration,
}

impl IncidentRun {
    fn emit(&self, partition: i32, i: &Incident) -> Result<Emit, StreamError> {
        Emit::record(
            &self.incidents,
            partition % self.incident_parts,
            &i.incident_id,
            i,
        )
    }
}

impl Stage for IncidentRun {
    const NAME: &'static str = STAGE;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![
            self.incidents.to_string(),
            self.correlator.state.topic().to_string(),
            self.deadletter.to_string(),
        ]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.incident_parts = partitions[&*self.incidents];
        self.deadletter_parts = partitions[&*self.deadletter];
        self.correlator
            .state
            .check_partitions(partitions, &self.input)
    }

    fn restore(&mut self, kafka: &KafkaConfig, partition: i32, _: i64) -> Result<(), StreamError> {
        self.correlator.restore(kafka, partition)
    }

    fn revoke(&mut self, partition: i32) {
        self.correlator.forget(partition);
    }

    fn refresh(&mut self) {
        if let Some(rules) = self.live.changed() {
            self.correlator.set_rules(rules);
        }
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let input = match avro::decode::<IncidentInput>(record) {
            Ok(i) => i,
            Err(e) => {
                self.undecodable += 1;
                tracing::warn!(partition = at.partition, offset = at.offset, error = %e, "undecodable incident input skipped");
                return Ok(Vec::new());
            }
        };
        self.correlator
            .input(at.partition, at.offset, at.written_at, &input, at.topic)
            .iter()
            .map(|i| self.emit(at.partition, i))
            .collect()
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let subject = avro::decode::<IncidentInput>(record)
            .map(|i| runtime::Subject {
                tenant: i.tenant,
                device: String::new(),
                event_id: i.action.map(|a| a.incident_id),
            })
            .unwrap_or_default();
        runtime::stage_failure(
            STAGE,
            at,
            record,
            subject,
            error,
            &self.deadletter,
            self.deadletter_parts,
        )
    }

    fn idle(&mut self, now: Micros) -> Result<Vec<Emit>, StreamError> {
        if self.last_idle.elapsed() < self.sweep {
            return Ok(Vec::new());
        }
        self.last_idle = Instant::now();
        let topic = self.input.clone();
        self.correlator
            .idle(now, &topic)
            .iter()
            .map(|(p, i)| self.emit(*p, i))
            .collect()
    }

    fn checkpoint(&mut self) -> Result<Vec<Emit>, StreamError> {
        self.correlator.state.changelog()
    }

    fn summary(&self) -> String {
        let c = &self.correlator;
        format!(
            "inputs={} incident_records={} ignored={} undecodable={}",
            c.inputs, c.incidents, c.ignored, self.undecodable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;
    const T0: Micros = 1_700_000_000 * S;

    fn rule(text: &str) -> IncidentRule {
        toml::from_str::<IncidentRuleSpec>(text)
            .unwrap()
            .check("r")
            .unwrap()
    }

    fn anomaly(device: &str, metric: &str, start: Micros) -> Anomaly {
        Anomaly {
            anomaly_id: crate::detectors::anomaly_id("acme", device, metric, "hot", start),
            seq: 0,
            state: AnomalyState::Open,
            tenant: "acme".into(),
            device: device.into(),
            metric: metric.into(),
            detector: "hot".into(),
            kind: "threshold".into(),
            severity: "warning".into(),
            device_group: Some("pumps".into()),
            site: vec!["north".into(), "hall 3".into(), format!("spot {device}")],
            start_time: start,
            end_time: None,
            event_time: start,
            value: 90.0,
            baseline: None,
            threshold: Some(80.0),
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
        }
    }

    fn resolved(a: &Anomaly, seq: i32, end: Micros) -> Anomaly {
        Anomaly {
            seq,
            state: AnomalyState::Resolved,
            end_time: Some(end),
            event_time: end,
            ..a.clone()
        }
    }

    /// Feeds anomalies under `rule` (one correlation key), the clock at each one's event time.
    fn feed(
        c: &mut Correlation,
        rule: &IncidentRule,
        anomalies: &[Anomaly],
    ) -> Vec<IncidentChange> {
        let mut out = Vec::new();
        for a in anomalies {
            let key = rule.key_of(a).unwrap();
            out.extend(
                c.anomaly(rule, ("acme", &key), a, a.event_time)
                    .into_iter()
                    .map(|c| c.change),
            );
        }
        out
    }

    const SECTION: &str =
        "correlate = 'site'\nlevel = 2\nmin_devices = 3\nwindow_secs = 300\nquiet_secs = 60";

    #[test]
    fn devices_of_one_section_within_the_window_open_one_incident_at_the_window_edge() {
        let r = rule(SECTION);
        let mut c = Correlation::default();
        let changes = feed(
            &mut c,
            &r,
            &[
                anomaly("d1", "temperature", T0),
                anomaly("d2", "temperature", T0 + 100 * S),
                anomaly("d3", "temperature", T0 + 300 * S),
            ],
        );
        assert_eq!(
            changes,
            vec![IncidentChange::Open],
            "the third device, exactly W after the first"
        );
        let t = c.incident.as_mut().unwrap();
        let rec = t.record(
            ("acme", &r, "north\u{1f}hall 3"),
            &Change {
                change: IncidentChange::Open,
                event_time: T0 + 300 * S,
                action: None,
            },
            ("incident-inputs", 0, 2),
        );
        assert_eq!(
            rec.site,
            vec!["north".to_owned(), "hall 3".to_owned()],
            "the highest common site level"
        );
        assert_eq!((rec.member_count, rec.device_count, rec.seq), (3, 3, 0));
        assert_eq!(rec.scope, "north / hall 3");
        assert_eq!(rec.first_time, T0);
        assert_eq!(
            rec.incident_id,
            incident_id("acme", "r", "north\u{1f}hall 3", T0)
        );
        // A fourth device later within the span's window joins; it is not a new incident.
        let more = feed(&mut c, &r, &[anomaly("d4", "temperature", T0 + 500 * S)]);
        assert_eq!(more, vec![IncidentChange::Update]);

        // 1 µs past the window: never three devices within one window.
        let mut apart = Correlation::default();
        let changes = feed(
            &mut apart,
            &r,
            &[
                anomaly("d1", "temperature", T0),
                anomaly("d2", "temperature", T0 + 100 * S),
                anomaly("d3", "temperature", T0 + 300 * S + 1),
            ],
        );
        assert!(changes.is_empty(), "{changes:?}");
        // Two anomalies of one device count once.
        let mut same = Correlation::default();
        let changes = feed(
            &mut same,
            &r,
            &[
                anomaly("d1", "temperature", T0),
                anomaly("d1", "pressure", T0 + 10 * S),
                anomaly("d2", "temperature", T0 + 20 * S),
            ],
        );
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_late_batch_correlates_with_the_anomalies_of_its_own_time_and_gets_the_same_id() {
        let r = rule(SECTION);
        let batch = [
            anomaly("d1", "temperature", T0),
            anomaly("d2", "temperature", T0 + 60 * S),
            anomaly("d3", "temperature", T0 + 120 * S),
        ];
        let mut live = Correlation::default();
        feed(&mut live, &r, &batch);
        // Five hours later, in reverse order, the clock far ahead.
        let mut late = Correlation::default();
        let now = T0 + 5 * 3600 * S;
        let mut changes = Vec::new();
        for a in batch.iter().rev() {
            changes.extend(late.anomaly(&r, ("acme", "north\u{1f}hall 3"), a, now));
        }
        assert_eq!(changes.len(), 1);
        assert_eq!(
            late.incident.as_ref().unwrap().id,
            live.incident.as_ref().unwrap().id
        );
        // Anomalies of now do not join an incident of five hours ago.
        let fresh = late.anomaly(
            &r,
            ("acme", "north\u{1f}hall 3"),
            &anomaly("d4", "temperature", now),
            now,
        );
        assert!(fresh.is_empty());
        assert_eq!(late.pending.len(), 1);
    }

    #[test]
    fn resolves_after_every_member_ended_and_the_quiet_period_then_reopens_with_the_same_id() {
        let r = rule(SECTION);
        let a = [
            anomaly("d1", "temperature", T0),
            anomaly("d2", "temperature", T0 + 10 * S),
            anomaly("d3", "temperature", T0 + 20 * S),
        ];
        let mut c = Correlation::default();
        feed(&mut c, &r, &a);
        let id = c.incident.as_ref().unwrap().id.clone();
        feed(
            &mut c,
            &r,
            &[
                resolved(&a[0], 1, T0 + 100 * S),
                resolved(&a[1], 1, T0 + 110 * S),
            ],
        );
        assert!(
            c.sweep(&r, T0 + 1000 * S).changes.is_empty(),
            "d3 still open"
        );
        assert_eq!(
            feed(&mut c, &r, &[resolved(&a[2], 1, T0 + 120 * S)]),
            vec![IncidentChange::Update]
        );
        assert!(
            c.sweep(&r, T0 + 179 * S).changes.is_empty(),
            "within the quiet period"
        );
        let swept = c.sweep(&r, T0 + 180 * S);
        assert_eq!(
            swept.changes.iter().map(|c| c.change).collect::<Vec<_>>(),
            vec![IncidentChange::Resolve]
        );
        assert_eq!(
            c.incident.as_ref().unwrap().status,
            IncidentStatus::Resolved
        );
        // A member record seen again (a replay) changes nothing.
        assert!(feed(&mut c, &r, &[resolved(&a[2], 1, T0 + 120 * S)]).is_empty());
        // A new anomaly of the section within the window of its span reopens it.
        assert_eq!(
            feed(&mut c, &r, &[anomaly("d5", "temperature", T0 + 200 * S)]),
            vec![IncidentChange::Reopen]
        );
        assert_eq!(c.incident.as_ref().unwrap().id, id);
        assert_eq!(c.incident.as_ref().unwrap().status, IncidentStatus::Open);
    }

    #[test]
    fn people_acknowledge_snooze_and_resolve_and_members_firing_again_reopen() {
        let r = rule("correlate = 'device'\nmin_metrics = 2\nwindow_secs = 120");
        let t = anomaly("pump-7", "temperature", T0);
        let p = anomaly("pump-7", "pressure", T0 + 30 * S);
        let mut c = Correlation::default();
        assert_eq!(
            feed(&mut c, &r, &[t.clone(), p.clone()]),
            vec![IncidentChange::Open]
        );
        let id = c.incident.as_ref().unwrap().id.clone();
        let act = |kind, until| IncidentAction {
            incident_id: id.clone(),
            action: kind,
            actor: "ops".into(),
            at: T0 + 60 * S,
            until,
            comment: Some("on it".into()),
        };
        let ack = c
            .action(&act(IncidentActionKind::Acknowledge, None), T0 + 60 * S)
            .unwrap();
        assert_eq!(ack[0].change, IncidentChange::Acknowledge);
        let tr = c.incident.as_mut().unwrap();
        let rec = tr.record(("acme", &r, "pump-7"), &ack[0], ("incident-inputs", 0, 9));
        assert_eq!(
            (rec.status, rec.actor.as_deref(), rec.comment.as_deref()),
            (IncidentStatus::Acknowledged, Some("ops"), Some("on it"))
        );
        assert_eq!(
            rec.metrics,
            vec!["pressure".to_owned(), "temperature".to_owned()]
        );
        // A third metric joins: an update, still acknowledged.
        assert_eq!(
            feed(&mut c, &r, &[anomaly("pump-7", "vibration", T0 + 90 * S)]),
            vec![IncidentChange::Update]
        );
        assert_eq!(
            c.incident.as_ref().unwrap().status,
            IncidentStatus::Acknowledged
        );
        let snooze = c
            .action(
                &act(IncidentActionKind::Snooze, Some(T0 + 3600 * S)),
                T0 + 100 * S,
            )
            .unwrap();
        assert_eq!(snooze[0].change, IncidentChange::Snooze);
        assert_eq!(
            c.incident.as_ref().unwrap().snoozed_until,
            Some(T0 + 3600 * S)
        );
        c.action(&act(IncidentActionKind::Resolve, None), T0 + 110 * S)
            .unwrap();
        assert_eq!(
            c.incident.as_ref().unwrap().status,
            IncidentStatus::Resolved
        );
        assert!(
            c.action(&act(IncidentActionKind::Acknowledge, None), T0 + 111 * S)
                .is_err()
        );
        // The temperature anomaly's evidence grows after the manual resolve: reopened, same id.
        let again = Anomaly {
            seq: 1,
            state: AnomalyState::Update,
            event_time: T0 + 120 * S,
            ..t
        };
        assert_eq!(feed(&mut c, &r, &[again]), vec![IncidentChange::Reopen]);
        assert_eq!(c.incident.as_ref().unwrap().id, id);
        // An unknown id is refused.
        let mut other = act(IncidentActionKind::Acknowledge, None);
        other.incident_id = "0".repeat(32);
        assert!(c.action(&other, T0).is_err());
    }

    #[test]
    fn the_correlator_routes_applies_each_input_once_and_resolves_on_its_clock() {
        let config: IncidentConfig = toml::from_str(&format!("clock_grace_secs = 0\nsweep_secs = 5\n[rules.section]\n{SECTION}\n[rules.each]\ncorrelate = 'anomaly'\nmin_severity = 'critical'")).unwrap();
        let rules = Arc::new(config.compile().unwrap());
        let mut c = Correlator::new(rules.clone(), &config, "incident-state");
        c.start_empty(0);
        let a: Vec<Anomaly> = (0..3)
            .map(|i| anomaly(&format!("d{i}"), "temperature", T0 + i * 10 * S))
            .collect();
        let mut records = Vec::new();
        let mut offset = 0;
        let mut send = |c: &mut Correlator, a: &Anomaly, replay: bool| {
            let bytes = avro::encode(a).unwrap();
            let routed = route(&rules, a, &bytes);
            assert_eq!(
                routed.len(),
                usize::from(a.severity == "critical") + 1,
                "{routed:?}"
            );
            let mut out = Vec::new();
            for (_, input) in routed {
                if !replay {
                    offset += 1;
                }
                out.extend(c.input(0, offset, a.event_time, &input, "incident-inputs"));
            }
            out
        };
        for x in &a {
            records.extend(send(&mut c, x, false));
        }
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].change, IncidentChange::Open);
        // The last input read again after a crash (same offset): not applied twice.
        assert!(send(&mut c, &a[2], true).is_empty());
        let mut crit = anomaly("d9", "temperature", T0 + 40 * S);
        crit.severity = "critical".into();
        let each = send(&mut c, &crit, false);
        assert_eq!(
            each.iter()
                .map(|i| (i.rule.as_str(), i.change))
                .collect::<Vec<_>>(),
            vec![
                ("each", IncidentChange::Open),
                ("section", IncidentChange::Update)
            ]
        );
        // Every member resolves; the clock passes the quiet period with later anomalies elsewhere.
        for (i, x) in a.iter().chain([&crit]).enumerate() {
            records.extend(send(
                &mut c,
                &resolved(x, 1, T0 + 100 * S + i as i64 * S),
                false,
            ));
        }
        let mut elsewhere = anomaly("z1", "temperature", T0 + 400 * S);
        elsewhere.site = vec!["south".into(), "hall 1".into()];
        let swept = send(&mut c, &elsewhere, false);
        let resolves: Vec<(&str, IncidentStatus)> =
            swept.iter().map(|i| (i.rule.as_str(), i.status)).collect();
        assert_eq!(resolves.len(), 2, "{swept:?}");
        assert!(resolves.iter().all(|(_, s)| *s == IncidentStatus::Resolved));
        let section = swept.iter().find(|i| i.rule == "section").unwrap();
        assert_eq!(
            (section.member_count, section.open_members, section.seq),
            (4, 0, 6)
        );
        assert_eq!(section.end_time, Some(T0 + 103 * S));
        assert_eq!(section.source_offset, -1, "made by the clock");
    }
}
