//! The crash case: `kill -9` the pipeline mid-stream, restart it, and nothing is lost or duplicated.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Stack, kill, summary};

#[test]
fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let stack = Stack::start_with_storage(20, &[], "sqlite://tansu.db");
    let mut pipeline = stack.spawn_pipeline(0);
    let simulate = |via: &str, seed: &str| {
        stack
            .cmd(&[
                "simulate",
                "--via",
                via,
                "--devices",
                "20",
                "--messages",
                "8000",
                "--rate",
                "600",
                "--batch",
                "10",
                "--seed",
                seed,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mqtt = simulate("mqtt", "11");
    let http = simulate("http", "12");

    // Kill while events flow and rows are landing, twice.
    for round in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let floor = stack.count("telemetry");
        while stack.count("telemetry") <= floor && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_millis(700));
        let pid = pipeline.id();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = pipeline.wait();
        std::thread::sleep(Duration::from_millis(500));
        pipeline = stack.spawn_pipeline(round);
    }

    let mqtt = summary(&String::from_utf8(mqtt.wait_with_output().unwrap().stdout).unwrap());
    let http = summary(&String::from_utf8(http.wait_with_output().unwrap().stdout).unwrap());
    let n = |v: &serde_json::Value, k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    };
    let expected_readings = n(&mqtt, "expected_readings") + n(&http, "expected_readings");
    let expected_dead = n(&mqtt, "expected_dead_letters") + n(&http, "expected_dead_letters");
    assert!(
        n(&http, "retries") > 0,
        "the HTTP devices should have seen the pipeline go away: {http}"
    );

    stack.assert_rows(
        expected_readings,
        expected_dead,
        Duration::from_secs(90),
        "nothing lost, nothing duplicated",
    );
    assert_eq!(stack.duplicate_readings(), 0);
    let dead_dups = stack.sql("SELECT count(*) AS n FROM (SELECT source_partition, source_offset, source_index FROM deadletter GROUP BY 1,2,3 HAVING count(*) > 1)");
    assert_eq!(dead_dups[0]["n"], 0);
    kill(&mut pipeline);
}
