//! What a tenant sets through the admin API beside its devices (the metric [`crate::catalog`],
//! the anomaly [`crate::detectors`], the [`crate::incident_rules`]): one shape for all three.
//!
//! Each is a per-tenant entry laid over the config file's, kept on a compacted topic (key =
//! tenant) whose only writer is a [`TenantSettingWriter`]. `GET` answers the entry in effect and
//! where it comes from (`api`, `config`, `default`); `PUT` checks the whole result with the same
//! code that checks the config file (a 400 naming the field of the body), records the change and
//! answers only once Kafka has it; `DELETE` drops the API entry, so the config file's applies
//! again. Changes are serialised within the process; every stage that uses the setting follows
//! the topic (`crate::follower`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rdkafka::producer::FutureProducer;
use serde::de::DeserializeOwned;
use tributary_schemas::Micros;
use tributary_schemas::avro::{self, TopicRecord};
use tributary_schemas::catalog::TenantOverrides;
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::now_micros;

use crate::RegistryError;
use crate::api::{Admin, ApiError, ApiState, check_name, parse};

/// One kind of per-tenant setting: its body, its config-file base, its topic record.
pub trait TenantSetting: Send + Sync + Sized + 'static {
    /// A tenant's own entry: the body of a PUT.
    type Own: Clone + DeserializeOwned + Send + Sync + 'static;
    /// The config file's entries, under the API's.
    type Base: Send + Sync + 'static;
    /// The record of a change on the topic.
    type Event: TopicRecord + Send + Sync;
    /// What changed, for the log (`catalog`, `detectors`, `incident rules`).
    const WHAT: &'static str;
    /// The Kafka client id of the writer.
    const CLIENT: &'static str;

    /// The topic the changes are recorded on.
    fn topic(kafka: &KafkaConfig) -> &str;
    /// Checks of a PUT body beyond its shape (entry names).
    fn check_body(_own: &Self::Own) -> Result<(), ApiError> {
        Ok(())
    }
    /// Checks the entries in effect with `api` laid over `base`; the error names the field of
    /// `tenant`'s body and the reason.
    fn check(
        base: &Self::Base,
        tenant: &str,
        api: &BTreeMap<String, Self::Own>,
    ) -> Result<(), (String, String)>;
    /// The record of `tenant`'s entry becoming `own` (`None`: removed).
    fn event(tenant: &str, at: Micros, actor: &str, own: Option<Self::Own>) -> Self::Event;
    /// `event` applied to the followed view.
    fn apply(overrides: &TenantOverrides<Self::Own>, event: &Self::Event);
    /// `tenant`'s setting in effect as the GET answers it.
    fn effective(
        base: &Self::Base,
        tenant: &str,
        api: &BTreeMap<String, Self::Own>,
    ) -> serde_json::Value;
}

/// Entry names of a setting (detector, rule names): the same rule as ids and tenants, or a 400
/// on `field`.
pub(crate) fn check_entry_names<'a>(
    mut names: impl Iterator<Item = &'a String>,
    what: &str,
    field: &str,
) -> Result<(), ApiError> {
    match names.find(|n| check_name(n, what).is_err()) {
        None => Ok(()),
        Some(name) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} name `{name}` must be 1 to 128 characters of A-Z a-z 0-9 . _ -"),
        )
        .field(Some(field))),
    }
}

/// The only writer of a setting's topic, with this process's view of it.
pub struct TenantSettingWriter<K: TenantSetting> {
    producer: FutureProducer,
    topic: String,
    /// Serialises changes within this process.
    lock: tokio::sync::Mutex<()>,
    base: K::Base,
    overrides: Arc<TenantOverrides<K::Own>>,
}

impl<K: TenantSetting> TenantSettingWriter<K> {
    /// `base`: the config file's entries; `overrides`: followed from the topic (`crate::follower`).
    pub fn new(
        kafka: &KafkaConfig,
        base: K::Base,
        overrides: Arc<TenantOverrides<K::Own>>,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            producer: kafka.producer(K::CLIENT).create()?,
            topic: K::topic(kafka).to_owned(),
            lock: tokio::sync::Mutex::new(()),
            base,
            overrides,
        })
    }

    fn effective(&self, tenant: &str) -> Response {
        axum::Json(K::effective(&self.base, tenant, &self.overrides.snapshot())).into_response()
    }

    async fn change(&self, tenant: String, own: Option<K::Own>) -> Response {
        let _guard = self.lock.lock().await;
        let mut overrides = self.overrides.snapshot();
        match &own {
            Some(entry) => overrides.insert(tenant.clone(), entry.clone()),
            None => overrides.remove(&tenant),
        };
        if let Err((field, reason)) = K::check(&self.base, &tenant, &overrides) {
            return ApiError::new(StatusCode::BAD_REQUEST, reason)
                .field(Some(&field))
                .into_response();
        }
        let event = K::event(&tenant, now_micros(), "admin", own);
        if let Err(answer) = self.record(&tenant, &event).await {
            return answer;
        }
        K::apply(&self.overrides, &event);
        tracing::info!(%tenant, "tenant {} changed", K::WHAT);
        self.effective(&tenant)
    }

    /// Records `event` under the key `tenant`; on failure the 503 to answer.
    async fn record(&self, tenant: &str, event: &K::Event) -> Result<(), Response> {
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

/// Where the admin API keeps the writer of each setting.
pub(crate) trait SettingWriters<K: TenantSetting> {
    fn writer(&self) -> &TenantSettingWriter<K>;
}

pub(crate) async fn get_setting<K: TenantSetting>(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response
where
    ApiState: SettingWriters<K>,
{
    SettingWriters::<K>::writer(&*state).effective(&tenant)
}

pub(crate) async fn put_setting<K: TenantSetting>(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response
where
    ApiState: SettingWriters<K>,
{
    if let Err(e) = check_name(&tenant, "tenant") {
        return e.into_response();
    }
    let own: K::Own = match parse(&body) {
        Ok(own) => own,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = K::check_body(&own) {
        return e.into_response();
    }
    SettingWriters::<K>::writer(&*state)
        .change(tenant, Some(own))
        .await
}

pub(crate) async fn delete_setting<K: TenantSetting>(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
) -> Response
where
    ApiState: SettingWriters<K>,
{
    SettingWriters::<K>::writer(&*state)
        .change(tenant, None)
        .await
}
