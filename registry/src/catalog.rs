//! The tenants' metric catalogs over the admin API, recorded on the compacted `catalog` topic.
//!
//! | method and path                     | does                                                  |
//! |-------------------------------------|-------------------------------------------------------|
//! | `GET /v1/tenants/{tenant}/catalog`  | the tenant's effective catalog (policy and metrics) and where it comes from |
//! | `PUT /v1/tenants/{tenant}/catalog`  | set it: `{"policy": {…}, "metrics": {"flow": {"type": "integer", "unit": "count"}}}` |
//! | `DELETE /v1/tenants/{tenant}/catalog` | drop the API entry (the config file's applies again) |
//!
//! A catalog is checked before it is recorded (a bad one is a 400 naming the field); the cleanse
//! stages follow the topic and apply a change to the records they cleanse next. The API's shape
//! is shared with the other settings: [`crate::tenant_settings`].

use std::collections::BTreeMap;

use serde_json::json;
use tributary_schemas::Micros;
use tributary_schemas::catalog::{CatalogBase, CatalogEvent, CatalogOverrides, TenantCatalog};
use tributary_schemas::kafka::KafkaConfig;

use crate::tenant_settings::{TenantSetting, TenantSettingWriter};

/// A tenant's metric catalog as a setting of the admin API.
pub struct CatalogSetting;

/// The only writer of the `catalog` topic, with this process's view of it.
pub type CatalogWriter = TenantSettingWriter<CatalogSetting>;

impl TenantSetting for CatalogSetting {
    type Own = TenantCatalog;
    type Base = CatalogBase;
    type Event = CatalogEvent;
    const WHAT: &'static str = "catalog";
    const CLIENT: &'static str = "tributary-catalog";

    fn topic(kafka: &KafkaConfig) -> &str {
        &kafka.topics.catalog
    }

    fn check(
        base: &CatalogBase,
        tenant: &str,
        api: &BTreeMap<String, TenantCatalog>,
    ) -> Result<(), (String, String)> {
        base.compile(api).map(drop).map_err(|e| {
            // e.key is `tenants.<tenant>.metrics.…`: name the field of the request body.
            let field = e
                .key
                .strip_prefix(&format!("tenants.{tenant}."))
                .unwrap_or(&e.key)
                .to_owned();
            (field, e.reason)
        })
    }

    fn event(tenant: &str, at: Micros, actor: &str, own: Option<TenantCatalog>) -> CatalogEvent {
        CatalogEvent {
            tenant: tenant.to_owned(),
            at,
            actor: actor.to_owned(),
            catalog: own,
        }
    }

    fn apply(overrides: &CatalogOverrides, event: &CatalogEvent) {
        overrides.apply(event);
    }

    fn effective(
        base: &CatalogBase,
        tenant: &str,
        api: &BTreeMap<String, TenantCatalog>,
    ) -> serde_json::Value {
        let (source, entry) = match (api.get(tenant), base.tenants.get(tenant)) {
            (Some(c), _) => ("api", Some(c)),
            (None, Some(c)) => ("config", Some(c)),
            (None, None) => ("default", None),
        };
        let mut metrics = base.metrics.clone();
        let mut policy = base.policy.clone();
        if let Some(c) = entry {
            metrics.extend(c.metrics.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Some(p) = &c.policy {
                policy = p.clone();
            }
        }
        json!({"tenant": tenant, "source": source, "policy": policy, "metrics": metrics})
    }
}
