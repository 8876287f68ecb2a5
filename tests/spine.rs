//! End to end against real services: devices → MQTT/HTTP → Kafka `raw` → cleanse → Delta → SQL.

mod support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};
use support::{Stack, kill, mqtt_publish, post, summary};

#[test]
fn devices_to_sql_end_to_end() {
    let stack = Stack::start(20, &[("ghost-1", "ghost-secret")]);
    let mut pipeline = stack.spawn_pipeline(0);
    let secrets = stack.secrets();
    let token = |i: usize| secrets[i]["token"].as_str().unwrap().to_owned();
    let device = |i: usize| secrets[i]["device"].as_str().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);

    // Bad input at the door: each answer names what is wrong, and nothing reaches the log.
    let (s, b) = post(
        &url,
        &token(0),
        "application/x-ndjson",
        "{\"metrics\":{\"t\":1}}\n{\"id\":7,\"metrics\":{}}\n",
    );
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"], "line 2: field `id`: must be a string");
    let (s, b) = post(&url, &token(0), "application/json", "{\"metrics\": [");
    assert_eq!(s, 400, "{b}");
    let (s, _) = post(
        &url,
        "not-a-token",
        "application/json",
        "{\"metrics\":{\"t\":1}}",
    );
    assert_eq!(s, 401);
    let (s, b) = post(
        &url,
        &token(0),
        "application/json",
        &json!({"device": device(1), "metrics": {"t": 1}}).to_string(),
    );
    assert_eq!(s, 403, "a device cannot write as another: {b}");
    let (s, _) = post(&url, &token(0), "text/csv", "t,1");
    assert_eq!(s, 415);

    // Simulated fleets over both protocols.
    let mqtt = summary(&stack.ok(&[
        "simulate",
        "--via",
        "mqtt",
        "--devices",
        "20",
        "--messages",
        "5000",
        "--rate",
        "2500",
        "--seed",
        "1",
    ]));
    let http = summary(&stack.ok(&[
        "simulate",
        "--via",
        "http",
        "--devices",
        "20",
        "--messages",
        "5000",
        "--rate",
        "5000",
        "--batch",
        "25",
        "--seed",
        "2",
    ]));
    assert!(
        mqtt["malformed"].as_u64().unwrap() > 0 && mqtt["duplicates"].as_u64().unwrap() > 0,
        "{mqtt}"
    );
    assert!(
        http["malformed"].as_u64().unwrap() > 0 && http["duplicates"].as_u64().unwrap() > 0,
        "{http}"
    );

    // A probe with known values for the aggregate, SenML with one non-numeric record, and an
    // MQTT user unknown to the registry.
    // The probe's readings are two days old (within the catalog's maximum age), in their own day.
    let probe_day = (chrono::Utc::now() - chrono::Duration::days(2)).date_naive();
    // Ten seconds apart: one device's readings of one metric at one time would conflict.
    let probe: String = (1..=10)
        .map(|i| json!({"id": format!("probe-{i}"), "time": format!("{probe_day}T10:00:{i:02}Z"), "metrics": {"probe": {"value": i as f64 * 1.5, "unit": "V"}}}).to_string() + "\n")
        .collect();
    let (s, b) = post(&url, &token(2), "application/x-ndjson", &probe);
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(10)), "{b}");
    let senml = format!(
        r#"[{{"bn":"urn:dev:x:","bt":{},"n":"senml_t","u":"Cel","v":21.5}},{{"n":"senml_h","v":40}},{{"n":"senml_label","vs":"door"}}]"#,
        chrono::Utc::now().timestamp() - 60
    );
    let (s, _) = post(&url, &token(3), "application/senml+json", &senml);
    assert_eq!(s, 202);
    let ghost: Vec<String> = (0..5)
        .map(|i| json!({"id": format!("g{i}"), "metrics": {"t": 1}}).to_string())
        .collect();
    mqtt_publish(
        stack.mqtt_port,
        "ghost-1",
        "ghost-secret",
        "devices/ghost-1/telemetry",
        &ghost,
    );
    // A device publishing on another device's topic is refused by the broker's ACL.
    let impostor: Vec<String> = (0..3)
        .map(|i| json!({"id": format!("impostor-{i}"), "metrics": {"t": 1}}).to_string())
        .collect();
    let reasons = mqtt_publish(
        stack.mqtt_port,
        &device(4),
        &token(4),
        &format!("devices/{}/telemetry", device(5)),
        &impostor,
    );
    assert_eq!(reasons, vec![PubAckReason::NotAuthorized; 3]);

    let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let expected_readings = n(&mqtt, "expected_readings") + n(&http, "expected_readings") + 10 + 2;
    let expected_dead =
        n(&mqtt, "expected_dead_letters") + n(&http, "expected_dead_letters") + 1 + 5;
    let sent = n(&mqtt, "messages")
        + n(&http, "messages")
        + n(&mqtt, "duplicates")
        + n(&http, "duplicates");
    assert!(sent >= 10_000, "at least 10 000 events: {sent}");

    stack.assert_rows(
        expected_readings,
        expected_dead,
        Duration::from_secs(180),
        "telemetry/deadletter rows",
    );

    // No reading twice.
    assert_eq!(stack.duplicate_readings(), 0);

    // One aggregate answered exactly.
    let agg = stack.sql("SELECT count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi, min(unit) AS u FROM telemetry WHERE metric = 'probe'");
    assert_eq!(agg[0]["n"], 10);
    assert_eq!(agg[0]["s"].as_f64().unwrap(), 82.5);
    assert_eq!(
        (
            agg[0]["lo"].as_f64().unwrap(),
            agg[0]["hi"].as_f64().unwrap()
        ),
        (1.5, 15.0)
    );
    assert_eq!(agg[0]["u"], "V");

    // The tenant comes from the registry, and the day partition from the event time.
    let probe_rows = stack.sql("SELECT DISTINCT tenant, device, CAST(day AS VARCHAR) AS day FROM telemetry WHERE metric = 'probe'");
    assert_eq!(
        probe_rows,
        vec![
            json!({"tenant": secrets[2]["tenant"], "device": device(2), "day": probe_day.to_string()})
        ]
    );

    // Dead letters carry rule, field, reason and provenance; simulated malformed messages are all there.
    let rules = stack.sql("SELECT rule, count(*) AS n FROM deadletter GROUP BY rule ORDER BY rule");
    let by_rule = |r: &str| {
        rules
            .iter()
            .find(|x| x["rule"] == r)
            .map(|x| x["n"].as_u64().unwrap())
            .unwrap_or(0)
    };
    assert_eq!(by_rule("unknown_device"), 5, "{rules:?}");
    assert!(
        by_rule("malformed_json") > 0
            && by_rule("non_numeric_value") > 0
            && by_rule("non_finite_value") > 0,
        "{rules:?}"
    );
    let senml_dead = stack
        .sql("SELECT field, reason, source_topic, stage FROM deadletter WHERE field = '[2].vs'");
    assert_eq!(senml_dead.len(), 1);
    assert_eq!(
        (
            senml_dead[0]["source_topic"].as_str(),
            senml_dead[0]["stage"].as_str()
        ),
        (Some("raw"), Some("cleanse"))
    );
    let ghost_rows = stack.sql("SELECT count(*) AS n FROM deadletter WHERE device = 'ghost-1' AND tenant IS NULL AND reason LIKE '%not in the registry%'");
    assert_eq!(ghost_rows[0]["n"], 5);

    // Nothing of the impostor reached the log.
    for table in ["telemetry", "deadletter"] {
        let n = stack.sql(&format!(
            "SELECT count(*) AS n FROM {table} WHERE event_id LIKE 'impostor-%'"
        ));
        assert_eq!(n[0]["n"], 0, "{table}");
    }

    // Usage metering: every raw event and its bytes, per tenant and device (unknown devices: null
    // tenant), by the hour it was received.
    stack.assert_usage_matches_raw(Duration::from_secs(60));
    let hours = stack.sql("SELECT count(*) AS n FROM usage WHERE hour <> date_trunc('hour', hour)");
    assert_eq!(hours[0]["n"], 0, "hours start on the hour");

    // CSV output works too.
    let csv = stack.ok(&[
        "sql",
        "--format",
        "csv",
        "SELECT count(*) AS n FROM telemetry WHERE metric = 'probe'",
    ]);
    assert_eq!(csv.trim(), "n\n10");
    kill(&mut pipeline);
}
