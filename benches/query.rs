//! Query bench: an IoT query set over generated lake tables, DataFusion (`QueryService`, as the
//! query server runs it: a fresh session per query at the tables' latest version) beside DuckDB
//! (PyPI `duckdb`, from install.sh's venv) over the same Parquet files, in the same run.
//!
//! ```text
//! cargo bench --bench query                               # 10 000 000 readings, 10 000 devices
//! cargo bench --bench query -- --rows 1000000 --runs 3
//! cargo bench --bench query -- --dir /tmp/qlake           # keep (and reuse) the generated lake
//! cargo bench --bench query -- --dir /tmp/qlake --only count-per-day --explain   # one plan, timed
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::{open_table, write_rows};
use tributary_lake::tables::devices::DeviceState;
use tributary_query::{Principal, QueryLimits, QueryService};
use tributary_schemas::Reading;
use tributary_schemas::registry::Device;

/// 2026-11-20T00:00:00Z: the generated week starts here.
const START: i64 = 1_795_132_800_000_000;
const METRICS: [&str; 3] = ["temperature", "humidity", "co2"];

struct Options {
    rows: u64,
    devices: u64,
    runs: usize,
    dir: Option<PathBuf>,
    /// Only the queries whose name contains this.
    only: Option<String>,
    /// Print each query's `EXPLAIN ANALYZE` (and skip DuckDB).
    explain: bool,
}

fn options() -> Options {
    let mut o = Options {
        rows: 10_000_000,
        devices: 10_000,
        runs: 5,
        dir: None,
        only: None,
        explain: false,
    };
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match a.as_str() {
            "--rows" => o.rows = value().parse().unwrap_or(o.rows),
            "--devices" => o.devices = value().parse().unwrap_or(o.devices).max(1),
            "--runs" => o.runs = value().parse().unwrap_or(o.runs).max(1),
            "--dir" => o.dir = Some(PathBuf::from(value())),
            "--only" => o.only = Some(value()),
            "--explain" => o.explain = true,
            _ => {}
        }
    }
    o
}

fn device(d: u64) -> String {
    format!("dev-{d:05}")
}

/// Reading `i`: devices in turn, a reading per device every `step` µs over one week.
fn reading(i: u64, o: &Options) -> Reading {
    let d = i % o.devices;
    let round = i / o.devices;
    let rounds = o.rows.div_ceil(o.devices).max(1);
    let step = 7 * 86_400_000_000 / rounds as i64;
    let t = START + round as i64 * step + (d as i64 * 997) % step.max(1);
    let metric = METRICS[(round % 3) as usize];
    let base = match metric {
        "temperature" => 18.0,
        "humidity" => 45.0,
        _ => 600.0,
    };
    Reading {
        tenant: format!("tenant-{}", d % 3 + 1),
        device: device(d),
        metric: metric.into(),
        value: base + ((i.wrapping_mul(2_654_435_761)) % 1000) as f64 / 100.0,
        unit: None,
        original_value: None,
        original_unit: None,
        late: false,
        event_time: t,
        ingest_time: t + 500_000,
        event_id: format!("{i}"),
        source_topic: "raw".into(),
        source_partition: (d % 3) as i32,
        source_offset: i as i64,
        source_index: 0,
        measurement: Some(0),
        name: None,
        conflict: false,
        device_group: None,
        device_model: None,
        site: Vec::new(),
    }
}

fn device_state(d: u64) -> DeviceState {
    let tenant = format!("tenant-{}", d % 3 + 1);
    DeviceState {
        device: device(d),
        tenant: tenant.clone(),
        state: Some(Device {
            id: device(d),
            tenant,
            group: Some(format!("group-{}", d % 10)),
            model: Some("th-1".into()),
            tags: BTreeMap::new(),
            metrics: METRICS.iter().map(|m| m.to_string()).collect(),
            site: vec![format!("zone-{}", d % 8), format!("section-{}", d % 40)],
            token_sha256: None,
            enabled: true,
            subject: None,
            subject_history: Vec::new(),
            created_at: START,
            updated_at: START,
            mqtt_password_hash: None,
        }),
    }
}

