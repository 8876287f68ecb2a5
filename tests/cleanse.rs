//! Cleansing end to end on a crafted data set whose tables are known exactly: unit variants,
//! duplicates, a late 5-hour batch (the Spiio case), out-of-range, wrongly typed, too fast, future,
//! too old, unknown-metric and garbage messages, two tenants with different policies. The
//! processing tier is `kill -9`ed between (and while) the halves, so dedup, rate-of-change and
//! watermark state must come back from `raw`. Then the catalog is fixed and the dead letters
//! replayed (twice: nothing doubles), and every derived table is rebuilt from `raw` and checked
//! equal to the live one.

mod support;

use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Stack, kill, mqtt_publish, post, request, wait_until};

const HOUR: i64 = 3600;

/// Tenant-2 refuses unknown metrics and data late by more than 3 h, and has a `flow` counter.
const CATALOG: &str = r#"
[cleanse.tenants.tenant-2.policy]
unknown_metrics = "reject"
late_data = "reject"
max_lateness_secs = 10800

[cleanse.tenants.tenant-2.metrics.flow]
type = "integer"
unit = "count"
max_rate_per_sec = 10.0
"#;

/// The fix: tenant-1's humidity sensors read up to 150 %RH.
const CATALOG_FIX: &str = r#"
[cleanse.tenants.tenant-1.metrics.humidity]
unit = "%RH"
min = 0.0
max = 150.0
"#;

fn time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A JSON message with an id, a time and metrics.
fn msg(id: &str, t: i64, metrics: Value) -> String {
    json!({"id": id, "time": time(t), "metrics": metrics}).to_string()
}

/// Hourly temperatures 1..=5 h before `now` as one SenML pack (a gateway's 5-hour batch).
fn batch(now: i64) -> String {
    let records: Vec<Value> = (1..=5)
        .map(|h| json!({"n": "temperature", "u": "Cel", "v": 10.0 + h as f64, "t": now - h * HOUR}))
        .collect();
    Value::Array(records).to_string()
}

struct Device {
    id: String,
    token: String,
}

impl Device {
    fn send(&self, stack: &Stack, content_type: &str, body: &str) {
        let url = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);
        let (status, answer) = post(&url, &self.token, content_type, body);
        assert_eq!(status, 202, "{body}: {answer}");
    }

    fn json(&self, stack: &Stack, body: &str) {
        self.send(stack, "application/json", body)
    }
}

fn processing(stack: &Stack, n: usize) -> Child {
    stack.spawn_stages(&["cleanse", "lake"], &format!("processing-{n}"), &[])
}

