//! `POST /v1/sql`: SQL over HTTP (and the incident lifecycle, `incidents.rs`), authenticated, answered as JSON, CSV, Arrow IPC stream or Parquet.
//!
//! Request: `{"sql": "SELECT …", "format": "json" | "csv" | "arrow" | "parquet"}`; without `format`,
//! the `Accept` header chooses (JSON by default). Credentials: `Authorization: Bearer <token>` or
//! HTTP Basic (`user:password`) of a `[query.users]` entry.
//!
//! Results stream: the first MiB is encoded before the status line is sent, so a query failing
//! early (or a small result over a limit) gets a proper error status; a larger result streams, and a
//! limit hit after that ends the response without the format's closing bytes (a truncated JSON
//! array, CSV without its end, Arrow without end-of-stream, Parquet without footer), so no client
//! mistakes a cut result for a whole one; the server logs why.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::config::{Principal, QueryConfig};
use crate::format::{StreamEncoder, WireFormat};
use crate::incidents::IncidentActionLog;
use crate::{QueryError, QueryService, QueryStream};
use tributary_schemas::shadows::{Limits, ShadowLogHandle};

/// Bytes encoded before the response starts.
const PREBUFFER_BYTES: usize = 1 << 20;

/// The HTTP SQL endpoint.
pub struct SqlHttp {
    state: Arc<HttpState>,
}

pub(crate) struct HttpState {
    pub(crate) service: Arc<QueryService>,
    pub(crate) config: QueryConfig,
    openapi: Option<&'static str>,
    /// Where incident actions are recorded (`None`: the incident routes only read).
    pub(crate) incidents: Option<Arc<dyn IncidentActionLog>>,
    /// Where shadow updates go and shadows are read (`None`: the shadow routes answer 404; not
    /// connected yet: 503).
    pub(crate) shadows: Option<ShadowLogHandle>,
    pub(crate) shadow_limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
    #[serde(default)]
    format: Option<String>,
}

impl SqlHttp {
    pub fn new(service: Arc<QueryService>, config: QueryConfig) -> Self {
        Self {
            state: Arc::new(HttpState {
                service,
                config,
                openapi: None,
                incidents: None,
                shadows: None,
                shadow_limits: Limits::default(),
            }),
        }
    }

    /// Also serves the HTTP API's OpenAPI document at `GET /openapi.json`.
    pub fn with_openapi(mut self, document: &'static str) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.openapi = Some(document);
        }
        self
    }

    /// Also records people's actions on incidents (`POST /v1/incidents/{id}/…`) in `log`.
    pub fn with_incidents(mut self, log: Arc<dyn IncidentActionLog>) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.incidents = Some(log);
        }
        self
    }

    /// Also serves device shadows to the tenants' users (`/v1/devices/{id}/shadow…`) through `log`
    /// (answering 503 while it is not connected).
    pub fn with_shadows(mut self, log: ShadowLogHandle, limits: Limits) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.shadows = Some(log);
            state.shadow_limits = limits;
        }
        self
    }

    pub fn router(&self) -> Router {
        let openapi = self.state.openapi;
        let mut router = Router::new()
            .route("/v1/sql", post(sql))
            .merge(crate::incidents::routes())
            .merge(crate::shadows::routes())
            .route("/healthz", get(|| async { "ok" }));
        if let Some(doc) = openapi {
            router = router.route(
                "/openapi.json",
                get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }),
            );
        }
        router.with_state(self.state.clone())
    }

    /// Serves on `listen` until the process ends.
    pub async fn serve(self, listen: &str) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(addr = %listen, "sql over http listening");
        axum::serve(listener, self.router()).await
    }
}

/// The principal the request's credentials name.
pub(crate) fn authenticate(config: &QueryConfig, headers: &HeaderMap) -> Option<Principal> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => config.authenticate_token(credentials.trim()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials.trim())
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let (user, password) = decoded.split_once(':')?;
            config.authenticate(user, password)
        }
        _ => None,
    }
}

