//! Device shadows end to end, on a real Tansu and Mosquitto: devices report over HTTP and MQTT,
//! apps set desired state over the query HTTP API with tenant credentials, a device that was
//! offline gets its delta when it subscribes, a stale conditional update gets 409 and changes
//! nothing, every refusal names its field, and a kill -9 of the shadow stage loses no logged update
//! and applies none twice (the versions on `shadows` are 1..=N, each with its own update).

mod support;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};
use serde_json::{Value, json};
use support::{Stack, kill, request, wait_until};
use tributary_schemas::avro::{ShadowDocument, ShadowUpdate};
use tributary_schemas::registry::token_hash;

const APP: &str = "app-token-of-tenant-1";
const AUDITOR: &str = "auditor-token-of-tenant-1";
const OTHER: &str = "app-token-of-tenant-2";

/// A message a device received: topic, payload, retained.
type Received = (String, String, bool);

/// A device's MQTT session subscribed to its shadow topics; messages arrive on the channel.
fn subscribe(port: u16, device: &str, token: &str) -> (Client, mpsc::Receiver<Received>) {
    let mut opts = MqttOptions::new(format!("shadow-test-{device}"), "127.0.0.1", port);
    opts.set_credentials(device, token);
    let (client, mut conn) = Client::new(opts, 100);
    client
        .subscribe(format!("devices/{device}/shadow/#"), QoS::AtLeastOnce)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for event in conn.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let body = String::from_utf8_lossy(&p.payload).into_owned();
                    if tx.send((topic, body, p.retain)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, rx)
}

/// The next message on `topic` within 20 s.
fn next_on(stack: &Stack, rx: &mpsc::Receiver<Received>, topic: &str) -> Received {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(m) if m.0 == topic => return m,
            Ok(_) => {}
            Err(_) => panic!("nothing on {topic} within 20 s\n{}", stack.logs()),
        }
    }
}

