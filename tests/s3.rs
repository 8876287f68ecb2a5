//! The lake on S3 (moto's S3 server, which honours the conditional puts Delta commits rely on):
//! two lake instances split the partitions of every topic and commit to the same tables at the
//! same time, each is `kill -9`ed while rows land (and compactions run), and the tables still
//! hold every row exactly once.

mod support;

use std::time::Duration;

use support::{Stack, field, kill, kill_9_while_landing};

#[test]
fn two_sinks_on_s3_commit_concurrently_and_survive_kill_9_exactly_once() {
    let mut stack = Stack::start_with_storage(20, &[], "sqlite://tansu.db");
    stack.start_object_store();
    stack.set_env("TRIBUTARY_LAKE__COMPACT_INTERVAL_SECS", "3");
    let mut upstream = stack.spawn_stages(&["http", "cleanse"], "upstream", &[]);
    stack.wait_http();
    let lake = |name: &str, instance: &str| {
        stack.spawn_stages(
            &["lake"],
            name,
            &[("TRIBUTARY_KAFKA__INSTANCE_ID", instance)],
        )
    };
    let mut a = lake("lake-a", "a");
    let mut b = lake("lake-b", "b");
    let http = stack.spawn_simulator("http", 6000, 500, "61");

    kill_9_while_landing(&stack, &mut a);
    a = lake("lake-a-again", "a");
    kill_9_while_landing(&stack, &mut b);
    b = lake("lake-b-again", "b");

    let http = stack.finish_simulator(http);
    stack.assert_rows(
        field(&http, "expected_readings"),
        field(&http, "expected_dead_letters"),
        Duration::from_secs(120),
        "two sinks on S3, each killed once: nothing lost, nothing twice",
    );
    assert_eq!(stack.duplicate_readings(), 0);
    stack.assert_usage_matches_raw(Duration::from_secs(60));
    // Both instances committed to `telemetry` (each owns some of its partitions).
    for instance in ["lake-a", "lake-b"] {
        let logs = format!(
            "{}{}",
            stack.log(instance),
            stack.log(&format!("{instance}-again"))
        );
        assert!(
            logs.lines()
                .any(|l| l.contains("delta commit") && l.contains("table=telemetry")),
            "{instance} committed to telemetry"
        );
    }
    assert!(
        !stack.path().join("lake/telemetry").exists(),
        "the lake is on S3, not on the local disk"
    );
    for child in [&mut a, &mut b, &mut upstream] {
        kill(child);
    }
}
