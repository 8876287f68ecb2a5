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
//! applies the change from the next reading it sees.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tributary_schemas::detectors::{
    DetectorBase, DetectorEvent, DetectorOverrides, TenantDetectors,
};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::now_micros;

use crate::RegistryError;
use crate::api::{Admin, ApiError, ApiState, check_name, parse};
use crate::catalog::TenantTopic;

/// The only writer of the `detector-catalog` topic, with this process's view of it.
pub struct DetectorWriter {
    topic: TenantTopic,
    base: DetectorBase,
    overrides: Arc<DetectorOverrides>,
}

impl DetectorWriter {
    /// `base`: the config file's detectors; `overrides`: followed from the topic
    /// (`follower::follow_detectors`).
    pub fn new(
        kafka: &KafkaConfig,
        base: DetectorBase,
        overrides: Arc<DetectorOverrides>,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            topic: TenantTopic::new(kafka, &kafka.topics.detector_catalog, "tributary-detectors")?,
            base,
            overrides,
        })
    }

    fn effective(
        &self,
        tenant: &str,
        api: &std::collections::BTreeMap<String, TenantDetectors>,
    ) -> serde_json::Value {
        let (source, detectors) = self.base.effective(tenant, api);
        json!({"tenant": tenant, "source": source, "detectors": detectors})
    }
}

pub(crate) async fn get_detectors(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    let d = &state.detectors;
    axum::Json(d.effective(&tenant, &d.overrides.snapshot())).into_response()
}

pub(crate) async fn put_detectors(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(e) = check_name(&tenant, "tenant") {
        return e.into_response();
    }
    let own: TenantDetectors = match parse(&body) {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    if let Some(name) = own
        .detectors
        .keys()
        .find(|n| check_name(n, "detector").is_err())
    {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("detector name `{name}` must be 1 to 128 characters of A-Z a-z 0-9 . _ -"),
        )
        .field(Some("detectors"))
        .into_response();
    }
    change(&state, tenant, Some(own)).await
}

pub(crate) async fn delete_detectors(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    change(&state, tenant, None).await
}

async fn change(state: &ApiState, tenant: String, own: Option<TenantDetectors>) -> Response {
    let d = &state.detectors;
    let _guard = d.topic.lock.lock().await;
    let mut overrides = d.overrides.snapshot();
    match &own {
        Some(entry) => overrides.insert(tenant.clone(), entry.clone()),
        None => overrides.remove(&tenant),
    };
    if let Err(e) = d.base.compile(&overrides) {
        return ApiError::new(StatusCode::BAD_REQUEST, e.reason)
            .field(Some(&format!("detectors.{}.{}", e.detector, e.field)))
            .into_response();
    }
    let event = DetectorEvent {
        tenant: tenant.clone(),
        at: now_micros(),
        actor: "admin".into(),
        detectors: own.map(|o| o.detectors),
    };
    if let Err(answer) = d.topic.record(&tenant, &event).await {
        return answer;
    }
    d.overrides.apply(&event);
    tracing::info!(%tenant, "tenant detectors changed");
    axum::Json(d.effective(&tenant, &overrides)).into_response()
}
