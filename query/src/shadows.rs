//! Device shadows for the tenants' apps and operators, on the query HTTP server:
//!
//! - `GET /v1/devices/{id}/shadow[/{name}]`: the current document (from the in-memory view the
//!   process follows, not the lake).
//! - `POST /v1/devices/{id}/shadow[/{name}]` with `{"state": {"desired": {…}}, "version": n,
//!   "clientToken": "…"}`: the update is logged, the shadow stage applies it, and the answer is
//!   the stage's (200 accepted, 409 stale `version`, 413 too large), or 503 when it did not come.
//!
//! Credentials and roles are the SQL endpoints' (`[query.users]`): a user sees and sets the
//! shadows of its tenant's devices (another tenant's device is 404, as an unknown one); `engineer`
//! and `admin` set desired state, `compliance` reads. An admin without a tenant names one with
//! `?tenant=`. Apps never set `reported` (403): that is the device's. This crate does not touch
//! Kafka: the process hands in the [`ShadowLog`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tributary_schemas::avro::ShadowOrigin;
use tributary_schemas::shadows::{self, Answer, ShadowLog};

use crate::config::{Principal, Role};
use crate::http::{HttpState, authenticate, error};

/// The shadow routes (mounted by [`crate::http::SqlHttp::with_shadows`]).
pub(crate) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route(
            "/v1/devices/{id}/shadow",
            get(get_classic).post(update_classic),
        )
        .route(
            "/v1/devices/{id}/shadow/{name}",
            get(get_named).post(update_named),
        )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TenantParam {
    #[serde(default)]
    tenant: Option<String>,
}

/// The caller's tenant, which must own device `id`, and the shadow log; else what to answer.
fn caller(
    state: &HttpState,
    headers: &HeaderMap,
    id: &str,
    param: &TenantParam,
) -> Result<(Principal, String, Arc<dyn ShadowLog>), Box<Response>> {
    let Some(principal) = authenticate(&state.config, headers) else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials: `Authorization: Bearer <token>` or Basic user:password",
            None,
        )));
    };
    let Some(handle) = &state.shadows else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "device shadows are not served by this process",
            None,
        )));
    };
    let Some(log) = handle.get() else {
        let mut refused = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the link to the shadow stage is still connecting (Kafka): retry",
            None,
        );
        refused
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(Box::new(refused));
    };
    let tenant = match (&principal.tenant, &param.tenant) {
        (Some(own), Some(asked)) if own != asked => {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                format!("user `{}` cannot act for tenant `{asked}`", principal.user),
                Some("tenant"),
            )));
        }
        (Some(own), _) => own.clone(),
        (None, Some(asked)) => asked.clone(),
        (None, None) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "a user of every tenant names the device's tenant: `?tenant=<tenant>`",
                Some("tenant"),
            )));
        }
    };
    if log.owner(id).as_deref() != Some(tenant.as_str()) {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no device `{id}` in tenant `{tenant}`"),
            Some("id"),
        )));
    }
    Ok((principal, tenant, log))
}

fn answer(a: Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(a.body)).into_response();
    if let Some(secs) = a.retry_after_secs
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

fn read(state: &HttpState, headers: &HeaderMap, id: &str, name: &str, p: &TenantParam) -> Response {
    match caller(state, headers, id, p) {
        Ok((_, tenant, log)) => answer(shadows::get_endpoint(log.view(), &tenant, id, name)),
        Err(refused) => *refused,
    }
}

async fn update(
    state: &HttpState,
    headers: &HeaderMap,
    id: &str,
    name: &str,
    p: &TenantParam,
    body: &[u8],
) -> Response {
    let (principal, tenant, log) = match caller(state, headers, id, p) {
        Ok(c) => c,
        Err(refused) => return *refused,
    };
    if !matches!(principal.role, Role::Engineer | Role::Admin) {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "user `{}` may read shadows but not set their desired state (role engineer or admin)",
                principal.user
            ),
            None,
        );
    }
    let limits = state.shadow_limits;
    let who = (
        tenant.as_str(),
        id,
        ShadowOrigin::App,
        principal.user.as_str(),
    );
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    answer(shadows::update_endpoint(log.as_ref(), &limits, who, name, content_type, body).await)
}

async fn get_classic(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    Query(p): Query<TenantParam>,
    headers: HeaderMap,
) -> Response {
    read(&state, &headers, &id, shadows::CLASSIC, &p)
}

async fn get_named(
    State(state): State<Arc<HttpState>>,
    Path((id, name)): Path<(String, String)>,
    Query(p): Query<TenantParam>,
    headers: HeaderMap,
) -> Response {
    read(&state, &headers, &id, &name, &p)
}

async fn update_classic(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    Query(p): Query<TenantParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    update(&state, &headers, &id, shadows::CLASSIC, &p, &body).await
}

async fn update_named(
    State(state): State<Arc<HttpState>>,
    Path((id, name)): Path<(String, String)>,
    Query(p): Query<TenantParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    update(&state, &headers, &id, &name, &p, &body).await
}
