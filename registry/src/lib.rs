//! The device registry: who the devices are, which tenant owns them, how they authenticate.
//!
//! This crate owns the admin API over devices ([`api::RegistryApi`]: create, bulk-create from a
//! recipe, list, get, update, delete, groups), the writer that records every change as an event on
//! the compacted `registry` topic ([`writer::RegistryWriter`]), and the follower that rebuilds a
//! process's in-memory view from that topic and keeps it current ([`follower::follow`]), and
//! self-registration of devices holding a tenant-signed JWT ([`self_registration`]). The model
//! and the view themselves are contracts and live in `tributary_schemas::registry`.
//!
//! It must not touch: telemetry (raw or derived topics), the lake, or Mosquitto's configuration.

pub mod api;
pub mod follower;
pub mod self_registration;
pub mod writer;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// A new secret token: 24 random bytes, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}
