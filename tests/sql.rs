//! SQL for data engineers: `tributary run query` serving the lake over the Postgres wire protocol
//! (psql, and a driver's extended protocol) and `POST /v1/sql` (every format), with tenant
//! isolation under an adversarial query set, and every limit answered with a clear error while
//! the server keeps serving.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use std::collections::BTreeMap;
use support::{BIN, free_port, kill};
use tributary_lake::LakeConfig;

use tributary_lake::delta_sink::write_rows;
use tributary_lake::tables::devices::DeviceState;
use tributary_schemas::Reading;
use tributary_schemas::registry::Device;
use tributary_schemas::registry::token_hash;

const ALICE: &str = "alice-token-acme-0123456789";
const BOB: &str = "bob-token-globex-0123456789";
const ROOT: &str = "root-token-admin-0123456789";

/// `per_device` readings (value = their index) of each device, one a minute from 2026-11-27 00:00.
fn readings(tenant: &str, devices: &[&str], per_device: usize, first: usize) -> Vec<Reading> {
    let start = 1_795_737_600_000_000i64; // 2026-11-27T00:00:00Z
    let mut out = Vec::new();
    for device in devices {
        for i in first..first + per_device {
            let t = start + i as i64 * 60_000_000;
            out.push(Reading {
                tenant: tenant.into(),
                device: (*device).into(),
                metric: "temperature".into(),
                value: i as f64,
                unit: Some("Cel".into()),
                original_value: None,
                original_unit: None,
                late: false,
                event_time: t,
                ingest_time: t + 1_000_000,
                event_id: format!("{device}-{i}"),
                source_topic: "raw".into(),
                source_partition: 0,
                source_offset: i as i64,
                source_index: 0,
                measurement: Some(0),
                name: None,
                conflict: false,
                device_group: None,
                device_model: None,
                site: Vec::new(),
            });
        }
    }
    out
}

/// Registry rows of `devices`: (tenant, device, site).
fn devices(lake: &LakeConfig, devices: &[(&str, &str, &[&str])]) {
    let rows: Vec<DeviceState> = devices
        .iter()
        .map(|(tenant, id, site)| DeviceState {
            device: (*id).into(),
            tenant: (*tenant).into(),
            state: Some(Device {
                id: (*id).into(),
                tenant: (*tenant).into(),
                group: None,
                model: None,
                tags: BTreeMap::from([("floor".to_owned(), "1".to_owned())]),
                metrics: vec!["temperature".into()],
                site: site.iter().map(|s| s.to_string()).collect(),
                token_sha256: None,
                enabled: true,
                subject: None,
                subject_history: Vec::new(),
                created_at: 0,
                updated_at: 0,
                mqtt_password_hash: None,
            }),
        })
        .collect();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(write_rows::<DeviceState>(lake, "devices", &rows))
        .unwrap();
}

fn write(lake: &LakeConfig, rows: &[Reading]) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(write_rows::<Reading>(lake, "telemetry", rows))
        .unwrap();
}

