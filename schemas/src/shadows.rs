//! Device shadows: the document and its algebra, with AWS IoT Device Shadow's semantics and no
//! size cap but a configurable one. Pure: the shadow stage (the single writer per device) applies
//! updates with it; the HTTP and MQTT endpoints check requests with it before they are logged.
//!
//! A shadow has `desired` (set by apps and operators) and `reported` (set by the device, or from
//! its telemetry), each a JSON object; `delta` is computed: the desired fields whose value differs
//! from the reported one (objects compared field by field, everything else, arrays included, as a
//! whole). An update merges objects field by field; `null` deletes a field (`"desired": null`
//! deletes the whole section); anything else replaces the value. Every leaf has the time of its
//! last change in `metadata`; `version` goes up by one with every update that applied something and
//! never goes back (a deleted shadow keeps its version, so a re-created one continues it); a
//! request's `clientToken` is echoed back.
//!
//! **Event time decides reported values**: a reported leaf is changed only by an update at least
//! as new as the leaf's time, and a deleted one remembers when it was deleted, so a late reading
//! never brings back an older value. Desired values follow the log's order (the time they were
//! accepted).
//!
//! Limits ([`Limits`]): nesting depth below `state.desired` / `state.reported`, and the size of
//! the whole document as JSON; a request past them is refused whole, naming the field.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Micros;
use crate::avro::{ShadowDocument, ShadowOrigin, ShadowResponse, ShadowUpdate};

/// The name of the classic (unnamed) shadow.
pub const CLASSIC: &str = "";

/// A `clientToken` is at most this long (AWS: 64 bytes).
pub const MAX_CLIENT_TOKEN: usize = 64;

/// The two sections an update may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    Desired,
    Reported,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Reported => "reported",
        }
    }
}

/// How big a document may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest document (state and metadata, as JSON), in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of objects and arrays below a section (`{"a": {"b": 1}}` is 2).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_depth: 16,
        }
    }
}

/// `[shadows]` in the config file: what the shadow stage and the shadow endpoints share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowConfig {
    /// Largest document, in bytes (state and metadata as JSON); an update past it gets 413.
    pub max_bytes: usize,
    /// Deepest nesting below `state.desired` / `state.reported`; deeper gets 400.
    pub max_depth: usize,
    /// How long an HTTP update waits for the shadow stage's answer before it gets 503 (the update
    /// is logged and will be applied).
    pub answer_timeout_ms: u64,
    pub batch_size: usize,
    /// How long the stage waits for more updates before it answers a batch.
    pub batch_ms: u64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            max_bytes: limits.max_bytes,
            max_depth: limits.max_depth,
            answer_timeout_ms: 10_000,
            batch_size: 1000,
            batch_ms: 5,
        }
    }
}

impl ShadowConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_bytes,
            max_depth: self.max_depth,
        }
    }
}

/// A request that cannot be applied, naming the field (`state.desired.a.b`, `version`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// Malformed (HTTP 400).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The request's `version` is not the shadow's (HTTP 409): nothing applied.
    #[error("version: the shadow is at version {current}, the update was for {expected}")]
    VersionConflict { expected: u64, current: u64 },
    /// The document would pass `max_bytes` (HTTP 413): nothing applied.
    #[error("state: the document would be {bytes} bytes, more than the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    /// The caller may not set this field (HTTP 403): an app setting `state.reported`.
    #[error("{field}: {reason}")]
    Forbidden { field: String, reason: String },
}

impl ShadowError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status of the refusal: 400, 403, 409 or 413.
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid { .. } => 400,
            Self::Forbidden { .. } => 403,
            Self::VersionConflict { .. } => 409,
            Self::TooLarge { .. } => 413,
        }
    }

    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::Forbidden { field, .. } => field,
            Self::VersionConflict { .. } => "version",
            Self::TooLarge { .. } => "state",
        }
    }
}

/// What one section of an update does.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// Merge these fields (`null`: delete the field).
    Merge(Map<String, Value>),
    /// `"desired": null`: delete the whole section.
    Clear,
}

/// An update request: `{"state": {"desired": {…}, "reported": {…}}, "version": 3, "clientToken": "…"}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    pub desired: Option<Patch>,
    pub reported: Option<Patch>,
    /// Apply only if the shadow is at this version.
    pub version: Option<u64>,
    pub client_token: Option<String>,
}

impl Update {
    /// Parses and checks a request body against `limits` (depth; the size is checked on apply).
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self, ShadowError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ShadowError::invalid("body", format!("not JSON: {e}")))?;
        Self::from_value(value, limits)
    }

    pub fn from_value(value: Value, limits: &Limits) -> Result<Self, ShadowError> {
        let Value::Object(mut top) = value else {
            return Err(ShadowError::invalid("body", "must be a JSON object"));
        };
        let mut update = Update::default();
        match top.remove("version") {
            None | Some(Value::Null) => {}
            Some(v) => {
                update.version = Some(v.as_u64().ok_or_else(|| {
                    ShadowError::invalid("version", "must be a whole number of at least 0")
                })?)
            }
        }
        match top.remove("clientToken") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN => update.client_token = Some(t),
            Some(Value::String(_)) => {
                return Err(ShadowError::invalid(
                    "clientToken",
                    format!("must be at most {MAX_CLIENT_TOKEN} bytes"),
                ));
            }
            Some(_) => return Err(ShadowError::invalid("clientToken", "must be a string")),
        }
        let state = top.remove("state");
        if let Some(other) = top.keys().next() {
            return Err(ShadowError::invalid(
                other.clone(),
                "unknown field (expected state, version, clientToken)",
            ));
        }
        let state = match state {
            Some(Value::Object(s)) => s,
            Some(_) => return Err(ShadowError::invalid("state", "must be an object")),
            None => return Err(ShadowError::invalid("state", "is required")),
        };
        for (key, value) in state {
            let section = match key.as_str() {
                "desired" => Section::Desired,
                "reported" => Section::Reported,
                "delta" => {
                    return Err(ShadowError::invalid(
                        "state.delta",
                        "is computed and cannot be set",
                    ));
                }
                _ => {
                    return Err(ShadowError::invalid(
                        format!("state.{key}"),
                        "unknown section (expected desired, reported)",
                    ));
                }
            };
            let field = format!("state.{key}");
            let patch = match value {
                Value::Null => Patch::Clear,
                Value::Object(fields) => {
                    check_depth(&fields, &field, 1, limits.max_depth)?;
                    Patch::Merge(fields)
                }
                _ => return Err(ShadowError::invalid(field, "must be an object or null")),
            };
            match section {
                Section::Desired => update.desired = Some(patch),
                Section::Reported => update.reported = Some(patch),
            }
        }
        if update.desired.is_none() && update.reported.is_none() {
            return Err(ShadowError::invalid(
                "state",
                "must set desired or reported",
            ));
        }
        Ok(update)
    }
}

