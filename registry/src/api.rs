//! The admin API over devices, authenticated by the admin bearer token (`registry.admin_token`).
//!
//! | method and path            | does                                                        |
//! |----------------------------|-------------------------------------------------------------|
//! | `POST /v1/devices`         | create one device; answers its token once                   |
//! | `POST /v1/devices/bulk`    | create `count` devices from a recipe; answers their tokens  |
//! | `GET /v1/devices`          | list (`tenant`, `group`, `after`, `limit`)                  |
//! | `GET /v1/devices/{id}`     | one device, with its owner history                          |
//! | `PATCH /v1/devices/{id}`   | change group, model, tags, metrics, site, enabled, owner; rotate the token |
//! | `DELETE /v1/devices/{id}`  | delete                                                      |
//! | `GET /v1/groups`           | groups per tenant with their device counts                  |
//! | `… /v1/tenants/{tenant}/catalog` | a tenant's metric catalog: see [`crate::catalog`]      |
//! | `… /v1/tenants/{tenant}/detectors` | a tenant's anomaly detectors: see [`crate::detectors`] |
//! | `… /v1/tenants/{tenant}/incident-rules` | a tenant's incident rules: see [`crate::incident_rules`] |
//!
//! Every change is recorded on the `registry` topic before the answer (so it survives any crash)
//! and applied to this process's view at once. Tokens are shown once and stored hashed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use tributary_schemas::now_micros;
use tributary_schemas::registry::{
    Device, DeviceRegistry, RegistryChange, RegistryEvent, token_hash,
};

use crate::catalog::{CatalogSetting, CatalogWriter};
use crate::detectors::{DetectorSetting, DetectorWriter};
use crate::incident_rules::{IncidentRuleSetting, IncidentRuleWriter};
use crate::issue_token;
use crate::tenant_settings::{
    SettingWriters, TenantSetting, TenantSettingWriter, delete_setting, get_setting, put_setting,
};
use crate::writer::RegistryWriter;

/// Most devices one bulk request may create.
pub const MAX_BULK: usize = 100_000;
/// Most devices one list page holds.
pub const MAX_PAGE: usize = 10_000;

/// The admin API.
pub struct RegistryApi {
    state: Arc<ApiState>,
}

pub(crate) struct ApiState {
    writer: Arc<RegistryWriter>,
    catalog: Arc<CatalogWriter>,
    detectors: Arc<DetectorWriter>,
    incident_rules: Arc<IncidentRuleWriter>,
    admin_token_sha256: Option<String>,
}

impl RegistryApi {
    pub fn new(
        writer: Arc<RegistryWriter>,
        catalog: Arc<CatalogWriter>,
        detectors: Arc<DetectorWriter>,
        incident_rules: Arc<IncidentRuleWriter>,
        admin_token: Option<&str>,
    ) -> Self {
        if admin_token.is_none() {
            tracing::warn!("registry.admin_token is not set: the admin API refuses every request");
        }
        Self {
            state: Arc::new(ApiState {
                writer,
                catalog,
                detectors,
                incident_rules,
                admin_token_sha256: admin_token.map(token_hash),
            }),
        }
    }

    /// The routes, to be merged into the HTTP server.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/devices", post(create).get(list))
            .route("/v1/devices/bulk", post(bulk))
            .route(
                "/v1/devices/{id}",
                get(get_one).patch(update).delete(delete),
            )
            .route("/v1/groups", get(groups))
            .route("/v1/tenants/{tenant}/catalog", setting::<CatalogSetting>())
            .route(
                "/v1/tenants/{tenant}/detectors",
                setting::<DetectorSetting>(),
            )
            .route(
                "/v1/tenants/{tenant}/incident-rules",
                setting::<IncidentRuleSetting>(),
            )
            .with_state(self.state.clone())
    }
}

/// GET, PUT and DELETE of a tenant setting.
fn setting<K: TenantSetting>() -> MethodRouter<Arc<ApiState>>
where
    ApiState: SettingWriters<K>,
{
    get(get_setting::<K>)
        .put(put_setting::<K>)
        .delete(delete_setting::<K>)
}

impl SettingWriters<CatalogSetting> for ApiState {
    fn writer(&self) -> &TenantSettingWriter<CatalogSetting> {
        &self.catalog
    }
}

impl SettingWriters<DetectorSetting> for ApiState {
    fn writer(&self) -> &TenantSettingWriter<DetectorSetting> {
        &self.detectors
    }
}

