//! Anomalies end to end: readings shaped for every detector kind go in over MQTT and HTTP; the
//! anomaly stage publishes them on `anomalies`, an ordinary Kafka consumer outside the process
//! (docs/examples/alert_consumer.py: confluent-kafka + fastavro) receives them, the `anomalies`
//! table holds each lifecycle record once across a kill -9 of the pipeline, and
//! `tributary anomalies backtest` over the same readings finds the same anomalies, as does
//! `tributary rebuild anomalies` from `raw`; a tenant's detector set over the admin API is
//! applied by the running stage.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Stack, kill, mqtt_publish, post, python, repo, request, wait_until};

const DETECTORS: &str = r#"
clock_grace_secs = 10
sweep_secs = 5

[detectors.hot]
metric = "k_threshold"
kind = "threshold"
above = 80.0
clear_above = 70.0
for_secs = 5
clear_for_secs = 10
severity = "critical"

[detectors.jump]
metric = "k_spike"
kind = "spike"
window_secs = 120
k = 6
warmup = 20

[detectors.surge]
metric = "k_rate"
kind = "rate_of_change"
max_per_sec = 1.0

[detectors.stuck]
metric = "k_flatline"
kind = "flatline"
epsilon = 0.001
for_secs = 20

[detectors.silent]
metric = "k_heartbeat"
kind = "heartbeat"
interval_secs = 30

[detectors.shift]
metric = "k_level"
kind = "level_shift"
warmup = 30
k = 8

[detectors.wearing]
metric = "k_trend"
kind = "trend"
limit = 80.0
horizon_secs = 200
window_secs = 3600
warmup = 10
"#;

/// Seconds of readings per device.
const N: i64 = 300;

/// A deterministic noise in [-0.5, 0.5).
fn noise(i: i64, salt: u64) -> f64 {
    let mut x =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
}

/// The message of second `i`: one value per metric, shaped so each detector fires where
/// [`expected_kinds`] says (and nowhere else).
fn message(i: i64, t0: i64, salt: u64) -> String {
    let t = chrono::DateTime::from_timestamp(t0 + i, 0)
        .unwrap()
        .to_rfc3339();
    let mut metrics = serde_json::Map::new();
    let n = |k: u64| noise(i, salt * 31 + k);
    metrics.insert(
        "k_threshold".into(),
        json!(if (100..120).contains(&i) {
            90.0
        } else {
            20.0 + n(1)
        }),
    );
    metrics.insert(
        "k_spike".into(),
        json!(if i == 150 { 40.0 } else { 20.0 + n(2) }),
    );
    metrics.insert(
        "k_rate".into(),
        json!(0.01 * i as f64 + if i >= 200 { 10.0 } else { 0.0 }),
    );
    metrics.insert(
        "k_flatline".into(),
        json!(if (50..100).contains(&i) {
            5.0
        } else {
            5.0 + n(3)
        }),
    );
    // Silent from 120 to 200, and for good after 250 (the others go on, so the clock moves).
    if i < 120 || (200..250).contains(&i) {
        metrics.insert("k_heartbeat".into(), json!(1.0 + n(4)));
    }
    metrics.insert(
        "k_level".into(),
        json!(if i < 150 { 50.0 } else { 55.0 } + 2.0 * n(5)),
    );
    metrics.insert("k_trend".into(), json!(100.0 - 0.05 * i as f64));
    json!({"id": format!("m-{i}"), "time": t, "metrics": metrics}).to_string()
}

/// The kinds that open, per device: each once, the heartbeat twice (the gap, and the end).
fn expected_kinds() -> Vec<&'static str> {
    let mut k = vec![
        "flatline",
        "heartbeat",
        "heartbeat",
        "level_shift",
        "rate_of_change",
        "spike",
        "threshold",
        "trend",
    ];
    k.sort();
    k
}

/// The table's open records, by device, kind and start; none while the table does not exist.
fn opened(stack: &Stack) -> Vec<Value> {
    if stack.count("anomalies") == 0 {
        return Vec::new();
    }
    stack.sql("SELECT anomaly_id, device, kind, CAST(start_time AS VARCHAR) AS start_time FROM anomalies WHERE state = 'open' ORDER BY device, kind, start_time")
}

