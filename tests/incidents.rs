//! Incidents end to end: three devices of one section overheat together and one pump loses
//! pressure while it overheats; exactly two incidents appear on the `incidents` topic and in the
//! `incidents` table (one for the section naming its site, one for the pump naming its two
//! metrics), nothing for a device overheating alone in another section nor for another tenant's
//! device overheating in a section of the same name, the same incident ids
//! across a kill -9 of the pipeline, and both resolve once their members have. And the
//! simulator's correlated failures (`tributary simulate --failures`) give exactly the incidents
//! it says they should.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use support::{Stack, kill, post, request, wait_until};
use tributary_schemas::avro::{Incident, IncidentChange, IncidentStatus};

const CONFIG: &str = r#"
[anomalies]
clock_grace_secs = 5
sweep_secs = 1

[anomalies.detectors.hot]
metric = "temperature"
kind = "threshold"
above = 80.0
clear_for_secs = 5
severity = "critical"

[anomalies.detectors.low_pressure]
metric = "pressure"
kind = "threshold"
below = 1.0
clear_for_secs = 5

[incidents]
clock_grace_secs = 5
sweep_secs = 1

[incidents.rules.section]
correlate = "site"
level = 2
min_devices = 3
window_secs = 120
quiet_secs = 10

[incidents.rules.pump]
correlate = "device"
min_metrics = 2
window_secs = 120
quiet_secs = 10
"#;

/// Second `i` of device `d`'s readings: devices 0–3 and 5 overheat from about 100 to 130 s (0–2
/// share a section, 3 is alone in the next, 5 is another tenant's), device 4 overheats and loses
/// pressure from 150 to 180 s.
fn message(d: usize, i: i64, t0: i64) -> String {
    let t = chrono::DateTime::from_timestamp(t0 + i, 0)
        .unwrap()
        .to_rfc3339();
    let hot = match d {
        0..=3 | 5 => (100 + d as i64 * 5..130).contains(&i),
        _ => (150..180).contains(&i),
    };
    let low = d == 4 && (155..180).contains(&i);
    json!({
        "id": format!("m-{i}"),
        "time": t,
        "metrics": {
            "temperature": if hot { 90.0 } else { 20.0 + (i % 3) as f64 * 0.1 },
            "pressure": if low { 0.5 } else { 2.0 },
        }
    })
    .to_string()
}

fn latest(records: &[Incident]) -> BTreeMap<String, Incident> {
    let mut by_id: BTreeMap<String, Incident> = BTreeMap::new();
    for r in records {
        let newer = by_id.get(&r.incident_id).is_none_or(|x| r.seq > x.seq);
        if newer {
            by_id.insert(r.incident_id.clone(), r.clone());
        }
    }
    by_id
}

