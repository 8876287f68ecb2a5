//! End-to-end throughput: events/s from devices (MQTT and HTTP) to rows in the Delta lake, on a
//! private local stack (Tansu memory storage, Mosquitto), everything on this machine.
//!
//!     cargo bench --bench e2e            (E2E_MESSAGES=20000 to change the load)
//!
//! Each run sends messages as fast as the simulator can (3 readings per message), and measures the
//! time from the first send until every reading is a row in `telemetry`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Stack, kill, summary};

fn main() {
    let messages: u64 = std::env::var("E2E_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    println!(
        "| path | messages | readings | acked by ingest (msg/s) | landed in lake (readings/s) | seconds to last row |"
    );
    println!("|---|---|---|---|---|---|");
    for via in ["mqtt", "http"] {
        let stack = Stack::start(50, &[]);
        let mut pipeline = stack.spawn_pipeline(0);
        let started = Instant::now();
        let out = stack.ok(&[
            "simulate",
            "--via",
            via,
            "--devices",
            "50",
            "--messages",
            &messages.to_string(),
            "--rate",
            "1000000",
            "--batch",
            "100",
            "--concurrency",
            "8",
            "--malformed",
            "0",
            "--duplicates",
            "0",
            "--seed",
            "7",
        ]);
        let s = summary(&out);
        let readings = s["expected_readings"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(600);
        while stack.count("telemetry") < readings && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let secs = started.elapsed().as_secs_f64();
        let landed = stack.count("telemetry");
        println!(
            "| {via} | {messages} | {landed} | {:.0} | {:.0} | {secs:.1} |",
            s["acked_per_sec"].as_f64().unwrap_or(0.0),
            landed as f64 / secs
        );
        kill(&mut pipeline);
    }
}