/// `get()` every 300 ms until `done` holds of what it gave or `timeout` passed; the last value
/// (the caller asserts on it, with the context it has).
fn poll<T>(timeout: Duration, mut get: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let value = get();
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn shadows_follow_devices_and_apps_with_exact_versions_across_a_crash() {
    let mut stack = Stack::start(9, &[]);
    let query_port = support::free_port();
    let config = format!(
        r#"
[shadows]
max_bytes = 4096
max_depth = 4
answer_timeout_ms = 3000

[query.users.app]
password_sha256 = "{app}"
tenant = "tenant-1"
role = "engineer"

[query.users.auditor]
password_sha256 = "{auditor}"
tenant = "tenant-1"
role = "compliance"

[query.users.other]
password_sha256 = "{other}"
tenant = "tenant-2"
role = "engineer"
"#,
        app = token_hash(APP),
        auditor = token_hash(AUDITOR),
        other = token_hash(OTHER),
    );
    let path = stack.path().join("tributary.toml");
    std::fs::write(&path, config).unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &path.display().to_string());
    stack.set_env(
        "TRIBUTARY_QUERY__HTTP_LISTEN",
        &format!("127.0.0.1:{query_port}"),
    );
    let secrets = stack.secrets();
    let of_tenant: Vec<&Value> = secrets
        .iter()
        .filter(|s| s["tenant"] == "tenant-1")
        .collect();
    assert!(of_tenant.len() >= 3, "{secrets:?}");
    let id = |i: usize| of_tenant[i]["device"].as_str().unwrap().to_owned();
    let token = |i: usize| of_tenant[i]["token"].as_str().unwrap().to_owned();
    let (d0, d1) = (id(0), id(1));

    // The endpoints (ingest HTTP, MQTT, query HTTP) in one process, the shadow stage in another.
    let mut front = stack.spawn_stages(&["http", "mqtt", "query"], "front", &[]);
    let mut stage = stack.spawn_stages(&["shadows"], "shadows-1", &[]);
    stack.wait_http();
    let partitions = tributary_schemas::kafka::KafkaConfig::default().partitions as usize;
    let stage_ready = |log: &str| {
        wait_until(
            "the shadow stage's partitions",
            Duration::from_secs(60),
            || {
                stack
                    .log(log)
                    .matches("state restored from its changelog")
                    .count()
                    >= partitions
            },
        )
    };
    stage_ready("shadows-1");
    let mut lake = stack.spawn_stages(&["lake"], "lake", &[]);
    let ingest = |device: &str, name: &str| {
        let tail = if name.is_empty() {
            String::new()
        } else {
            format!("/{name}")
        };
        format!(
            "http://127.0.0.1:{}/v1/devices/{device}/shadow{tail}",
            stack.http_port
        )
    };
    let app = |device: &str| format!("http://127.0.0.1:{query_port}/v1/devices/{device}/shadow");
    wait_until("the query server", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", query_port)).is_ok()
    });

    // The device reports over HTTP with its token; the answer is the stage's, with its clientToken.
    let report =
        json!({"state": {"reported": {"firmware": "2.3", "led": "off"}}, "clientToken": "h-1"});
    let (status, body) = request(
        "POST",
        &ingest(&d0, ""),
        &token(0),
        "application/json",
        &report.to_string(),
    );
    assert_eq!(
        (status, &body["version"], &body["clientToken"]),
        (200, &json!(1), &json!("h-1")),
        "{body}\n{}",
        stack.logs()
    );
    // An app of the tenant sets the desired state: the delta is what differs.
    let (status, body) = request(
        "POST",
        &app(&d0),
        APP,
        "application/json",
        &json!({"state": {"desired": {"firmware": "2.4"}}}).to_string(),
    );
    assert_eq!((status, &body["version"]), (200, &json!(2)), "{body}");
    let (status, doc) = request("GET", &ingest(&d0, ""), &token(0), "application/json", "");
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["state"]["delta"], json!({"firmware": "2.4"}));
    assert_eq!(
        doc["state"]["reported"],
        json!({"firmware": "2.3", "led": "off"})
    );
    assert!(
        doc["metadata"]["desired"]["firmware"]["timestamp"].is_i64(),
        "{doc}"
    );
    let (status, seen_by_app) = request("GET", &app(&d0), APP, "application/json", "");
    assert_eq!((status, &seen_by_app["state"]), (200, &doc["state"]));

    // A conditional update on a stale version: 409 naming `version`, nothing applied.
    let (status, body) = request(
        "POST",
        &app(&d0),
        APP,
        "application/json",
        &json!({"state": {"desired": {"firmware": "2.5"}}, "version": 1}).to_string(),
    );
    assert_eq!((status, &body["field"]), (409, &json!("version")), "{body}");
    let (_, after) = request("GET", &app(&d0), APP, "application/json", "");
    assert_eq!(
        (&after["version"], &after["state"]["desired"]["firmware"]),
        (&json!(2), &json!("2.4"))
    );
    // And on the right one: applied.
    let (status, body) = request(
        "POST",
        &app(&d0),
        APP,
        "application/json",
        &json!({"state": {"desired": {"firmware": "2.5"}}, "version": 2}).to_string(),
    );
    assert_eq!((status, &body["version"]), (200, &json!(3)), "{body}");

    // Every refusal says why, naming the field where there is one.
    let deep = json!({"state": {"desired": {"a": {"b": {"c": {"d": {"e": 1}}}}}}}).to_string();
    let big = json!({"state": {"desired": {"blob": "x".repeat(5000)}}}).to_string();
    let desired = json!({"state": {"desired": {"x": 1}}}).to_string();
    let reported = json!({"state": {"reported": {"x": 1}}}).to_string();
    for (what, url, credential, content_type, body, expected, field) in [
        (
            "too deep",
            app(&d0),
            APP,
            "application/json",
            deep.as_str(),
            400,
            Some("state.desired.a.b.c.d"),
        ),
        (
            "too large",
            app(&d0),
            APP,
            "application/json",
            big.as_str(),
            413,
            Some("state"),
        ),
        (
            "not JSON",
            app(&d0),
            APP,
            "application/json",
            "{nope",
            400,
            Some("body"),
        ),
        (
            "an app reporting",
            app(&d0),
            APP,
            "application/json",
            reported.as_str(),
            403,
            Some("state.reported"),
        ),
        (
            "a reader setting",
            app(&d0),
            AUDITOR,
            "application/json",
            desired.as_str(),
            403,
            None,
        ),
        (
            "another tenant",
            app(&d0),
            OTHER,
            "application/json",
            desired.as_str(),
            404,
            Some("id"),
        ),
        (
            "no credentials",
            app(&d0),
            "wrong",
            "application/json",
            desired.as_str(),
            401,
            None,
        ),
        (
            "not JSON content",
            app(&d0),
            APP,
            "text/plain",
            desired.as_str(),
            415,
            None,
        ),
        (
            "another device's token",
            ingest(&d1, ""),
            &token(0),
            "application/json",
            reported.as_str(),
            403,
            Some("id"),
        ),
    ] {
        let (status, body) = request("POST", &url, credential, content_type, body);
        assert_eq!(status, expected, "{what}: {body}");
        if let Some(f) = field {
            assert_eq!(body["field"], f, "{what}: {body}");
        }
    }
    let (status, _) = request("GET", &app(&d0), OTHER, "application/json", "");
    assert_eq!(status, 404, "another tenant does not see the shadow");
    let (_, after) = request("GET", &app(&d0), APP, "application/json", "");
    assert_eq!(
        after["version"], 3,
        "no refused request took a version: {after}"
    );

    // Device 1 is offline while an app sets its desired state; when it connects and subscribes it
    // gets the current delta (retained), without asking.
    let (status, body) = request(
        "POST",
        &app(&d1),
        APP,
        "application/json",
        &json!({"state": {"desired": {"led": "on", "interval": 30}}}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    // The bridge publishes the delta a moment after the answer: a session that connects before
    // gets it live; one that connects after gets it from the broker, retained. Reconnect until
    // a session connects after: it is sent the delta without asking for it.
    let delta_topic = format!("devices/{d1}/shadow/update/delta");
    let mut sessions = 0;
    let (device, messages) = loop {
        sessions += 1;
        let (device, messages) = subscribe(stack.mqtt_port, &d1, &token(1));
        let (_, delta, retained) = next_on(&stack, &messages, &delta_topic);
        let delta: Value = serde_json::from_str(&delta).unwrap();
        assert_eq!(delta["state"], json!({"led": "on", "interval": 30}));
        if retained {
            break (device, messages);
        }
        assert!(
            sessions < 5,
            "the delta is not retained for a device that connects later"
        );
        let _ = device.disconnect();
        std::thread::sleep(Duration::from_millis(200));
    };
    // It reports over MQTT: accepted with its clientToken, and the delta shrinks, then clears.
    device
        .publish(
            format!("devices/{d1}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"led": "on"}}, "clientToken": "m-1"})
                .to_string()
                .into_bytes(),
        )
        .unwrap();
    let (_, accepted, _) = next_on(
        &stack,
        &messages,
        &format!("devices/{d1}/shadow/update/accepted"),
    );
    let accepted: Value = serde_json::from_str(&accepted).unwrap();
    assert_eq!(
        (&accepted["clientToken"], &accepted["version"]),
        (&json!("m-1"), &json!(2)),
        "{accepted}"
    );
    let (_, delta, _) = next_on(&stack, &messages, &delta_topic);
    assert_eq!(
        serde_json::from_str::<Value>(&delta).unwrap()["state"],
        json!({"interval": 30})
    );
    device
        .publish(
            format!("devices/{d1}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"interval": 30}}})
                .to_string()
                .into_bytes(),
        )
        .unwrap();
    let (_, cleared, retained) = next_on(&stack, &messages, &delta_topic);
    assert_eq!(
        (cleared.as_str(), retained),
        ("", false),
        "an empty message clears the retained delta"
    );
    // A malformed report over MQTT is rejected on its topic, naming the field.
    device
        .publish(
            format!("devices/{d1}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            b"{nope".to_vec(),
        )
        .unwrap();
    let (_, rejected, _) = next_on(
        &stack,
        &messages,
        &format!("devices/{d1}/shadow/update/rejected"),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&rejected).unwrap()["field"],
        "body"
    );
    // A named shadow: none yet, then one the app sets, read by the device over MQTT.
    device
        .publish(
            format!("devices/{d1}/shadow/name/firmware/get"),
            QoS::AtLeastOnce,
            false,
            Vec::new(),
        )
        .unwrap();
    let (_, missing, _) = next_on(
        &stack,
        &messages,
        &format!("devices/{d1}/shadow/name/firmware/get/rejected"),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&missing).unwrap()["error"]
            .as_str()
            .map(|e| e.contains("firmware")),
        Some(true)
    );
    let (status, _) = request(
        "POST",
        &format!("{}/firmware", app(&d1)),
        APP,
        "application/json",
        &json!({"state": {"desired": {"version": "2.4.1", "url": "https://ota/2.4.1"}}})
            .to_string(),
    );
    assert_eq!(status, 200);
    device
        .publish(
            format!("devices/{d1}/shadow/name/firmware/get"),
            QoS::AtLeastOnce,
            false,
            Vec::new(),
        )
        .unwrap();
    let (_, named, _) = next_on(
        &stack,
        &messages,
        &format!("devices/{d1}/shadow/name/firmware/get/accepted"),
    );
    let named: Value = serde_json::from_str(&named).unwrap();
    assert_eq!(
        (&named["version"], &named["state"]["delta"]["version"]),
        (&json!(1), &json!("2.4.1"))
    );
    let (status, classic) = request("GET", &ingest(&d1, ""), &token(1), "application/json", "");
    assert_eq!(
        (status, &classic["version"]),
        (200, &json!(3)),
        "the named shadow is its own: {classic}"
    );
    assert!(classic["state"].get("delta").is_none(), "{classic}");
    // The device cannot touch another device's shadow topics (Mosquitto's ACL).
    let reasons = support::mqtt_publish(
        stack.mqtt_port,
        &d1,
        &token(1),
        &format!("devices/{d0}/shadow/update"),
        std::slice::from_ref(&reported),
    );
    assert_eq!(
        reasons,
        vec![rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized]
    );
    drop(device);

    // A burst of reports over MQTT from one device, the shadow stage killed -9 in the middle and
    // started again: every logged update is applied once, in order.
    let d2 = id(2);
    let burst = |range: std::ops::Range<usize>| -> Vec<String> {
        range
            .map(|n| json!({"state": {"reported": {"n": n}}}).to_string())
            .collect()
    };
    let (status, _) = request("GET", &ingest(&d2, ""), &token(2), "application/json", "");
    assert_eq!(status, 404, "no shadow before its first update");
    let topic = format!("devices/{d2}/shadow/update");
    support::mqtt_publish(stack.mqtt_port, &d2, &token(2), &topic, &burst(0..200));
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-9", &stage.id().to_string()])
        .status();
    let _ = stage.wait();
    support::mqtt_publish(stack.mqtt_port, &d2, &token(2), &topic, &burst(200..400));
    // While the stage is down an app's update is logged but not answered: 503, retry later.
    let (status, _) = request(
        "POST",
        &app(&d2),
        APP,
        "application/json",
        &json!({"state": {"desired": {"n": 399}}}).to_string(),
    );
    assert_eq!(status, 503);
    stage = stack.spawn_stages(&["shadows"], "shadows-2", &[]);
    stage_ready("shadows-2");
    let last = 401;
    let (_, doc) = poll(
        Duration::from_secs(90),
        || request("GET", &ingest(&d2, ""), &token(2), "application/json", ""),
        |(_, doc)| doc["version"].as_i64() >= Some(last),
    );
    assert!(
        doc["version"].as_i64() >= Some(last),
        "not every update applied after the crash: {doc}\n{}",
        stack.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    // The log holds each report once, in the order the device sent them; the app's update is
    // somewhere among them (Mosquitto acknowledged the device's publishes before the bridge
    // logged them all).
    let logged: Vec<ShadowUpdate> = stack
        .records::<ShadowUpdate>("shadow-updates")
        .into_iter()
        .filter(|u| u.device == d2 && u.name.is_empty())
        .collect();
    let reported = |u: &ShadowUpdate| {
        serde_json::from_slice::<Value>(&u.body).unwrap()["state"]["reported"]["n"].as_i64()
    };
    let reports: Vec<i64> = logged.iter().filter_map(reported).collect();
    assert_eq!(
        reports,
        (0..400).collect::<Vec<_>>(),
        "each report logged once, in order"
    );
    assert_eq!(logged.len(), 401, "400 reports and the app's update");
    // Version v is the v-th logged update, each applied once: documents re-emitted after the
    // crash are the same records.
    let docs: Vec<ShadowDocument> = stack
        .records::<ShadowDocument>("shadows")
        .into_iter()
        .filter(|d| d.device == d2 && d.name.is_empty())
        .collect();
    let mut by_version: BTreeMap<i64, &ShadowDocument> = BTreeMap::new();
    for d in &docs {
        if let Some(seen) = by_version.insert(d.version, d) {
            assert_eq!(seen, d, "version {} written twice differently", d.version);
        }
    }
    let versions: Vec<i64> = by_version.keys().copied().collect();
    assert_eq!(
        versions,
        (1..=last).collect::<Vec<_>>(),
        "versions are gap-free and none repeats"
    );
    let mut n = None;
    for (update, (version, doc)) in logged.iter().zip(&by_version) {
        assert_eq!(
            doc.request_id, update.request_id,
            "version {version} is the {version}th update"
        );
        n = reported(update).or(n);
        let body: Value = serde_json::from_str(&doc.document).unwrap();
        assert_eq!(
            body["state"]["reported"]["n"].as_i64(),
            n,
            "version {version}"
        );
    }
    let (_, last_doc) = request("GET", &ingest(&d2, ""), &token(2), "application/json", "");
    assert_eq!(
        (&last_doc["version"], &last_doc["state"]["desired"]["n"]),
        (&json!(last), &json!(399))
    );
    assert!(last_doc["state"].get("delta").is_none(), "{last_doc}");

    // SQL over the lake: `shadow_history` holds every version once, each valid until the next was
    // made; `shadows` each shadow's latest; JSON functions read fields by path; tenants see
    // only their own.
    let sql = |credential: &str, query: &str| -> Vec<Value> {
        let url = format!("http://127.0.0.1:{query_port}/v1/sql");
        let (status, rows) = request(
            "POST",
            &url,
            credential,
            "application/json",
            &json!({ "sql": query }).to_string(),
        );
        assert_eq!(status, 200, "{query}: {rows}");
        rows.as_array().cloned().unwrap_or_default()
    };
    let history = format!(
        "SELECT version, request_id, valid_from, valid_to FROM shadow_history WHERE device = '{d2}' AND name = '' ORDER BY version"
    );
    let rows = poll(
        Duration::from_secs(120),
        || sql(APP, &history),
        |rows| rows.len() >= 401,
    );
    let got: Vec<(i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["version"].as_i64().unwrap(),
                r["request_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(i64, String)> = logged
        .iter()
        .enumerate()
        .map(|(i, u)| (i as i64 + 1, u.request_id.clone()))
        .collect();
    assert_eq!(
        got,
        want,
        "every version once, in order\n{}",
        stack.log("lake")
    );
    for pair in rows.windows(2) {
        assert_eq!(
            pair[0]["valid_to"], pair[1]["valid_from"],
            "version {} valid until the next",
            pair[0]["version"]
        );
    }
    assert!(
        rows[400]["valid_to"].is_null(),
        "the current version is open: {}",
        rows[400]
    );
    let current = format!(
        "SELECT device, version, json_get_str(reported, 'firmware') AS firmware, json_get_str(delta, 'firmware') AS pending, \
         json_get_int(reported, 'n') AS n FROM shadows WHERE name = '' AND device IN ('{d0}', '{d2}') ORDER BY device"
    );
    let want = vec![
        // (JSON rows leave out null columns.)
        json!({"device": d0, "version": 3, "firmware": "2.3", "pending": "2.5"}),
        json!({"device": d2, "version": 401, "n": 399}),
    ];
    let rows = poll(
        Duration::from_secs(60),
        || sql(APP, &current),
        |rows| *rows == want,
    );
    assert_eq!(rows, want, "shadows table\n{}", stack.log("lake"));
    let named = sql(
        APP,
        &format!(
            "SELECT name, json_get_str(desired, 'version') AS target FROM shadows WHERE device = '{d1}' ORDER BY name"
        ),
    );
    assert_eq!(
        named,
        vec![
            json!({"name": ""}),
            json!({"name": "firmware", "target": "2.4.1"})
        ]
    );
    for table in ["shadows", "shadow_history"] {
        let rows = sql(OTHER, &format!("SELECT count(*) AS n FROM {table}"));
        assert_eq!(
            rows,
            vec![json!({"n": 0})],
            "tenant-2 sees none of tenant-1's {table}"
        );
    }
    // Both tables are a function of `shadow-updates` alone.
    for table in ["shadows", "shadow-history"] {
        let out = stack.ok(&["rebuild", table, "--check"]);
        assert!(out.contains("check: equal"), "rebuild {table}: {out}");
    }
    kill(&mut lake);
    kill(&mut stage);
    kill(&mut front);
}
