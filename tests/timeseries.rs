//! The time-series sink against a real VictoriaMetrics (Debian's, started by `stack.sh`): readings
//! written while the store is down are kept in Kafka (offsets not committed) and land, every one of
//! them with its tags, once the store is back; writing every point again changes nothing.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Stack, kill, post, request, wait_until};
use tributary_schemas::Reading;

/// A point as the store holds it: metric name and labels, millisecond timestamp → value.
type Points = BTreeMap<(String, i64), f64>;

/// What the store should hold for these readings: `telemetry_<metric>` with tenant, device and the
/// device's site levels, at the event time truncated to milliseconds (VictoriaMetrics' precision).
fn expected(readings: &[Reading], sites: &BTreeMap<&str, Vec<&str>>) -> Points {
    readings
        .iter()
        .map(|r| {
            let mut labels = BTreeMap::new();
            labels.insert("__name__".to_owned(), format!("telemetry_{}", r.metric));
            labels.insert("tenant".to_owned(), r.tenant.clone());
            labels.insert("device".to_owned(), r.device.clone());
            for (i, level) in sites
                .get(r.device.as_str())
                .into_iter()
                .flatten()
                .enumerate()
            {
                labels.insert(format!("site_{}", i + 1), (*level).to_owned());
            }
            let series = serde_json::to_string(&labels).unwrap();
            ((series, r.event_time.div_euclid(1000)), r.value)
        })
        .collect()
}

/// Every `telemetry_*` point in the store, and how many samples came back (duplicates included).
fn exported(stack: &Stack) -> (Points, usize) {
    let base = stack.timeseries_url();
    let end = chrono::Utc::now().timestamp() + 3600;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        let client = reqwest::Client::new();
        // Makes what was just written visible to queries.
        let flushed = client
            .get(format!("{base}/internal/force_flush"))
            .send()
            .await;
        if flushed.is_err() {
            return String::new();
        }
        client
            .get(format!("{base}/api/v1/export"))
            .query(&[
                ("match[]", r#"{__name__=~"telemetry_.*"}"#),
                ("start", "0"),
                ("end", &end.to_string()),
            ])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let mut points = Points::new();
    let mut samples = 0;
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let series: Value = serde_json::from_str(line).unwrap();
        let labels: BTreeMap<String, String> =
            serde_json::from_value(series["metric"].clone()).unwrap();
        let key = serde_json::to_string(&labels).unwrap();
        let values = series["values"].as_array().unwrap();
        let times = series["timestamps"].as_array().unwrap();
        for (v, t) in values.iter().zip(times) {
            samples += 1;
            points.insert((key.clone(), t.as_i64().unwrap()), v.as_f64().unwrap());
        }
    }
    (points, samples)
}

#[test]
fn store_outage_loses_nothing_and_writing_again_is_harmless() {
    let mut stack = Stack::start(12, &[]);
    // The store's address is known, but the store is not running yet.
    let url = stack.timeseries_url();
    stack.set_env("TRIBUTARY_TIMESERIES__URL", &url);
    stack.set_env("TRIBUTARY_TIMESERIES__FLUSH_INTERVAL_MS", "300");
    stack.set_env("TRIBUTARY_TIMESERIES__BATCH_POINTS", "400");
    stack.set_env("TRIBUTARY_TIMESERIES__MAX_BACKOFF_MS", "2000");
    let mut pipeline = stack.spawn_stages(&["http", "cleanse", "timeseries"], "pipeline", &[]);
    stack.wait_http();

    // A device placed in a site hierarchy: its points carry the levels as tags.
    let api = format!("http://127.0.0.1:{}", stack.http_port);
    let (status, created) = request(
        "POST",
        &format!("{api}/v1/devices"),
        ADMIN_TOKEN,
        "application/json",
        &json!({"id": "probe-1", "tenant": "tenant-1", "site": ["north", "hall 3", "spot=17"]})
            .to_string(),
    );
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..5i64 {
        let time = chrono::DateTime::from_timestamp_millis(now - 60_000 + i * 1_001)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = json!({"id": format!("p-{i}"), "time": time,
            "metrics": {"temperature": 20.25 + i as f64, "humidity": 40 + i}});
        let (status, answer) = post(
            &format!("{api}/v1/telemetry"),
            token,
            "application/json",
            &body.to_string(),
        );
        assert_eq!(status, 202, "{answer}");
    }
    // Every seeded device sends 15 messages a second apart (two metrics each), as NDJSON. (A
    // series holds one value per timestamp: readings of one device and metric must differ in time.)
    let mut sent = 10;
    for (d, secret) in stack.secrets().iter().enumerate() {
        let body: String = (0..15i64)
            .map(|k| {
                let time =
                    chrono::DateTime::from_timestamp_millis(now - 120_000 + k * 1_000 + d as i64)
                        .unwrap()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let metrics = json!({"temperature": 18.0 + (k as f64) / 8.0, "humidity": 30 + k});
                format!(
                    "{}\n",
                    json!({"id": format!("m-{k}"), "time": time, "metrics": metrics})
                )
            })
            .collect();
        let (status, answer) = post(
            &format!("{api}/v1/telemetry"),
            secret["token"].as_str().unwrap(),
            "application/x-ndjson",
            &body,
        );
        assert_eq!(status, 202, "{answer}");
        sent += 30;
    }

    // Every reading is on `telemetry`; none reached the store, and the sink says why.
    let mut readings: Vec<Reading> = Vec::new();
    let topic = tributary_schemas::kafka::KafkaConfig::default()
        .topics
        .telemetry;
    wait_until(
        "cleanse to publish every reading",
        Duration::from_secs(60),
        || {
            readings = stack.records(&topic);
            readings.len() >= sent
        },
    );
    assert_eq!(readings.len(), sent);
    wait_until(
        "the sink to report the store down",
        Duration::from_secs(30),
        || {
            stack
                .log("pipeline")
                .contains("time-series store write failed; retrying")
        },
    );
    // Down for a while (the sink backs off to its 2 s maximum meanwhile).
    std::thread::sleep(Duration::from_secs(8));

    let sites = BTreeMap::from([("probe-1", vec!["north", "hall 3", "spot=17"])]);
    let want = expected(&readings, &sites);
    assert_eq!(want.len(), readings.len(), "one point per reading");
    stack.service("up", &["victoria-metrics"]);
    let mut got = (Points::new(), 0);
    wait_until(
        "the backlog to drain into the store",
        Duration::from_secs(90),
        || {
            got = exported(&stack);
            got.0.len() >= want.len()
        },
    );
    assert_eq!(got.0, want, "the store holds exactly the readings");
    assert_eq!(got.1, want.len(), "no point twice");
    assert!(
        stack
            .log("pipeline")
            .contains("time-series store writes again"),
        "the sink says when the store is back"
    );
    kill(&mut pipeline);

    // A second sink (another consumer group) writes every point again: nothing changes.
    let mut again = stack.spawn_stages(
        &["timeseries"],
        "rewrite",
        &[("TRIBUTARY_KAFKA__GROUP_PREFIX", "rewrite")],
    );
    let total = format!("written={} ", want.len());
    wait_until(
        "the second sink to write everything",
        Duration::from_secs(60),
        || stack.log("rewrite").contains(&total),
    );
    let after = exported(&stack);
    assert_eq!(after.0, want, "same points after writing them again");
    assert_eq!(after.1, want.len(), "still no point twice");
    kill(&mut again);
}
