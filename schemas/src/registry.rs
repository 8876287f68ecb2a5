//! The device registry: which devices exist, their tenant, and their credential (a token hash).
//!
//! For now a JSON file (`registry.path`); every stage that needs it loads the same file. Tokens are
//! never stored: only their SHA-256, hex-encoded.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub tenant: String,
    /// SHA-256 of the device's bearer token, hex.
    pub token_sha256: String,
    #[serde(default = "enabled_default")]
    pub enabled: bool,
    /// The data subject (person) owning the device, when known.
    #[serde(default)]
    pub subject: Option<String>,
}

fn enabled_default() -> bool {
    true
}

/// The registry file's layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryFile {
    pub devices: Vec<Device>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read device registry {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("device registry {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("device registry {path}: device `{id}` is listed twice")]
    Duplicate { path: String, id: String },
}

/// The registry in memory, indexed by device id and by token hash.
#[derive(Debug, Clone, Default)]
pub struct DeviceRegistry {
    by_id: HashMap<String, Device>,
    by_token: HashMap<String, String>,
}

/// SHA-256 of a token, hex: what the registry stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl DeviceRegistry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let p = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| RegistryError::Read {
            path: p.clone(),
            source,
        })?;
        let file: RegistryFile =
            serde_json::from_slice(&text).map_err(|source| RegistryError::Parse {
                path: p.clone(),
                source,
            })?;
        Self::from_devices(file.devices).map_err(|id| RegistryError::Duplicate { path: p, id })
    }

    /// Builds the registry; `Err(id)` names a device listed twice.
    pub fn from_devices(devices: Vec<Device>) -> Result<Self, String> {
        let mut reg = Self::default();
        for d in devices {
            if reg.by_id.contains_key(&d.id) {
                return Err(d.id);
            }
            reg.by_token.insert(d.token_sha256.clone(), d.id.clone());
            reg.by_id.insert(d.id.clone(), d);
        }
        Ok(reg)
    }

    pub fn get(&self, id: &str) -> Option<&Device> {
        self.by_id.get(id)
    }

    /// The device a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<&Device> {
        self.by_token
            .get(&token_hash(token))
            .and_then(|id| self.by_id.get(id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticates_by_token_hash_only() {
        let reg = DeviceRegistry::from_devices(vec![Device {
            id: "d1".into(),
            tenant: "acme".into(),
            token_sha256: token_hash("s3cret"),
            enabled: true,
            subject: None,
        }])
        .unwrap();
        assert_eq!(reg.authenticate("s3cret").unwrap().id, "d1");
        assert!(reg.authenticate("S3cret").is_none());
        assert_eq!(reg.get("d1").unwrap().tenant, "acme");
    }

    #[test]
    fn refuses_duplicates() {
        let d = Device {
            id: "d1".into(),
            tenant: "a".into(),
            token_sha256: "x".into(),
            enabled: true,
            subject: None,
        };
        assert_eq!(
            DeviceRegistry::from_devices(vec![d.clone(), d]).unwrap_err(),
            "d1"
        );
    }
}
