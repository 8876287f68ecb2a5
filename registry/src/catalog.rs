//! The tenants' metric catalogs over the admin API, recorded on the compacted `catalog` topic.
//!
//! | method and path                     | does                                                  |
//! |-------------------------------------|-------------------------------------------------------|
//! | `GET /v1/tenants/{tenant}/catalog`  | the tenant's effective catalog (policy and metrics) and where it comes from |
//! | `PUT /v1/tenants/{tenant}/catalog`  | set it: `{"policy": {…}, "metrics": {"flow": {"type": "integer", "unit": "count"}}}` |
//! | `DELETE /v1/tenants/{tenant}/catalog` | drop the API entry (the config file's applies again) |
//!
//! A catalog is checked before it is recorded (a bad one is a 400 naming the field); the cleanse
//! stages follow the topic and apply a change to the records they cleanse next.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use tributary_schemas::avro::{self, TopicRecord};
use tributary_schemas::catalog::{CatalogBase, CatalogEvent, CatalogOverrides, TenantCatalog};
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::now_micros;

use crate::RegistryError;
use crate::api::{Admin, ApiError, ApiState, check_name, parse};

/// The producer of a compacted per-tenant topic (`catalog`, `detector-catalog`): a change is
/// answered only once Kafka has it.
pub(crate) struct TenantTopic {
    producer: FutureProducer,
    topic: String,
    /// Serialises changes within this process.
    pub(crate) lock: tokio::sync::Mutex<()>,
}

impl TenantTopic {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        topic: &str,
        client: &str,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            producer: kafka.producer(client).create()?,
            topic: topic.to_owned(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Records `event` under the key `tenant`; on failure the 503 to answer.
    pub(crate) async fn record<E: TopicRecord>(
        &self,
        tenant: &str,
        event: &E,
    ) -> Result<(), Response> {
        let sent = async {
            let bytes = avro::encode(event)?;
            let delivery =
                kafka::enqueue(&self.producer, &self.topic, None, tenant, &bytes).await?;
            kafka::delivered(delivery).await?;
            Ok::<_, RegistryError>(())
        };
        sent.await.map_err(|e| {
            tracing::error!(error = %e, %tenant, topic = %self.topic, "change not recorded");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the change could not be recorded; retry",
            )
            .retry_after(std::time::Duration::from_secs(1))
            .into_response()
        })
    }
}

/// The only writer of the `catalog` topic, with this process's view of it.
pub struct CatalogWriter {
    topic: TenantTopic,
    base: CatalogBase,
    overrides: Arc<CatalogOverrides>,
}

impl CatalogWriter {
    /// `base`: the config file's catalog; `overrides`: followed from the topic
    /// (`follower::follow_catalog`).
    pub fn new(
        kafka: &KafkaConfig,
        base: CatalogBase,
        overrides: Arc<CatalogOverrides>,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            topic: TenantTopic::new(kafka, &kafka.topics.catalog, "tributary-catalog")?,
            base,
            overrides,
        })
    }

    /// The effective catalog of `tenant` as JSON.
    fn effective(
        &self,
        tenant: &str,
        overrides: &BTreeMap<String, TenantCatalog>,
    ) -> serde_json::Value {
        let (source, entry) = match (overrides.get(tenant), self.base.tenants.get(tenant)) {
            (Some(c), _) => ("api", Some(c)),
            (None, Some(c)) => ("config", Some(c)),
            (None, None) => ("default", None),
        };
        let mut metrics = self.base.metrics.clone();
        let mut policy = self.base.policy.clone();
        if let Some(c) = entry {
            metrics.extend(c.metrics.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Some(p) = &c.policy {
                policy = p.clone();
            }
        }
        json!({"tenant": tenant, "source": source, "policy": policy, "metrics": metrics})
    }
}

pub(crate) async fn get_catalog(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    let c = &state.catalog;
    axum::Json(c.effective(&tenant, &c.overrides.snapshot())).into_response()
}

pub(crate) async fn put_catalog(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(e) = check_name(&tenant, "tenant") {
        return e.into_response();
    }
    let catalog: TenantCatalog = match parse(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    change(&state, tenant, Some(catalog)).await
}

pub(crate) async fn delete_catalog(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response {
    change(&state, tenant, None).await
}

async fn change(state: &ApiState, tenant: String, catalog: Option<TenantCatalog>) -> Response {
    let c = &state.catalog;
    let _guard = c.topic.lock.lock().await;
    let mut overrides = c.overrides.snapshot();
    match &catalog {
        Some(entry) => overrides.insert(tenant.clone(), entry.clone()),
        None => overrides.remove(&tenant),
    };
    if let Err(e) = c.base.compile(&overrides) {
        // e.key is `tenants.<tenant>.metrics.…`: name the field of the request body.
        let field = e
            .key
            .strip_prefix(&format!("tenants.{tenant}."))
            .unwrap_or(&e.key)
            .to_owned();
        return ApiError::new(StatusCode::BAD_REQUEST, e.reason)
            .field(Some(&field))
            .into_response();
    }
    let event = CatalogEvent {
        tenant: tenant.clone(),
        at: now_micros(),
        actor: "admin".into(),
        catalog,
    };
    if let Err(answer) = c.topic.record(&tenant, &event).await {
        return answer;
    }
    c.overrides.apply(&event);
    tracing::info!(%tenant, "tenant catalog changed");
    axum::Json(c.effective(&tenant, &overrides)).into_response()
}
