//! Self-registration: a device unknown to the registry presents a JWT signed by its tenant's key
//! (EdDSA / Ed25519; the public keys are configured under `[registry.tenant_keys]`) and is
//! registered on first contact.
//!
//! Claims: `iss` = the tenant, `sub` = the device id, `exp` (required); optional `group` and
//! `model`. A JWT never moves a device between tenants, and a disabled device stays refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tributary_schemas::now_micros;
use tributary_schemas::registry::{Device, RegistryChange, RegistryEvent};

use crate::writer::RegistryWriter;

/// Why a JWT was refused; `forbidden` means 403 (a valid identity that may not do this), else 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub forbidden: bool,
    pub reason: String,
}

impl Refusal {
    fn unauthorized(reason: impl Into<String>) -> Self {
        Self {
            forbidden: false,
            reason: reason.into(),
        }
    }

    fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            forbidden: true,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

/// Verifies tenant-signed device JWTs and registers new devices.
pub struct SelfRegistration {
    keys: HashMap<String, DecodingKey>,
    writer: Arc<RegistryWriter>,
}

/// A configured tenant key that is not an Ed25519 public key in PEM.
#[derive(Debug, thiserror::Error)]
#[error("`registry.tenant_keys.{tenant}` is not an Ed25519 public key in PEM: {reason}")]
pub struct BadTenantKey {
    pub tenant: String,
    pub reason: String,
}

/// Parses the configured tenant keys.
pub fn tenant_keys(
    configured: &BTreeMap<String, String>,
) -> Result<HashMap<String, DecodingKey>, BadTenantKey> {
    configured
        .iter()
        .map(|(tenant, pem)| {
            DecodingKey::from_ed_pem(pem.as_bytes())
                .map(|k| (tenant.clone(), k))
                .map_err(|e| BadTenantKey {
                    tenant: tenant.clone(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

impl SelfRegistration {
    pub fn new(
        configured: &BTreeMap<String, String>,
        writer: Arc<RegistryWriter>,
    ) -> Result<Self, BadTenantKey> {
        Ok(Self {
            keys: tenant_keys(configured)?,
            writer,
        })
    }

    /// Whether a bearer token is a JWT at all (three base64url parts).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// The device a tenant-signed JWT stands for, registering it on first contact.
    pub async fn authenticate(&self, jwt: &str) -> Result<Arc<Device>, Refusal> {
        // The issuer picks the key; it is read unverified and then checked by the signature.
        let tenant = unverified_issuer(jwt)
            .ok_or_else(|| Refusal::unauthorized("the JWT has no readable `iss` (tenant)"))?;
        let key = self.keys.get(&tenant).ok_or_else(|| {
            Refusal::unauthorized(format!("tenant `{tenant}` has no key for device JWTs"))
        })?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&tenant]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 30;
        let claims = jsonwebtoken::decode::<Claims>(jwt, key, &validation)
            .map_err(|e| Refusal::unauthorized(format!("JWT refused: {e}")))?
            .claims;
        let id = claims.sub;
        if id.is_empty()
            || id.len() > 128
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(Refusal::unauthorized(
                "JWT `sub` must be a device id of 1 to 128 of A-Z a-z 0-9 . _ -",
            ));
        }
        let view = self.writer.view().clone();
        if let Some(d) = view.get(&id) {
            return self.admit(d, &claims.iss);
        }
        let _guard = self.writer.lock().await;
        if let Some(d) = view.get(&id) {
            return self.admit(d, &claims.iss);
        }
        let mut device = Device::new(id.clone(), claims.iss.clone(), now_micros());
        device.group = claims.group;
        device.model = claims.model;
        let event = RegistryEvent {
            device: id.clone(),
            tenant: claims.iss.clone(),
            change: RegistryChange::Created,
            at: device.created_at,
            actor: "self-registration".into(),
            state: Some(device),
        };
        self.writer.record(&[event]).await.map_err(|e| {
            tracing::warn!(error = %e, device = %id, "self-registration not recorded");
            Refusal::unauthorized("the registry is unavailable; retry later")
        })?;
        tracing::info!(device = %id, tenant = %claims.iss, "device registered itself");
        view.get(&id)
            .ok_or_else(|| Refusal::unauthorized("registration was lost; retry"))
    }

    fn admit(&self, device: Arc<Device>, tenant: &str) -> Result<Arc<Device>, Refusal> {
        if device.tenant != tenant {
            return Err(Refusal::forbidden(format!(
                "device `{}` belongs to another tenant",
                device.id
            )));
        }
        Ok(device)
    }
}

fn unverified_issuer(jwt: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Iss {
        iss: String,
    }
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok().map(|c| c.iss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"acme","sub":"d1","exp":1}"#);
        assert_eq!(
            unverified_issuer(&format!("e30.{payload}.sig")).as_deref(),
            Some("acme")
        );
        assert_eq!(unverified_issuer("a.b.c"), None);
        assert!(SelfRegistration::looks_like_jwt("a.b.c"));
        assert!(!SelfRegistration::looks_like_jwt("0123abcd"));
    }
}
