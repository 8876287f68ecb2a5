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
//! the change from their next batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tributary_schemas::incidents::{
    IncidentRuleBase, IncidentRuleOverrides, IncidentRulesEvent, TenantIncidentRules,
};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::now_micros;

use crate::RegistryError;
use crate::api::{Admin, ApiError, ApiState, check_name, parse};
use crate::catalog::TenantTopic;

/// The only writer of the `incident-rules` topic, with this process's view of it.
pub struct IncidentRuleWriter {
    topic: TenantTopic,
    base: IncidentRuleBase,
    overrides: Arc<IncidentRuleOverrides>,
}

impl IncidentRuleWriter {
    /// `base`: the config file's rules; `overrides`: followed from the topic
    /// (`follower::follow_incident_rules`).
    pub fn new(
        kafka: &KafkaConfig,
        base: IncidentRuleBase,
        overrides: Arc<IncidentRuleOverrides>,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            topic: TenantTopic::new(
                kafka,
                &kafka.topics.incident_rules,
                "tributary-incident-rules",
            )?,
            base,
            overrides,
        })
    }

    fn effective(
        &self,
        tenant: &str,
        api: &BTreeMap<String, TenantIncidentRules>,
    ) -> serde_json::Value {
        let (source, rules) = self.base.effective(tenant, api);
        json!({"tenant": tenant, "source": source, "rules": rules})
    }
}

pub(crate) async fn get_rules(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    let r = &state.incident_rules;
    axum::Json(r.effective(&tenant, &r.overrides.snapshot())).into_response()
}

pub(crate) async fn put_rules(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(e) = check_name(&tenant, "tenant") {
        return e.into_response();
    }
    let own: TenantIncidentRules = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Some(name) = own.rules.keys().find(|n| check_name(n, "rule").is_err()) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("rule name `{name}` must be 1 to 128 characters of A-Z a-z 0-9 . _ -"),
        )
        .field(Some("rules"))
        .into_response();
    }
    change(&state, tenant, Some(own)).await
}

pub(crate) async fn delete_rules(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    change(&state, tenant, None).await
}

async fn change(state: &ApiState, tenant: String, own: Option<TenantIncidentRules>) -> Response {
    let r = &state.incident_rules;
    let _guard = r.topic.lock.lock().await;
    let mut overrides = r.overrides.snapshot();
    match &own {
        Some(entry) => overrides.insert(tenant.clone(), entry.clone()),
        None => overrides.remove(&tenant),
    };
    if let Err(e) = r.base.compile(&overrides) {
        return ApiError::new(StatusCode::BAD_REQUEST, e.reason)
            .field(Some(&format!("rules.{}.{}", e.rule, e.field)))
            .into_response();
    }
    let event = IncidentRulesEvent {
        tenant: tenant.clone(),
        at: now_micros(),
        actor: "admin".into(),
        rules: own.map(|o| o.rules),
    };
    if let Err(answer) = r.topic.record(&tenant, &event).await {
        return answer;
    }
    r.overrides.apply(&event);
    tracing::info!(%tenant, "tenant incident rules changed");
    axum::Json(r.effective(&tenant, &overrides)).into_response()
}
