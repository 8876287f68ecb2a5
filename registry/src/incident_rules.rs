//! The tenants' incident rules over the admin API, recorded on the compacted `incident-rules`
//! topic.
//!
//! | method and path                             | does                                          |
//! |---------------------------------------------|-----------------------------------------------|
//! | `GET /v1/tenants/{tenant}/incident-rules`   | the tenant's rules in effect and where its own come from (`api`, `config`, `default`) |
//! | `PUT /v1/tenants/{tenant}/incident-rules`   | set its own: `{"rules": {"section_down": {"correlate": "site", "level": 2, "min_devices": 3}}}` |
//! | `DELETE /v1/tenants/{tenant}/incident-rules` | drop the API entry (the config file's applies again) |
//!
//! The tenant's own rules replace its `[incidents.tenants.<tenant>]` entry of the config file and,
//! by name, the global rules. A PUT is checked with the same code as the config file (a missing
//! `correlate`, a window of 0, a field the kind does not use: a 400 naming
//! `rules.<name>.<field>`) before it is recorded; the incident stages follow the topic and apply
//! the change from their next batch. The API's shape is shared with the other settings:
//! [`crate::tenant_settings`].

use std::collections::BTreeMap;

use serde_json::json;
use tributary_schemas::Micros;
use tributary_schemas::incidents::{
    IncidentRuleBase, IncidentRuleOverrides, IncidentRulesEvent, TenantIncidentRules,
};
use tributary_schemas::kafka::KafkaConfig;

use crate::api::ApiError;
use crate::tenant_settings::{TenantSetting, TenantSettingWriter, check_entry_names};

/// A tenant's incident rules as a setting of the admin API.
pub struct IncidentRuleSetting;

/// The only writer of the `incident-rules` topic, with this process's view of it.
pub type IncidentRuleWriter = TenantSettingWriter<IncidentRuleSetting>;

impl TenantSetting for IncidentRuleSetting {
    type Own = TenantIncidentRules;
    type Base = IncidentRuleBase;
    type Event = IncidentRulesEvent;
    const WHAT: &'static str = "incident rules";
    const CLIENT: &'static str = "tributary-incident-rules";

    fn topic(kafka: &KafkaConfig) -> &str {
        &kafka.topics.incident_rules
    }

    fn check_body(own: &TenantIncidentRules) -> Result<(), ApiError> {
        check_entry_names(own.rules.keys(), "rule", "rules")
    }

    fn check(
        base: &IncidentRuleBase,
        _tenant: &str,
        api: &BTreeMap<String, TenantIncidentRules>,
    ) -> Result<(), (String, String)> {
        base.compile(api)
            .map(drop)
            .map_err(|e| (format!("rules.{}.{}", e.rule, e.field), e.reason))
    }

    fn event(
        tenant: &str,
        at: Micros,
        actor: &str,
        own: Option<TenantIncidentRules>,
    ) -> IncidentRulesEvent {
        IncidentRulesEvent {
            tenant: tenant.to_owned(),
            at,
            actor: actor.to_owned(),
            rules: own.map(|o| o.rules),
        }
    }

    fn apply(overrides: &IncidentRuleOverrides, event: &IncidentRulesEvent) {
        overrides.apply(event);
    }

    fn effective(
        base: &IncidentRuleBase,
        tenant: &str,
        api: &BTreeMap<String, TenantIncidentRules>,
    ) -> serde_json::Value {
        let (source, rules) = base.effective(tenant, api);
        json!({"tenant": tenant, "source": source, "rules": rules})
    }
}
