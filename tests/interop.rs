//! Interop: the tables Tributary writes read the same outside it. Every lake table (after a
//! compaction, with nested columns in `devices`) is read with delta-rs's Python bindings and with
//! polars (`tests/interop/read_tables.py`, from PyPI into the venv `deploy/local/install.sh`
//! makes), and both must give exactly DataFusion's rows.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{ADMIN_TOKEN, Stack, field, kill, python, request, wait_until};
use tributary_lake::tables::TABLES;

#[test]
fn every_table_reads_the_same_in_deltalake_polars_and_datafusion() {
    let mut stack = Stack::start(20, &[]);
    // A detector the simulator's temperatures cross now and then, so `anomalies` has rows too,
    // and a rule making each of its anomalies an incident, so `incidents` has rows.
    let config = stack.path().join("tributary.toml");
    std::fs::write(
        &config,
        "[anomalies.detectors.warm]\nmetric = \"temperature\"\nkind = \"threshold\"\nabove = 20.0\nclear_for_secs = 0\n\
         [incidents.rules.each]\ncorrelate = \"anomaly\"\n",
    )
    .unwrap();
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());
    let mut pipeline = stack.spawn_pipeline(0);
    let (status, body) = request(
        "POST",
        &format!("http://127.0.0.1:{}/v1/devices", stack.http_port),
        ADMIN_TOKEN,
        "application/json",
        &json!({"id": "meter-9", "tenant": "tenant-2", "group": "acme", "model": "wm-3",
            "tags": {"floor": "2", "wing": "east"}, "metrics": ["level", "flow"],
            "site": ["north", "hall-1", "spot-4"], "subject": "person-17"})
        .to_string(),
    );
    assert_eq!(status, 201, "{body}");
    let http = stack.finish_simulator(stack.spawn_simulator("http", 600, 600, "51"));
    stack.assert_rows(
        field(&http, "expected_readings"),
        field(&http, "expected_dead_letters"),
        Duration::from_secs(60),
        "the lake holds what was sent",
    );
    stack.assert_usage_matches_raw(Duration::from_secs(30));
    wait_until("every device in `devices`", Duration::from_secs(30), || {
        stack.count("devices") == 21
    });
    wait_until("anomalies in `anomalies`", Duration::from_secs(30), || {
        stack.count("anomalies") > 0
    });
    wait_until("incidents in `incidents`", Duration::from_secs(60), || {
        stack.count("incidents") > 0
    });
    // A device's shadow, three versions with a nested field, so `shadows` and `shadow_history`
    // have rows.
    let secrets = stack.secrets();
    let (device, token) = (
        secrets[0]["device"].as_str().unwrap(),
        secrets[0]["token"].as_str().unwrap(),
    );
    for firmware in ["2.2", "2.3", "2.4"] {
        let (status, body) = request(
            "POST",
            &format!(
                "http://127.0.0.1:{}/v1/devices/{device}/shadow",
                stack.http_port
            ),
            token,
            "application/json",
            &json!({"state": {"reported": {"firmware": firmware, "modem": {"rssi": -70}}}})
                .to_string(),
        );
        assert_eq!(status, 200, "{body}");
    }
    wait_until(
        "the shadow's versions in the lake",
        Duration::from_secs(60),
        || stack.count("shadow_history") == 3 && stack.count("shadows") == 1,
    );
    kill(&mut pipeline);
    // Files written by a compaction (Z-ordered) read the same too.
    stack.ok(&["optimize", "telemetry", "--zorder-by", "device"]);

    let mut pairs = Vec::new();
    for table in TABLES {
        let out = stack
            .cmd(&[
                "sql",
                "--format",
                "arrow",
                &format!("SELECT * FROM {table}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = stack.path().join(format!("{table}.arrows"));
        std::fs::write(&path, &out.stdout).unwrap();
        pairs.push(format!("{table}={}", path.display()));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/read_tables.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(stack.path().join("lake"))
        .args(&pairs)
        .output()
        .expect("the interop venv: run deploy/local/install.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for table in TABLES {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{table}: "))
                && l.ends_with("equal in DataFusion, deltalake and polars")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("telemetry: ") && !stdout.contains("telemetry: 0 rows"),
        "{stdout}"
    );
}
