//! Incidents end to end: three devices of one section overheat together and one pump loses
//! pressure while it overheats; exactly two incidents appear on the `incidents` topic and in the
//! `incidents` table (one for the section naming its site, one for the pump naming its two
//! metrics), nothing for a device overheating alone in another section nor for another tenant's
//! device overheating in a section of the same name, the same incident ids
//! across a kill -9 of the pipeline, and both resolve once their members have.

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

    let resolved = || {
        if stack.count("incidents") == 0 {
            return 0;
        }
        stack.sql("SELECT count(*) AS n FROM incidents WHERE change = 'resolve'")[0]["n"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(
        "both incidents resolved in the table",
        Duration::from_secs(180),
        || resolved() >= 2,
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