/// (name, DataFusion SQL, DuckDB SQL): the same question in each dialect.
fn queries() -> Vec<(&'static str, String, String)> {
    let same = |name, sql: &str| (name, sql.to_owned(), sql.to_owned());
    vec![
        same(
            "device-time-filter",
            "SELECT count(*), avg(value) FROM telemetry WHERE device = 'dev-00042' \
             AND event_time >= '2026-11-22T00:00:00Z' AND event_time < '2026-11-23T00:00:00Z'",
        ),
        same(
            "tenant-day-filter",
            "SELECT metric, count(*), min(value), max(value) FROM telemetry \
             WHERE tenant = 'tenant-2' AND day = DATE '2026-11-24' GROUP BY metric ORDER BY metric",
        ),
        same(
            "per-hour-avg",
            "SELECT date_trunc('hour', event_time) AS hour, metric, avg(value) AS avg FROM telemetry \
             GROUP BY 1, 2 ORDER BY 1, 2",
        ),
        (
            "last-value-per-device",
            "SELECT device, last_value(value ORDER BY event_time) AS value FROM telemetry \
             WHERE metric = 'temperature' GROUP BY device"
                .into(),
            "SELECT device, arg_max(value, event_time) AS value FROM telemetry \
             WHERE metric = 'temperature' GROUP BY device"
                .into(),
        ),
        same(
            "top-10-devices",
            "SELECT device, max(value) AS peak FROM telemetry WHERE metric = 'co2' \
             GROUP BY device ORDER BY peak DESC, device LIMIT 10",
        ),
        (
            "p95-per-metric",
            "SELECT metric, approx_percentile_cont(value, 0.95) AS p95 FROM telemetry GROUP BY metric"
                .into(),
            "SELECT metric, approx_quantile(value, 0.95) AS p95 FROM telemetry GROUP BY metric"
                .into(),
        ),
        same(
            "median-per-tenant",
            "SELECT tenant, median(value) AS median FROM telemetry WHERE metric = 'humidity' \
             GROUP BY tenant ORDER BY tenant",
        ),
        same(
            "join-devices-per-zone",
            "SELECT d.site[1] AS zone, count(*) AS n, avg(t.value) AS avg FROM telemetry t \
             JOIN devices d ON t.tenant = d.tenant AND t.device = d.device \
             WHERE t.metric = 'temperature' GROUP BY 1 ORDER BY 1",
        ),
        same(
            "count-per-day",
            "SELECT day, count(*) FROM telemetry GROUP BY day ORDER BY day",
        ),
    ]
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let o = options();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = o.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).expect("lake dir");
    let lake = LakeConfig {
        url: dir.display().to_string(),
        ..LakeConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");

    // The tables, generated once (reused with --dir when they already hold the rows).
    let existing = runtime.block_on(async {
        let table = open_table(&lake, "telemetry").await.expect("table");
        table.version().is_some()
    });
    if !existing {
        let started = Instant::now();
        runtime.block_on(async {
            let devices: Vec<DeviceState> = (0..o.devices).map(device_state).collect();
            write_rows::<DeviceState>(&lake, "devices", &devices)
                .await
                .expect("devices");
            let chunk = 1_000_000;
            let mut i = 0;
            while i < o.rows {
                let rows: Vec<Reading> = (i..(i + chunk).min(o.rows))
                    .map(|i| reading(i, &o))
                    .collect();
                write_rows::<Reading>(&lake, "telemetry", &rows)
                    .await
                    .expect("telemetry");
                i += rows.len() as u64;
                eprintln!("  generated {i} rows");
            }
        });
        println!(
            "generated {} readings of {} devices in {:.1} s into {}",
            o.rows,
            o.devices,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
    }

    let queries: Vec<_> = queries()
        .into_iter()
        .filter(|(name, _, _)| {
            o.only
                .as_ref()
                .is_none_or(|only| name.contains(only.as_str()))
        })
        .collect();
    // DataFusion, as the query server runs a query.
    let limits = QueryLimits {
        max_memory_bytes: 8 << 30,
        timeout: std::time::Duration::from_secs(600),
        max_rows: 100_000_000,
        max_concurrent: 1,
    };
    let service = Arc::new(QueryService::new(lake.clone(), limits));
    let admin = Principal::local_admin();
    if o.explain {
        runtime.block_on(async {
            for (name, sql, _) in &queries {
                let started = Instant::now();
                let batches: Vec<_> = service
                    .execute(&admin, &format!("EXPLAIN ANALYZE {sql}"))
                    .await
                    .expect(name)
                    .map(|b| b.expect(name))
                    .collect()
                    .await;
                println!(
                    "== {name} ({:.1} ms)\n{}",
                    started.elapsed().as_secs_f64() * 1000.0,
                    arrow::util::pretty::pretty_format_batches(&batches).expect("plan")
                );
            }
        });
        return;
    }
    let mut datafusion: Vec<(f64, usize)> = Vec::new();
    runtime.block_on(async {
        for (name, sql, _) in &queries {
            let mut times = Vec::new();
            let mut rows = 0;
            for run in 0..=o.runs {
                let started = Instant::now();
                let mut stream = service.execute(&admin, sql).await.expect(name);
                let mut n = 0;
                while let Some(batch) = stream.next().await {
                    n += batch.expect(name).num_rows();
                }
                if run > 0 {
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                rows = n;
            }
            datafusion.push((median(times), rows));
        }
    });

    // DuckDB over the same Parquet files.
    let spec: Vec<serde_json::Value> = queries
        .iter()
        .map(|(name, _, duck)| serde_json::json!({ "name": name, "duckdb": duck }))
        .collect();
    let spec_path = dir.join("duckdb-queries.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).expect("json")).expect("queries file");
    let venv = std::env::var("TRIBUTARY_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/tributary/venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/query_duckdb.py"
        ))
        .arg(&dir)
        .arg(&spec_path)
        .arg(o.runs.to_string())
        .output()
        .expect("the venv's python (deploy/local/install.sh installs duckdb)");
    assert!(
        out.status.success(),
        "duckdb side failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: serde_json::Value = serde_json::from_slice(&out.stdout).expect("duckdb json");

    println!(
        "query bench: {} readings, {} devices, median of {} runs after a warm-up (ms)",
        o.rows, o.devices, o.runs
    );
    println!(
        "{:<24} {:>12} {:>12} {:>8} {:>8}",
        "query", "datafusion", "duckdb", "ratio", "rows"
    );
    let mut log_sum = 0.0;
    for ((name, _, _), (df_ms, rows)) in queries.iter().zip(&datafusion) {
        let times: Vec<f64> = duck[name]["ms"]
            .as_array()
            .expect("times")
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        let duck_ms = median(times);
        let duck_rows = duck[name]["rows"].as_u64().unwrap_or(0) as usize;
        assert_eq!(
            *rows, duck_rows,
            "{name}: DataFusion and DuckDB disagree on the row count"
        );
        let ratio = df_ms / duck_ms;
        log_sum += ratio.ln();
        println!("{name:<24} {df_ms:>12.1} {duck_ms:>12.1} {ratio:>7.2}× {rows:>8}");
    }
    println!(
        "geometric mean DataFusion / DuckDB: {:.2}× (target ≤ 1.2×)",
        (log_sum / queries.len() as f64).exp()
    );
}