/// Resolve records in the `incidents` table.
fn resolved(stack: &Stack) -> u64 {
    if stack.count("incidents") == 0 {
        return 0;
    }
    stack.sql("SELECT count(*) AS n FROM incidents WHERE change = 'resolve'")[0]["n"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_section_and_a_pump_each_page_once_across_a_crash_and_resolve() {
    // The stack's devices go round-robin over three tenants: 0, 3, 6, 9, 12 are tenant-1's, 1 is
    // tenant-2's.
    let mut stack = Stack::start_with_storage(15, &[], "sqlite://tansu.db");
    let config = stack.dir.path().join("tributary.toml");
    std::fs::write(&config, CONFIG).unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let mut pipeline = stack.spawn_pipeline(0);
    stack.wait_http();
    let secrets = stack.secrets();
    // Roles 0–4 are tenant-1's devices, role 5 another tenant's.
    let index = [0usize, 3, 6, 9, 12, 1];
    assert!(
        index[..5]
            .iter()
            .all(|&i| secrets[i]["tenant"] == "tenant-1")
    );
    assert_eq!(secrets[1]["tenant"], "tenant-2");
    let token = |d: usize| secrets[index[d]]["token"].as_str().unwrap().to_owned();
    let device = |d: usize| secrets[index[d]]["device"].as_str().unwrap().to_owned();
    // Where the devices are: 0–2 in north/section-1, 3 in north/section-2, 4 in south; the other
    // tenant's in its own north/section-1.
    let sites = [
        ["north", "section-1", "spot-1"],
        ["north", "section-1", "spot-2"],
        ["north", "section-1", "spot-3"],
        ["north", "section-2", "spot-1"],
        ["south", "section-1", "spot-1"],
        ["north", "section-1", "spot-4"],
    ];
    for (i, site) in sites.iter().enumerate() {
        let url = format!(
            "http://127.0.0.1:{}/v1/devices/{}",
            stack.http_port,
            device(i)
        );
        let body = json!({"site": site, "group": "pumps"}).to_string();
        let (status, answer) = request(
            "PATCH",
            &url,
            support::ADMIN_TOKEN,
            "application/json",
            &body,
        );
        assert_eq!(status, 200, "{answer}");
    }
    let url = format!("http://127.0.0.1:{}/v1/telemetry", stack.http_port);
    let t0 = chrono::Utc::now().timestamp() - 3600;
    let send = |range: std::ops::Range<i64>| {
        for chunk in range.collect::<Vec<_>>().chunks(20) {
            for d in 0..6 {
                let ndjson: String = chunk.iter().map(|i| message(d, *i, t0) + "\n").collect();
                let (s, b) = post(&url, &token(d), "application/x-ndjson", &ndjson);
                assert_eq!(s, 202, "{b}");
            }
        }
    };
    let opened = || {
        if stack.count("incidents") == 0 {
            return Vec::new();
        }
        stack.sql("SELECT incident_id, rule FROM incidents WHERE change = 'open' ORDER BY rule")
    };
    send(0..145);
    wait_until(
        "the section's incident in the table",
        Duration::from_secs(120),
        || !opened().is_empty(),
    );
    // kill -9 while the section's members are resolving and the pump's not yet begun.
    let status = std::process::Command::new("kill")
        .args(["-9", &pipeline.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = pipeline.wait();
    pipeline = stack.spawn_pipeline(1);
    send(145..300);

    wait_until(
        "both incidents resolved in the table",
        Duration::from_secs(180),
        || resolved(&stack) >= 2,
    );
    std::thread::sleep(Duration::from_secs(3));

    // Exactly two incidents, each lifecycle record once, whatever the crash re-published.
    let open = opened();
    let rules: Vec<&str> = open.iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, vec!["pump", "section"], "{open:?}");
    let dups = stack.sql("SELECT count(*) AS n FROM (SELECT incident_id, seq FROM incidents GROUP BY 1, 2 HAVING count(*) > 1)");
    assert_eq!(dups[0]["n"], 0);

    // The topic says the same as the table, with the same ids (the crash changed none).
    let records: Vec<Incident> = stack.records(&tributary_schemas::Topics::default().incidents);
    let current = latest(&records);
    let ids: BTreeSet<&str> = current.keys().map(String::as_str).collect();
    let table_ids: BTreeSet<&str> = open
        .iter()
        .map(|r| r["incident_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, table_ids, "{records:?}");
    let section = current.values().find(|i| i.rule == "section").unwrap();
    assert_eq!(section.status, IncidentStatus::Resolved);
    assert_eq!(
        section.site,
        vec!["north".to_owned(), "section-1".to_owned()]
    );
    assert_eq!(section.scope, "north / section-1");
    let members: BTreeSet<String> = section.devices.iter().cloned().collect();
    assert_eq!(
        members,
        (0..3).map(device).collect::<BTreeSet<_>>(),
        "not device 3 of section-2"
    );
    assert_eq!((section.member_count, section.open_members), (3, 0));
    assert_eq!(section.severity, "critical");
    assert_eq!(section.device_group.as_deref(), Some("pumps"));
    // Its members are the anomalies of the three devices (table `anomalies`).
    let anomaly_ids: BTreeSet<String> = stack
        .sql("SELECT DISTINCT anomaly_id, device FROM anomalies WHERE detector = 'hot'")
        .iter()
        .filter(|r| (0..3).map(device).any(|d| r["device"] == d.as_str()))
        .map(|r| r["anomaly_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        section.members.iter().cloned().collect::<BTreeSet<_>>(),
        anomaly_ids
    );
    let started = chrono::DateTime::from_timestamp(t0 + 100, 0)
        .unwrap()
        .timestamp_micros();
    assert_eq!(section.first_time, started, "event time, not arrival");

    let pump = current.values().find(|i| i.rule == "pump").unwrap();
    assert_eq!(pump.status, IncidentStatus::Resolved);
    assert_eq!(pump.devices, vec![device(4)]);
    assert_eq!(
        pump.metrics,
        vec!["pressure".to_owned(), "temperature".to_owned()]
    );
    assert!(pump.message.contains("2 anomalies"), "{}", pump.message);
    // Its records in order: open, updates as members resolved, resolve.
    let mut pump_changes: Vec<(i32, IncidentChange)> = records
        .iter()
        .filter(|r| r.incident_id == pump.incident_id)
        .map(|r| (r.seq, r.change))
        .collect();
    pump_changes.sort_by_key(|c| c.0);
    pump_changes.dedup();
    assert_eq!(
        pump_changes.first().map(|c| c.1),
        Some(IncidentChange::Open)
    );
    assert_eq!(
        pump_changes.last().map(|c| c.1),
        Some(IncidentChange::Resolve)
    );
    let seqs: Vec<i32> = pump_changes.iter().map(|c| c.0).collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as i32).collect::<Vec<_>>(),
        "no gap, no repeat"
    );

    // Alert reduction: anomaly records folded into the two incidents.
    let folded: i64 = current.values().map(|i| i.anomaly_records).sum();
    assert!(folded >= 5, "{folded}");
    kill(&mut pipeline);
}

/// The simulator's correlated failures (`tributary simulate --failures`): one zone of seven
/// sections of four devices of tenant-1, one round (a section failure, two pump failures, four
/// lone overheats). Exactly the incidents the simulator says should come appear on the topic and
/// in the table: one per section failure naming the section and its failed devices, one per pump
/// failure naming the device and both metrics, none for a lone overheat (whose anomaly is in the
/// `anomalies` table all the same).
#[test]
fn the_simulators_failures_page_once_per_failure_and_never_for_a_lone_device() {
    // Seeded round-robin over three tenants: 84 devices give tenant-1 28, one zone.
    let mut stack = Stack::start(84, &[]);
    let config = stack.dir.path().join("tributary.toml");
    let fast = "[anomalies]\nclock_grace_secs = 5\nsweep_secs = 1\n\n[incidents]\nclock_grace_secs = 5\nsweep_secs = 1\n";
    std::fs::write(
        &config,
        format!("{fast}\n{}", tributary_streams::failures::CONFIG),
    )
    .unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let mut pipeline = stack.spawn_pipeline(0);
    stack.wait_http();
    let labels = stack.dir.path().join("failures.jsonl");
    let labels_arg = labels.display().to_string();
    let simulator = stack.spawn_simulate(&[
        "--via",
        "http",
        "--tenant",
        "tenant-1",
        "--devices",
        "28",
        "--per-section",
        "4",
        "--failures",
        "--duration",
        "90m",
        "--step",
        "10s",
        "--rate",
        "3000",
        "--seed",
        "20261207",
        "--labels",
        &labels_arg,
    ]);
    let summary = stack.finish_simulator(simulator);
    assert_eq!(summary["messages"], 28 * 540, "{summary}");

    let failures: Vec<serde_json::Value> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = failures
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["section", "pump", "pump", "lone", "lone", "lone", "lone"]
    );
    // (rule, scope) → the failed devices, for the failures that should page.
    let expected: BTreeMap<(String, String), BTreeSet<String>> = failures
        .iter()
        .filter(|f| !f["rule"].is_null())
        .map(|f| {
            let key = (
                f["rule"].as_str().unwrap().to_owned(),
                f["scope"].as_str().unwrap().to_owned(),
            );
            let devices = f["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap().to_owned())
                .collect();
            (key, devices)
        })
        .collect();
    assert_eq!(expected.len(), 3, "{failures:?}");

    wait_until(
        "every expected incident resolved in the table",
        Duration::from_secs(180),
        || resolved(&stack) >= 3,
    );
    std::thread::sleep(Duration::from_secs(3));

    // The table: exactly the expected incidents, each lifecycle record once.
    let opened = stack.sql(
        "SELECT incident_id, rule, scope FROM incidents WHERE change = 'open' ORDER BY rule, scope",
    );
    let found: Vec<(String, String)> = opened
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_owned(),
                r["scope"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        expected.keys().cloned().collect::<Vec<_>>(),
        "{failures:?}"
    );
    let dups = stack.sql("SELECT count(*) AS n FROM (SELECT incident_id, seq FROM incidents GROUP BY 1, 2 HAVING count(*) > 1)");
    assert_eq!(dups[0]["n"], 0);

    // The topic: the same incidents, with the failed devices as members, all resolved.
    let records: Vec<Incident> = stack.records(&tributary_schemas::Topics::default().incidents);
    let current = latest(&records);
    assert_eq!(current.len(), 3, "{records:?}");
    for incident in current.values() {
        let key = (incident.rule.clone(), incident.scope.clone());
        let devices = expected.get(&key).unwrap_or_else(|| panic!("{incident:?}"));
        assert_eq!(
            &incident.devices.iter().cloned().collect::<BTreeSet<_>>(),
            devices,
            "{incident:?}"
        );
        assert_eq!(incident.status, IncidentStatus::Resolved, "{incident:?}");
        if incident.rule == "pump" {
            assert_eq!(incident.metrics, ["pressure", "temperature"]);
        }
    }
    let ids: BTreeSet<&str> = current.keys().map(String::as_str).collect();
    let table_ids: BTreeSet<&str> = opened
        .iter()
        .map(|r| r["incident_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, table_ids);

    // Each lone overheat is an anomaly all the same.
    let hot: BTreeSet<String> = stack
        .sql("SELECT DISTINCT device FROM anomalies WHERE detector = 'hot'")
        .iter()
        .map(|r| r["device"].as_str().unwrap().to_owned())
        .collect();
    for f in failures.iter().filter(|f| f["kind"] == "lone") {
        let device = f["devices"][0].as_str().unwrap();
        assert!(hot.contains(device), "{device} of {f}");
    }
    kill(&mut pipeline);
}
