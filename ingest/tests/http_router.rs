//! The HTTP ingest's answers that do not need Kafka to succeed, checked through the real router:
//! the OpenAPI document matches the routes, bodies are decoded or refused with the right status, a
//! tenant over its rate gets 429, and Kafka not answering gives 503 — each with `Retry-After` where
//! the client should retry. The broker address points at a closed port on purpose: this file tests
//! what a device sees when Kafka is unreachable. Acceptance (202) is covered end to end in `tests/`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;
use tributary_ingest::http::{HttpConfig, HttpIngest, OPENAPI};
use tributary_ingest::producer::RawProducer;
use tributary_registry::api::RegistryApi;
use tributary_registry::catalog::CatalogWriter;
use tributary_registry::detectors::DetectorWriter;
use tributary_registry::writer::RegistryWriter;
use tributary_schemas::catalog::CatalogBase;
use tributary_schemas::detectors::DetectorBase;
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::registry::{Device, DeviceRegistry, token_hash};

const TOKEN: &str = "token-of-dev-1";

fn router(config: HttpConfig) -> axum::Router {
    let kafka = KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..KafkaConfig::default()
    };
    let producer = Arc::new(RawProducer::new(&kafka, "http-router-test").expect("producer"));
    let registry = DeviceRegistry::from_devices(vec![Device {
        token_sha256: Some(token_hash(TOKEN)),
        ..Device::new("dev-1", "acme", 0)
    }])
    .expect("registry");
    let registry = Arc::new(registry);
    let writer = Arc::new(RegistryWriter::new(&kafka, registry.clone()).expect("writer"));
    let catalog = Arc::new(
        CatalogWriter::new(&kafka, CatalogBase::default(), Default::default()).expect("writer"),
    );
    let detectors = Arc::new(
        DetectorWriter::new(&kafka, DetectorBase::default(), Default::default()).expect("writer"),
    );
    let rules = Arc::new(
        tributary_registry::incident_rules::IncidentRuleWriter::new(
            &kafka,
            Default::default(),
            Default::default(),
        )
        .expect("writer"),
    );
    let admin = RegistryApi::new(writer, catalog, detectors, rules, Some("admin-secret"));
    HttpIngest::new(config, registry, producer)
        .with_admin(&admin)
        .router()
}

fn quick() -> HttpConfig {
    HttpConfig {
        ack_timeout_ms: 300,
        ..HttpConfig::default()
    }
}

