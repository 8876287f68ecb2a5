//! Test harness: a private local stack (Tansu, Mosquitto) on free loopback ports, started by the
//! project's own `deploy/local/stack.sh`, and the `tributary` binary configured for it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{Client, Event, MqttOptions};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tributary");

/// The admin API token of every test stack.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of install.sh's venv (deltalake, polars, pyarrow, confluent-kafka, fastavro):
/// `$TRIBUTARY_PYTHON`, or `~/.cache/tributary/venv`.
pub fn python() -> PathBuf {
    std::env::var_os("TRIBUTARY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tributary/venv/bin/python")
        })
}

/// A running stack and the configuration pointing at it.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub kafka_port: u16,
    pub mqtt_port: u16,
    pub http_port: u16,
    /// VictoriaMetrics' port, when a test starts it ([`Stack::start_timeseries_store`]).
    pub vm_port: u16,
    /// The S3-compatible store's port, when a test starts it ([`Stack::start_object_store`]).
    pub s3_port: u16,
    /// Alertmanager's port, when a test starts it ([`Stack::start_alertmanager`]).
    pub am_port: u16,
    env: Vec<(String, String)>,
    stack_env: Vec<(String, String)>,
    /// Every process a test started, killed when the stack goes (also when a test panics).
    children: std::sync::Mutex<Vec<u32>>,
}

impl Stack {
    /// Seeds `devices` devices (plus MQTT-only users that are not in the registry), starts the
    /// stack and creates the topics.
    pub fn start(devices: usize, unregistered_mqtt_users: &[(&str, &str)]) -> Stack {
        Self::start_with_storage(devices, unregistered_mqtt_users, "memory://tansu/")
    }