impl SettingWriters<IncidentRuleSetting> for ApiState {
    fn writer(&self) -> &TenantSettingWriter<IncidentRuleSetting> {
        &self.incident_rules
    }
}

/// An error answer of the HTTP API: `{"error": …, "field": …}`, with `WWW-Authenticate` on 401
/// and `Retry-After` when the client should come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// Names the field at fault.
    pub fn field(mut self, field: Option<&str>) -> Self {
        self.field = field.map(str::to_owned);
        self
    }

    /// Tells the client when to retry (rounded up to whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = &self.field {
            body["field"] = json!(f);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

fn fail(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> ApiError {
    ApiError::new(status, message).field(field)
}

/// A JSON error naming the field at fault when there is one.
fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    fail(status, message, field).into_response()
}

/// Proof that the request carries the admin token: every admin handler takes one, so none can
/// forget the check.
pub(crate) struct Admin;

impl FromRequestParts<Arc<ApiState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        check_admin(state, &parts.headers).map(|()| Admin)
    }
}

/// Query parameters, or 400 naming what is wrong with them.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

fn check_admin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| token_hash(t.trim()));
    match (&state.admin_token_sha256, given) {
        (Some(expected), Some(given)) if *expected == given => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token",
        )),
    }
}

fn bad_json(e: serde_json::Error) -> ApiError {
    let msg = e.to_string();
    // serde names unknown and missing fields in backticks; pass the name on as `field`.
    let field = msg.split('`').nth(1).map(str::to_owned);
    fail(StatusCode::BAD_REQUEST, msg, field.as_deref())
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(bad_json)
}

/// Ids and tenants: 1 to 128 of `[A-Za-z0-9._-]`, so they are safe in MQTT topics, paths and URLs.
pub(crate) fn check_name(value: &str, field: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!("`{value}` must be 1 to 128 characters of A-Z a-z 0-9 . _ -"),
            Some(field),
        ));
    }
    if field == "id" && value == "bulk" {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "`bulk` is reserved",
            Some(field),
        ));
    }
    Ok(())
}

/// A device as the API shows it: no token hash, but how it authenticates.
fn view(d: &Device) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("token_sha256");
        m.remove("mqtt_password_hash");
        m.insert(
            "credential".into(),
            json!(if d.token_sha256.is_some() {
                "token"
            } else {
                "jwt"
            }),
        );
    }
    v
}

fn unavailable(e: crate::RegistryError) -> Response {
    tracing::warn!(error = %e, "registry change not recorded");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the registry log is unavailable; retry later",
    )
    .retry_after(std::time::Duration::from_secs(1))
    .into_response()
}

fn event(device: Device, change: RegistryChange, actor: &str) -> RegistryEvent {
    RegistryEvent {
        device: device.id.clone(),
        tenant: device.tenant.clone(),
        change,
        at: device.updated_at,
        actor: actor.to_owned(),
        state: Some(device),
    }
}

/// The attributes a device is created with (one device, or each device of a recipe).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attributes {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub site: Vec<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Recipes only: spread the devices over a site layout instead of one fixed `site`.
    #[serde(default)]
    pub layout: Option<SiteLayout>,
}

impl Attributes {
    fn device(&self, id: &str, tenant: &str, at: i64) -> (Device, String) {
        let mut d = Device::new(id, tenant, at);
        d.group = self.group.clone();
        d.model = self.model.clone();
        d.tags = self.tags.clone();
        d.metrics = self.metrics.clone();
        d.site = self.site.clone();
        d.enabled = self.enabled.unwrap_or(true);
        let token = issue_token(&mut d);
        d.set_subject(self.subject.clone(), at);
        (d, token)
    }
}

/// `{"id", "tenant", …attributes}`.
fn parse_create(body: &[u8]) -> Result<(String, String, Attributes), ApiError> {
    let mut fields: serde_json::Map<String, Value> = parse(body)?;
    let mut take = |name: &str| match fields.remove(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(fail(
            StatusCode::BAD_REQUEST,
            "must be a string",
            Some(name),
        )),
        None => Err(fail(StatusCode::BAD_REQUEST, "is required", Some(name))),
    };
    let id = take("id")?;
    let tenant = take("tenant")?;
    let attributes: Attributes = serde_json::from_value(Value::Object(fields)).map_err(bad_json)?;
    if attributes.layout.is_some() {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "a layout belongs to a bulk recipe; give one device its `site`",
            Some("layout"),
        ));
    }
    Ok((id, tenant, attributes))
}