async fn call(router: &axum::Router, req: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let resp = router.clone().oneshot(req).await.expect("router answers");
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn telemetry(body: impl Into<Body>, encoding: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/v1/telemetry")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(e) = encoding {
        req = req.header(header::CONTENT_ENCODING, e);
    }
    req.body(body.into()).expect("request")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

#[tokio::test]
async fn openapi_document_describes_exactly_the_served_routes() {
    let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let r = router(quick());
    // Operations with their own `servers` are served by the query stage's router.
    let lake_dir = tempfile::tempdir().expect("temp dir");
    let lake = tributary_lake::LakeConfig {
        url: lake_dir.path().display().to_string(),
        ..tributary_lake::LakeConfig::default()
    };
    let query_config = tributary_query::QueryConfig::default();
    let sql = tributary_query::http::SqlHttp::new(
        Arc::new(tributary_query::QueryService::new(
            lake,
            query_config.limits(),
        )),
        query_config,
    )
    .router();
    let paths = doc["paths"].as_object().expect("paths");
    for served in [
        "/v1/sql",
        "/v1/telemetry",
        "/v1/devices",
        "/v1/devices/{id}",
        "/v1/groups",
        "/v1/tenants/{tenant}/catalog",
        "/v1/tenants/{tenant}/detectors",
        "/v1/tenants/{tenant}/incident-rules",
        "/v1/incidents",
        "/v1/incidents/{id}",
        "/v1/incidents/{id}/acknowledge",
        "/v1/devices/{id}/shadow",
        "/v1/devices/{id}/shadow/{name}",
    ] {
        assert!(paths.contains_key(served), "{served} is documented");
    }
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("operations") {
            let documented: Vec<&String> = op["responses"]
                .as_object()
                .map(|r| r.keys().collect())
                .unwrap_or_default();
            assert!(
                !documented.is_empty(),
                "{method} {path} documents its responses"
            );
            // Path parameters get an example value.
            let uri: String = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "example" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(uri)
                .body(Body::empty())
                .expect("request");
            let served_by = if op.get("servers").is_some() {
                &sql
            } else {
                &r
            };
            let (status, _, _) = call(served_by, req).await;
            assert!(
                documented.iter().any(|c| c.as_str() == status.as_str()),
                "{method} {path} answered {status}, which is not documented"
            );
        }
    }
    // Every $ref points at something that exists.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        assert!(
            doc.pointer(r.trim_start_matches('#')).is_some(),
            "dangling $ref {r}"
        );
    }
    // The served document is the checked-in one.
    let req = Request::get("/openapi.json")
        .body(Body::empty())
        .expect("request");
    let (status, _, served) = call(&r, req).await;
    assert_eq!((status, served), (StatusCode::OK, doc));
    // An undocumented path is not served.
    let req = Request::get("/v1/nothing-here")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&r, req).await.0, StatusCode::NOT_FOUND);
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.push(v.as_str().unwrap_or_default().to_owned());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn kafka_not_acknowledging_gives_503_with_retry_after_within_the_ack_timeout() {
    let r = router(quick());
    let started = Instant::now();
    let (status, retry, body) = call(&r, telemetry(r#"{"metrics":{"t":1}}"#, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        started.elapsed().as_secs_f64() < 5.0,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn gzip_bodies_are_decoded_and_bad_encodings_refused() {
    let r = router(quick());
    // Valid gzip of a malformed message: decoded, then refused naming the field (so decoding ran).
    let (status, _, body) = call(
        &r,
        telemetry(gzip(br#"{"id":7,"metrics":{"t":1}}"#), Some("gzip")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "id");
    // A valid gzip of a valid message gets as far as Kafka (absent here: 503).
    let (status, _, _) = call(&r, telemetry(gzip(br#"{"metrics":{"t":1}}"#), Some("gzip"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Not gzip at all.
    let (status, _, body) = call(&r, telemetry("plain text", Some("gzip"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap_or_default().contains("gzip"),
        "{body}"
    );
    // Unsupported encoding.
    let (status, _, body) = call(&r, telemetry("x", Some("br"))).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(
        body["error"].as_str().unwrap_or_default().contains("br"),
        "{body}"
    );
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_with_413() {
    let r = router(HttpConfig {
        max_body_bytes: 64 * 1024,
        ..quick()
    });
    let mut big = br#"{"metrics":{"t":1},"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    big.extend(br#""}"#);
    let packed = gzip(&big);
    assert!(packed.len() < 64 * 1024, "compressed, it fits the limit");
    let (status, _, body) = call(&r, telemetry(packed, Some("gzip"))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
}

#[tokio::test]
async fn too_many_messages_or_bytes_give_413() {
    let r = router(HttpConfig {
        max_messages: 3,
        max_body_bytes: 4096,
        ..quick()
    });
    let four =
        r#"[{"metrics":{"t":1}},{"metrics":{"t":2}},{"metrics":{"t":3}},{"metrics":{"t":4}}]"#;
    let (status, _, body) = call(&r, telemetry(four, None)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 3"),
        "{body}"
    );
    let (status, _, _) = call(&r, telemetry(vec![b' '; 8192], None)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after() {
    let r = router(HttpConfig {
        tenant_rate_limit: 1,
        tenant_burst: 2,
        ..quick()
    });
    let three = r#"[{"metrics":{"t":1}},{"metrics":{"t":2}},{"metrics":{"t":3}}]"#;
    // The bucket is full: the request passes the limit (and meets the absent Kafka), leaving the
    // tenant one event in debt.
    let (status, _, _) = call(&r, telemetry(three, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, retry, body) = call(&r, telemetry(three, None)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let secs: u64 = retry.as_deref().unwrap_or("").parse().expect("Retry-After");
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("acme"),
        "{body}"
    );
}
