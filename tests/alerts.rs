//! Incidents delivered to the tools on-call teams run, end to end: one device of tenant-1 and one
//! of tenant-2 overheat; each incident shows in its own tenant's `GET /v1/incidents` (and is 404
//! to the other), Alertmanager (started by the stack script) holds both alerts; an acknowledge
//! through the API silences tenant-1's in Alertmanager and stops its re-notification, a manual
//! resolve ends tenant-2's; tenant-1's webhook receiver, down (503) while the incident opens and
//! up later, gets every lifecycle change exactly once, signed, under a delivery id that stayed the
//! same across the retries. The incident rules come through the admin API, and an ordinary Kafka
//! consumer outside the process (docs/examples/alert_consumer.py) follows the whole story.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{Stack, free_port, kill, post, python, repo, request, wait_until};
use tributary_schemas::registry::token_hash;

const SECRET: &str = "tenant-1-webhook-secret";
const OPS1: &str = "ops1-token-0123456789";
const OPS2: &str = "ops2-token-0123456789";
const AUDITOR: &str = "auditor-token-0123456789";

/// One delivery attempt the receiver saw.
#[derive(Debug, Clone)]
struct Attempt {
    delivery: String,
    event: String,
    signed: bool,
    accepted: bool,
    body: Value,
}

#[derive(Default)]
struct Receiver {
    up: bool,
    attempts: Vec<Attempt>,
}

type Shared = Arc<Mutex<Receiver>>;

async fn hook(State(r): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
    let accepted = r.up;
    r.attempts.push(Attempt {
        delivery: header("x-tributary-delivery"),
        event: header("x-tributary-event"),
        signed: header("x-tributary-signature") == expected,
        accepted,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A webhook receiver on loopback, answering 503 until it is switched up.
fn start_receiver(port: u16) -> Shared {
    let shared: Shared = Arc::default();
    let state = shared.clone();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new()
                .route("/hook", axum::routing::post(hook))
                .with_state(state);
            axum::serve(listener, app).await.expect("receiver");
        });
    });
    shared
}

fn attempts(r: &Shared) -> Vec<Attempt> {
    r.lock().unwrap_or_else(|p| p.into_inner()).attempts.clone()
}

/// Second `i` of a device's readings: hot from 10 s on while `hot`.
fn message(i: i64, t0: i64, hot: bool) -> String {
    let t = chrono::DateTime::from_timestamp(t0 + i, 0)
        .unwrap()
        .to_rfc3339();
    json!({
        "id": format!("m-{i}"),
        "time": t,
        "metrics": {"temperature": if hot && i >= 10 { 90.0 } else { 20.0 }},
    })
    .to_string()
}

fn get(url: &str, token: &str) -> (u16, Value) {
    request("GET", url, token, "application/json", "")
}