struct Server {
    child: Child,
    http: String,
    pg_port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn start(dir: tempfile::TempDir) -> Server {
    let (http_port, pg_port) = (free_port(), free_port());
    let d = dir.path();
    let toml = format!(
        r#"
[lake]
url = "{lake}"

[query]
http_listen = "127.0.0.1:{http_port}"
pg_listen = "127.0.0.1:{pg_port}"
max_rows = 1000
max_concurrent = 2
timeout_secs = 4
max_memory_mb = 32

[query.users.alice]
password_sha256 = "{alice}"
tenant = "acme"
role = "engineer"

[query.users.bob]
password_sha256 = "{bob}"
tenant = "globex"
role = "compliance"

[query.users.root]
password_sha256 = "{root}"
role = "admin"
"#,
        lake = d.join("lake").display(),
        alice = token_hash(ALICE),
        bob = token_hash(BOB),
        root = token_hash(ROOT),
    );
    std::fs::write(d.join("tributary.toml"), toml).unwrap();
    let log = std::fs::File::create(d.join("query.log")).unwrap();
    let child = Command::new(BIN)
        .args(["run", "query"])
        .current_dir(d)
        .env(
            "TRIBUTARY_LOG",
            "info,buoyant_kernel=off,deltalake_core=off",
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", http_port)).is_err()
    {
        assert!(Instant::now() < deadline, "the query server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Server {
        child,
        http: format!("http://127.0.0.1:{http_port}"),
        pg_port,
        dir,
    }
}

impl Server {
    /// `POST /v1/sql` as the bearer of `token`: status, content type and body.
    fn post(
        &self,
        token: Option<&str>,
        body: Value,
        accept: Option<&str>,
    ) -> (u16, String, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = reqwest::Client::new()
                .post(format!("{}/v1/sql", self.http))
                .json(&body);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            if let Some(a) = accept {
                r = r.header("accept", a);
            }
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (status, ct, r.bytes().await.unwrap().to_vec())
        })
    }

    /// Rows as JSON objects; panics unless 200.
    fn rows(&self, token: &str, sql: &str) -> Vec<Value> {
        let (status, _, body) = self.post(Some(token), serde_json::json!({ "sql": sql }), None);
        assert_eq!(status, 200, "{sql}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// The status and error message of a refused query.
    fn refused(&self, token: &str, sql: &str) -> (u16, String) {
        let (status, _, body) = self.post(Some(token), serde_json::json!({ "sql": sql }), None);
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v["error"].as_str().unwrap_or("").to_owned())
    }

    /// psql -At as `user`: stdout lines, or the error on stderr.
    fn psql(&self, user: &str, password: &str, sql: &str) -> Result<Vec<String>, String> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.pg_port.to_string(),
                "-U",
                user,
                "-d",
                "tributary",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql (postgresql-client) is installed by deploy/local/install.sh");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn n(rows: &[Value]) -> i64 {
    rows[0]["n"].as_i64().unwrap()
}

#[test]
fn sql_over_pg_wire_and_http_with_tenant_isolation_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let lake = LakeConfig {
        url: dir.path().join("lake").display().to_string(),
        ..LakeConfig::default()
    };
    // Version 0: acme 3 devices × 20, globex 2 devices × 20.
    let mut rows = readings("acme", &["a-1", "a-2", "a-3"], 20, 0);
    rows.extend(readings("globex", &["g-1", "g-2"], 20, 0));
    write(&lake, &rows);
    let server = start(dir);

    // --- psql: a query set with known answers (simple query protocol).
    let psql = |sql: &str| {
        server
            .psql("alice", ALICE, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    assert_eq!(psql("SELECT count(*) FROM telemetry"), ["60"]);
    assert_eq!(
        psql(
            "SELECT device, count(*), CAST(sum(value) AS BIGINT) FROM telemetry GROUP BY device ORDER BY device"
        ),
        ["a-1|20|190", "a-2|20|190", "a-3|20|190"]
    );
    assert_eq!(
        psql("SELECT date_bin(INTERVAL '10 minutes', event_time) AS bucket, count(*) FROM telemetry GROUP BY 1 ORDER BY 1")
            .iter()
            .map(|l| l.split('|').nth(1).unwrap().to_owned())
            .collect::<Vec<_>>(),
        ["30", "30"]
    );
    assert_eq!(
        psql(
            "SELECT device, CAST(last_value(value ORDER BY event_time) AS BIGINT), CAST(median(value) AS BIGINT) FROM telemetry WHERE device = 'a-2' GROUP BY device"
        ),
        ["a-2|19|9"]
    );
    assert!(psql("SHOW TABLES").iter().any(|l| l.contains("telemetry")));
    assert_eq!(
        psql("SET application_name = 'dbeaver'; SELECT 1"),
        ["SET", "1"]
    );
    let wrong = server.psql("alice", BOB, "SELECT 1").unwrap_err();
    assert!(
        wrong
            .to_lowercase()
            .contains("password authentication failed"),
        "{wrong}"
    );
    assert!(server.psql("mallory", ALICE, "SELECT 1").is_err());
    let bob = server
        .psql("bob", BOB, "SELECT DISTINCT tenant FROM telemetry")
        .unwrap();
    assert_eq!(bob, ["globex"]);

    // --- Extended query protocol (what drivers use): parameters bound by the client.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=alice password={ALICE} dbname=tributary",
                server.pg_port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let count = |device: &'static str| {
            let client = &client;
            async move {
                let row = client
                    .query_one(
                        "SELECT count(*) AS n FROM telemetry WHERE device = $1",
                        &[&device],
                    )
                    .await
                    .unwrap();
                row.get::<_, i64>("n")
            }
        };
        assert_eq!(count("a-1").await, 20);
        assert_eq!(
            count("g-1").await,
            0,
            "another tenant's device through a parameter"
        );
        let refused = client.query("DROP TABLE telemetry", &[]).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
        );
    });

    // --- Tenant isolation: adversarial queries as alice return no globex row, over both endpoints.
    let adversarial = [
        "SELECT count(*) AS n FROM telemetry WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM telemetry WHERE tenant <> 'acme' OR tenant IS NULL",
        "SELECT count(*) AS n FROM telemetry WHERE device LIKE 'g-%'",
        "SELECT count(*) AS n FROM datafusion.public.telemetry WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM telemetry a JOIN telemetry b ON a.device = b.device WHERE b.tenant = 'globex'",
        "SELECT count(*) AS n FROM (SELECT * FROM telemetry) s WHERE s.tenant = 'globex'",
        "WITH x AS (SELECT * FROM telemetry) SELECT count(*) AS n FROM x WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM (SELECT tenant FROM telemetry UNION ALL SELECT tenant FROM table_at('telemetry', 0)) u WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM table_at('telemetry', 0) WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM telemetry WHERE device IN (SELECT device FROM telemetry WHERE tenant = 'globex')",
        "SELECT count(*) AS n FROM telemetry WHERE EXISTS (SELECT 1 FROM telemetry t WHERE t.tenant = 'globex')",
    ];
    for sql in adversarial {
        assert_eq!(n(&server.rows(ALICE, sql)), 0, "leak over HTTP: {sql}");
        assert_eq!(psql(sql), ["0"], "leak over pgwire: {sql}");
    }
    let tenants = server.rows(ALICE, "SELECT DISTINCT tenant FROM telemetry");
    assert_eq!(tenants, vec![serde_json::json!({"tenant": "acme"})]);
    // Only table names are in information_schema, and its views list no other tenant's data.
    let tables = server.rows(
        ALICE,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    );
    assert_eq!(tables, vec![serde_json::json!({"table_name": "telemetry"})]);
    // Nothing that writes, defines or reads a path.
    let lake_path = server.dir.path().join("lake/telemetry");
    for sql in [
        "CREATE VIEW everything AS SELECT * FROM telemetry".to_owned(),
        format!(
            "CREATE EXTERNAL TABLE raw_files STORED AS PARQUET LOCATION '{}'",
            lake_path.display()
        ),
        "COPY (SELECT * FROM telemetry) TO '/tmp/tributary-leak.csv'".to_owned(),
        "INSERT INTO telemetry SELECT * FROM telemetry".to_owned(),
        "SET datafusion.execution.batch_size = 1".to_owned(),
        "DROP TABLE telemetry".to_owned(),
    ] {
        let (status, message) = server.refused(ALICE, &sql);
        assert_eq!(status, 403, "{sql}: {message}");
        assert!(message.contains("may only read"), "{sql}: {message}");
    }
    assert!(!Path::new("/tmp/tributary-leak.csv").exists());
    let (status, message) = server.refused(ALICE, "SELECT * FROM table_at('../lake/telemetry', 0)");
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("no table"), "{message}");
    // The admin sees every tenant.
    assert_eq!(
        n(&server.rows(ROOT, "SELECT count(*) AS n FROM telemetry")),
        100
    );

    // --- Latest version without a restart; time travel to the first.
    write(&lake, &readings("acme", &["a-1"], 10, 20));
    assert_eq!(
        n(&server.rows(ALICE, "SELECT count(*) AS n FROM telemetry")),
        70
    );
    assert_eq!(
        n(&server.rows(ALICE, "SELECT count(*) AS n FROM table_at('telemetry', 0)")),
        60
    );
    assert_eq!(psql("SELECT count(*) FROM telemetry"), ["70"]);

    // --- The README's cookbook, on this data (a-1: minutes 0–29, a-2 and a-3: 0–19; a-4 silent).
    devices(
        &lake,
        &[
            ("acme", "a-1", &["north", "hall"]),
            ("acme", "a-2", &["north"]),
            ("acme", "a-3", &["south"]),
            ("acme", "a-4", &["south"]),
            ("globex", "g-1", &["north"]),
        ],
    );
    let per_site = server.rows(
        ALICE,
        "SELECT d.site[1] AS zone, date_bin(INTERVAL '1 hour', t.event_time) AS hour, avg(t.value) AS avg \
         FROM telemetry t JOIN devices d ON t.tenant = d.tenant AND t.device = d.device \
         WHERE t.metric = 'temperature' GROUP BY 1, 2 ORDER BY 1, 2",
    );
    assert_eq!(per_site.len(), 2, "{per_site:?}");
    assert_eq!(
        (per_site[0]["zone"].as_str(), per_site[0]["avg"].as_f64()),
        (Some("north"), Some(12.5))
    );
    assert_eq!(
        (per_site[1]["zone"].as_str(), per_site[1]["avg"].as_f64()),
        (Some("south"), Some(9.5))
    );
    let silent = server.rows(
        ALICE,
        "SELECT d.tenant, d.device, max(t.event_time) AS last_seen \
         FROM devices d LEFT JOIN telemetry t ON t.tenant = d.tenant AND t.device = d.device \
         GROUP BY d.tenant, d.device \
         HAVING max(t.event_time) IS NULL OR max(t.event_time) < TIMESTAMP '2026-11-27T00:25:00Z' \
         ORDER BY d.device",
    );
    let silent: Vec<&str> = silent
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    assert_eq!(silent, ["a-2", "a-3", "a-4"]);
    let around = server.rows(
        ALICE,
        "SELECT device, metric, event_time, value FROM telemetry WHERE device = 'a-1' \
         AND event_time BETWEEN TIMESTAMP '2026-11-27T00:10:00Z' - INTERVAL '5 minutes' \
         AND TIMESTAMP '2026-11-27T00:10:00Z' + INTERVAL '5 minutes' ORDER BY event_time",
    );
    assert_eq!(around.len(), 11);
    let last = server.rows(
        ALICE,
        "SELECT device, metric, last_value(value ORDER BY event_time) AS value, max(event_time) AS at \
         FROM telemetry GROUP BY device, metric ORDER BY device",
    );
    assert_eq!(last[0]["value"].as_f64(), Some(29.0));
    let pct = server.rows(
        ALICE,
        "SELECT metric, median(value) AS median, approx_percentile_cont(value, 0.95) AS p95 FROM telemetry GROUP BY metric",
    );
    assert_eq!(pct[0]["median"].as_f64(), Some(11.0));
    assert!(pct[0]["p95"].as_f64().unwrap() >= 25.0, "{pct:?}");
    let filled = server.rows(
        ALICE,
        "WITH buckets AS ( \
           SELECT date_bin(INTERVAL '10 minutes', b) AS bucket \
           FROM unnest(generate_series(TIMESTAMP '2026-11-27T00:00:00Z', TIMESTAMP '2026-11-27T00:50:00Z', \
                                       INTERVAL '10 minutes')) AS s(b)), \
          agg AS ( \
           SELECT date_bin(INTERVAL '10 minutes', event_time) AS bucket, avg(value) AS avg \
           FROM telemetry WHERE device = 'a-1' GROUP BY 1) \
         SELECT b.bucket, agg.avg, last_value(agg.avg) IGNORE NULLS OVER (ORDER BY b.bucket) AS filled \
         FROM buckets b LEFT JOIN agg ON b.bucket = agg.bucket ORDER BY b.bucket",
    );
    let filled: Vec<(Option<f64>, Option<f64>)> = filled
        .iter()
        .map(|r| (r["avg"].as_f64(), r["filled"].as_f64()))
        .collect();
    assert_eq!(
        filled,
        [
            (Some(4.5), Some(4.5)),
            (Some(14.5), Some(14.5)),
            (Some(24.5), Some(24.5)),
            (None, Some(24.5)),
            (None, Some(24.5)),
            (None, Some(24.5)),
        ]
    );
    // Maps and lists reach psql as text; another tenant's devices stay invisible.
    assert_eq!(
        psql("SELECT device, tags, site FROM devices WHERE device = 'a-1'"),
        ["a-1|{floor: 1}|{north,hall}"]
    );
    assert_eq!(psql("SELECT count(*) FROM devices"), ["4"]);

    // --- What clients ask of pg_catalog: psql's \dt and \d, DBeaver's and Grafana's schema
    // browsers. A tenant sees its tables as tables, with their columns, and nothing else.
    let listed: Vec<String> = psql("\\dt")
        .iter()
        .map(|l| l.split('|').take(3).collect::<Vec<_>>().join("|"))
        .collect();
    assert_eq!(listed, ["public|devices|table", "public|telemetry|table"]);
    let described = psql("\\d telemetry");
    assert!(
        described
            .iter()
            .any(|l| l.starts_with("event_time|timestamp")),
        "{described:?}"
    );
    assert!(
        described
            .iter()
            .any(|l| l.starts_with("value|double precision")),
        "{described:?}"
    );
    // Grafana's table and column pickers (information_schema, quote_ident).
    assert_eq!(
        psql(
            "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables \
             WHERE quote_ident(table_schema) NOT IN ('information_schema', 'pg_catalog') \
             AND table_type = 'BASE TABLE' ORDER BY 1"
        ),
        ["devices", "telemetry"]
    );
    assert!(
        psql(
            "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" \
             FROM information_schema.columns WHERE quote_ident(table_name) = 'telemetry'"
        )
        .iter()
        .any(|l| l == "value|Float64")
    );
    // DBeaver's first questions after connecting.
    assert!(
        psql("SELECT current_schema(), session_user")[0].starts_with("public|"),
        "DBeaver asks for the schema and user"
    );
    assert!(
        psql(
            "SELECT n.oid, n.nspname, d.description FROM pg_catalog.pg_namespace n \
             LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid = n.oid AND d.objsubid = 0 \
             AND d.classoid = 'pg_namespace'::regclass ORDER BY nspname"
        )
        .iter()
        .any(|l| l.contains("|public|"))
    );
    let relations = psql(
        "SELECT c.relname, c.relkind FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' ORDER BY 1",
    );
    assert_eq!(relations, ["devices|r", "telemetry|r"]);
    // Catalogs hold names only: another tenant's rows never come through them.
    assert_eq!(
        psql("SELECT count(*) FROM pg_catalog.pg_class WHERE relname LIKE 'g-%'"),
        ["0"]
    );

    // --- Every HTTP format round-trips the same rows.
    let sql = "SELECT device, count(*) AS n, max(event_time) AS last FROM telemetry GROUP BY device ORDER BY device";
    let json = server.rows(ALICE, sql);
    assert_eq!(json.len(), 3);
    assert_eq!(json[0]["device"], "a-1");
    assert_eq!(json[0]["n"], 30);
    let (status, ct, csv) = server.post(
        Some(ALICE),
        serde_json::json!({ "sql": sql }),
        Some("text/csv"),
    );
    assert_eq!((status, ct.starts_with("text/csv")), (200, true));
    let csv = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "device,n,last");
    assert!(lines[1].starts_with("a-1,30,2026-11-27T00:29:00"), "{csv}");
    assert_eq!(lines.len(), 4);
    let (status, ct, ipc) = server.post(
        Some(ALICE),
        serde_json::json!({ "sql": sql, "format": "arrow" }),
        None,
    );
    assert_eq!(
        (status, ct.as_str()),
        (200, "application/vnd.apache.arrow.stream")
    );
    let batches: Vec<arrow::array::RecordBatch> =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let from_arrow = batches_as_json(&batches);
    assert_eq!(from_arrow, json);
    let (status, ct, parquet) = server.post(
        Some(ALICE),
        serde_json::json!({ "sql": sql }),
        Some("application/vnd.apache.parquet"),
    );
    assert_eq!(
        (status, ct.as_str()),
        (200, "application/vnd.apache.parquet")
    );
    let batches: Vec<arrow::array::RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(
            parquet,
        ))
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches_as_json(&batches), json);
    // Bad requests name what is wrong; no credentials, no answer.
    let (status, _, body) = server.post(
        Some(ALICE),
        serde_json::json!({ "sql": sql, "format": "xml" }),
        None,
    );
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["field"],
        "format"
    );
    assert_eq!(
        server.post(None, serde_json::json!({ "sql": sql }), None).0,
        401
    );
    assert_eq!(
        server
            .post(Some("guess"), serde_json::json!({ "sql": sql }), None)
            .0,
        401
    );
    let (status, message) = server.refused(ALICE, "SELECT nope FROM telemetry");
    assert_eq!(status, 400);
    assert!(message.contains("nope"), "{message}");

    // --- The CLI against the server.
    let out = Command::new(BIN)
        .args([
            "sql",
            "--server",
            &server.http,
            "--format",
            "json",
            "SELECT count(*) AS n FROM telemetry",
        ])
        .env("TRIBUTARY_SQL_TOKEN", BOB)
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        n(&serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()),
        40
    );

    // --- Limits: each gives a clear error, and the server keeps serving.
    let (status, message) = server.refused(ALICE, "SELECT * FROM generate_series(1, 5000)");
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("query.max_rows"), "{message}");
    let err = server
        .psql("alice", ALICE, "SELECT * FROM generate_series(1, 5000)")
        .unwrap_err();
    assert!(err.contains("query.max_rows"), "{err}");
    let (status, message) = server.refused(
        ALICE,
        "SELECT count(*) AS n FROM generate_series(1, 100000000000)",
    );
    assert_eq!(status, 504, "{message}");
    assert!(message.contains("query.timeout_secs"), "{message}");
    let (status, message) = server.refused(
        ALICE,
        "SELECT array_agg(value) AS a FROM generate_series(1, 20000000) t(value)",
    );
    assert_eq!(status, 507, "{message}");
    assert!(message.contains("query.max_memory_mb"), "{message}");
    // Two slow queries hold both slots; a third is turned away.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let http = server.http.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                // Bob's probes hold a slot for a few ms: retry until this one is in.
                rt.block_on(async {
                    let client = reqwest::Client::new();
                    loop {
                        let status = client
                            .post(format!("{http}/v1/sql"))
                            .bearer_auth(ALICE)
                            .json(&serde_json::json!({ "sql": "SELECT count(*) FROM generate_series(1, 100000000000)" }))
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16();
                        if status != 429 {
                            return status;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
        })
        .collect();
    // Until both have answered: some query of bob's must have been turned away meanwhile.
    let began = Instant::now();
    let mut seen = Vec::new();
    while !slow.iter().all(|s| s.is_finished()) {
        let (status, message) = server.refused(BOB, "SELECT 1 AS n");
        if status == 429 {
            seen.push(message);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let slow: Vec<u16> = slow.into_iter().map(|s| s.join().unwrap()).collect();
    assert_eq!(slow, [504, 504], "the slow queries ended on their timeout");
    assert!(
        !seen.is_empty(),
        "no query was turned away while two slow ones ran (they took {:?})",
        began.elapsed()
    );
    let message = &seen[0];
    assert!(message.contains("query.max_concurrent"), "{message}");
    assert_eq!(
        n(&server.rows(BOB, "SELECT count(*) AS n FROM telemetry")),
        40
    );
    assert_eq!(psql("SELECT count(*) FROM telemetry"), ["70"]);
    let log = std::fs::read_to_string(server.dir.path().join("query.log")).unwrap();
    for secret in [ALICE, BOB, ROOT] {
        assert!(!log.contains(secret), "a token is in the log");
    }
}

fn batches_as_json(batches: &[arrow::array::RecordBatch]) -> Vec<Value> {
    let mut out = Vec::new();
    {
        let mut w = arrow::json::ArrayWriter::new(&mut out);
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
    }
    serde_json::from_slice(&out).unwrap()
}
