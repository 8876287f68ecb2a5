//! `POST /v1/telemetry`: devices send our JSON (object, array, NDJSON) or SenML JSON, optionally
//! gzip-compressed, authenticated by their bearer token. Answers 202 only after Kafka acknowledged
//! every message of the request; a request is all or nothing.
//!
//! Status codes: 400 malformed (names the field, and the line of NDJSON), 401 unknown token, 403
//! device disabled or writing as another device, 413 too many bytes or messages, 415 unsupported
//! content type or encoding, 429 tenant over its rate (with `Retry-After`), 503 Kafka did not
//! acknowledge in time (with `Retry-After`). The API is described by `ingest/openapi.json`, served at
//! `GET /openapi.json`.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tributary_schemas::avro::ShadowOrigin;
use tributary_schemas::payload::{BodyFormat, content_event_id, refusal_at_ingest, split_body};
use tributary_schemas::registry::{Device, DeviceRegistry};
use tributary_schemas::shadows::{self, Answer, Limits, ShadowLog};
use tributary_schemas::{RawEnvelope, Source, now_micros};

use crate::IngestError;
use crate::producer::RawProducer;
use crate::rate_limit::TenantRateLimit;
use tributary_registry::api::{ApiError, RegistryApi};
use tributary_registry::self_registration::SelfRegistration;

/// The OpenAPI document of the HTTP API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// `[http]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest accepted request body in bytes, before and after gzip decoding; larger gets 413.
    pub max_body_bytes: usize,
    /// Most messages in one request; more gets 413.
    pub max_messages: usize,
    /// Events per second each tenant may send over HTTP to this instance; 0 = no limit. Over it,
    /// requests get 429 with `Retry-After`.
    pub tenant_rate_limit: u32,
    /// Events a tenant may send at once above its rate (the token bucket's size).
    pub tenant_burst: u32,
    /// How long a request waits for Kafka to acknowledge all its events before it gets 503 (the
    /// device retries; events that were stored meanwhile are deduplicated by event id).
    pub ack_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            max_messages: 10_000,
            tenant_rate_limit: 0,
            tenant_burst: 10_000,
            ack_timeout_ms: 10_000,
        }
    }
}

/// The HTTP server: device ingest, and the registry's admin API when one is given.
pub struct HttpIngest {
    config: HttpConfig,
    state: Arc<AppState>,
    admin: Option<Router>,
}

struct AppState {
    registry: Arc<DeviceRegistry>,
    self_registration: std::sync::OnceLock<Arc<SelfRegistration>>,
    producer: Arc<RawProducer>,
    max_messages: usize,
    max_body_bytes: usize,
    rate_limit: Option<TenantRateLimit>,
    ack_timeout: Duration,
    shadows: std::sync::OnceLock<(Arc<dyn ShadowLog>, Limits)>,
}

impl HttpIngest {
    pub fn new(
        config: HttpConfig,
        registry: Arc<DeviceRegistry>,
        producer: Arc<RawProducer>,
    ) -> Self {
        let state = Arc::new(AppState {
            registry,
            self_registration: std::sync::OnceLock::new(),
            producer,
            max_messages: config.max_messages,
            max_body_bytes: config.max_body_bytes,
            rate_limit: TenantRateLimit::new(
                f64::from(config.tenant_rate_limit),
                f64::from(config.tenant_burst),
            ),
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
            shadows: std::sync::OnceLock::new(),
        });
        Self {
            config,
            state,
            admin: None,
        }
    }

    /// Lets devices holding a tenant-signed JWT register themselves on first contact.
    pub fn with_self_registration(self, sr: Arc<SelfRegistration>) -> Self {
        // Set once, before serving; a second call keeps the first.
        let _ = self.state.self_registration.set(sr);
        self
    }

    /// Also serves the devices' shadows (`/v1/devices/{id}/shadow[/{name}]`: GET, and POST of
    /// an update), through `log`.
    pub fn with_shadows(self, log: Arc<dyn ShadowLog>, limits: Limits) -> Self {
        let _ = self.state.shadows.set((log, limits));
        self
    }