fn check_depth(
    fields: &Map<String, Value>,
    at: &str,
    depth: usize,
    max: usize,
) -> Result<(), ShadowError> {
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        check_value_depth(value, &field, depth, max)?;
    }
    Ok(())
}

fn check_value_depth(
    value: &Value,
    field: &str,
    depth: usize,
    max: usize,
) -> Result<(), ShadowError> {
    let nested = matches!(value, Value::Object(_) | Value::Array(_));
    if nested && depth >= max {
        return Err(ShadowError::invalid(
            field,
            format!("nested deeper than the limit of {max}"),
        ));
    }
    match value {
        Value::Object(o) => check_depth(o, field, depth + 1, max),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_value_depth(v, &format!("{field}[{i}]"), depth + 1, max)),
        _ => Ok(()),
    }
}

/// One section's values with the time of each leaf's last change and of each deletion.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Values {
    pub state: Map<String, Value>,
    /// The shape of `state`, each leaf replaced by the time (µs) it was last set.
    pub times: Map<String, Value>,
    /// JSON pointer (RFC 6901) of a deleted field → when it was deleted (reported only: what keeps
    /// a late value from coming back).
    pub deleted: BTreeMap<String, Micros>,
}

/// A shadow document as the shadow stage keeps it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Shadow {
    pub desired: Values,
    pub reported: Values,
    pub version: u64,
    /// When the last update was applied (µs).
    pub updated: Micros,
}

/// What an applied update did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Whether anything changed (an update whose every reported field is older than the shadow's
    /// changes nothing and takes no version).
    pub changed: bool,
    pub version: u64,
    /// Whether `delta` is not what it was (the device is sent the new one).
    pub delta_changed: bool,
    /// The reported fields left as they were because the shadow's are newer (`state.reported.a`).
    pub stale: Vec<String>,
}

impl Shadow {
    /// Applies `update` made at `at` (µs: the event time of reported values, the acceptance time of
    /// desired ones). On an error nothing is applied.
    pub fn apply(
        &mut self,
        update: &Update,
        at: Micros,
        limits: &Limits,
    ) -> Result<Applied, ShadowError> {
        if let Some(expected) = update.version
            && expected != self.version
        {
            return Err(ShadowError::VersionConflict {
                expected,
                current: self.version,
            });
        }
        let before = self.delta();
        let mut next = self.clone();
        let mut changed = false;
        let mut stale = Vec::new();
        if let Some(patch) = &update.desired {
            changed |= next
                .desired
                .patch(patch, at, false, "state.desired", &mut stale);
        }
        if let Some(patch) = &update.reported {
            changed |= next
                .reported
                .patch(patch, at, true, "state.reported", &mut stale);
        }
        if !changed {
            // Deletions of what was not there are remembered all the same (a late older value
            // stays out), without a version.
            self.reported.deleted = next.reported.deleted;
            return Ok(Applied {
                changed: false,
                version: self.version,
                delta_changed: false,
                stale,
            });
        }
        next.version += 1;
        next.updated = next.updated.max(at);
        let bytes = next.size();
        if bytes > limits.max_bytes {
            return Err(ShadowError::TooLarge {
                bytes,
                limit: limits.max_bytes,
            });
        }
        *self = next;
        Ok(Applied {
            changed: true,
            version: self.version,
            delta_changed: self.delta() != before,
            stale,
        })
    }

    /// The desired fields whose value differs from the reported one.
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired.state, &self.reported.state)
    }

    /// The size of the document as JSON (state and metadata), the figure [`Limits::max_bytes`]
    /// bounds.
    pub fn size(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len())
    }

    /// The document as AWS IoT serves it: `state` (`desired`, `reported`, `delta` when not empty),
    /// `metadata` (per leaf `{"timestamp": seconds}`), `version`, `timestamp` (seconds), and the
    /// request's `clientToken`.
    pub fn document(&self, client_token: Option<&str>, now: Micros) -> Value {
        let mut state = Map::new();
        let mut metadata = Map::new();
        for (section, values) in [
            (Section::Desired, &self.desired),
            (Section::Reported, &self.reported),
        ] {
            if !values.state.is_empty() {
                state.insert(section.as_str().into(), Value::Object(values.state.clone()));
                metadata.insert(section.as_str().into(), aws_metadata(&values.times));
            }
        }
        let delta = self.delta();
        if !delta.is_empty() {
            state.insert("delta".into(), Value::Object(delta));
        }
        let mut doc = Map::new();
        doc.insert("state".into(), Value::Object(state));
        doc.insert("metadata".into(), Value::Object(metadata));
        doc.insert("version".into(), self.version.into());
        doc.insert("timestamp".into(), seconds(now).into());
        if let Some(t) = client_token {
            doc.insert("clientToken".into(), t.into());
        }
        Value::Object(doc)
    }
}

