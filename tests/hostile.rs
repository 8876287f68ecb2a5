//! One device must never stop the pipeline (issue 14), end to end on a real stack (Tansu,
//! Mosquitto, VictoriaMetrics) with every stage in one `tributary run` process:
//!
//! - the poison shapes that once panicked the cleanse stage (times like `bt: -1e300`,
//!   `time: -9223372036854775`, `t: 1e300`) are refused over HTTP with 400 naming the field, and
//!   dead-lettered (`bad_time`, field as sent) over MQTT; values that overflow (`v` + `bv`, a
//!   conversion to ∞) are dead letters too; a 20 KB publish (twice the MQTT client's default
//!   packet limit) lands;
//! - a record that makes the stage panic (fault injection) is retried, then dead-lettered
//!   `stage_failure` with the panic message, while the process keeps serving every device;
//! - ordinary messages of the same and other devices land afterwards;
//! - simulators over MQTT and HTTP (each device on one channel) leave `telemetry` and the
//!   time-series store with the same count per series.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Stack, field, kill, post, try_mqtt_publish_as, wait_until};

const MARKER: &str = "POISON-PILL-14";
const SENML: &str = "application/senml+json";
const JSON: &str = "application/json";

/// (content type, body, the field a refusal must name).
const POISON: &[(&str, &str, &str)] = &[
    (
        SENML,
        r#"[{"bn":"x:","bt":-1e300,"n":"temperature","v":1}]"#,
        "[0].bt",
    ),
    (
        JSON,
        r#"{"time":-9223372036854775,"metrics":{"temperature":1}}"#,
        "time",
    ),
    (SENML, r#"[{"n":"temperature","v":1,"t":1e300}]"#, "[0].t"),
];

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Samples per series in the store: (tenant, device, metric) → count.
fn store_counts(stack: &Stack) -> BTreeMap<(String, String, String), u64> {
    let base = stack.timeseries_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        let client = reqwest::Client::new();
        let _ = client
            .get(format!("{base}/internal/force_flush"))
            .send()
            .await;
        let end = (chrono::Utc::now().timestamp() + 3600).to_string();
        match client
            .get(format!("{base}/api/v1/export"))
            .query(&[
                ("match[]", r#"{__name__=~"telemetry_.*"}"#),
                ("start", "0"),
                ("end", end.as_str()),
            ])
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    });
    let mut counts = BTreeMap::new();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let series: Value = serde_json::from_str(line).unwrap();
        let m = &series["metric"];
        let label = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
        let metric = label("__name__")
            .strip_prefix("telemetry_")
            .unwrap_or_default()
            .to_owned();
        let n = series["values"].as_array().map_or(0, Vec::len) as u64;
        *counts
            .entry((label("tenant"), label("device"), metric))
            .or_default() += n;
    }
    counts
}

