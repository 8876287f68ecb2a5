//! The device registry's contract: a device ([`Device`]), a change of the registry
//! ([`RegistryEvent`], the records of the compacted `registry` topic, key = device id), and the
//! in-memory view every stage that needs devices keeps ([`DeviceRegistry`]), rebuilt by applying
//! the topic's events in order.
//!
//! Tokens are never stored: only their SHA-256, hex-encoded.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Micros;

/// One device, as the registry knows it. Schema: the `Device` record of
/// `schemas/avro/registry_event.avsc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub tenant: String,
    /// Customer group within the tenant.
    pub group: Option<String>,
    pub model: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Metrics the device is expected to send.
    pub metrics: Vec<String>,
    /// Site hierarchy, outermost first (zone, section, spot).
    pub site: Vec<String>,
    /// SHA-256 of the device's bearer token, hex; `None` for devices that present a tenant JWT.
    pub token_sha256: Option<String>,
    pub enabled: bool,
    /// The data subject (person) owning the device now.
    pub subject: Option<String>,
    /// Every owner the device had, oldest first.
    pub subject_history: Vec<SubjectSpan>,
    pub created_at: Micros,
    pub updated_at: Micros,
    /// The token hashed for Mosquitto's password file (`$7$…`), so the MQTT broker accepts the same
    /// token as the device's password; `None` for devices without a token.
    pub mqtt_password_hash: Option<String>,
}

/// From `since` on, `subject` owned the device (`None`: nobody known).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectSpan {
    pub subject: Option<String>,
    pub since: Micros,
}

impl Device {
    /// An enabled device with nothing but its id and tenant, created at `at`.
    pub fn new(id: impl Into<String>, tenant: impl Into<String>, at: Micros) -> Self {
        Self {
            id: id.into(),
            tenant: tenant.into(),
            enabled: true,
            created_at: at,
            updated_at: at,
            ..Self::default()
        }
    }

    /// Changes the owning subject, keeping the history. Setting the current owner again is a no-op.
    pub fn set_subject(&mut self, subject: Option<String>, at: Micros) {
        let first = self.subject_history.is_empty();
        if !first && self.subject == subject {
            return;
        }
        if first && subject.is_none() {
            return;
        }
        self.subject_history.push(SubjectSpan {
            subject: subject.clone(),
            since: at,
        });
        self.subject = subject;
    }

    /// Who owned the device at `at`.
    pub fn subject_at(&self, at: Micros) -> Option<&str> {
        self.subject_history
            .iter()
            .rev()
            .find(|s| s.since <= at)
            .and_then(|s| s.subject.as_deref())
    }
}

/// What a [`RegistryEvent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryChange {
    Created,
    Updated,
    Deleted,
}

/// Topic `registry`: one change, with the device's whole state after it (`None` once deleted).
/// Schema: `schemas/avro/registry_event.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub device: String,
    /// The device's tenant (the one it had, when deleted).
    pub tenant: String,
    pub change: RegistryChange,
    pub at: Micros,
    pub actor: String,
    pub state: Option<Device>,
}

/// SHA-256 of a token, hex: what the registry stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The registry in memory, indexed by device id and by token hash; shared by the tasks of a
/// process and updated in place as registry events arrive.
#[derive(Debug, Default)]
pub struct DeviceRegistry {
    index: RwLock<Index>,
    /// Bumped by every change, so followers of the view (e.g. the broker's password file) can tell
    /// it changed without diffing it.
    generation: AtomicU64,
}

#[derive(Debug, Default)]
struct Index {
    by_id: HashMap<String, Arc<Device>>,
    by_token: HashMap<String, String>,
}

