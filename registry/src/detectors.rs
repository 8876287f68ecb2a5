//! The tenants' anomaly detectors over the admin API, recorded on the compacted `detector-catalog`
//! topic.
//!
//! | method and path                       | does                                                |
//! |---------------------------------------|-----------------------------------------------------|
//! | `GET /v1/tenants/{tenant}/detectors`  | the tenant's detectors in effect and where its own come from (`api`, `config`, `default`) |
//! | `PUT /v1/tenants/{tenant}/detectors`  | set its own: `{"detectors": {"overheating": {"metric": "temperature", "kind": "threshold", "above": 80}}}` |
//! | `DELETE /v1/tenants/{tenant}/detectors` | drop the API entry (the config file's applies again) |
//!
//! The tenant's own detectors replace its `[anomalies.tenants.<tenant>]` entry of the config file
//! and, by name, the global detectors. A PUT is checked with the same code as the config file (a
//! clear level past the trigger, a window of 0, an unknown metric: a 400 naming
//! `detectors.<name>.<field>`) before it is recorded; every anomaly stage follows the topic and
//! applies the change from the next reading it sees. The API's shape is shared with the other
//! settings: [`crate::tenant_settings`].

use std::collections::BTreeMap;

use serde_json::json;
use tributary_schemas::Micros;
use tributary_schemas::detectors::{
    DetectorBase, DetectorEvent, DetectorOverrides, TenantDetectors,
};
use tributary_schemas::kafka::KafkaConfig;

use crate::api::ApiError;
use crate::tenant_settings::{TenantSetting, TenantSettingWriter, check_entry_names};

/// A tenant's detectors as a setting of the admin API.
pub struct DetectorSetting;

/// The only writer of the `detector-catalog` topic, with this process's view of it.
pub type DetectorWriter = TenantSettingWriter<DetectorSetting>;

impl TenantSetting for DetectorSetting {
    type Own = TenantDetectors;
    type Base = DetectorBase;
    type Event = DetectorEvent;
    const WHAT: &'static str = "detectors";
    const CLIENT: &'static str = "tributary-detectors";

    fn topic(kafka: &KafkaConfig) -> &str {
        &kafka.topics.detector_catalog
    }

    fn check_body(own: &TenantDetectors) -> Result<(), ApiError> {
        check_entry_names(own.detectors.keys(), "detector", "detectors")
    }

    fn check(
        base: &DetectorBase,
        _tenant: &str,
        api: &BTreeMap<String, TenantDetectors>,
    ) -> Result<(), (String, String)> {
        base.compile(api)
            .map(drop)
            .map_err(|e| (format!("detectors.{}.{}", e.detector, e.field), e.reason))
    }

    fn event(tenant: &str, at: Micros, actor: &str, own: Option<TenantDetectors>) -> DetectorEvent {
        DetectorEvent {
            tenant: tenant.to_owned(),
            at,
            actor: actor.to_owned(),
            detectors: own.map(|o| o.detectors),
        }
    }

    fn apply(overrides: &DetectorOverrides, event: &DetectorEvent) {
        overrides.apply(event);
    }

    fn effective(
        base: &DetectorBase,
        tenant: &str,
        api: &BTreeMap<String, TenantDetectors>,
    ) -> serde_json::Value {
        let (source, detectors) = base.effective(tenant, api);
        json!({"tenant": tenant, "source": source, "detectors": detectors})
    }
}