    /// Also serves the registry's admin API (`/v1/devices…`, `/v1/groups`).
    pub fn with_admin(mut self, api: &RegistryApi) -> Self {
        self.admin = Some(api.router());
        self
    }

    /// The routes, for serving or for tests.
    pub fn router(&self) -> Router {
        let admin = self.admin.clone().unwrap_or_default();
        Router::new()
            .route("/v1/telemetry", post(telemetry))
            .route(
                "/v1/devices/{id}/shadow",
                get(get_classic_shadow).post(update_classic_shadow),
            )
            .route(
                "/v1/devices/{id}/shadow/{name}",
                get(get_named_shadow).post(update_named_shadow),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/openapi.json",
                get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
            )
            .with_state(self.state.clone())
            .merge(admin)
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), IngestError> {
        let addr: SocketAddr = self
            .config
            .listen
            .parse()
            .map_err(|e| IngestError::Listen {
                addr: self.config.listen.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| IngestError::Listen {
                addr: self.config.listen.clone(),
                source,
            })?;
        tracing::info!(%addr, "http ingest listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(IngestError::Serve)
    }
}

fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    ApiError::new(status, message).field(field).into_response()
}

/// An error the client should retry after `wait`.
fn retry_later(status: StatusCode, message: impl Into<String>, wait: Duration) -> Response {
    ApiError::new(status, message)
        .retry_after(wait)
        .into_response()
}

fn kafka_unavailable() -> Response {
    retry_later(
        StatusCode::SERVICE_UNAVAILABLE,
        "event log unavailable, retry later",
        Duration::from_secs(1),
    )
}

/// The body after `Content-Encoding` (identity or gzip), at most `max` bytes once decoded.
fn decode_body(headers: &HeaderMap, body: Bytes, max: usize) -> Result<Bytes, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(body),
        Some("gzip") | Some("x-gzip") => {
            let mut decoded = Vec::with_capacity(body.len() * 4);
            flate2::read::GzDecoder::new(&body[..])
                .take(max as u64 + 1)
                .read_to_end(&mut decoded)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("body is not valid gzip: {e}"),
                    )
                })?;
            if decoded.len() > max {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("gzip body decodes to more than {max} bytes"),
                ));
            }
            Ok(Bytes::from(decoded))
        }
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content encoding `{other}` is not supported: use gzip or none"),
        )),
    }
}

/// The device a request's bearer token (or self-registration JWT) belongs to, enabled; else the
/// 401 or 403 to answer.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Arc<Device>, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let known = token.and_then(|t| state.registry.authenticate(t));
    let device = match (known, token, state.self_registration.get()) {
        (Some(d), _, _) => d,
        (None, Some(t), Some(sr)) if SelfRegistration::looks_like_jwt(t) => {
            match sr.authenticate(t).await {
                Ok(d) => d,
                Err(r) if r.forbidden => return Err(error(StatusCode::FORBIDDEN, r.reason, None)),
                Err(r) => return Err(error(StatusCode::UNAUTHORIZED, r.reason, None)),
            }
        }
        _ => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token",
                None,
            ));
        }
    };
    if !device.enabled {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!("device `{}` is disabled", device.id),
            None,
        ));
    }
    Ok(device)
}

