//! The device registry: who the devices are, which tenant owns them, how they authenticate.
//!
//! This crate owns the admin API over devices ([`api::RegistryApi`]: create, bulk-create from a
//! recipe, list, get, update, delete, groups), the writer that records every change as an event on
//! the compacted `registry` topic ([`writer::RegistryWriter`]), and the follower that rebuilds a
//! process's in-memory view from that topic and keeps it current ([`follower::follow`]), and
//! self-registration of devices holding a tenant-signed JWT ([`self_registration`]), and the
//! tenants' settings over the admin API, one shape for each ([`tenant_settings`]): metric catalogs
//! ([`catalog`], topic `catalog`), anomaly detectors ([`detectors`], topic `detector-catalog`) and
//! incident rules ([`incident_rules`], topic `incident-rules`). The models and views themselves
//! are contracts and live in `tributary_schemas::{registry, catalog, detectors, incidents}`.
//!
//! It must not touch: telemetry (raw or derived topics), the lake, or Mosquitto's configuration.

pub mod api;
pub mod catalog;
pub mod detectors;
pub mod follower;
pub mod incident_rules;
pub mod self_registration;
pub mod tenant_settings;
pub mod writer;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tributary_schemas::registry::{Device, token_hash};

/// `[registry]` in the config file.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Bearer token of the admin API (`/v1/devices…`). Unset: the admin API refuses every request.
    pub admin_token: Option<String>,
    /// Tenant → Ed25519 public key (PEM) that signs its devices' self-registration JWTs
    /// (`iss` = tenant, `sub` = device id, `exp`). A tenant without a key cannot self-register.
    pub tenant_keys: BTreeMap<String, String>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tenant_keys", &self.tenant_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("registry event: {0}")]
    Avro(#[from] tributary_schemas::avro::AvroError),
    #[error("topic `{0}` does not exist (run `tributary topics create`)")]
    NoTopic(String),
}

/// Gives `device` a new secret token and returns it (to be shown once): the device keeps only its
/// SHA-256 (for HTTP) and its Mosquitto hash (so the MQTT broker takes the same token as password).
pub fn issue_token(device: &mut Device) -> String {
    let token = new_token();
    device.token_sha256 = Some(token_hash(&token));
    device.mqtt_password_hash = Some(mosquitto_hash(&token));
    token
}

/// Mosquitto's password-file hash of `password`: `$7$<iterations>$<salt>$<hash>`, PBKDF2-HMAC-SHA512
/// with a 12-byte random salt and 101 iterations, base64 — what `mosquitto_passwd` writes.
pub fn mosquitto_hash(password: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    const ITERATIONS: u32 = 101;
    let mut salt = [0u8; 12];
    rand::rng().fill_bytes(&mut salt);
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), &salt, ITERATIONS, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${ITERATIONS}${}${}", b64.encode(salt), b64.encode(hash))
}

/// A new secret token: 24 random bytes, hex.
fn new_token() -> String {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_hashes_are_salted_pbkdf2_sha512() {
        let a = mosquitto_hash("s3cret");
        let b = mosquitto_hash("s3cret");
        assert_ne!(a, b, "a fresh salt each time");
        let parts: Vec<&str> = a.split('$').collect();
        assert_eq!(&parts[..3], ["", "7", "101"]);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode(parts[3]).unwrap();
        let hash = b64.decode(parts[4]).unwrap();
        assert_eq!((salt.len(), hash.len()), (12, 64));
        let mut again = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(b"s3cret", &salt, 101, &mut again);
        assert_eq!(hash, again);
    }

    #[test]
    fn issued_tokens_set_both_hashes() {
        let mut d = Device::new("d1", "t1", 0);
        let token = issue_token(&mut d);
        assert_eq!(d.token_sha256, Some(token_hash(&token)));
        assert!(
            d.mqtt_password_hash
                .as_deref()
                .unwrap()
                .starts_with("$7$101$")
        );
    }
}