impl Values {
    /// Applies one section's patch; whether anything changed. `by_time`: a leaf changes only if
    /// `at` is at least its time and the time it or a parent was deleted.
    fn patch(
        &mut self,
        patch: &Patch,
        at: Micros,
        by_time: bool,
        field: &str,
        stale: &mut Vec<String>,
    ) -> bool {
        match patch {
            Patch::Clear if by_time => self.delete(&[], at),
            Patch::Clear => {
                let changed = !self.state.is_empty();
                self.state.clear();
                self.times.clear();
                changed
            }
            Patch::Merge(fields) => {
                let mut changed = false;
                for (k, v) in fields {
                    changed |= self.merge(std::slice::from_ref(k), v, at, by_time, field, stale);
                }
                changed
            }
        }
    }

    /// Merges `value` into the field at `path`.
    fn merge(
        &mut self,
        path: &[String],
        value: &Value,
        at: Micros,
        by_time: bool,
        field: &str,
        stale: &mut Vec<String>,
    ) -> bool {
        let label = || format!("{field}.{}", path.join("."));
        match value {
            Value::Null if by_time => {
                if let Some(Value::Number(t)) = lookup(&self.times, path)
                    && t.as_i64().is_some_and(|t| t > at)
                {
                    stale.push(label());
                    return false;
                }
                self.delete(path, at)
            }
            Value::Null => {
                let present = lookup(&self.state, path).is_some();
                remove(&mut self.state, path);
                remove(&mut self.times, path);
                present
            }
            Value::Object(fields) if fields.is_empty() => false,
            Value::Object(fields) => {
                let mut changed = false;
                if !matches!(lookup(&self.state, path), Some(Value::Object(_))) {
                    // An object where there was none or a leaf (which must be older).
                    if by_time && !self.newer_or_equal(path, at) {
                        stale.push(label());
                        return false;
                    }
                    changed = lookup(&self.state, path).is_some();
                    set(&mut self.state, path, Value::Object(Map::new()));
                    set(&mut self.times, path, Value::Object(Map::new()));
                }
                for (k, v) in fields {
                    let mut child = path.to_vec();
                    child.push(k.clone());
                    changed |= self.merge(&child, v, at, by_time, field, stale);
                }
                if lookup(&self.state, path)
                    .is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
                {
                    // Objects are never left empty.
                    remove(&mut self.state, path);
                    remove(&mut self.times, path);
                }
                changed
            }
            leaf => {
                // A leaf must be newer than what it replaces, every leaf of an object included.
                if by_time && !(self.newer_or_equal(path, at) && self.subtree_older(path, at)) {
                    stale.push(label());
                    return false;
                }
                set(&mut self.state, path, leaf.clone());
                set(&mut self.times, path, Value::from(at));
                true
            }
        }
    }

    /// Deletes, at `at`, every leaf at or under `path` (the whole section for an empty path) not
    /// newer than `at`, and remembers the deletion; whether anything went.
    fn delete(&mut self, path: &[String], at: Micros) -> bool {
        let entry = self.deleted.entry(pointer(path)).or_insert(at);
        *entry = (*entry).max(at);
        let mut older = Vec::new();
        let times = if path.is_empty() {
            Some(Value::Object(self.times.clone()))
        } else {
            lookup(&self.times, path).cloned()
        };
        if let Some(t) = &times {
            leaves(t, &mut path.to_vec(), &mut older);
        }
        let mut changed = false;
        for (leaf, t) in older {
            if t <= at {
                remove(&mut self.state, &leaf);
                remove(&mut self.times, &leaf);
                changed = true;
            }
        }
        changed
    }

    /// Whether `at` is at least the time of the leaf at `path` or above it, and of any deletion
    /// of it, a parent, or the section.
    fn newer_or_equal(&self, path: &[String], at: Micros) -> bool {
        (0..=path.len()).all(|n| {
            let deleted = self.deleted.get(&pointer(&path[..n]));
            let set = match lookup(&self.times, &path[..n]) {
                Some(Value::Number(t)) if n > 0 => t.as_i64(),
                _ => None,
            };
            deleted.is_none_or(|t| *t <= at) && set.is_none_or(|t| t <= at)
        })
    }

    /// Whether every leaf under `path` is at most `at` old.
    fn subtree_older(&self, path: &[String], at: Micros) -> bool {
        let mut all = Vec::new();
        if let Some(t) = lookup(&self.times, path) {
            leaves(t, &mut path.to_vec(), &mut all);
        }
        all.iter().all(|(_, t)| *t <= at)
    }
}

/// Every leaf of a times tree under `path`: (its path, its time).
fn leaves(times: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, Micros)>) {
    match times {
        Value::Object(o) => {
            for (k, v) in o {
                path.push(k.clone());
                leaves(v, path, out);
                path.pop();
            }
        }
        Value::Number(t) => out.push((path.clone(), t.as_i64().unwrap_or(Micros::MAX))),
        _ => {}
    }
}

/// The desired fields of `desired` whose value differs from `reported`'s.
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, d) in desired {
        match (d, reported.get(k)) {
            (Value::Object(d), Some(Value::Object(r))) => {
                let inner = delta(d, r);
                if !inner.is_empty() {
                    out.insert(k.clone(), Value::Object(inner));
                }
            }
            (d, Some(r)) if d == r => {}
            (d, _) => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

fn lookup<'a>(root: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = root.get(first)?;
    for k in rest {
        v = v.as_object()?.get(k)?;
    }
    Some(v)
}

/// Sets `path` to `value`, making objects on the way (a leaf in the way is replaced).
fn set(root: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut map = root;
    for k in parents {
        let slot = map
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(inner) = slot else {
            return;
        };
        map = inner;
    }
    map.insert(last.clone(), value);
}

/// Removes `path`, and parents left empty by it.
fn remove(root: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        root.remove(first);
        return;
    }
    if let Some(Value::Object(inner)) = root.get_mut(first) {
        remove(inner, rest);
        if inner.is_empty() {
            root.remove(first);
        }
    }
}