async fn create(_: Admin, State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let (id, tenant, attributes) = match parse_create(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_name(&id, "id").and(check_name(&tenant, "tenant")) {
        return r.into_response();
    }
    let _guard = state.writer.lock().await;
    if state.writer.view().get(&id).is_some() {
        return error(
            StatusCode::CONFLICT,
            format!("device `{id}` already exists"),
            Some("id"),
        );
    }
    let (device, token) = attributes.device(&id, &tenant, now_micros());
    let body = json!({ "device": view(&device), "token": token });
    match state
        .writer
        .record(&[event(device, RegistryChange::Created, "admin")])
        .await
    {
        Ok(()) => (StatusCode::CREATED, axum::Json(body)).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Where the devices of a recipe sit: `zones` × `sections_per_zone` × `spots_per_section` spots,
/// filled in order (device *i* sits in spot *i* mod the number of spots).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLayout {
    pub zones: Vec<String>,
    pub sections_per_zone: usize,
    pub spots_per_section: usize,
}

impl SiteLayout {
    /// The site of the `i`-th device: `[zone, section-k, spot-m]` (k, m from 1).
    pub fn site_of(&self, i: usize) -> Vec<String> {
        let sections = self.sections_per_zone.max(1);
        let spots = self.spots_per_section.max(1);
        let total = self.zones.len().max(1) * sections * spots;
        let j = i % total;
        let zone = self
            .zones
            .get(j / (sections * spots))
            .cloned()
            .unwrap_or_else(|| "zone-1".into());
        let section = (j / spots) % sections + 1;
        let spot = j % spots + 1;
        vec![zone, format!("section-{section}"), format!("spot-{spot}")]
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkRequest {
    tenant: String,
    count: usize,
    /// Ids are `<id_prefix><n>`, n zero-padded to 5 digits, from `first`.
    id_prefix: String,
    #[serde(default = "one")]
    first: usize,
    /// The template every device is made from.
    recipe: Attributes,
}

fn one() -> usize {
    1
}

async fn bulk(_: Admin, State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let req: BulkRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_name(&req.tenant, "tenant") {
        return r.into_response();
    }
    if req.count == 0 || req.count > MAX_BULK {
        return error(
            StatusCode::BAD_REQUEST,
            format!("must be between 1 and {MAX_BULK}"),
            Some("count"),
        );
    }
    if req.recipe.layout.is_some() && !req.recipe.site.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "give either a fixed site or a layout, not both",
            Some("recipe.layout"),
        );
    }
    let Some(_) = req.first.checked_add(req.count) else {
        return error(
            StatusCode::BAD_REQUEST,
            "first + count is beyond the largest number",
            Some("first"),
        );
    };
    let ids: Vec<String> = (0..req.count)
        .map(|i| format!("{}{:05}", req.id_prefix, req.first + i))
        .collect();
    if let Some(Err(r)) = ids.first().map(|id| check_name(id, "id_prefix")) {
        return r.into_response();
    }
    let _guard = state.writer.lock().await;
    if let Some(taken) = ids.iter().find(|id| state.writer.view().get(id).is_some()) {
        return error(
            StatusCode::CONFLICT,
            format!("device `{taken}` already exists; nothing was created"),
            Some("id_prefix"),
        );
    }
    let at = now_micros();
    let mut events = Vec::with_capacity(ids.len());
    let mut created = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let (mut device, token) = req.recipe.device(id, &req.tenant, at);
        if let Some(layout) = &req.recipe.layout {
            device.site = layout.site_of(i);
        }
        created.push(json!({ "id": id, "token": token }));
        events.push(event(device, RegistryChange::Created, "admin"));
    }
    match state.writer.record(&events).await {
        Ok(()) => (
            StatusCode::CREATED,
            axum::Json(json!({ "created": created.len(), "devices": created })),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    tenant: Option<String>,
    group: Option<String>,
    /// Only ids after this one (the previous page's `next`).
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_PAGE);
    let devices = list_page(state.writer.view(), &q, limit);
    let next = (devices.len() == limit)
        .then(|| devices.last().map(|d| d.id.clone()))
        .flatten();
    let devices: Vec<Value> = devices.iter().map(|d| view(d)).collect();
    axum::Json(json!({ "devices": devices, "next": next })).into_response()
}

fn list_page(view: &DeviceRegistry, q: &ListQuery, limit: usize) -> Vec<Arc<Device>> {
    let mut devices = view.list(|d| {
        q.tenant.as_ref().is_none_or(|t| d.tenant == *t)
            && q.group.as_ref().is_none_or(|g| d.group.as_ref() == Some(g))
            && q.after.as_ref().is_none_or(|a| d.id > *a)
    });
    devices.truncate(limit);
    devices
}

async fn get_one(_: Admin, State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match state.writer.view().get(&id) {
        Some(d) => axum::Json(view(&d)).into_response(),
        None => not_found(&id),
    }
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("device `{id}` does not exist"),
        Some("id"),
    )
}

/// Present-and-null (`Some(None)`) differs from absent (`None`).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    #[serde(default, deserialize_with = "nullable")]
    group: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    model: Option<Option<String>>,
    tags: Option<BTreeMap<String, String>>,
    metrics: Option<Vec<String>>,
    site: Option<Vec<String>>,
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    subject: Option<Option<String>>,
    /// A new token; the old one stops working.
    #[serde(default)]
    rotate_token: bool,
}

