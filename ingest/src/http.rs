//! `POST /v1/telemetry`: devices send our JSON (object, array, NDJSON) or SenML JSON, authenticated
//! by their bearer token. Answers 202 only after Kafka acknowledged every message of the request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tributary_schemas::payload::{BodyFormat, content_event_id, split_body};
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::{RawEnvelope, Source, now_micros};

use crate::IngestError;
use crate::producer::RawProducer;

/// `[http]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest accepted request body (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// Most messages in one request; more gets 413.
    pub max_messages: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            max_messages: 10_000,
        }
    }
}

/// The HTTP ingest endpoint.
pub struct HttpIngest {
    config: HttpConfig,
    state: Arc<AppState>,
}

struct AppState {
    registry: Arc<DeviceRegistry>,
    producer: Arc<RawProducer>,
    max_messages: usize,
}

impl HttpIngest {
    pub fn new(
        config: HttpConfig,
        registry: Arc<DeviceRegistry>,
        producer: Arc<RawProducer>,
    ) -> Self {
        let state = Arc::new(AppState {
            registry,
            producer,
            max_messages: config.max_messages,
        });
        Self { config, state }
    }

    /// The routes, for serving or for tests.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/telemetry", post(telemetry))
            .route("/healthz", get(|| async { "ok" }))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(self.state.clone())
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
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    match status {
        StatusCode::UNAUTHORIZED => {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    resp
}

async fn telemetry(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(device) = token.and_then(|t| state.registry.authenticate(t)) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or unknown bearer token",
            None,
        );
    };
    if !device.enabled {
        return error(
            StatusCode::FORBIDDEN,
            format!("device `{}` is disabled", device.id),
            None,
        );
    }
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
    let mut pending = Vec::with_capacity(messages.len());
    let mut ids = Vec::with_capacity(messages.len());
    for m in &messages {
        let envelope = RawEnvelope {
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
        };
        match state.producer.enqueue(&envelope).await {
            Ok(p) => pending.push(p),
            Err(e) => {
                tracing::warn!(error = %e, device = %device.id, "raw produce refused");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "event log unavailable, retry later",
                    None,
                );
            }
        }
        ids.push(envelope.event_id);
    }
    for result in futures::future::join_all(pending.into_iter().map(|p| p.acked())).await {
        if let Err(e) = result {
            tracing::warn!(error = %e, device = %device.id, "raw produce failed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "event log unavailable, retry later",
                None,
            );
        }
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "accepted": ids.len(), "event_ids": ids })),
    )
        .into_response()
}