/// RFC 6901 JSON pointer of `path`.
fn pointer(path: &[String]) -> String {
    path.iter()
        .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
        .collect()
}

fn seconds(t: Micros) -> i64 {
    t.div_euclid(1_000_000)
}

/// The times tree in AWS's form: each leaf `{"timestamp": seconds}`.
fn aws_metadata(times: &Map<String, Value>) -> Value {
    Value::Object(
        times
            .iter()
            .map(|(k, v)| {
                let m = match v {
                    Value::Object(o) => aws_metadata(o),
                    Value::Number(t) => {
                        serde_json::json!({"timestamp": seconds(t.as_i64().unwrap_or(0))})
                    }
                    other => other.clone(),
                };
                (k.clone(), m)
            })
            .collect(),
    )
}

/// The key of a shadow on `shadow-updates`, `shadow-responses`, `shadows` and in the shadow stage's
/// state: `tenant/device/name` (ids and names hold no `/`; the classic shadow's name is empty).
pub fn key(tenant: &str, device: &str, name: &str) -> String {
    format!("{tenant}/{device}/{name}")
}

/// A shadow name: 1 to 64 of `[A-Za-z0-9._-]` (safe in MQTT topics and paths), or the classic
/// shadow's empty name.
pub fn check_name(name: &str) -> Result<(), ShadowError> {
    let ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ShadowError::invalid(
            "name",
            "a shadow name is 1 to 64 of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// Checks a request an endpoint received from `origin` before it is logged: the body parses
/// within `limits`, and an app sets only `desired` (the device owns `reported`; a device may set
/// both, e.g. clear `desired` once applied). The refusal names the field.
pub fn check_request(
    body: &[u8],
    origin: ShadowOrigin,
    limits: &Limits,
) -> Result<Update, ShadowError> {
    let update = Update::parse(body, limits)?;
    if origin == ShadowOrigin::App && update.reported.is_some() {
        return Err(ShadowError::Forbidden {
            field: "state.reported".into(),
            reason: "only the device reports its state; apps set `state.desired`".into(),
        });
    }
    if update.desired.is_none() && update.reported.is_none() {
        return Err(ShadowError::invalid(
            "state",
            "an update sets `state.desired` or `state.reported`",
        ));
    }
    Ok(update)
}

/// The message of a refused update, as AWS IoT publishes it on `…/update/rejected`.
pub fn rejection(error: &ShadowError, client_token: Option<&str>, at: Micros) -> Value {
    let mut m = Map::new();
    m.insert("code".into(), error.status().into());
    m.insert("message".into(), error.to_string().into());
    m.insert("field".into(), error.field().into());
    m.insert("timestamp".into(), seconds(at).into());
    if let Some(t) = client_token {
        m.insert("clientToken".into(), t.into());
    }
    Value::Object(m)
}

/// The message of an accepted update, as AWS IoT publishes it on `…/update/accepted`: the
/// request's state, the shadow's version after it, the time, and the `clientToken`.
pub fn acceptance(update: &Update, version: u64, at: Micros) -> Value {
    let mut state = Map::new();
    for (section, patch) in [
        (Section::Desired, &update.desired),
        (Section::Reported, &update.reported),
    ] {
        match patch {
            Some(Patch::Merge(m)) => {
                state.insert(section.as_str().into(), Value::Object(m.clone()));
            }
            Some(Patch::Clear) => {
                state.insert(section.as_str().into(), Value::Null);
            }
            None => {}
        }
    }
    let mut m = Map::new();
    m.insert("state".into(), Value::Object(state));
    m.insert("version".into(), version.into());
    m.insert("timestamp".into(), seconds(at).into());
    if let Some(t) = &update.client_token {
        m.insert("clientToken".into(), t.as_str().into());
    }
    Value::Object(m)
}

/// The message of `shadow`'s delta, as AWS IoT publishes it on `…/update/delta`; `None` when
/// the delta is empty (the device has what was desired).
pub fn delta_message(shadow: &Shadow, client_token: Option<&str>, at: Micros) -> Option<Value> {
    let delta = shadow.delta();
    if delta.is_empty() {
        return None;
    }
    let mut m = Map::new();
    m.insert("state".into(), Value::Object(delta));
    m.insert("version".into(), shadow.version.into());
    m.insert("timestamp".into(), seconds(at).into());
    if let Some(t) = client_token {
        m.insert("clientToken".into(), t.into());
    }
    Some(Value::Object(m))
}

/// Every shadow's current document in memory, followed from the compacted `shadows` topic: what
/// `GET /v1/devices/{id}/shadow` serves at constant time.
#[derive(Debug, Default)]
pub struct ShadowView {
    docs: RwLock<HashMap<String, Arc<ShadowDocument>>>,
    /// Woken at every change, for a writer waiting to read its own write.
    changed: tokio::sync::Notify,
}

impl ShadowView {
    /// Applies a record of `shadows` (`None`: a tombstone of `key`).
    pub fn apply(&self, key: &str, doc: Option<ShadowDocument>) {
        {
            let mut docs = self.docs.write().unwrap_or_else(|e| e.into_inner());
            match doc {
                // The topic may be read again from an earlier point: never go back a version.
                Some(d) => match docs.get(key) {
                    Some(old) if old.version > d.version => {}
                    _ => {
                        docs.insert(key.to_owned(), Arc::new(d));
                    }
                },
                None => {
                    docs.remove(key);
                }
            }
        }
        self.changed.notify_waiters();
    }

    pub fn get(&self, tenant: &str, device: &str, name: &str) -> Option<Arc<ShadowDocument>> {
        let docs = self.docs.read().unwrap_or_else(|e| e.into_inner());
        docs.get(&key(tenant, device, name)).cloned()
    }

    pub fn len(&self) -> usize {
        self.docs.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits (at most `wait`) until the view holds `version` or later of the shadow: a writer
    /// answered by the stage reads its own write.
    pub async fn wait_for(
        &self,
        tenant: &str,
        device: &str,
        name: &str,
        version: i64,
        wait: std::time::Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if self
                .get(tenant, device, name)
                .is_some_and(|d| d.version >= version)
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

/// Why an update could not be logged or answered (HTTP 503: retry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowLogError {
    #[error("the shadow log is unavailable: {0}")]
    Unavailable(String),
    #[error(
        "the shadow stage did not answer within {0:?}; the update is logged and will be applied"
    )]
    NoAnswer(std::time::Duration),
}

/// Where endpoints record shadow updates and read shadows: the process hands one in (it writes
/// `shadow-updates`, waits for the stage's answer on `shadow-responses`, and follows `shadows`),
/// so the endpoint crates do not touch those topics.
#[async_trait::async_trait]
pub trait ShadowLog: Send + Sync {
    /// Records `update` and waits for the shadow stage's answer to it.
    async fn submit(&self, update: ShadowUpdate) -> Result<ShadowResponse, ShadowLogError>;
    /// Records `update` (durable on return); the answer goes to the device over MQTT.
    async fn record(&self, update: ShadowUpdate) -> Result<(), ShadowLogError>;
    /// The current documents.
    fn view(&self) -> &ShadowView;
    /// The tenant of `device`, when the registry knows it (apps may set the desired state only
    /// of their tenant's devices).
    fn owner(&self, device: &str) -> Option<String>;
    /// The stage's answers to publish to the devices, from now on until the receiver is dropped;
    /// each answer goes to one of the publishers that asked (they share a consumer group).
    fn deliveries(&self) -> Result<tokio::sync::mpsc::Receiver<ShadowResponse>, ShadowLogError>;
}

/// A [`ShadowLog`] that may not be connected yet: a query server starts serving SQL without
/// Kafka and links to the shadow stage when it can; until then its shadow routes answer 503.
#[derive(Clone, Default)]
pub struct ShadowLogHandle(Arc<std::sync::OnceLock<Arc<dyn ShadowLog>>>);

impl ShadowLogHandle {
    /// A handle to a log that is connected already.
    pub fn ready(log: Arc<dyn ShadowLog>) -> Self {
        let handle = Self::default();
        handle.set(log);
        handle
    }

    /// Connects the handle (once; later calls change nothing).
    pub fn set(&self, log: Arc<dyn ShadowLog>) {
        let _ = self.0.set(log);
    }

    /// The log, once connected.
    pub fn get(&self) -> Option<Arc<dyn ShadowLog>> {
        self.0.get().cloned()
    }
}

impl std::fmt::Debug for ShadowLogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowLogHandle")
            .field("connected", &self.0.get().is_some())
            .finish()
    }
}