/// Readings per series in the lake: (tenant, device, metric) → count.
fn lake_counts(stack: &Stack) -> BTreeMap<(String, String, String), u64> {
    stack
        .sql("SELECT tenant, device, metric, count(*) AS n FROM telemetry GROUP BY 1, 2, 3")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                (s("tenant"), s("device"), s("metric")),
                r["n"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn hostile_input_never_stops_the_pipeline_and_stores_agree() {
    let mut stack = Stack::start(8, &[]);
    stack.start_timeseries_store();
    let url = stack.timeseries_url();
    stack.set_env("TRIBUTARY_TIMESERIES__URL", &url);
    stack.set_env("TRIBUTARY_TIMESERIES__FLUSH_INTERVAL_MS", "300");
    let mut pipeline =
        stack.spawn_stages(&[], "pipeline", &[("TRIBUTARY_FAULT_INJECT_PANIC", MARKER)]);
    stack.wait_http();
    let secrets = stack.secrets();
    let device = |i: usize| {
        (
            secrets[i]["device"].as_str().unwrap().to_owned(),
            secrets[i]["token"].as_str().unwrap().to_owned(),
        )
    };
    let ((a, a_token), (b, b_token), (c, c_token)) = (device(0), device(1), device(2));
    let telemetry = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);
    // Each message alone in its Kafka record batch: Tansu 0.6 (memory engine) serves a fetch
    // from the middle of a batch from the next batch on, so a stage restarted at an offset inside
    // a batch never sees that batch's later records (ARCHITECTURE.md, Tansu notes).
    let apart = || std::thread::sleep(Duration::from_millis(300));
    let publish = |user: &str, token: &str, content_type: &str, body: &str| {
        apart();
        let ct = (content_type == SENML).then_some(SENML);
        let acks = try_mqtt_publish_as(
            stack.mqtt_port,
            user,
            token,
            &format!("devices/{user}/telemetry"),
            &[body.to_owned()],
            ct,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(acks.len(), 1, "{body}");
    };

    // HTTP: refused at the door, naming the field.
    for (content_type, body, at) in POISON {
        let (status, answer) = post(&telemetry, &a_token, content_type, body);
        assert_eq!(
            (status, answer["field"].as_str()),
            (400, Some(*at)),
            "{body}: {answer}"
        );
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("1970"),
            "the reason says the range: {answer}"
        );
    }
    // MQTT: accepted by the broker (no door can answer), dead-lettered naming the field.
    for (content_type, body, _) in POISON {
        publish(&a, &a_token, content_type, body);
    }
    // Values that overflow: the sum of `v` and `bv`, and a conversion to the canonical unit.
    publish(
        &a,
        &a_token,
        SENML,
        r#"[{"bv":1e308,"n":"temperature","v":1e308}]"#,
    );
    publish(
        &a,
        &a_token,
        JSON,
        r#"{"id":"huge","metrics":{"energy":{"value":1e300,"unit":"MWh"}}}"#,
    );
    // A record that makes the cleanse stage panic, once over each channel.
    publish(
        &b,
        &b_token,
        JSON,
        &format!(r#"{{"id":"{MARKER}-mqtt","metrics":{{"temperature":1}}}}"#),
    );
    apart();
    let (status, answer) = post(
        &telemetry,
        &c_token,
        JSON,
        &format!(r#"{{"id":"{MARKER}-http","metrics":{{"temperature":2}}}}"#),
    );
    assert_eq!(status, 202, "{answer}");
    // Then ordinary messages of the same and other devices; one of 20 KB (padding it carries).
    let t0 = now_ms() - 60_000;
    let ordinary = |id: &str, k: i64, v: f64| {
        json!({"id": id, "time": rfc3339(t0 + k), "metrics": {"temperature": v}}).to_string()
    };
    publish(&a, &a_token, JSON, &ordinary("a-after", 1, 21.0));
    let big = json!({"id": "a-big", "time": rfc3339(t0 + 2), "pad": "x".repeat(20_000),
        "metrics": {"humidity": 40}})
    .to_string();
    publish(&a, &a_token, JSON, &big);
    for (token, id, k) in [(&b_token, "b-after", 3), (&c_token, "c-after", 4)] {
        apart();
        let (status, answer) = post(&telemetry, token, JSON, &ordinary(id, k, 22.0));
        assert_eq!(status, 202, "{answer}");
    }

    wait_until("the ordinary readings", Duration::from_secs(180), || {
        stack.count("telemetry") >= 4
    });
    let landed = stack.sql("SELECT event_id FROM telemetry ORDER BY event_id");
    let ids: Vec<&str> = landed
        .iter()
        .filter_map(|r| r["event_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["a-after", "a-big", "b-after", "c-after"],
        "{}",
        stack.logs()
    );
    // Waits up to 3 minutes, then lets the comparison below say what is missing.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while stack.count("deadletter") < 7 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let dead = stack.sql(
        "SELECT device, rule, field, reason, event_id FROM deadletter ORDER BY device, rule, field",
    );
    let got: Vec<(String, String, String)> = dead
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
            let who = [(&a, "a"), (&b, "b"), (&c, "c")]
                .iter()
                .find(|(d, _)| **d == s("device"))
                .map_or("?", |(_, l)| *l);
            (who.to_owned(), s("rule"), s("field"))
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("a", "bad_time", "[0].bt"),
        ("a", "bad_time", "[0].t"),
        ("a", "bad_time", "time"),
        ("a", "non_finite_value", "[0].v"),
        ("a", "non_finite_value", "metrics.energy"),
        ("b", "stage_failure", "-"),
        ("c", "stage_failure", "-"),
    ]
    .iter()
    .map(|(d, r, f)| ((*d).to_owned(), (*r).to_owned(), (*f).to_owned()))
    .collect();
    assert_eq!(got, want, "{dead:#?}\n{}", stack.log("pipeline"));
    for d in dead.iter().filter(|d| d["rule"] == "stage_failure") {
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("fault injected") && reason.contains("3 times"),
            "{reason}"
        );
        assert!(
            d["event_id"]
                .as_str()
                .unwrap_or_default()
                .starts_with(MARKER)
        );
    }
    // The stage failed on each poisoned record three times, said so loudly, and went on; the
    // process never stopped.
    let log = stack.log("pipeline");
    assert!(
        log.matches("record failed the stage").count() >= 6,
        "three failures per poisoned record: {log}"
    );
    assert!(
        pipeline.try_wait().unwrap().is_none(),
        "the pipeline is alive"
    );

    // Simulators, each device on one channel: the store holds what the lake holds, per series.
    let mqtt = stack.spawn_simulator_on("mqtt", 3, 2, 300, 100);
    let http = stack.spawn_simulator_on("http", 5, 3, 300, 100);
    let (m, h) = (stack.finish_simulator(mqtt), stack.finish_simulator(http));
    let expected = 4 + field(&m, "expected_readings") + field(&h, "expected_readings");
    wait_until("the simulated readings", Duration::from_secs(180), || {
        stack.count("telemetry") >= expected
    });
    assert_eq!(stack.count("telemetry"), expected);
    let lake = lake_counts(&stack);
    let mut store = BTreeMap::new();
    wait_until(
        "the store to hold every reading",
        Duration::from_secs(120),
        || {
            store = store_counts(&stack);
            store.values().sum::<u64>() >= expected
        },
    );
    assert_eq!(store, lake, "the same count per series in both stores");
    assert!(
        pipeline.try_wait().unwrap().is_none(),
        "the pipeline is alive"
    );
    kill(&mut pipeline);
}
