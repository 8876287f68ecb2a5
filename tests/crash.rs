//! The crash case: `kill -9` the pipeline mid-stream (sinks committing, compacting), restart it,
//! and nothing is lost or duplicated.

mod support;

use std::time::Duration;

use support::{Stack, field, kill, kill_9_while_landing};

#[test]
fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let mut stack = Stack::start_with_storage(20, &[], "sqlite://tansu.db");
    // Compactions every 2 s, so the kills also hit them.
    stack.set_env("TRIBUTARY_LAKE__COMPACT_INTERVAL_SECS", "2");
    let mut pipeline = stack.spawn_pipeline(0);
    let mqtt = stack.spawn_simulator("mqtt", 8000, 600, "11");
    let http = stack.spawn_simulator("http", 8000, 600, "12");

    // Kill while events flow and rows are landing, twice.
    for round in 1..=2 {
        kill_9_while_landing(&stack, &mut pipeline);
        std::thread::sleep(Duration::from_millis(500));
        pipeline = stack.spawn_pipeline(round);
    }

    let mqtt = stack.finish_simulator(mqtt);
    let http = stack.finish_simulator(http);
    let n = field;
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
    // Metering added each raw event exactly once, across both kills.
    stack.assert_usage_matches_raw(Duration::from_secs(60));
    kill(&mut pipeline);
}
