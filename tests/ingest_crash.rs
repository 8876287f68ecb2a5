//! The ingest tier alone is killed: `kill -9` the HTTP server and the MQTT bridge mid-load while
//! cleanse and the lake keep running in their own process, and a second MQTT bridge instance shares
//! the subscription. Every 202-acked request and every QoS 1 message (acked by Mosquitto, queued
//! there for the bridge's persistent session) reaches `raw`, and the lake holds each exactly once.
//! Then Mosquitto itself restarts, and MQTT still flows.

mod support;

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;

use support::{Stack, field, kill, kill_9_while_landing, try_mqtt_publish};

#[test]
fn kill_9_of_http_and_mqtt_bridge_loses_nothing() {
    let stack = Stack::start_with_storage(20, &[], "sqlite://tansu.db");
    let mut processing = stack.spawn_stages(&["cleanse", "lake"], "processing", &[]);
    let mut ingest = stack.spawn_stages(&["http", "mqtt"], "ingest-0", &[]);
    // Another bridge instance in the same shared subscription (its own client id and instance).
    let second = [
        ("TRIBUTARY_MQTT__CLIENT_ID", "tributary-bridge-2"),
        ("TRIBUTARY_KAFKA__INSTANCE_ID", "2"),
    ];
    let mut bridge_2 = stack.spawn_stages(&["mqtt"], "bridge-2", &second);
    stack.wait_http();
    let mqtt = stack.spawn_simulator("mqtt", 8000, 600, "21");
    let http = stack.spawn_simulator("http", 8000, 600, "22");

    for round in 1..=2 {
        kill_9_while_landing(&stack, &mut ingest);
        // Devices keep sending meanwhile: HTTP ones get connection errors and retry, MQTT ones are
        // acked by Mosquitto, which queues for the bridge.
        std::thread::sleep(Duration::from_millis(1500));
        ingest = stack.spawn_stages(&["http", "mqtt"], &format!("ingest-{round}"), &[]);
        stack.wait_http();
    }

    let mqtt = stack.finish_simulator(mqtt);
    let http = stack.finish_simulator(http);
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
    // Both bridges took a share of the MQTT load.
    let forwarded = |log: &str| {
        log.lines()
            .filter_map(|l| l.split("acked=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let by_second = forwarded(&stack.log("bridge-2"));
    let by_first: u64 = (0..=2)
        .map(|r| forwarded(&stack.log(&format!("ingest-{r}"))))
        .sum();
    assert!(
        by_second > 0 && by_first > 0,
        "messages acknowledged by the bridges: first {by_first}, second {by_second}"
    );

    // Mosquitto restarted from its persistence file: the bridges subscribe again and a device's
    // message still reaches the lake.
    stack.service("down", &["mosquitto"]);
    stack.service("up", &["mosquitto"]);
    let secrets = stack.secrets();
    let (device, token) = (
        secrets[0]["device"].as_str().unwrap(),
        secrets[0]["token"].as_str().unwrap(),
    );
    let probe = r#"{"id":"after-mosquitto-restart","metrics":{"probe":1.5}}"#.to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_mqtt_publish(
        stack.mqtt_port,
        device,
        token,
        &format!("devices/{device}/telemetry"),
        std::slice::from_ref(&probe),
    ) != Ok(vec![PubAckReason::Success])
    {
        assert!(
            Instant::now() < deadline,
            "the device cannot publish after the restart"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let landed = || {
        stack.sql("SELECT count(*) AS n FROM telemetry WHERE event_id = 'after-mosquitto-restart'")
            [0]["n"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while landed() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(landed(), 1, "after the Mosquitto restart\n{}", stack.logs());

    kill(&mut ingest);
    kill(&mut bridge_2);
    kill(&mut processing);
}