#[test]
fn every_detector_kind_reaches_an_outside_consumer_the_table_and_the_backtest() {
    let mut stack = Stack::start_with_storage(6, &[], "sqlite://tansu.db");
    let config = stack.dir.path().join("tributary.toml");
    // The same catalog as the pipeline's config file: the `[anomalies]` section.
    let section = format!(
        "[anomalies]\n{}",
        DETECTORS.replace("[detectors.", "[anomalies.detectors.")
    );
    std::fs::write(&config, section).unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let detectors_file = stack.dir.path().join("detectors.toml");
    std::fs::write(&detectors_file, DETECTORS).unwrap();
    let mut pipeline = stack.spawn_pipeline(0);
    stack.wait_http();
    let secrets = stack.secrets();
    let token = |i: usize| secrets[i]["token"].as_str().unwrap().to_owned();
    let device = |i: usize| secrets[i]["device"].as_str().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);
    // Two hours ago, a second apart: event time is what counts, not arrival.
    let t0 = chrono::Utc::now().timestamp() - 7200;

    // The outside consumer, from before the first anomaly.
    let consumer = Command::new(python())
        .arg(repo().join("docs/examples/alert_consumer.py"))
        .args(["--brokers", &format!("127.0.0.1:{}", stack.kafka_port)])
        .args(["--topic", "anomalies"])
        .args([
            "--schemas",
            &repo().join("schemas/avro").display().to_string(),
        ])
        .args([
            "--group",
            "test-alerting",
            "--idle",
            "20",
            "--timeout",
            "300",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the venv's python: run deploy/local/install.sh");

    // Device 0 over MQTT, device 1 over HTTP, second by second; the pipeline is killed -9 once
    // anomalies have landed, half way through.
    let send = |range: std::ops::Range<i64>| {
        for chunk in range.collect::<Vec<_>>().chunks(25) {
            let mqtt: Vec<String> = chunk.iter().map(|i| message(*i, t0, 0)).collect();
            mqtt_publish(
                stack.mqtt_port,
                &device(0),
                &token(0),
                &format!("devices/{}/telemetry", device(0)),
                &mqtt,
            );
            let ndjson: String = chunk.iter().map(|i| message(*i, t0, 1) + "\n").collect();
            let (s, b) = post(&url, &token(1), "application/x-ndjson", &ndjson);
            assert_eq!(s, 202, "{b}");
        }
    };
    send(0..160);
    wait_until(
        "the first anomalies in the table",
        Duration::from_secs(120),
        || opened(&stack).len() >= 4,
    );
    let status = Command::new("kill")
        .args(["-9", &pipeline.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = pipeline.wait();
    pipeline = stack.spawn_pipeline(1);
    send(160..N);

    let want = expected_kinds();
    wait_until(
        "every anomaly in the table",
        Duration::from_secs(180),
        || opened(&stack).len() >= 2 * want.len(),
    );
    // Give a re-emission after the crash time to land too, then compare.
    std::thread::sleep(Duration::from_secs(3));
    let open = opened(&stack);
    for d in [device(0), device(1)] {
        let kinds: Vec<&str> = open
            .iter()
            .filter(|a| a["device"] == d.as_str())
            .map(|a| a["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, want, "device {d}: {open:?}");
    }
    // Each lifecycle record once, whatever the crash re-published.
    let dups = stack.sql("SELECT count(*) AS n FROM (SELECT anomaly_id, seq FROM anomalies GROUP BY 1, 2 HAVING count(*) > 1)");
    assert_eq!(dups[0]["n"], 0);
    // Evidence that explains: the threshold's start is when the value went above, and the
    // heartbeat's is the last reading plus the interval.
    let hot = stack.sql(&format!("SELECT CAST(start_time AS VARCHAR) AS s, threshold, severity, message FROM anomalies WHERE device = '{}' AND kind = 'threshold' AND state = 'open'", device(0)));
    assert_eq!(hot[0]["threshold"], 80.0);
    assert_eq!(hot[0]["severity"], "critical");
    let start = chrono::DateTime::from_timestamp(t0 + 100, 0)
        .unwrap()
        .naive_utc()
        .to_string();
    assert!(
        hot[0]["s"]
            .as_str()
            .unwrap()
            .starts_with(&start.replace(' ', "T"))
            || hot[0]["s"].as_str().unwrap().starts_with(&start),
        "{hot:?} vs {start}"
    );
    let silent = stack.sql(&format!("SELECT CAST(start_time AS VARCHAR) AS s FROM anomalies WHERE device = '{}' AND kind = 'heartbeat' AND state = 'open' ORDER BY start_time", device(1)));
    let gap = chrono::DateTime::from_timestamp(t0 + 119 + 30, 0)
        .unwrap()
        .naive_utc()
        .to_string();
    assert!(
        silent[0]["s"]
            .as_str()
            .unwrap()
            .replace('T', " ")
            .starts_with(&gap),
        "{silent:?} vs {gap}"
    );

    // The outside consumer saw every anomaly that opened.
    let out = consumer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "consumer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let received: BTreeSet<String> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["state"] == "open")
        .map(|r| r["anomaly_id"].as_str().unwrap().to_owned())
        .collect();
    let in_table: BTreeSet<String> = open
        .iter()
        .map(|a| a["anomaly_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        received, in_table,
        "the consumer's anomalies and the table's"
    );

    // The backtest over the same readings (the telemetry table) finds the same anomalies.
    let backtest = stack.ok(&[
        "anomalies",
        "backtest",
        "--detectors",
        &detectors_file.display().to_string(),
    ]);
    let fired: BTreeSet<String> = backtest
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["anomaly_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fired, in_table, "backtest and live:\n{backtest}");
    // And from a CSV file of readings (one device's), with start times in RFC 3339.
    let csv_path = stack.dir.path().join("r.csv");
    let rows = stack.sql(&format!("SELECT tenant, device, metric, event_time, value FROM telemetry WHERE device = '{}' ORDER BY event_time", device(0)));
    let mut csv = String::from("tenant,device,metric,time,value\n");
    for r in &rows {
        let t = r["event_time"].as_str().unwrap();
        let t = chrono::NaiveDateTime::parse_from_str(
            t.replace('T', " ").trim_end_matches('Z'),
            "%Y-%m-%d %H:%M:%S%.f",
        )
        .map(|n| n.and_utc().to_rfc3339())
        .unwrap_or_else(|_| t.to_owned());
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            r["tenant"].as_str().unwrap(),
            r["device"].as_str().unwrap(),
            r["metric"].as_str().unwrap(),
            t,
            r["value"]
        ));
    }
    std::fs::write(&csv_path, csv).unwrap();
    let from_csv = stack.ok(&[
        "anomalies",
        "backtest",
        "--detectors",
        &detectors_file.display().to_string(),
        "--input",
        &csv_path.display().to_string(),
        "--format",
        "csv",
    ]);
    let lines: Vec<&str> = from_csv.lines().collect();
    assert!(lines[0].starts_with("anomaly_id,"), "{from_csv}");
    let csv_ids: BTreeSet<String> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    let device0: BTreeSet<String> = open
        .iter()
        .filter(|a| a["device"] == device(0).as_str())
        .map(|a| a["anomaly_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(csv_ids, device0, "{from_csv}");
    assert!(
        lines[1].split(',').nth(7).unwrap().contains('T'),
        "RFC 3339 start: {}",
        lines[1]
    );

    // Rebuilt from `raw` alone (cleanse, then detection): the same anomalies, ids and lifecycles.
    let rebuilt = stack.ok(&["rebuild", "anomalies", "--check"]);
    assert!(rebuilt.contains("check: equal"), "{rebuilt}");

    // A tenant's own detector over the admin API: refused with the field when it cannot work,
    // recorded when it can, and applied by the running stage to the next readings.
    let tenant = stack.sql(&format!(
        "SELECT DISTINCT tenant FROM telemetry WHERE device = '{}'",
        device(1)
    ))[0]["tenant"]
        .as_str()
        .unwrap()
        .to_owned();
    let detectors_url = format!(
        "http://127.0.0.1:{}/v1/tenants/{tenant}/detectors",
        stack.http_port
    );
    let admin = support::ADMIN_TOKEN;
    let json_type = "application/json";
    let bad = r#"{"detectors": {"cold": {"metric": "k_threshold", "kind": "threshold", "below": 5, "clear_below": 3}}}"#;
    let (status, body) = request("PUT", &detectors_url, admin, json_type, bad);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "detectors.cold.clear_below", "{body}");
    let (status, _) = request("PUT", &detectors_url, "not-the-admin", json_type, bad);
    assert_eq!(status, 401);
    let good = r#"{"detectors": {"warm": {"metric": "k_threshold", "kind": "threshold", "above": 15, "severity": "info"}}}"#;
    let (status, body) = request("PUT", &detectors_url, admin, json_type, good);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "api");
    assert_eq!(body["detectors"]["warm"]["above"], 15.0);
    assert_eq!(body["detectors"]["hot"]["above"], 80.0, "global ones stay");
    let (_, body) = request("GET", &detectors_url, admin, json_type, "");
    assert_eq!(body["detectors"]["warm"]["kind"], "threshold", "{body}");
    // k_threshold sits at 20: above 15 from the first reading on.
    let more: String = (N..N + 5).map(|i| message(i, t0, 1) + "\n").collect();
    let (s, b) = post(&url, &token(1), "application/x-ndjson", &more);
    assert_eq!(s, 202, "{b}");
    let warm = || {
        stack.sql(&format!(
            "SELECT count(*) AS n FROM anomalies WHERE detector = 'warm' AND device = '{}' AND state = 'open'",
            device(1)
        ))[0]["n"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(
        "the API's detector to fire",
        Duration::from_secs(60),
        || warm() == 1,
    );
    kill(&mut pipeline);
}

/// The simulator's labelled anomalies (`tributary_streams::labelled`, every detector kind at known
/// event times), sent over MQTT and HTTP at once by two simulators on disjoint devices: the live
/// stage finds them, scored per label as the quality bench scores them.
#[test]
fn the_simulators_labelled_anomalies_over_mqtt_and_http_are_found() {
    use tributary_schemas::detectors::DetectorKind;
    use tributary_streams::labelled::{self, Detected, Label};

    let mut stack = Stack::start(8, &[]);
    let config = stack.dir.path().join("tributary.toml");
    // A backfill of two hours runs ~100 times faster than real time, on two channels that do not
    // keep step: the clock stands 15 minutes (of event time) behind the newest reading.
    let section = format!(
        "[anomalies]\nclock_grace_secs = 900\n{}",
        labelled::DETECTORS.replace("[detectors.", "[anomalies.detectors.")
    );
    std::fs::write(&config, section).unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let mut pipeline = stack.spawn_pipeline(0);
    let labels_of = |via: &str| stack.dir.path().join(format!("labels-{via}.jsonl"));
    let simulate = |via: &str, first: &str, seed: &str| {
        let labels = labels_of(via).display().to_string();
        stack.spawn_simulate(&[
            "--via",
            via,
            "--first-device",
            first,
            "--devices",
            "4",
            "--anomalies",
            "--duration",
            "2h",
            "--step",
            "10s",
            "--rate",
            "40",
            "--seed",
            seed,
            "--labels",
            &labels,
        ])
    };
    let (mqtt, http) = (
        simulate("mqtt", "0", "20261203"),
        simulate("http", "4", "20261204"),
    );
    let (mqtt, http) = (stack.finish_simulator(mqtt), stack.finish_simulator(http));
    let readings =
        support::field(&mqtt, "expected_readings") + support::field(&http, "expected_readings");

    let rfc3339 = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_micros()
    };
    let kind_of = |name: &str| {
        DetectorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap()
    };
    let labels: Vec<Label> = ["mqtt", "http"]
        .iter()
        .flat_map(|via| {
            std::fs::read_to_string(labels_of(via))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .map(|l| Label {
            device: l["device"].as_str().unwrap().to_owned(),
            metric: l["metric"].as_str().unwrap().to_owned(),
            kind: kind_of(l["kind"].as_str().unwrap()),
            start: rfc3339(&l["start"]),
            end: rfc3339(&l["end"]),
        })
        .collect();
    assert!(labels.len() >= 16, "{labels:?}");
    // Every reading in the lake, then the anomalies settle.
    wait_until(
        "every reading in telemetry",
        Duration::from_secs(180),
        || stack.count("telemetry") >= readings,
    );
    let detected = || -> Vec<Detected> {
        if stack.count("anomalies") == 0 {
            return Vec::new();
        }
        stack
            .sql("SELECT device, metric, kind, CAST(start_time AS BIGINT) AS start FROM anomalies WHERE state = 'open'")
            .iter()
            .map(|r| Detected {
                device: r["device"].as_str().unwrap().to_owned(),
                metric: r["metric"].as_str().unwrap().to_owned(),
                kind: kind_of(r["kind"].as_str().unwrap()),
                start: r["start"].as_i64().unwrap(),
            })
            .collect()
    };
    let mut seen = detected().len();
    wait_until("the anomalies to settle", Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_secs(5));
        let now = detected().len();
        let settled = now == seen && now > 0;
        seen = now;
        settled
    });
    let found = detected();
    let quality = labelled::score(&labels, &found);
    let total = |f: fn(&labelled::Quality) -> usize| quality.values().map(f).sum::<usize>();
    let (found_labels, all_labels) = (total(|q| q.found), total(|q| q.labels));
    let (correct, detections) = (total(|q| q.correct), total(|q| q.detections));
    let report = format!("{quality:#?}");
    assert!(
        found_labels as f64 >= 0.9 * all_labels as f64,
        "recall {found_labels}/{all_labels}: {report}"
    );
    assert!(
        correct as f64 >= 0.9 * detections as f64,
        "precision {correct}/{detections}: {report}"
    );
    // Both channels' devices are among them.
    for first in [0, 4] {
        let device = stack.secrets()[first]["device"]
            .as_str()
            .unwrap()
            .to_owned();
        let own = labels.iter().filter(|l| l.device == device).count();
        let hits = found.iter().filter(|d| d.device == device).count();
        assert!(own == 0 || hits > 0, "{device}: {own} labels, none found");
    }
    kill(&mut pipeline);
}