pub(crate) fn error(
    status: StatusCode,
    message: impl Into<String>,
    field: Option<&str>,
) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer, Basic realm=\"tributary\""),
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

pub(crate) fn query_error(e: QueryError, principal: &Principal) -> Response {
    let status = StatusCode::from_u16(e.codes().http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    tracing::info!(user = %principal.user, status = status.as_u16(), error = %e, "sql refused");
    error(status, e.to_string(), None)
}

async fn sql(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(principal) = authenticate(&state.config, &headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials: `Authorization: Bearer <token>` or Basic user:password",
            None,
        );
    };
    let request: SqlRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let field = if e.to_string().contains("sql") {
                Some("sql")
            } else {
                None
            };
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be {{\"sql\": \"…\", \"format\": \"json|csv|arrow|parquet\"}}: {e}"
                ),
                field,
            );
        }
    };
    let format = match &request.format {
        Some(name) => match WireFormat::from_name(name) {
            Some(f) => f,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown format `{name}`: json, csv, arrow or parquet"),
                    Some("format"),
                );
            }
        },
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .and_then(WireFormat::from_accept)
            .unwrap_or(WireFormat::Json),
    };
    let started = Instant::now();
    let stream = match state.service.execute(&principal, &request.sql).await {
        Ok(s) => s,
        Err(e) => return query_error(e, &principal),
    };
    match respond(stream, format, &principal, started).await {
        Ok(r) => r,
        Err(e) => query_error(e, &principal),
    }
}

/// Encodes up to [`PREBUFFER_BYTES`] before answering, then streams the rest.
async fn respond(
    mut stream: QueryStream,
    format: WireFormat,
    principal: &Principal,
    started: Instant,
) -> Result<Response, QueryError> {
    let mut encoder = StreamEncoder::new(format, stream.schema())?;
    let mut head: Vec<Bytes> = Vec::new();
    let mut buffered = 0;
    let mut rows = 0;
    while buffered < PREBUFFER_BYTES {
        match stream.next().await {
            Some(batch) => {
                let batch = batch?;
                rows += batch.num_rows();
                let bytes = encoder.encode(&batch)?;
                buffered += bytes.len();
                head.push(bytes);
            }
            None => {
                head.push(encoder.finish()?);
                tracing::info!(user = %principal.user, rows, elapsed_ms = started.elapsed().as_millis() as u64, "sql answered");
                return Ok(ok(format, Body::from(head.concat())));
            }
        }
    }
    let user = principal.user.clone();
    let rest = futures::stream::unfold(
        (stream, Some(encoder), rows),
        move |(mut stream, encoder, mut rows)| {
            let user = user.clone();
            async move {
                let mut encoder = encoder?;
                let chunk = match stream.next().await {
                    Some(Ok(batch)) => {
                        rows += batch.num_rows();
                        encoder.encode(&batch)
                    }
                    Some(Err(e)) => Err(e),
                    None => {
                        tracing::info!(user = %user, rows, elapsed_ms = started.elapsed().as_millis() as u64, "sql answered (streamed)");
                        return Some((
                            encoder.finish().map_err(std::io::Error::other),
                            (stream, None, rows),
                        ));
                    }
                };
                match chunk {
                    Ok(bytes) => Some((Ok(bytes), (stream, Some(encoder), rows))),
                    Err(e) => {
                        tracing::warn!(user = %user, rows, error = %e, "sql result cut short");
                        Some((
                            Err(std::io::Error::other(e.to_string())),
                            (stream, None, rows),
                        ))
                    }
                }
            }
        },
    );
    let body = futures::stream::iter(head.into_iter().map(Ok::<_, std::io::Error>)).chain(rest);
    Ok(ok(format, Body::from_stream(body)))
}

fn ok(format: WireFormat, body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    resp
}