async fn update(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let patch: Patch = match parse(&body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let _guard = state.writer.lock().await;
    let Some(current) = state.writer.view().get(&id) else {
        return not_found(&id);
    };
    let at = now_micros().max(current.updated_at.saturating_add(1));
    let mut d = (*current).clone();
    if let Some(v) = patch.group {
        d.group = v;
    }
    if let Some(v) = patch.model {
        d.model = v;
    }
    if let Some(v) = patch.tags {
        d.tags = v;
    }
    if let Some(v) = patch.metrics {
        d.metrics = v;
    }
    if let Some(v) = patch.site {
        d.site = v;
    }
    if let Some(v) = patch.enabled {
        d.enabled = v;
    }
    if let Some(v) = patch.subject {
        d.set_subject(v, at);
    }
    let token = patch.rotate_token.then(|| issue_token(&mut d));
    d.updated_at = at;
    let mut body = json!({ "device": view(&d) });
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    match state
        .writer
        .record(&[event(d, RegistryChange::Updated, "admin")])
        .await
    {
        Ok(()) => axum::Json(body).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn delete(_: Admin, State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let _guard = state.writer.lock().await;
    let Some(current) = state.writer.view().get(&id) else {
        return not_found(&id);
    };
    let e = RegistryEvent {
        device: id,
        tenant: current.tenant.clone(),
        change: RegistryChange::Deleted,
        at: now_micros(),
        actor: "admin".into(),
        state: None,
    };
    match state.writer.record(&[e]).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsQuery {
    tenant: Option<String>,
}

async fn groups(
    _: Admin,
    State(state): State<Arc<ApiState>>,
    q: Result<Query<GroupsQuery>, QueryRejection>,
) -> Response {
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let mut counts: HashMap<(String, Option<String>), u64> = HashMap::new();
    for d in state
        .writer
        .view()
        .list(|d| q.tenant.as_ref().is_none_or(|t| d.tenant == *t))
    {
        *counts
            .entry((d.tenant.clone(), d.group.clone()))
            .or_default() += 1;
    }
    let mut groups: Vec<_> = counts.into_iter().collect();
    groups.sort();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|((tenant, group), devices)| json!({"tenant": tenant, "group": group, "devices": devices}))
        .collect();
    axum::Json(json!({ "groups": groups })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fills_spots_in_order_and_wraps() {
        let l = SiteLayout {
            zones: vec!["north".into(), "south".into()],
            sections_per_zone: 2,
            spots_per_section: 3,
        };
        assert_eq!(l.site_of(0), ["north", "section-1", "spot-1"]);
        assert_eq!(l.site_of(2), ["north", "section-1", "spot-3"]);
        assert_eq!(l.site_of(3), ["north", "section-2", "spot-1"]);
        assert_eq!(l.site_of(6), ["south", "section-1", "spot-1"]);
        assert_eq!(l.site_of(11), ["south", "section-2", "spot-3"]);
        assert_eq!(l.site_of(12), l.site_of(0), "12 spots, then it wraps");
    }

    #[test]
    fn names_are_topic_safe() {
        assert!(check_name("dev-1.a_b", "id").is_ok());
        for bad in ["", "a/b", "a+b", "a#", "dé", "bulk"] {
            assert!(check_name(bad, "id").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn patch_tells_null_from_absent() {
        let p: Patch = serde_json::from_str(r#"{"subject": null}"#).unwrap();
        assert_eq!(p.subject, Some(None));
        assert_eq!(p.group, None);
        let p: Patch = serde_json::from_str(r#"{"subject": "p-1"}"#).unwrap();
        assert_eq!(p.subject, Some(Some("p-1".into())));
        assert!(serde_json::from_str::<Patch>(r#"{"tenant": "x"}"#).is_err());
    }
}