    /// Like [`start`](Self::start) with a chosen Tansu storage engine (`sqlite://tansu.db` is durable).
    pub fn start_with_storage(
        devices: usize,
        unregistered_mqtt_users: &[(&str, &str)],
        kafka_storage: &str,
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let (kafka_port, mqtt_port, http_port, vm_port, s3_port, am_port) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let d = dir.path();
        let mut env: Vec<(String, String)> = [
            (
                "TRIBUTARY_KAFKA__BROKERS",
                format!("127.0.0.1:{kafka_port}"),
            ),
            ("TRIBUTARY_MQTT__PORT", mqtt_port.to_string()),
            ("TRIBUTARY_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            (
                "TRIBUTARY_SIMULATOR__HTTP_URL",
                format!("http://127.0.0.1:{http_port}"),
            ),
            ("TRIBUTARY_LAKE__URL", d.join("lake").display().to_string()),
            ("TRIBUTARY_LAKE__FLUSH_INTERVAL_MS", "500".into()),
            // No time-series store unless a test starts one.
            ("TRIBUTARY_TIMESERIES__URL", String::new()),
            ("TRIBUTARY_REGISTRY__ADMIN_TOKEN", ADMIN_TOKEN.into()),
            (
                "TRIBUTARY_SIMULATOR__TOKENS_PATH",
                d.join("device-tokens.json").display().to_string(),
            ),
            (
                "TRIBUTARY_LOG",
                "info,rdkafka=warn,deltalake_core=error,buoyant_kernel=warn,datafusion=warn".into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let stack_env: Vec<(String, String)> = [
            ("STACK_DIR", d.join("stack").display().to_string()),
            ("KAFKA_PORT", kafka_port.to_string()),
            ("MQTT_PORT", mqtt_port.to_string()),
            ("STACK_VM", "0".into()),
            ("VM_PORT", vm_port.to_string()),
            ("S3_PORT", s3_port.to_string()),
            ("AM_PORT", am_port.to_string()),
            ("KAFKA_STORAGE", kafka_storage.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut stack = Stack {
            dir,
            kafka_port,
            mqtt_port,
            http_port,
            vm_port,
            s3_port,
            am_port,
            env: env.clone(),
            stack_env,
            children: Default::default(),
        };
        // Kafka first: devices are seeded on the registry topic, and Mosquitto needs their tokens.
        stack.service("up", &["tansu"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = stack.cmd(&["topics", "create"]).output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topics create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        stack.ok(&[
            "devices",
            "seed",
            "--count",
            &devices.to_string(),
            "--tenants",
            "3",
        ]);
        // MQTT users the broker knows but the registry does not.
        let plain = stack.dir.path().join("stack").join("mqtt-users.plain");
        let users: String = unregistered_mqtt_users
            .iter()
            .map(|(u, p)| format!("{u}:{p}\n"))
            .collect();
        std::fs::write(&plain, users).unwrap();
        stack.service("up", &["mosquitto"]);
        // What a user does: `eval "$(stack.sh env)"`.
        let out = Command::new("bash")
            .arg(repo().join("deploy/local/stack.sh"))
            .arg("env")
            .envs(stack.stack_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line
                .trim()
                .strip_prefix("export ")
                .and_then(|kv| kv.split_once('='))
                && k.starts_with("TRIBUTARY_MQTT__")
            {
                env.retain(|(key, _)| key != k);
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        stack.env = env;
        stack
    }

    /// `stack.sh up|down <services>`: stops or starts single services (e.g. the broker) mid-test.
    pub fn service(&self, action: &str, services: &[&str]) {
        let status = Command::new("bash")
            .arg(repo().join("deploy/local/stack.sh"))
            .arg(action)
            .args(services)
            .envs(self.stack_env.iter().map(|(k, v)| (k, v)))
            .status()
            .unwrap();
        assert!(status.success(), "stack.sh {action} {services:?} failed");
    }

    /// Starts VictoriaMetrics (`stack.sh up victoria-metrics`) and points `timeseries.url` at it.
    pub fn start_timeseries_store(&mut self) {
        self.service("up", &["victoria-metrics"]);
        let url = self.timeseries_url();
        self.set_env("TRIBUTARY_TIMESERIES__URL", &url);
    }

    /// Starts the S3-compatible store (`stack.sh up s3`) and moves the lake onto it:
    /// `s3://tributary-lake/lake`, its endpoint and credentials in `tributary.toml`.
    pub fn start_object_store(&mut self) {
        self.service("up", &["s3"]);
        let config = self.path().join("tributary.toml");
        let mut toml = std::fs::read_to_string(&config).unwrap_or_default();
        toml.push_str(&format!(
            "\n[lake.storage_options]\nAWS_ENDPOINT_URL = \"http://127.0.0.1:{}\"\n\
             AWS_ALLOW_HTTP = \"true\"\nAWS_REGION = \"us-east-1\"\n\
             AWS_ACCESS_KEY_ID = \"tributary-test\"\nAWS_SECRET_ACCESS_KEY = \"tributary-test-secret\"\n",
            self.s3_port
        ));
        std::fs::write(&config, toml).unwrap();
        self.set_env("TRIBUTARY_LAKE__URL", "s3://tributary-lake/lake");
    }

    /// Starts Alertmanager (`stack.sh up alertmanager`) and points `alerts.alertmanager_url` at it.
    pub fn start_alertmanager(&mut self) {
        self.service("up", &["alertmanager"]);
        let url = self.alertmanager_url();
        self.set_env("TRIBUTARY_ALERTS__ALERTMANAGER_URL", &url);
    }

    /// Alertmanager's base URL.
    pub fn alertmanager_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.am_port)
    }

    /// VictoriaMetrics' base URL.
    pub fn timeseries_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.vm_port)
    }

    /// Sets a configuration override (`TRIBUTARY_…`) for every later command.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// A `tributary` command configured for this stack.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out: Output = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tributary {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `tributary run` (every stage), logging to `<dir>/pipeline-N.log`.
    pub fn spawn_pipeline(&self, n: usize) -> Child {
        let child = self.spawn_stages(&[], &format!("pipeline-{n}"), &[]);
        self.wait_http();
        child
    }

    /// Starts `tributary run <stages…>` with extra `TRIBUTARY_…` settings, logging to
    /// `<dir>/<name>.log`; does not wait for it.
    pub fn spawn_stages(&self, stages: &[&str], name: &str, env: &[(&str, &str)]) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut args = vec!["run"];
        args.extend_from_slice(stages);
        let child = self
            .cmd(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.adopt(&child);
        child
    }

    fn adopt(&self, child: &Child) {
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
    }

    /// Starts the simulator in the background: `messages` messages at `rate` msg/s, in HTTP batches
    /// of 10, from 10 of the 20 seeded devices: 0..10 over MQTT, 10..20 over HTTP (a device sends
    /// on one channel; the same device on both at once makes conflicting readings). Its JSON
    /// summary is on the child's stdout.
    pub fn spawn_simulator(&self, via: &str, messages: u64, rate: u64, seed: &str) -> Child {
        let first = if via == "mqtt" { "0" } else { "10" };
        let (messages, rate) = (messages.to_string(), rate.to_string());
        self.spawn_simulate(&[
            "--via",
            via,
            "--first-device",
            first,
            "--devices",
            "10",
            "--messages",
            &messages,
            "--rate",
            &rate,
            "--batch",
            "10",
            "--seed",
            seed,
        ])
    }

    /// Starts a simulator on the seeded devices `first..first + devices` (a device sends on one
    /// channel: simulators running at once take disjoint ranges). Summary on the child's stdout.
    pub fn spawn_simulator_on(
        &self,
        via: &str,
        first: usize,
        devices: usize,
        messages: u64,
        rate: u64,
    ) -> Child {
        let (first, devices) = (first.to_string(), devices.to_string());
        let (messages, rate) = (messages.to_string(), rate.to_string());
        self.spawn_simulate(&[
            "--via",
            via,
            "--first-device",
            &first,
            "--devices",
            &devices,
            "--messages",
            &messages,
            "--rate",
            &rate,
            "--seed",
            "14",
        ])
    }

    /// `tributary simulate <args>`: summary on the child's stdout, its log in
    /// `<dir>/simulator-<via>-<first device>.log` (shown by [`Stack::logs`]).
    pub fn spawn_simulate(&self, args: &[&str]) -> Child {
        let arg = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .copied()
                .unwrap_or("0")
        };
        let log_name = format!("simulator-{}-{}.log", arg("--via"), arg("--first-device"));
        let log = std::fs::File::create(self.dir.path().join(log_name)).unwrap();
        let mut all = vec!["simulate"];
        all.extend_from_slice(args);
        let child = self
            .cmd(&all)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.adopt(&child);
        child
    }

    /// Waits for a simulator started by [`Stack::spawn_simulator`] and returns its summary. A
    /// simulator that cannot finish in 5 minutes (the pipeline never acks) fails the test, with
    /// every log of the test, instead of hanging it.
    pub fn finish_simulator(&self, mut child: Child) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the simulator did not finish within 5 minutes\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "simulator failed\n{}", self.logs());
        summary(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn wait_http(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.http_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "http ingest did not start: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL through the CLI and returns the rows as JSON objects.
    pub fn sql(&self, query: &str) -> Vec<Value> {
        let out = self.ok(&["sql", "--format", "json", query]);
        serde_json::from_str::<Vec<Value>>(out.trim())
            .unwrap_or_else(|e| panic!("bad JSON from sql: {e}: {out}"))
    }

    /// `SELECT count(*)` of a table, 0 when the table does not exist yet.
    pub fn count(&self, table: &str) -> u64 {
        let out = self
            .cmd(&[
                "sql",
                "--format",
                "json",
                &format!("SELECT count(*) AS n FROM {table}"),
            ])
            .output()
            .unwrap();
        if !out.status.success() {
            return 0;
        }
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.first().and_then(|r| r["n"].as_u64()).unwrap_or(0)
    }

    /// Waits until both tables hold at least the expected rows, then a little longer to catch extras.
    pub fn wait_for_rows(&self, telemetry: u64, deadletter: u64, timeout: Duration) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let (t, d) = (self.count("telemetry"), self.count("deadletter"));
            if (t >= telemetry && d >= deadletter) || Instant::now() > deadline {
                std::thread::sleep(Duration::from_secs(3));
                return (self.count("telemetry"), self.count("deadletter"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for the lake to settle and asserts it holds exactly the expected rows.
    pub fn assert_rows(&self, telemetry: u64, deadletter: u64, timeout: Duration, what: &str) {
        let (rows, dead) = self.wait_for_rows(telemetry, deadletter, timeout);
        assert_eq!(
            (rows, dead),
            (telemetry, deadletter),
            "{what}\n{}",
            self.logs()
        );
    }

    /// Every record of the `raw` topic (the source of truth), decoded, read to its end.
    pub fn raw_envelopes(&self) -> Vec<tributary_schemas::RawEnvelope> {
        self.records(&tributary_schemas::kafka::KafkaConfig::default().topics.raw)
    }

    /// Every record of `topic`, decoded.
    pub fn records<T: tributary_schemas::avro::TopicRecord>(&self, topic: &str) -> Vec<T> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let kafka = tributary_schemas::kafka::KafkaConfig {
            brokers: format!("127.0.0.1:{}", self.kafka_port),
            ..Default::default()
        };
        let reader: BaseConsumer = kafka.reader(&format!("test-{topic}")).create().unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut remaining = std::collections::HashMap::new();
        for p in 0..kafka.partitions {
            let (low, high) = reader
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            if high > low {
                remaining.insert(p, high);
            }
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        reader.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        // Tansu 0.6 reports a high watermark inside the last record batch (the records of that
        // batch past it exist and are served), so reading to the watermarks stops short: read on
        // until nothing came for 2 s after every partition reached its watermark.
        let mut last_record = Instant::now();
        while (!remaining.is_empty() || last_record.elapsed() < Duration::from_secs(2))
            && Instant::now() < deadline
        {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(500)) {
                last_record = Instant::now();
                if let Some(bytes) = m.payload() {
                    out.push(tributary_schemas::avro::decode(bytes).unwrap());
                }
                if remaining
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    remaining.remove(&m.partition());
                }
            }
        }
        out
    }

    /// Waits until the `usage` table meters exactly what `raw` holds (events and payload bytes per
    /// tenant and device), and asserts it does.
    pub fn assert_usage_matches_raw(&self, timeout: Duration) {
        let mut expected: std::collections::BTreeMap<(String, String), (u64, u64)> =
            Default::default();
        for e in self.raw_envelopes() {
            let t = expected.entry((e.tenant, e.device)).or_default();
            t.0 += 1;
            t.1 += e.payload.len() as u64;
        }
        let metered = || -> std::collections::BTreeMap<(String, String), (u64, u64)> {
            if self.count("usage") == 0 {
                return Default::default();
            }
            self.sql(
                "SELECT coalesce(tenant, '') AS tenant, device, sum(events) AS events, \
                 sum(bytes) AS bytes FROM usage GROUP BY 1, 2",
            )
            .into_iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                let n = |k: &str| r[k].as_u64().unwrap_or_default();
                ((s("tenant"), s("device")), (n("events"), n("bytes")))
            })
            .collect()
        };
        let deadline = Instant::now() + timeout;
        let mut got = metered();
        while got != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            got = metered();
        }
        assert!(!expected.is_empty());
        assert_eq!(
            got,
            expected,
            "usage = raw, per tenant and device\n{}",
            self.logs()
        );
    }

    /// Readings that appear more than once, by (tenant, device, event id, metric).
    pub fn duplicate_readings(&self) -> Value {
        self.sql(
            "SELECT count(*) AS n FROM (SELECT tenant, device, event_id, metric FROM telemetry \
             GROUP BY 1,2,3,4 HAVING count(*) > 1)",
        )[0]["n"]
            .clone()
    }

    pub fn secrets(&self) -> Vec<Value> {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("device-tokens.json")).unwrap())
            .unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Dumps the pipeline logs (for a failing assertion's context).
    /// The log of a process started by [`Stack::spawn_stages`].
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The last lines of every process log of this test.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        for path in logs {
            if let Ok(l) = std::fs::read_to_string(&path) {
                let tail: Vec<&str> = l.lines().rev().take(40).collect();
                s.push_str(&format!(
                    "--- {} (last lines)\n{}\n",
                    path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        s
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for pid in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("bash")
            .arg(repo().join("deploy/local/stack.sh"))
            .arg("down")
            .envs(self.stack_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .status();
        if std::env::var_os("KEEP_TEST_DIR").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

/// Parses the simulator's JSON summary (its last stdout line).
pub fn summary(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim().lines().last().unwrap_or("{}")).unwrap()
}

/// A number from a simulator summary.
pub fn field(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {summary}"))
}

/// Waits until new rows are landing in `telemetry` (up to 60 s), then `kill -9`s `child` and reaps it.
pub fn kill_9_while_landing(stack: &Stack, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let floor = stack.count("telemetry");
    while stack.count("telemetry") <= floor && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(700));
    let status = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
}

/// POSTs `body` with a bearer token; returns the status and the JSON answer (null if none).
pub fn post(url: &str, token: &str, content_type: &str, body: &str) -> (u16, Value) {
    request("POST", url, token, content_type, body)
}

/// An HTTP request with a bearer token; returns the status and the JSON answer (null if none).
pub fn request(
    method: &str,
    url: &str,
    token: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .request(method.parse().unwrap(), url)
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body.to_owned())
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    })
}

/// Polls `check` every 300 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Stops a child for good.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Publishes QoS 1 messages as one MQTT user, waits for every PUBACK and returns their reason codes;
/// `Err` when the connection failed (e.g. the broker refused the credentials).
pub fn try_mqtt_publish(
    port: u16,
    user: &str,
    password: &str,
    topic: &str,
    payloads: &[String],
) -> Result<Vec<PubAckReason>, String> {
    try_mqtt_publish_as(port, user, password, topic, payloads, None)
}

/// [`try_mqtt_publish`] with an MQTT 5 content type on every publish (e.g. SenML's).
pub fn try_mqtt_publish_as(
    port: u16,
    user: &str,
    password: &str,
    topic: &str,
    payloads: &[String],
    content_type: Option<&str>,
) -> Result<Vec<PubAckReason>, String> {
    let mut opts = MqttOptions::new(format!("test-{user}"), "127.0.0.1", port);
    opts.set_credentials(user, password);
    // Every publish is queued before the connection is polled: room for all of them.
    let (client, mut conn) = Client::new(opts, payloads.len() + 10);
    for p in payloads {
        let bytes = p.clone().into_bytes();
        match content_type {
            None => client.publish(topic, QoS::AtLeastOnce, false, bytes),
            Some(ct) => {
                let properties = PublishProperties {
                    content_type: Some(ct.to_owned()),
                    ..Default::default()
                };
                client.publish_with_properties(topic, QoS::AtLeastOnce, false, bytes, properties)
            }
        }
        .unwrap();
    }
    let mut acks = Vec::new();
    for event in conn.iter() {
        match event {
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                acks.push(ack.reason);
                if acks.len() == payloads.len() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => return Err(format!("mqtt error for {user}: {e}")),
        }
    }
    client.disconnect().ok();
    Ok(acks)
}

/// [`try_mqtt_publish`] that must connect.
pub fn mqtt_publish(
    port: u16,
    user: &str,
    password: &str,
    topic: &str,
    payloads: &[String],
) -> Vec<PubAckReason> {
    try_mqtt_publish(port, user, password, topic, payloads).unwrap_or_else(|e| panic!("{e}"))
}
