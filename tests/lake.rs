//! The lake under maintenance while the sinks write: compaction on demand (bin-packing and
//! Z-order) and on a schedule, beside the live writers, loses and doubles nothing; tables carry
//! their properties and get checkpoints; vacuum deletes only what no recent version needs.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{Stack, field, kill};
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::open_table;

/// The active files of a lake table.
fn active_files(lake: &LakeConfig, table: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = open_table(lake, table).await.unwrap();
        t.get_file_uris().unwrap().collect()
    })
}

#[test]
fn compaction_beside_live_writers_keeps_every_row_exactly_once() {
    let mut stack = Stack::start(20, &[]);
    stack.set_env("TRIBUTARY_LAKE__COMPACT_INTERVAL_SECS", "3");
    stack.set_env("TRIBUTARY_LAKE__CHECKPOINT_INTERVAL", "5");
    let lake = LakeConfig {
        url: stack.path().join("lake").display().to_string(),
        ..Default::default()
    };
    let mut pipeline = stack.spawn_pipeline(0);
    let http = stack.spawn_simulator("http", 4000, 400, "41");

    // While devices send and the sinks commit every 500 ms: compact on demand, twice.
    std::thread::sleep(Duration::from_secs(4));
    let zordered = stack.ok(&["optimize", "telemetry", "--zorder-by", "device"]);
    assert!(zordered.starts_with("optimize telemetry: "), "{zordered}");
    std::thread::sleep(Duration::from_secs(2));
    let packed = stack.ok(&["optimize", "deadletter"]);
    assert!(packed.starts_with("optimize deadletter: "), "{packed}");

    let http = stack.finish_simulator(http);
    stack.assert_rows(
        field(&http, "expected_readings"),
        field(&http, "expected_dead_letters"),
        Duration::from_secs(90),
        "compactions beside the live writers lose and double nothing",
    );
    assert_eq!(stack.duplicate_readings(), 0);
    stack.assert_usage_matches_raw(Duration::from_secs(60));
    let log = stack.log("pipeline-0");
    assert!(
        log.contains("scheduled compaction: "),
        "the sinks compact on their schedule"
    );
    for table in ["telemetry", "deadletter"] {
        assert!(
            !log.lines()
                .any(|l| l.contains("delta commit failed") && l.contains(&format!("table={table}"))),
            "an append sink never conflicts with a compaction ({table})"
        );
    }

    // Quiet now: one more compaction leaves at most one file per partition (all files are small).
    kill(&mut pipeline);
    let before = active_files(&lake, "telemetry").len();
    let out = stack.ok(&["optimize", "telemetry"]);
    let after = active_files(&lake, "telemetry");
    let partitions: BTreeSet<String> = after
        .iter()
        .map(|f| {
            let dir = std::path::Path::new(f).parent().unwrap();
            dir.display().to_string()
        })
        .collect();
    assert_eq!(
        after.len(),
        partitions.len(),
        "one file per partition after compaction ({before} before): {out}"
    );
    stack.assert_rows(
        field(&http, "expected_readings"),
        field(&http, "expected_dead_letters"),
        Duration::from_secs(10),
        "compaction keeps the rows",
    );

    // Properties set at creation, and checkpoints every 5 commits (a run makes 9 to 20: with
    // five sinks joining their groups on Tansu, the first commits can come late).
    let log_dir = stack.path().join("lake/telemetry/_delta_log");
    let first = std::fs::read_to_string(log_dir.join("00000000000000000000.json")).unwrap();
    assert!(
        first.contains(r#""delta.checkpointInterval":"5""#),
        "{first}"
    );
    assert!(
        first.contains(r#""delta.targetFileSize":"134217728""#),
        "{first}"
    );
    let checkpoints = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".checkpoint.parquet")
        })
        .count();
    let listing: Vec<String> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(checkpoints > 0, "checkpoints are written: {listing:?}");

    // Vacuum: with no retention, the files compactions removed are deleted; the rows stay.
    let dry = stack.ok(&["vacuum", "telemetry", "--retention-hours", "0", "--dry-run"]);
    assert!(dry.starts_with("vacuum telemetry: would delete "), "{dry}");
    let refused = stack
        .cmd(&["vacuum", "telemetry", "--retention-hours", "0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("add --force"));
    let done = stack.ok(&["vacuum", "telemetry", "--retention-hours", "0", "--force"]);
    let deleted: usize = done
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(deleted > 0, "{done}");
    let mut on_disk = 0;
    for entry in walk(&stack.path().join("lake/telemetry")) {
        if entry.extension().is_some_and(|e| e == "parquet")
            && !entry.to_string_lossy().contains("_delta_log")
        {
            on_disk += 1;
        }
    }
    assert_eq!(on_disk, after.len(), "only the active files remain");
    stack.assert_rows(
        field(&http, "expected_readings"),
        field(&http, "expected_dead_letters"),
        Duration::from_secs(10),
        "vacuum keeps the rows",
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
