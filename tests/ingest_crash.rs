//! The ingest tier alone is killed: `kill -9` the HTTP server and the MQTT bridge mid-load while
//! cleanse and the lake keep running in their own process. Every 202-acked request and every QoS 1
//! message (acked by Mosquitto, queued there for the bridge's persistent session) reaches `raw`, and
//! the lake holds each exactly once.

mod support;

use std::time::{Duration, Instant};

use support::{Stack, field, finish_simulator, kill};

#[test]
fn kill_9_of_http_and_mqtt_bridge_loses_nothing() {
    let stack = Stack::start_with_storage(20, &[], "sqlite://tansu.db");
    let mut processing = stack.spawn_stages(&["cleanse", "lake"], "processing");
    let mut ingest = stack.spawn_stages(&["http", "mqtt"], "ingest-0");
    stack.wait_http();
    let mqtt = stack.spawn_simulator("mqtt", 8000, 600, "21");
    let http = stack.spawn_simulator("http", 8000, 600, "22");

    for round in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let floor = stack.count("telemetry");
        while stack.count("telemetry") <= floor && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_millis(700));
        let status = std::process::Command::new("kill")
            .args(["-9", &ingest.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = ingest.wait();
        // Devices keep sending meanwhile: HTTP ones get connection errors and retry, MQTT ones are
        // acked by Mosquitto, which queues for the bridge.
        std::thread::sleep(Duration::from_millis(1500));
        ingest = stack.spawn_stages(&["http", "mqtt"], &format!("ingest-{round}"));
        stack.wait_http();
    }

    let mqtt = finish_simulator(mqtt);
    let http = finish_simulator(http);
    let n = field;
    assert!(
        n(&http, "retries") > 0,
        "the HTTP devices should have seen the server go away: {http}"
    );
    stack.assert_rows(
        n(&mqtt, "expected_readings") + n(&http, "expected_readings"),
        n(&mqtt, "expected_dead_letters") + n(&http, "expected_dead_letters"),
        Duration::from_secs(90),
        "every acked event in the lake, once",
    );
    assert_eq!(stack.duplicate_readings(), 0);
    stack.assert_usage_matches_raw(Duration::from_secs(60));
    kill(&mut ingest);
    kill(&mut processing);
}