/// What a device asks on a shadow topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttRequest {
    /// `…/update`: an update of the shadow.
    Update,
    /// `…/get`: the current document, answered on `…/get/accepted` (or `…/get/rejected`).
    Get,
}

/// The MQTT topic of a shadow's `suffix` (`update/accepted`, `get`, …):
/// `devices/{id}/shadow/{suffix}`, or `devices/{id}/shadow/name/{name}/{suffix}` for a named one.
pub fn mqtt_topic(device: &str, name: &str, suffix: &str) -> String {
    if name.is_empty() {
        format!("devices/{device}/shadow/{suffix}")
    } else {
        format!("devices/{device}/shadow/name/{name}/{suffix}")
    }
}

/// The filters a bridge subscribes to for the devices' shadow requests.
pub const MQTT_REQUEST_FILTERS: [&str; 4] = [
    "devices/+/shadow/update",
    "devices/+/shadow/get",
    "devices/+/shadow/name/+/update",
    "devices/+/shadow/name/+/get",
];

/// The device, shadow name and request of a shadow request topic; `None` for any other topic.
pub fn parse_mqtt_topic(topic: &str) -> Option<(&str, &str, MqttRequest)> {
    let parts: Vec<&str> = topic.split('/').collect();
    let (device, name, op) = match parts.as_slice() {
        ["devices", device, "shadow", op] => (*device, CLASSIC, *op),
        ["devices", device, "shadow", "name", name, op] if !name.is_empty() => {
            (*device, *name, *op)
        }
        _ => return None,
    };
    let request = match op {
        "update" => MqttRequest::Update,
        "get" => MqttRequest::Get,
        _ => return None,
    };
    (!device.is_empty()).then_some((device, name, request))
}

/// What a shadow endpoint answers: an HTTP status, a JSON body, and for a 503 when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub retry_after_secs: Option<u64>,
}

impl Answer {
    fn refused(error: &ShadowError, at: Micros) -> Self {
        Self {
            status: error.status(),
            body: rejection(error, None, at),
            retry_after_secs: None,
        }
    }
}

/// The whole of an update endpoint, for the device's (ingest HTTP) and the apps' (query HTTP):
/// checks the request (a JSON body: `content_type` absent or `application/json`), logs it, waits for the shadow stage's answer and hands it back.
pub async fn update_endpoint(
    log: &dyn ShadowLog,
    limits: &Limits,
    who: (&str, &str, ShadowOrigin, &str),
    name: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Answer {
    let (tenant, device, origin, actor) = who;
    let now = crate::now_micros();
    let content_type = content_type.unwrap_or("application/json");
    if content_type.split(';').next().map(str::trim) != Some("application/json") {
        let mut m = Map::new();
        let why = format!("content type `{content_type}` is not supported: use application/json");
        m.insert("error".into(), why.into());
        return Answer {
            status: 415,
            body: Value::Object(m),
            retry_after_secs: None,
        };
    }
    if let Err(e) = check_name(name).and_then(|()| check_request(body, origin, limits).map(|_| ()))
    {
        return Answer::refused(&e, now);
    }
    let update = ShadowUpdate {
        request_id: uuid::Uuid::new_v4().to_string(),
        tenant: tenant.to_owned(),
        device: device.to_owned(),
        name: name.to_owned(),
        origin,
        actor: actor.to_owned(),
        received_at: now,
        body: body.to_vec(),
    };
    match log.submit(update).await {
        Ok(answer) => Answer {
            status: u16::try_from(answer.status).unwrap_or(500),
            body: serde_json::from_str(&answer.body).unwrap_or(Value::Null),
            retry_after_secs: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, device, "shadow update not answered");
            let mut m = Map::new();
            m.insert("error".into(), e.to_string().into());
            Answer {
                status: 503,
                body: Value::Object(m),
                retry_after_secs: Some(1),
            }
        }
    }
}