async fn telemetry(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let device = match authenticate(&state, &headers).await {
        Ok(d) => d,
        Err(refused) => return refused,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let Some(format) = BodyFormat::from_content_type(content_type) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type `{content_type}` is not supported: use application/json, application/x-ndjson or application/senml+json"
            ),
            None,
        );
    };
    let body = match decode_body(&headers, body, state.max_body_bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let messages = match split_body(format, &body) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string(), e.field.as_deref()),
    };
    if messages.len() > state.max_messages {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} messages in one request; at most {} are allowed",
                messages.len(),
                state.max_messages
            ),
            None,
        );
    }
    if let Some(other) = messages
        .iter()
        .find_map(|m| m.device.as_deref().filter(|d| *d != device.id))
    {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "token of device `{}` cannot send as device `{other}`",
                device.id
            ),
            Some("device"),
        );
    }
    let received_at = now_micros();
    // Times out of range and oversized messages are refused here, where the device can be told.
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.bytes.len() > tributary_schemas::payload::MAX_MESSAGE_BYTES)
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "message {i} is {} bytes; one message may have at most {}",
                m.bytes.len(),
                tributary_schemas::payload::MAX_MESSAGE_BYTES
            ),
            None,
        );
    }
    for (i, m) in messages.iter().enumerate() {
        if let Err(e) = refusal_at_ingest(format, m.bytes, &device.id, received_at) {
            let e = if messages.len() > 1 {
                e.at(format!("message {i}"))
            } else {
                e
            };
            return error(StatusCode::BAD_REQUEST, e.to_string(), e.field.as_deref());
        }
    }
    if let Some(limit) = &state.rate_limit
        && let Err(wait) = limit.take(&device.tenant, messages.len())
    {
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            format!("tenant `{}` is over its rate limit", device.tenant),
            wait,
        );
    }
    let envelopes: Vec<RawEnvelope> = messages
        .iter()
        .map(|m| RawEnvelope {
            event_id: m
                .id
                .clone()
                .unwrap_or_else(|| content_event_id(&device.id, m.bytes)),
            tenant: device.tenant.clone(),
            device: device.id.clone(),
            source: Source::Http,
            received_at,
            content_type: format.message_content_type().to_owned(),
            payload: m.bytes.to_vec(),
            subject: device.subject.clone(),
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: device.group.clone(),
            device_model: device.model.clone(),
            site: device.site.clone(),
        })
        .collect();
    let produce = async {
        let mut pending = Vec::with_capacity(envelopes.len());
        for envelope in &envelopes {
            pending.push(state.producer.enqueue(envelope).await?);
        }
        for result in futures::future::join_all(pending.into_iter().map(|p| p.acked())).await {
            result?;
        }
        Ok::<_, IngestError>(())
    };
    match tokio::time::timeout(state.ack_timeout, produce).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, device = %device.id, "raw produce failed");
            return kafka_unavailable();
        }
        Err(_) => {
            tracing::warn!(device = %device.id, timeout = ?state.ack_timeout, "kafka did not acknowledge in time");
            return kafka_unavailable();
        }
    }
    let ids: Vec<String> = envelopes.into_iter().map(|e| e.event_id).collect();
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "accepted": ids.len(), "event_ids": ids })),
    )
        .into_response()
}

/// The device of the token, which must be device `id`, and the shadow log; else what to answer.
async fn shadow_caller<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Arc<Device>, &'a (Arc<dyn ShadowLog>, Limits)), Response> {
    let Some(shadows) = state.shadows.get() else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "device shadows are not served by this process",
            None,
        ));
    };
    let device = authenticate(state, headers).await?;
    if device.id != id {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "token of device `{}` cannot use the shadow of device `{id}`",
                device.id
            ),
            Some("id"),
        ));
    }
    Ok((device, shadows))
}

fn answer(a: Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(a.body)).into_response();
    if let Some(secs) = a.retry_after_secs
        && let Ok(v) = header::HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

async fn get_shadow(state: &AppState, headers: &HeaderMap, id: &str, name: &str) -> Response {
    match shadow_caller(state, headers, id).await {
        Ok((device, (log, _))) => answer(shadows::get_endpoint(
            log.view(),
            &device.tenant,
            &device.id,
            name,
        )),
        Err(refused) => refused,
    }
}

async fn update_shadow(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    name: &str,
    body: &[u8],
) -> Response {
    let (device, (log, limits)) = match shadow_caller(state, headers, id).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let who = (
        device.tenant.as_str(),
        device.id.as_str(),
        ShadowOrigin::Device,
        device.id.as_str(),
    );
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    answer(shadows::update_endpoint(log.as_ref(), limits, who, name, content_type, body).await)
}

async fn get_classic_shadow(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    get_shadow(&state, &headers, &id, shadows::CLASSIC).await
}

async fn get_named_shadow(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    get_shadow(&state, &headers, &id, &name).await
}

async fn update_classic_shadow(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    update_shadow(&state, &headers, &id, shadows::CLASSIC, &body).await
}

async fn update_named_shadow(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    update_shadow(&state, &headers, &id, &name, &body).await
}