#[test]
fn crafted_data_set_gives_exactly_the_expected_tables_across_kills_replays_and_rebuilds() {
    let stack = Stack::start_with_storage(6, &[], "sqlite://tansu.db");
    std::fs::write(stack.path().join("tributary.toml"), CATALOG).unwrap();
    let secrets = stack.secrets();
    let device = |tenant: &str| {
        let s = secrets
            .iter()
            .find(|s| s["tenant"] == tenant)
            .unwrap_or_else(|| panic!("a device of {tenant}"));
        Device {
            id: s["device"].as_str().unwrap().to_owned(),
            token: s["token"].as_str().unwrap().to_owned(),
        }
    };
    let (a, b, c) = (device("tenant-1"), device("tenant-2"), device("tenant-3"));
    let mut ingest = stack.spawn_stages(&["http", "mqtt"], "ingest", &[]);
    stack.wait_http();
    let mut processing_tier = processing(&stack, 0);
    let now = chrono::Utc::now().timestamp();

    // Tenant-3's catalog through the admin API: refuse unknown metrics. A bad one is refused with
    // the field named; the effective catalog keeps the defaults beside the tenant's own.
    let catalog_url = format!(
        "http://127.0.0.1:{}/v1/tenants/tenant-3/catalog",
        stack.http_port
    );
    let put = |body: Value| {
        request(
            "PUT",
            &catalog_url,
            ADMIN_TOKEN,
            "application/json",
            &body.to_string(),
        )
    };
    let (status, answer) = put(json!({"metrics": {"flow": {"unit": "furlong"}}}));
    assert_eq!(
        (status, &answer["field"]),
        (400, &json!("metrics.flow.unit")),
        "{answer}"
    );
    let (status, answer) = put(json!({"policy": {"unknown_metrics": "reject"}}));
    assert_eq!(status, 200, "{answer}");
    let (status, got) = request("GET", &catalog_url, ADMIN_TOKEN, "application/json", "");
    assert_eq!(status, 200);
    assert_eq!(got["source"], "api");
    assert_eq!(got["policy"]["unknown_metrics"], "reject");
    assert_eq!(got["metrics"]["temperature"]["unit"], "Cel");
    assert_eq!(
        request("GET", &catalog_url, "wrong", "application/json", "").0,
        401
    );
    // The cleanse stage follows the catalog topic and applies the change to what comes next.
    wait_until(
        "the catalog change in cleanse",
        Duration::from_secs(30),
        || {
            stack
                .log("processing-0")
                .contains("metric catalog applied generation=1")
        },
    );
    c.json(
        &stack,
        &msg("c-1", now - 50, json!({"rpm": 5, "temperature": 20})),
    );

    // First half. Tenant-1 (default policy): unit variants, a bad value, an out-of-range value,
    // an unknown metric (accepted as sent), garbage over MQTT.
    let m1 = msg(
        "a-1",
        now - 60,
        json!({"temperature": {"value": 68, "unit": "degF"}, "humidity": 40,
               "battery_voltage": {"value": 3300, "unit": "mV"}}),
    );
    a.json(&stack, &m1);
    a.json(&stack, &msg("a-2", now - 59, json!({"temperature": "hot"})));
    a.json(
        &stack,
        &msg("a-3", now - 58, json!({"humidity": 140, "temperature": 21})),
    );
    a.json(
        &stack,
        &msg("a-4", now - 57, json!({"rpm": {"value": 5, "unit": "Hz"}})),
    );
    let acks = mqtt_publish(
        stack.mqtt_port,
        &a.id,
        &a.token,
        &format!("devices/{}/telemetry", a.id),
        &["{\"metrics\": {\"temperature\":".to_owned()],
    );
    assert_eq!(acks.len(), 1);
    // Tenant-2 (strict): an unknown metric, a fractional counter, two plausible counts.
    b.json(&stack, &msg("b-1", now - 100, json!({"rpm": 5})));
    b.json(&stack, &msg("b-2", now - 100, json!({"flow": 2.5})));
    b.json(&stack, &msg("b-3", now - 100, json!({"flow": 100})));
    b.json(&stack, &msg("b-4", now - 90, json!({"flow": 190})));

    // 1 + 3 + 1 + 1 + 2 readings of the first half landed: kill the processing tier.
    wait_until(
        "the first half in the lake",
        Duration::from_secs(120),
        || stack.count("telemetry") >= 8,
    );
    kill_9(&mut processing_tier);

    // Second half, while processing is down: the duplicate of a-1 must still be caught, b-5 must
    // be measured against b-4, the batches against the watermarks, all from state rebuilt from raw.
    a.json(&stack, &m1);
    a.json(&stack, &msg("a-5", now + HOUR, json!({"temperature": 20})));
    a.json(
        &stack,
        &msg("a-6", now - 40 * 24 * HOUR, json!({"temperature": 20})),
    );
    a.send(&stack, "application/senml+json", &batch(now));
    a.json(
        &stack,
        &msg(
            "a-8",
            now - 30,
            json!({"pressure": {"value": 14.5, "unit": "psi"}}),
        ),
    );
    a.json(
        &stack,
        &msg(
            "a-9",
            now - 30,
            json!({"energy": {"value": 1500, "unit": "Wh"}}),
        ),
    );
    a.json(
        &stack,
        &msg(
            "a-10",
            now - 30,
            json!({"temperature": {"value": 1, "unit": "V"}}),
        ),
    );
    b.json(&stack, &msg("b-5", now - 89, json!({"flow": 300})));
    b.send(&stack, "application/senml+json", &batch(now));

    processing_tier = processing(&stack, 1);
    // And once more while it rebuilds its state or works through the second half.
    std::thread::sleep(Duration::from_millis(1500));
    kill_9(&mut processing_tier);
    processing_tier = processing(&stack, 2);

    // Tenant-1: 3 (a-1) + 1 (a-3) + 1 (a-4) + 5 (batch) + 1 (a-8) + 1 (a-9) = 12 readings;
    // tenant-2: 2 (b-3, b-4) + 3 (batch within 3 h) = 5; tenant-3: 1.
    let (t, d) = stack.wait_for_rows(18, 12, Duration::from_secs(120));
    assert_eq!((t, d), (18, 12), "{}", stack.logs());

    let label = |d: &Value| {
        [(&a, "a"), (&b, "b"), (&c, "c")]
            .iter()
            .find(|(x, _)| *d == x.id.as_str())
            .map_or("?", |(_, l)| *l)
    };
    let readings = stack.sql(
        "SELECT device, event_id, metric, round(value, 6) AS value, unit, original_value, \
         original_unit, late, CAST(event_time AS VARCHAR) AS t FROM telemetry \
         ORDER BY device, event_time, metric",
    );
    let row = |r: &Value| {
        format!(
            "{} {} {}={} {} ({} {}) late={}",
            label(&r["device"]),
            r["event_id"]
                .as_str()
                .unwrap_or("")
                .split('-')
                .next()
                .unwrap_or(""),
            r["metric"].as_str().unwrap_or(""),
            r["value"],
            r["unit"].as_str().unwrap_or("-"),
            r["original_value"],
            r["original_unit"].as_str().unwrap_or("-"),
            r["late"]
        )
    };
    let got: Vec<String> = readings.iter().map(row).collect();
    let batch_rows = |d: &str, hours: &[i64]| -> Vec<String> {
        hours
            .iter()
            .rev()
            .map(|h| format!("{d} h temperature={}.0 Cel (null -) late=true", 10 + h))
            .collect()
    };
    let mut expected: Vec<String> = Vec::new();
    expected.extend(batch_rows("a", &[1, 2, 3, 4, 5]));
    expected.extend([
        "a a battery_voltage=3.3 V (3300.0 mV) late=false".to_owned(),
        "a a humidity=40.0 %RH (null -) late=false".to_owned(),
        "a a temperature=20.0 Cel (68.0 degF) late=false".to_owned(),
        "a a temperature=21.0 Cel (null -) late=false".to_owned(),
        "a a rpm=5.0 Hz (null -) late=false".to_owned(),
        "a a energy=1.5 kWh (1500.0 Wh) late=false".to_owned(),
        "a a pressure=99.973981 kPa (14.5 psi) late=false".to_owned(),
    ]);
    expected.extend(batch_rows("b", &[1, 2, 3]));
    expected.extend([
        "b b flow=100.0 count (null -) late=false".to_owned(),
        "b b flow=190.0 count (null -) late=false".to_owned(),
        "c c temperature=20.0 Cel (null -) late=false".to_owned(),
    ]);
    assert_eq!(got, expected, "{readings:#?}");
    // The late batch landed in the days of its event times.
    let misplaced =
        stack.sql("SELECT count(*) AS n FROM telemetry WHERE day <> CAST(event_time AS DATE)");
    assert_eq!(misplaced[0]["n"], 0);

    let dead = stack.sql("SELECT device, rule, field FROM deadletter ORDER BY device, rule, field");
    let got: Vec<String> = dead
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                label(&r["device"]),
                r["rule"].as_str().unwrap_or(""),
                r["field"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "a future_event_time time",
            "a malformed_json -",
            "a non_numeric_value metrics.temperature",
            "a out_of_range metrics.humidity",
            "a too_old time",
            "a unknown_unit metrics.temperature.unit",
            "b late_event [3].t",
            "b late_event [4].t",
            "b rate_of_change metrics.flow",
            "b type_mismatch metrics.flow",
            "b unknown_metric metrics.rpm",
            "c unknown_metric metrics.rpm",
        ]
    );

    // `deadletter list` and `show`: the reason, the provenance and the original bytes.
    let listed = stack.ok(&["deadletter", "list", "--rule", "out_of_range"]);
    assert!(listed.contains("above the maximum 100 %RH"), "{listed}");
    let id = stack.sql(
        "SELECT concat(source_topic, '/', CAST(source_partition AS VARCHAR), '/', \
         CAST(source_offset AS VARCHAR), '/', CAST(source_index AS VARCHAR)) AS id \
         FROM deadletter WHERE rule = 'out_of_range'",
    )[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(listed.contains(&id), "{listed}");
    let shown = stack.ok(&["deadletter", "show", &id]);
    assert!(shown.contains("\"humidity\":140"), "{shown}");
    assert!(shown.contains("metrics.humidity"), "{shown}");

    // Event sourcing: the derived tables rebuilt from `raw` alone equal the live ones.
    for table in ["telemetry", "deadletter"] {
        let out = stack.ok(&["rebuild", table, "--check"]);
        assert!(out.contains("check: equal"), "{table}: {out}");
    }

    // Fix the catalog, restart processing with it, replay: the humidity reading of a-3 lands
    // (its temperature, accepted the first time, does not come again).
    std::fs::write(
        stack.path().join("tributary.toml"),
        format!("{CATALOG}\n{CATALOG_FIX}"),
    )
    .unwrap();
    kill(&mut processing_tier);
    processing_tier = processing(&stack, 3);
    let out = stack.ok(&["deadletter", "replay", "--rule", "out_of_range"]);
    assert!(out.contains("replayed 1 raw records"), "{out}");
    assert!(
        out.contains("1 readings landed, 0 dead letters again"),
        "{out}"
    );
    // Replayed again: that dead letter is resolved, nothing goes.
    let out = stack.ok(&["deadletter", "replay", "--rule", "out_of_range"]);
    assert!(out.contains("nothing to replay"), "{out}");
    // Every other open dead letter replayed under the same catalog: refused again, no reading.
    let out = stack.ok(&["deadletter", "replay"]);
    assert!(out.contains("replayed 10 raw records"), "{out}");
    assert!(
        out.contains("0 readings landed, 11 dead letters again"),
        "{out}"
    );
    a.json(&stack, &msg("a-11", now, json!({"humidity": 41})));
    wait_until("the marker", Duration::from_secs(90), || {
        stack.count("telemetry") >= 20
    });
    let a3 =
        stack.sql("SELECT metric, value FROM telemetry WHERE event_id = 'a-3' ORDER BY metric");
    assert_eq!(
        a3,
        [
            json!({"metric": "humidity", "value": 140.0}),
            json!({"metric": "temperature", "value": 21.0})
        ]
    );
    assert_eq!(stack.count("telemetry"), 20);
    // The refused-again replays are new dead letters (of the copies): 11 (malformed_json is
    // replayed whole, the rest by measurement).
    assert_eq!(stack.count("deadletter"), 23);

    // Rebuilt under today's (fixed) catalog: a-3's humidity comes from the original record, the
    // replays find nothing left to do, so the same 20 readings.
    let out = stack.ok(&["rebuild", "telemetry", "--into", "telemetry_fixed"]);
    assert!(out.contains("→ 20 rows"), "{out}");
    let humidity = stack.sql(
        "SELECT count(*) AS n FROM telemetry_fixed WHERE event_id = 'a-3' AND metric = 'humidity'",
    );
    assert_eq!(humidity[0]["n"], 1);
    let out = stack.ok(&["rebuild", "usage", "--check"]);
    assert!(out.contains("check: equal"), "usage: {out}");
    // Usage counts device traffic only: 13 messages of tenant-1's device (one over MQTT, one the
    // marker), 6 of tenant-2's, 1 of tenant-3's; no replay.
    let usage = stack.sql("SELECT sum(events) AS n FROM usage");
    assert_eq!(usage[0]["n"], 20);

    kill(&mut processing_tier);
    kill(&mut ingest);
}

fn kill_9(child: &mut Child) {
    let status = std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
}