/// The whole of a read endpoint: the shadow's current document, or 404 naming it.
pub fn get_endpoint(view: &ShadowView, tenant: &str, device: &str, name: &str) -> Answer {
    let found = view
        .get(tenant, device, name)
        .and_then(|d| serde_json::from_str::<Value>(&d.document).ok());
    match found {
        Some(body) => Answer {
            status: 200,
            body,
            retry_after_secs: None,
        },
        None => {
            let what = if name.is_empty() {
                format!("device `{device}` has no shadow")
            } else {
                format!("device `{device}` has no shadow named `{name}`")
            };
            let mut m = Map::new();
            m.insert("error".into(), what.into());
            Answer {
                status: 404,
                body: Value::Object(m),
                retry_after_secs: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn update(v: Value) -> Update {
        Update::from_value(v, &Limits::default()).unwrap()
    }

    fn apply(s: &mut Shadow, v: Value, at: Micros) -> Applied {
        s.apply(&update(v), at, &Limits::default()).unwrap()
    }

    #[test]
    fn desired_and_reported_merge_and_the_delta_is_what_differs() {
        let mut s = Shadow::default();
        let a = apply(
            &mut s,
            json!({"state": {"desired": {"color": "red", "cfg": {"rate": 10, "mode": "eco"}}}}),
            1_000_000,
        );
        assert_eq!((a.changed, a.version, a.delta_changed), (true, 1, true));
        assert_eq!(
            Value::Object(s.delta()),
            json!({"color": "red", "cfg": {"rate": 10, "mode": "eco"}})
        );
        apply(
            &mut s,
            json!({"state": {"reported": {"color": "red", "cfg": {"rate": 5, "mode": "eco"}, "fw": "2.3"}}}),
            2_000_000,
        );
        assert_eq!(Value::Object(s.delta()), json!({"cfg": {"rate": 10}}));
        assert_eq!(s.version, 2);
        // Arrays are compared and replaced whole.
        apply(
            &mut s,
            json!({"state": {"desired": {"tags": [1, 2]}}}),
            3_000_000,
        );
        apply(
            &mut s,
            json!({"state": {"reported": {"tags": [1, 2, 3]}}}),
            3_000_000,
        );
        assert_eq!(
            Value::Object(s.delta()),
            json!({"cfg": {"rate": 10}, "tags": [1, 2]})
        );
        apply(
            &mut s,
            json!({"state": {"desired": {"tags": [3]}}}),
            4_000_000,
        );
        assert_eq!(s.desired.state["tags"], json!([3]));
    }

    #[test]
    fn null_deletes_a_field_or_a_section_and_the_version_never_goes_back() {
        let mut s = Shadow::default();
        apply(
            &mut s,
            json!({"state": {"desired": {"a": 1, "b": {"c": 2, "d": 3}}}}),
            1,
        );
        apply(&mut s, json!({"state": {"desired": {"b": {"c": null}}}}), 2);
        assert_eq!(
            Value::Object(s.desired.state.clone()),
            json!({"a": 1, "b": {"d": 3}})
        );
        assert_eq!(
            Value::Object(s.desired.times.clone()),
            json!({"a": 1, "b": {"d": 1}})
        );
        apply(&mut s, json!({"state": {"desired": {"b": {"d": null}}}}), 3);
        assert_eq!(
            Value::Object(s.desired.state.clone()),
            json!({"a": 1}),
            "an emptied object goes"
        );
        apply(&mut s, json!({"state": {"desired": null}}), 4);
        assert!(s.desired.state.is_empty() && s.desired.times.is_empty());
        assert_eq!(s.version, 4);
        // Deleting what is not there changes nothing and takes no version.
        let a = apply(&mut s, json!({"state": {"desired": {"zzz": null}}}), 5);
        assert_eq!((a.changed, a.version), (false, 4));
    }

    #[test]
    fn a_late_reported_value_never_overwrites_a_newer_one_nor_comes_back_after_a_delete() {
        let mut s = Shadow::default();
        apply(
            &mut s,
            json!({"state": {"reported": {"temp": 20, "fw": "2.3"}}}),
            100,
        );
        // A reading of 50 µs ago arrives late: temp stays.
        let a = apply(
            &mut s,
            json!({"state": {"reported": {"temp": 19, "rssi": -70}}}),
            50,
        );
        assert_eq!(s.reported.state["temp"], json!(20));
        assert_eq!(
            s.reported.state["rssi"],
            json!(-70),
            "a field it did not have is taken"
        );
        assert_eq!(a.stale, vec!["state.reported.temp".to_owned()]);
        assert_eq!(a.version, 2);
        // Deleted at 200; a value of 150 arriving after stays out, one of 250 comes in.
        apply(&mut s, json!({"state": {"reported": {"fw": null}}}), 200);
        let a = apply(&mut s, json!({"state": {"reported": {"fw": "2.2"}}}), 150);
        assert_eq!((a.changed, s.reported.state.get("fw")), (false, None));
        assert_eq!(a.version, 3, "nothing applied, no version");
        apply(&mut s, json!({"state": {"reported": {"fw": "2.4"}}}), 250);
        assert_eq!(s.reported.state["fw"], json!("2.4"));
        // A late delete of a parent removes only the leaves older than it.
        apply(
            &mut s,
            json!({"state": {"reported": {"cfg": {"x": 1}}}}),
            300,
        );
        apply(
            &mut s,
            json!({"state": {"reported": {"cfg": {"y": 2}}}}),
            500,
        );
        apply(&mut s, json!({"state": {"reported": {"cfg": null}}}), 400);
        assert_eq!(s.reported.state["cfg"], json!({"y": 2}));
        // Desired values follow the log's order, not time.
        apply(&mut s, json!({"state": {"desired": {"mode": "a"}}}), 900);
        apply(&mut s, json!({"state": {"desired": {"mode": "b"}}}), 100);
        assert_eq!(s.desired.state["mode"], json!("b"));
    }

    #[test]
    fn a_stale_version_is_a_conflict_and_applies_nothing() {
        let mut s = Shadow::default();
        apply(&mut s, json!({"state": {"desired": {"a": 1}}}), 1);
        let before = s.clone();
        let err = s
            .apply(
                &update(json!({"state": {"desired": {"a": 2}}, "version": 0})),
                2,
                &Limits::default(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            ShadowError::VersionConflict {
                expected: 0,
                current: 1
            }
        );
        assert_eq!(err.field(), "version");
        assert_eq!(s, before);
        let a = apply(
            &mut s,
            json!({"state": {"desired": {"a": 2}}, "version": 1}),
            3,
        );
        assert_eq!(a.version, 2);
    }

    #[test]
    fn requests_past_the_limits_or_malformed_are_refused_naming_the_field() {
        let limits = Limits {
            max_bytes: 300,
            max_depth: 3,
        };
        let err = |v: Value| Update::from_value(v, &limits).unwrap_err();
        let deep = json!({"state": {"desired": {"a": {"b": {"c": {"d": 1}}}}}});
        assert_eq!(err(deep).field(), "state.desired.a.b.c");
        assert_eq!(
            err(json!({"state": {"reported": {"a": [[[1]]]}}})).field(),
            "state.reported.a[0][0]"
        );
        assert_eq!(err(json!({"state": {"delta": {}}})).field(), "state.delta");
        assert_eq!(
            err(json!({"state": {"wanted": {}}})).field(),
            "state.wanted"
        );
        assert_eq!(
            err(json!({"state": {"desired": 3}})).field(),
            "state.desired"
        );
        assert_eq!(err(json!({"state": {}})).field(), "state");
        assert_eq!(err(json!({"desired": {}})).field(), "desired");
        assert_eq!(
            err(json!({"state": {"desired": {}}, "version": -1})).field(),
            "version"
        );
        assert_eq!(
            err(json!({"state": {"desired": {}}, "clientToken": "x".repeat(65)})).field(),
            "clientToken"
        );
        assert_eq!(Update::parse(b"{", &limits).unwrap_err().field(), "body");
        assert_eq!(Update::parse(b"[]", &limits).unwrap_err().field(), "body");

        let mut s = Shadow::default();
        let big = Update::from_value(
            json!({"state": {"desired": {"blob": "x".repeat(400)}}}),
            &limits,
        )
        .unwrap();
        let e = s.apply(&big, 1, &limits).unwrap_err();
        assert!(matches!(e, ShadowError::TooLarge { limit: 300, .. }), "{e}");
        assert_eq!(s, Shadow::default(), "nothing applied");
    }

    #[test]
    fn the_document_is_served_in_aws_form() {
        let mut s = Shadow::default();
        apply(
            &mut s,
            json!({"state": {"desired": {"cfg": {"rate": 10}}}}),
            5_000_000,
        );
        apply(
            &mut s,
            json!({"state": {"reported": {"cfg": {"rate": 5}}}}),
            6_500_000,
        );
        let doc = s.document(Some("tok-1"), 7_000_000);
        assert_eq!(
            doc,
            json!({
                "state": {
                    "desired": {"cfg": {"rate": 10}},
                    "reported": {"cfg": {"rate": 5}},
                    "delta": {"cfg": {"rate": 10}},
                },
                "metadata": {
                    "desired": {"cfg": {"rate": {"timestamp": 5}}},
                    "reported": {"cfg": {"rate": {"timestamp": 6}}},
                },
                "version": 2,
                "timestamp": 7,
                "clientToken": "tok-1",
            })
        );
        // And it survives a round trip through the stage's state.
        let back: Shadow = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![
                Just(1e308),
                Just(-1e308),
                Just(0.0),
                Just(f64::MIN_POSITIVE),
                any::<f64>()
            ]
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ]
    }

    fn tree() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::btree_map("[a-d]", inner.clone(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                prop::collection::vec(inner, 0..3).prop_map(Value::Array),
            ]
        })
    }

    fn section() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-d]", tree(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        /// Whatever the updates: the version counts the updates that changed something, the times
        /// mirror the state leaf for leaf (no object left empty), and the delta is empty once
        /// reported equals desired.
        #[test]
        fn any_sequence_of_updates_keeps_the_document_consistent(
            updates in prop::collection::vec((any::<bool>(), section(), 0i64..50), 1..12)
        ) {
            let limits = Limits::default();
            let mut s = Shadow::default();
            let mut versions = 0;
            for (desired, fields, at) in &updates {
                let key = if *desired { "desired" } else { "reported" };
                let u = Update::from_value(json!({"state": {key: fields}}), &limits).unwrap();
                let before = s.version;
                let a = s.apply(&u, *at, &limits).unwrap();
                prop_assert_eq!(a.version, s.version);
                prop_assert!(s.version == before || s.version == before + 1);
                versions += u64::from(a.changed);
                prop_assert!(same_shape(&s.desired.state, &s.desired.times));
                prop_assert!(same_shape(&s.reported.state, &s.reported.times));
            }
            prop_assert_eq!(s.version, versions);
            // Reporting exactly what is desired, newer than everything, empties the delta.
            let desired = Value::Object(s.desired.state.clone());
            let mut r = s.clone();
            r.apply(&Update::from_value(json!({"state": {"reported": null}}), &limits).unwrap(), 1_000, &limits).unwrap();
            r.apply(&Update::from_value(json!({"state": {"reported": desired}}), &limits).unwrap(), 1_000, &limits).unwrap();
            prop_assert!(r.delta().is_empty(), "{:?}", r.delta());
        }
    }

    proptest! {
        /// Readings of flat values at distinct event times, in any arrival order, leave the
        /// reported section as the time order does: the newest value of each field, or none if
        /// its newest change was a delete.
        #[test]
        fn reported_values_do_not_depend_on_arrival_order(
            changes in prop::collection::vec(("[a-c]", prop_oneof![Just(Value::Null), any::<i32>().prop_map(Value::from)]), 1..16),
            order in any::<u64>(),
        ) {
            let limits = Limits::default();
            let timed: Vec<(Micros, &String, &Value)> = changes
                .iter()
                .enumerate()
                .map(|(i, (k, v))| (i as Micros * 10, k, v))
                .collect();
            let mut shuffled = timed.clone();
            let mut x = order;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            let run = |seq: &[(Micros, &String, &Value)]| {
                let mut s = Shadow::default();
                for (at, k, v) in seq {
                    let u = Update::from_value(json!({"state": {"reported": {(*k).clone(): v}}}), &limits).unwrap();
                    s.apply(&u, *at, &limits).unwrap();
                }
                s.reported.state
            };
            prop_assert_eq!(run(&shuffled), run(&timed));
        }
    }

    fn same_shape(state: &Map<String, Value>, times: &Map<String, Value>) -> bool {
        state.len() == times.len()
            && state.iter().all(|(k, v)| match (v, times.get(k)) {
                (Value::Object(a), Some(Value::Object(b))) => !a.is_empty() && same_shape(a, b),
                (Value::Object(_), _) => false,
                (_, Some(Value::Number(_))) => true,
                _ => false,
            })
    }

    #[test]
    fn shadow_topics_name_the_device_the_shadow_and_the_request() {
        assert_eq!(
            mqtt_topic("d1", "", "update/delta"),
            "devices/d1/shadow/update/delta"
        );
        assert_eq!(
            mqtt_topic("d1", "fw", "update/accepted"),
            "devices/d1/shadow/name/fw/update/accepted"
        );
        assert_eq!(
            parse_mqtt_topic("devices/d1/shadow/update"),
            Some(("d1", "", MqttRequest::Update))
        );
        assert_eq!(
            parse_mqtt_topic("devices/d1/shadow/name/fw/get"),
            Some(("d1", "fw", MqttRequest::Get))
        );
        for other in [
            "devices/d1/telemetry",
            "devices/d1/shadow/update/accepted",
            "devices//shadow/update",
            "devices/d1/shadow/name//update",
            "devices/d1/shadow/delete",
        ] {
            assert_eq!(parse_mqtt_topic(other), None, "{other}");
        }
    }

    fn doc(version: i64) -> ShadowDocument {
        ShadowDocument {
            tenant: "acme".into(),
            device: "d1".into(),
            name: String::new(),
            version,
            updated: version,
            request_id: format!("r{version}"),
            origin: ShadowOrigin::App,
            document: format!(r#"{{"version":{version}}}"#),
        }
    }

    #[test]
    fn the_view_never_goes_back_a_version_and_wakes_a_waiting_writer() {
        let view = Arc::new(ShadowView::default());
        let k = key("acme", "d1", "");
        view.apply(&k, Some(doc(2)));
        view.apply(&k, Some(doc(1)));
        assert_eq!(view.get("acme", "d1", "").map(|d| d.version), Some(2));
        assert!(
            view.get("other", "d1", "").is_none(),
            "tenants do not share keys"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let writer = view.clone();
            let waiting = tokio::spawn(async move {
                writer
                    .wait_for("acme", "d1", "", 3, std::time::Duration::from_secs(5))
                    .await
            });
            tokio::task::yield_now().await;
            view.apply(&k, Some(doc(3)));
            assert!(waiting.await.unwrap());
            assert!(
                !view
                    .wait_for("acme", "d1", "", 9, std::time::Duration::from_millis(20))
                    .await
            );
        });
        view.apply(&k, None);
        assert!(view.is_empty());
    }

    #[test]
    fn endpoints_refuse_before_logging_naming_the_field() {
        let limits = Limits::default();
        let refused = |body: &str, origin| check_request(body.as_bytes(), origin, &limits);
        let e = refused(r#"{"state":{"reported":{"a":1}}}"#, ShadowOrigin::App).unwrap_err();
        assert_eq!((e.field(), e.status()), ("state.reported", 403));
        let e = refused(r#"{"state":{}}"#, ShadowOrigin::Device).unwrap_err();
        assert_eq!((e.field(), e.status()), ("state", 400));
        assert!(refused(r#"{"state":{"reported":{"a":1}}}"#, ShadowOrigin::Device).is_ok());
        assert!(refused(r#"{"state":{"desired":null}}"#, ShadowOrigin::Device).is_ok());
        assert_eq!(check_name("fw/../x").unwrap_err().field(), "name");
        let r = rejection(
            &ShadowError::VersionConflict {
                expected: 1,
                current: 2,
            },
            Some("t"),
            3_000_000,
        );
        assert_eq!(
            (&r["code"], &r["field"], &r["clientToken"], &r["timestamp"]),
            (
                &Value::from(409),
                &Value::from("version"),
                &Value::from("t"),
                &Value::from(3)
            )
        );
    }
}
