//! The incident lifecycle for the tenants' users, on the query HTTP server:
//!
//! - `GET /v1/incidents?state=open|acknowledged|snoozed|resolved|unresolved|all&limit=N`: the
//!   current state of each incident (its record of highest `seq` in the `incidents` table), newest
//!   first; `unresolved` (open, acknowledged or snoozed) by default.
//! - `GET /v1/incidents/{id}`: one incident's current state and its whole story (every record).
//! - `POST /v1/incidents/{id}/acknowledge|snooze|resolve` with `{"comment": "…"}` (and for a
//!   snooze `"until": "<RFC 3339>"`): the action is recorded, with who and when, through an
//!   [`IncidentActionLog`]; the incident stage applies it and publishes the incident's next record.
//!
//! Credentials and roles are the SQL endpoints' (`[query.users]`): everyone reads their tenant's
//! incidents, `engineer` and `admin` act on them. Every read goes through [`QueryService`] as the
//! caller, so the tenant scope of SQL applies: another tenant's incident is 404, as an unknown
//! one. This crate does not touch Kafka: the process hands in the log that writes actions.

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_schemas::avro::{IncidentAction, IncidentActionKind};
use tributary_schemas::now_micros;

use crate::config::{Principal, Role};
use crate::format::{OutputFormat, render};
use crate::http::{HttpState, authenticate, error, query_error};
use crate::{QueryError, QueryService};

/// Where people's actions on incidents are recorded (the process writes them to the incident
/// stage's input topic under the incident's key).
#[async_trait]
pub trait IncidentActionLog: Send + Sync {
    /// Records `action` for the incident state of (`tenant`, `rule`, `correlation_key`);
    /// returns once it is durable.
    async fn record(
        &self,
        tenant: &str,
        rule: &str,
        correlation_key: &str,
        action: IncidentAction,
    ) -> Result<(), String>;
}

/// Incidents listed at most per request.
const MAX_LIMIT: usize = 10_000;

/// The incident routes (mounted by [`crate::http::SqlHttp::with_incidents`]).
pub(crate) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/v1/incidents", get(list))
        .route("/v1/incidents/{id}", get(show))
        .route("/v1/incidents/{id}/{action}", post(act))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong credentials: `Authorization: Bearer <token>` or Basic user:password",
        None,
    )
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no incident `{id}`"),
        Some("id"),
    )
}

/// Incident ids are 32 lowercase hex digits; anything else names no incident (and is never
/// spliced into SQL).
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The condition on `status` a `state` parameter selects.
fn state_filter(state: &str) -> Option<&'static str> {
    Some(match state {
        "open" => "status = 'open'",
        "acknowledged" => "status = 'acknowledged'",
        "snoozed" => "status = 'snoozed'",
        "resolved" => "status = 'resolved'",
        "unresolved" => "status <> 'resolved'",
        "all" => "true",
        _ => return None,
    })
}

/// The latest record of each incident matching `filter`, as JSON objects.
fn latest_sql(filter: &str, limit: usize) -> String {
    format!(
        "SELECT * EXCEPT (latest) FROM (SELECT *, row_number() OVER \
         (PARTITION BY incident_id ORDER BY seq DESC) AS latest FROM incidents) \
         WHERE latest = 1 AND ({filter}) ORDER BY first_time DESC, incident_id LIMIT {limit}"
    )
}

/// Rows of `sql` run as `principal`, as JSON objects; none when the table does not exist yet.
async fn rows(
    service: &Arc<QueryService>,
    principal: &Principal,
    sql: &str,
) -> Result<Vec<Value>, QueryError> {
    let stream = match service.execute(principal, sql).await {
        Ok(s) => s,
        // No incident has been written yet: the table is not there.
        Err(e)
            if e.is_users_fault() && {
                let text = e.to_string();
                text.contains("incidents") && text.contains("not found")
            } =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let batches: Vec<_> = stream.try_collect().await?;
    let text = render(&batches, OutputFormat::Json)?;
    Ok(serde_json::from_str::<Vec<Value>>(&text).unwrap_or_default())
}

async fn list(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(principal) = authenticate(&state.config, &headers) else {
        return unauthorized();
    };
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameters are `state` and `limit`",
            None,
        );
    };
    let wanted = params.state.as_deref().unwrap_or("unresolved");
    let Some(filter) = state_filter(wanted) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown state `{wanted}`: open, acknowledged, snoozed, resolved, unresolved or all"
            ),
            Some("state"),
        );
    };
    let limit = params.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {MAX_LIMIT}"),
            Some("limit"),
        );
    }
    match rows(&state.service, &principal, &latest_sql(filter, limit)).await {
        Ok(incidents) => axum::Json(json!({ "incidents": incidents })).into_response(),
        Err(e) => query_error(e, &principal),
    }
}

/// The incident's latest record, if the caller can see it.
async fn current(
    state: &HttpState,
    principal: &Principal,
    id: &str,
) -> Result<Option<Value>, QueryError> {
    if !valid_id(id) {
        return Ok(None);
    }
    let sql = latest_sql(&format!("incident_id = '{id}'"), 1);
    Ok(rows(&state.service, principal, &sql)
        .await?
        .into_iter()
        .next())
}