fn am_alerts(stack: &Stack) -> Vec<Value> {
    let (status, body) = get(&format!("{}/api/v2/alerts", stack.alertmanager_url()), "");
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

fn am_alert(stack: &Stack, incident: &str) -> Option<Value> {
    am_alerts(stack)
        .into_iter()
        .find(|a| a["labels"]["incident_id"] == incident)
}

#[test]
fn incidents_reach_alertmanager_and_a_webhook_and_people_act_on_them() {
    let mut stack = Stack::start(3, &[]);
    stack.start_alertmanager();
    let hook_port = free_port();
    let receiver = start_receiver(hook_port);
    let query_port = free_port();
    let query = format!("http://127.0.0.1:{query_port}");
    let config = format!(
        r#"
[anomalies]
clock_grace_secs = 2
sweep_secs = 1

[anomalies.detectors.hot]
metric = "temperature"
kind = "threshold"
above = 80.0
clear_for_secs = 5
severity = "critical"

[incidents]
clock_grace_secs = 2
sweep_secs = 1

[alerts]
repost_secs = 2
retry_max_secs = 1
query_url = "{query}"

[alerts.webhooks.ops]
tenant = "tenant-1"
url = "http://127.0.0.1:{hook_port}/hook"
secret = "{SECRET}"

[query.users.ops1]
password_sha256 = "{ops1}"
tenant = "tenant-1"
role = "engineer"

[query.users.ops2]
password_sha256 = "{ops2}"
tenant = "tenant-2"
role = "engineer"

[query.users.auditor]
password_sha256 = "{auditor}"
tenant = "tenant-1"
role = "compliance"
"#,
        ops1 = token_hash(OPS1),
        ops2 = token_hash(OPS2),
        auditor = token_hash(AUDITOR),
    );
    let path = stack.path().join("tributary.toml");
    std::fs::write(&path, &config).unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &path.display().to_string());
    stack.set_env(
        "TRIBUTARY_QUERY__HTTP_LISTEN",
        &format!("127.0.0.1:{query_port}"),
    );

    // A webhook URL that is not http(s) is refused, naming the key.
    let bad = stack.path().join("bad.toml");
    std::fs::write(
        &bad,
        config.replace(
            &format!("http://127.0.0.1:{hook_port}/hook"),
            "ftp://example.com/hook",
        ),
    )
    .unwrap();
    let out = stack
        .cmd(&["config", "check"])
        .env("TRIBUTARY_CONFIG", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("alerts.webhooks.ops.url") && stderr.contains("ftp"),
        "{stderr}"
    );

    let mut pipeline = stack.spawn_pipeline(0);
    let secrets = stack.secrets();

    // The rules, per tenant, over the admin API: one that cannot work is refused naming the field.
    let rules = |tenant: &str| {
        format!(
            "http://127.0.0.1:{}/v1/tenants/{tenant}/incident-rules",
            stack.http_port
        )
    };
    let (status, body) = request(
        "PUT",
        &rules("tenant-1"),
        support::ADMIN_TOKEN,
        "application/json",
        &json!({"rules": {"each": {"quiet_secs": 5}}}).to_string(),
    );
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("rules.each.correlate")),
        "{body}"
    );
    for tenant in ["tenant-1", "tenant-2"] {
        let each = json!({"rules": {"each": {"correlate": "anomaly", "quiet_secs": 5}}});
        let (status, body) = request(
            "PUT",
            &rules(tenant),
            support::ADMIN_TOKEN,
            "application/json",
            &each.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["source"], "api");
        assert_eq!(body["rules"]["each"]["correlate"], "anomaly");
    }
    assert_eq!(
        request(
            "PUT",
            &rules("tenant-1"),
            "not-admin",
            "application/json",
            "{}"
        )
        .0,
        401
    );

    // The outside consumer, from before the first incident.
    let consumer = std::process::Command::new(python())
        .arg(repo().join("docs/examples/alert_consumer.py"))
        .args(["--brokers", &format!("127.0.0.1:{}", stack.kafka_port)])
        .args(["--topic", "incidents", "--group", "test-oncall"])
        .args([
            "--schemas",
            &repo().join("schemas/avro").display().to_string(),
        ])
        .args(["--idle", "8", "--timeout", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the venv's python: run deploy/local/install.sh");
    assert_eq!(
        (secrets[0]["tenant"].as_str(), secrets[1]["tenant"].as_str()),
        (Some("tenant-1"), Some("tenant-2"))
    );
    let telemetry = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);
    let t0 = chrono::Utc::now().timestamp() - 3600;
    let send = |range: std::ops::Range<i64>, hot: bool| {
        for chunk in range.collect::<Vec<_>>().chunks(20) {
            for s in &secrets[..2] {
                let ndjson: String = chunk.iter().map(|i| message(*i, t0, hot) + "\n").collect();
                let (status, body) = post(
                    &telemetry,
                    s["token"].as_str().unwrap(),
                    "application/x-ndjson",
                    &ndjson,
                );
                assert_eq!(status, 202, "{body}");
            }
        }
    };
    send(0..40, true);

    // Each tenant's users see their own incident, and only it.
    let list = |token: &str, state: &str| -> Vec<Value> {
        let (status, body) = get(&format!("{query}/v1/incidents?state={state}"), token);
        assert_eq!(status, 200, "{body}");
        body["incidents"].as_array().cloned().unwrap_or_default()
    };
    wait_until("both incidents open", Duration::from_secs(120), || {
        list(OPS1, "open").len() == 1 && list(OPS2, "open").len() == 1
    });
    let first = list(OPS1, "open").remove(0);
    let second = list(OPS2, "open").remove(0);
    let (id1, id2) = (
        first["incident_id"].as_str().unwrap().to_owned(),
        second["incident_id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(first["tenant"], "tenant-1");
    assert_eq!(first["devices"], json!([secrets[0]["device"]]));
    assert_eq!(second["tenant"], "tenant-2");
    assert_eq!(list(OPS1, "unresolved").len(), 1, "the default view");
    assert!(list(OPS1, "resolved").is_empty());

    // Unknown, other tenant's, malformed: 404; no credentials: 401; a reader may not act: 403;
    // an unknown state: 400 naming the field.
    let incident = |id: &str| format!("{query}/v1/incidents/{id}");
    assert_eq!(get(&incident(&id2), OPS1).0, 404);
    assert_eq!(get(&incident(&"0".repeat(32)), OPS1).0, 404);
    assert_eq!(get(&incident("../etc"), OPS1).0, 404);
    assert_eq!(get(&incident(&id1), "wrong").0, 401);
    let (status, body) = get(&format!("{query}/v1/incidents?state=burning"), OPS1);
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("state")),
        "{body}"
    );
    let act = |id: &str, action: &str, token: &str, body: Value| {
        post(
            &format!("{}/{action}", incident(id)),
            token,
            "application/json",
            &body.to_string(),
        )
    };
    assert_eq!(act(&id1, "acknowledge", AUDITOR, json!({})).0, 403);
    assert_eq!(act(&id2, "acknowledge", OPS1, json!({})).0, 404);
    assert_eq!(act(&id1, "escalate", OPS1, json!({})).0, 404);
    let (status, body) = act(&id1, "snooze", OPS1, json!({}));
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("until")),
        "{body}"
    );

    // Alertmanager holds both, active, labelled.
    wait_until(
        "both alerts in Alertmanager",
        Duration::from_secs(60),
        || am_alert(&stack, &id1).is_some() && am_alert(&stack, &id2).is_some(),
    );
    let alert = am_alert(&stack, &id1).unwrap();
    assert_eq!(alert["status"]["state"], "active", "{alert}");
    assert_eq!(alert["labels"]["tenant"], "tenant-1");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["detector"], "hot", "{alert}");
    assert!(
        alert["annotations"]["sql"]
            .as_str()
            .unwrap_or_default()
            .contains("FROM anomalies"),
        "{alert}"
    );

    // The receiver is down: the open notification is being retried.
    wait_until("a retried delivery", Duration::from_secs(60), || {
        attempts(&receiver).len() >= 2
    });

    // Acknowledge tenant-1's: recorded with who, silenced in Alertmanager.
    let (status, body) = act(&id1, "acknowledge", OPS1, json!({"comment": "on it"}));
    assert_eq!(status, 202, "{body}");
    wait_until(
        "the acknowledgement applied",
        Duration::from_secs(60),
        || get(&incident(&id1), OPS1).1["incident"]["status"] == "acknowledged",
    );
    let (_, shown) = get(&incident(&id1), OPS1);
    let history = shown["history"].as_array().cloned().unwrap_or_default();
    let ack = history
        .iter()
        .find(|r| r["change"] == "acknowledge")
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(ack["actor"], "ops1", "{ack}");
    assert_eq!(ack["comment"], "on it", "{ack}");
    wait_until("the alert silenced", Duration::from_secs(60), || {
        am_alert(&stack, &id1).is_some_and(|a| a["status"]["state"] == "suppressed")
    });
    let silences = get(&format!("{}/api/v2/silences", stack.alertmanager_url()), "").1;
    let silence = silences
        .as_array()
        .and_then(|s| {
            s.iter().find(|s| {
                s["status"]["state"] == "active" && s["matchers"][0]["value"] == id1.as_str()
            })
        })
        .cloned()
        .unwrap_or_else(|| panic!("{silences}"));
    assert_eq!(silence["createdBy"], "ops1", "{silence}");

    // Tenant-2's is resolved by hand: it ends in Alertmanager, and cannot be resolved twice.
    assert_eq!(
        act(&id2, "resolve", OPS2, json!({"comment": "fixed"})).0,
        202
    );
    wait_until(
        "the manual resolve applied",
        Duration::from_secs(60),
        || list(OPS2, "resolved").len() == 1,
    );
    assert_eq!(act(&id2, "resolve", OPS2, json!({})).0, 409);
    wait_until("the resolved alert gone", Duration::from_secs(60), || {
        am_alert(&stack, &id2).is_none()
    });

    // The devices cool down (updates follow, unannounced), the receiver comes back.
    receiver.lock().unwrap().up = true;
    send(40..120, false);
    wait_until(
        "tenant-1's incident resolved",
        Duration::from_secs(120),
        || list(OPS1, "resolved").len() == 1,
    );
    wait_until("the resolve delivered", Duration::from_secs(60), || {
        attempts(&receiver)
            .iter()
            .any(|a| a.accepted && a.event == "incident.resolve")
    });
    wait_until("the resolved alert gone", Duration::from_secs(60), || {
        am_alert(&stack, &id1).is_none()
    });
    std::thread::sleep(Duration::from_secs(3));

    let seen = attempts(&receiver);
    assert!(seen.iter().all(|a| a.signed), "{seen:?}");
    assert!(
        seen.iter()
            .all(|a| a.body["incident"]["tenant"] == "tenant-1"),
        "only tenant-1's incidents reach its webhook"
    );
    // Every delivery id accepted exactly once, each retried under the same id.
    let mut accepted: BTreeMap<&str, usize> = BTreeMap::new();
    for a in seen.iter().filter(|a| a.accepted) {
        *accepted.entry(&a.delivery).or_default() += 1;
    }
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    let refused: Vec<&Attempt> = seen.iter().filter(|a| !a.accepted).collect();
    assert!(!refused.is_empty());
    assert!(
        refused
            .iter()
            .all(|a| accepted.contains_key(a.delivery.as_str())),
        "every refused delivery was delivered later: {seen:?}"
    );
    // One notification per lifecycle change: open, acknowledge, resolve (nothing between the
    // acknowledgement and the resolve, though the incident was updated as its member resolved).
    let events: Vec<&str> = seen
        .iter()
        .filter(|a| a.accepted)
        .map(|a| a.event.as_str())
        .filter(|e| *e != "incident.update")
        .collect();
    assert_eq!(
        events,
        vec!["incident.open", "incident.acknowledge", "incident.resolve"],
        "{seen:?}"
    );
    let after_ack = seen
        .iter()
        .filter(|a| a.accepted)
        .skip_while(|a| a.event != "incident.acknowledge")
        .filter(|a| a.event == "incident.update")
        .count();
    assert_eq!(after_ack, 0, "an acknowledged incident does not notify");
    let last = seen.iter().rfind(|a| a.accepted).unwrap();
    assert_eq!(last.body["incident"]["incident_id"], id1.as_str());
    assert_eq!(
        last.body["link"],
        format!("{query}/v1/incidents/{id1}").as_str()
    );
    let dead: Vec<tributary_schemas::avro::DeadLetter> =
        stack.records(&tributary_schemas::Topics::default().deadletter);
    assert!(
        dead.iter().all(|d| d.stage != "alerts"),
        "nothing dead-lettered: {dead:?}"
    );

    // `alerts tail` shows the tenant's incident records from the topic.
    let tail = stack.ok(&[
        "alerts",
        "tail",
        "--tenant",
        "tenant-1",
        "--incidents-only",
        "--from-beginning",
        "--json",
        "--limit",
        "3",
    ]);
    let lines: Vec<Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{tail}");
    assert!(lines.iter().all(|l| l["tenant"] == "tenant-1"), "{tail}");
    assert_eq!(lines[0]["change"], "open", "{tail}");
    // The outside consumer saw each tenant's story, with who acted.
    let out = consumer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let story = |id: &str| -> Vec<(String, Value)> {
        let mut r: Vec<&Value> = records.iter().filter(|r| r["incident_id"] == id).collect();
        r.sort_by_key(|r| r["seq"].as_i64());
        r.iter()
            .map(|r| (r["change"].as_str().unwrap().to_owned(), r["actor"].clone()))
            .collect()
    };
    let first_story = story(&id1);
    assert_eq!(first_story.first().map(|c| c.0.as_str()), Some("open"));
    assert!(
        first_story.contains(&("acknowledge".into(), json!("ops1"))),
        "{first_story:?}"
    );
    assert_eq!(first_story.last().map(|c| c.0.as_str()), Some("resolve"));
    assert!(
        story(&id2).contains(&("resolve".to_owned(), json!("ops2"))),
        "{records:?}"
    );
    kill(&mut pipeline);
}