impl DeviceRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding `devices`; `Err(id)` names a device listed twice.
    pub fn from_devices(devices: Vec<Device>) -> Result<Self, String> {
        let reg = Self::new();
        for d in devices {
            if reg.get(&d.id).is_some() {
                return Err(d.id);
            }
            reg.put(d);
        }
        Ok(reg)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A number that changes whenever the view does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Adds or replaces a device.
    pub fn put(&self, device: Device) {
        let mut index = self.write();
        if let Some(old) = index.by_id.get(&device.id).cloned()
            && let Some(h) = &old.token_sha256
        {
            index.by_token.remove(h);
        }
        if let Some(h) = &device.token_sha256 {
            index.by_token.insert(h.clone(), device.id.clone());
        }
        index.by_id.insert(device.id.clone(), Arc::new(device));
        drop(index);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Removes a device.
    pub fn remove(&self, id: &str) {
        let mut index = self.write();
        if let Some(old) = index.by_id.remove(id)
            && let Some(h) = &old.token_sha256
        {
            index.by_token.remove(h);
        }
        drop(index);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Applies one event of the `registry` topic.
    pub fn apply(&self, event: &RegistryEvent) {
        match &event.state {
            Some(d) if event.change != RegistryChange::Deleted => self.put(d.clone()),
            _ => self.remove(&event.device),
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.read().by_id.get(id).cloned()
    }

    /// The device a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Device>> {
        let index = self.read();
        index
            .by_token
            .get(&token_hash(token))
            .and_then(|id| index.by_id.get(id))
            .cloned()
    }

    /// The devices `keep` accepts, by id.
    pub fn list(&self, keep: impl Fn(&Device) -> bool) -> Vec<Arc<Device>> {
        let mut out: Vec<Arc<Device>> = self
            .read()
            .by_id
            .values()
            .filter(|d| keep(d))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro;

    fn device(id: &str, token: &str) -> Device {
        Device {
            token_sha256: Some(token_hash(token)),
            ..Device::new(id, "acme", 1)
        }
    }

    #[test]
    fn authenticates_by_token_hash_only() {
        let reg = DeviceRegistry::from_devices(vec![device("d1", "s3cret")]).unwrap();
        assert_eq!(reg.authenticate("s3cret").unwrap().id, "d1");
        assert!(reg.authenticate("S3cret").is_none());
        assert_eq!(reg.get("d1").unwrap().tenant, "acme");
    }

    #[test]
    fn refuses_duplicates() {
        let d = device("d1", "x");
        assert_eq!(
            DeviceRegistry::from_devices(vec![d.clone(), d]).unwrap_err(),
            "d1"
        );
    }

    #[test]
    fn events_replace_and_delete_and_rotate_tokens() {
        let reg = DeviceRegistry::new();
        let event = |change, state: Option<Device>| RegistryEvent {
            device: "d1".into(),
            tenant: "acme".into(),
            change,
            at: 5,
            actor: "admin".into(),
            state,
        };
        reg.apply(&event(RegistryChange::Created, Some(device("d1", "old"))));
        reg.apply(&event(RegistryChange::Updated, Some(device("d1", "new"))));
        assert!(reg.authenticate("old").is_none(), "a rotated token is dead");
        assert_eq!(reg.authenticate("new").unwrap().id, "d1");
        reg.apply(&event(RegistryChange::Deleted, None));
        assert!(reg.get("d1").is_none() && reg.authenticate("new").is_none());
        assert!(reg.is_empty());
    }

    #[test]
    fn subject_history_keeps_every_owner() {
        let mut d = Device::new("d", "t", 0);
        d.set_subject(None, 1);
        assert!(d.subject_history.is_empty(), "no owner yet is not a change");
        d.set_subject(Some("alice".into()), 10);
        d.set_subject(Some("alice".into()), 15);
        d.set_subject(Some("bob".into()), 20);
        d.set_subject(None, 30);
        assert_eq!(d.subject_history.len(), 3);
        assert_eq!(d.subject, None);
        assert_eq!(d.subject_at(5), None);
        assert_eq!(d.subject_at(12), Some("alice"));
        assert_eq!(d.subject_at(20), Some("bob"));
        assert_eq!(d.subject_at(31), None);
    }

    #[test]
    fn registry_event_round_trips_through_avro() {
        let mut d = device("d1", "t");
        d.group = Some("customer-a".into());
        d.model = Some("th-200".into());
        d.tags.insert("floor".into(), "2".into());
        d.metrics = vec!["temperature".into(), "humidity".into()];
        d.site = vec!["north".into(), "hall-3".into(), "spot-17".into()];
        d.set_subject(Some("person-1".into()), 7);
        let e = RegistryEvent {
            device: "d1".into(),
            tenant: "t".into(),
            change: RegistryChange::Created,
            at: 7,
            actor: "admin".into(),
            state: Some(d),
        };
        assert_eq!(
            avro::decode::<RegistryEvent>(&avro::encode(&e).unwrap()).unwrap(),
            e
        );
        let deleted = RegistryEvent {
            change: RegistryChange::Deleted,
            state: None,
            ..e
        };
        assert_eq!(
            avro::decode::<RegistryEvent>(&avro::encode(&deleted).unwrap()).unwrap(),
            deleted
        );
    }
}