async fn show(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(principal) = authenticate(&state.config, &headers) else {
        return unauthorized();
    };
    let incident = match current(&state, &principal, &id).await {
        Ok(Some(i)) => i,
        Ok(None) => return not_found(&id),
        Err(e) => return query_error(e, &principal),
    };
    let sql = format!("SELECT * FROM incidents WHERE incident_id = '{id}' ORDER BY seq");
    match rows(&state.service, &principal, &sql).await {
        Ok(history) => {
            axum::Json(json!({ "incident": incident, "history": history })).into_response()
        }
        Err(e) => query_error(e, &principal),
    }
}

fn action_of(name: &str) -> Option<IncidentActionKind> {
    Some(match name {
        "acknowledge" => IncidentActionKind::Acknowledge,
        "snooze" => IncidentActionKind::Snooze,
        "resolve" => IncidentActionKind::Resolve,
        _ => return None,
    })
}

/// An RFC 3339 time in the future, as µs.
fn parse_until(text: &str, now: i64) -> Result<i64, String> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))?;
    let micros = t.timestamp_micros();
    if micros <= now {
        return Err(format!("`{text}` is not in the future"));
    }
    Ok(micros)
}

async fn act(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(principal) = authenticate(&state.config, &headers) else {
        return unauthorized();
    };
    let Some(kind) = action_of(&action) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no action `{action}`: acknowledge, snooze or resolve"),
            Some("action"),
        );
    };
    let Some(log) = state.incidents.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "incident actions are not served by this process",
            None,
        );
    };
    let request: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("body must be {{\"comment\": \"…\", \"until\": \"<RFC 3339>\"}}: {e}"),
                    None,
                );
            }
        }
    };
    let now = now_micros();
    let until = match (kind, request.until.as_deref()) {
        (IncidentActionKind::Snooze, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "a snooze needs `until`: when to notify again (RFC 3339)",
                Some("until"),
            );
        }
        (IncidentActionKind::Snooze, Some(text)) => match parse_until(text, now) {
            Ok(t) => Some(t),
            Err(reason) => return error(StatusCode::BAD_REQUEST, reason, Some("until")),
        },
        (_, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`until` is for snooze only",
                Some("until"),
            );
        }
        (_, None) => None,
    };
    if request.comment.as_ref().is_some_and(|c| c.len() > 4096) {
        return error(
            StatusCode::BAD_REQUEST,
            "comment is longer than 4096 bytes",
            Some("comment"),
        );
    }
    // Looked up before the role check: another tenant's incident does not exist for the caller.
    let incident = match current(&state, &principal, &id).await {
        Ok(Some(i)) => i,
        Ok(None) => return not_found(&id),
        Err(e) => return query_error(e, &principal),
    };
    if !matches!(principal.role, Role::Engineer | Role::Admin) {
        return error(
            StatusCode::FORBIDDEN,
            "acting on incidents needs role engineer or admin",
            None,
        );
    }
    let field = |name: &str| incident[name].as_str().unwrap_or_default().to_owned();
    let (tenant, rule, key, status) = (
        field("tenant"),
        field("rule"),
        field("correlation_key"),
        field("status"),
    );
    if status == "resolved" {
        return error(
            StatusCode::CONFLICT,
            format!("incident `{id}` is resolved"),
            Some("status"),
        );
    }
    if key.is_empty() {
        return error(
            StatusCode::CONFLICT,
            format!("incident `{id}` was recorded before actions were supported"),
            None,
        );
    }
    let recorded = IncidentAction {
        incident_id: id.clone(),
        action: kind,
        actor: principal.user.clone(),
        at: now,
        until,
        comment: request.comment,
    };
    if let Err(e) = log.record(&tenant, &rule, &key, recorded).await {
        tracing::warn!(incident = %id, error = %e, "incident action not recorded");
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the action could not be recorded; retry",
            None,
        );
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return resp;
    }
    tracing::info!(user = %principal.user, incident = %id, action = %action, "incident action recorded");
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "incident_id": id,
            "action": action,
            "actor": principal.user,
            "at": chrono::DateTime::from_timestamp_micros(now).map(|t| t.to_rfc3339()),
            "until": until.and_then(chrono::DateTime::from_timestamp_micros).map(|t| t.to_rfc3339()),
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_incident_shaped_ids_reach_sql() {
        assert!(valid_id(&"0123456789abcdef".repeat(2)));
        for bad in [
            "",
            "' OR true --",
            &"A".repeat(32),
            &"0".repeat(31),
            &"0".repeat(33),
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn states_name_their_filter_and_unknown_ones_are_refused() {
        assert_eq!(state_filter("unresolved"), Some("status <> 'resolved'"));
        assert_eq!(state_filter("open"), Some("status = 'open'"));
        assert_eq!(state_filter("OPEN"), None);
        assert_eq!(state_filter("open' OR '1"), None);
    }

    #[test]
    fn a_snooze_is_until_a_future_rfc3339_time() {
        let now = 1_800_000_000_000_000;
        // `now` is 2027-01-15T08:00:00Z.
        assert_eq!(
            parse_until("2027-01-15T09:00:00Z", now),
            Ok(now + 3_600_000_000)
        );
        assert_eq!(
            parse_until("2027-01-15T10:00:00+01:00", now),
            Ok(now + 3_600_000_000)
        );
        assert!(parse_until("2027-01-15T08:00:00Z", now).is_err());
        assert!(parse_until("2020-01-01T00:00:00Z", now).is_err());
        assert!(parse_until("tomorrow", now).is_err());
    }
}
