//! Anomaly → incident → Alertmanager latency at 10 000 readings/s with 1 % anomalous, on a private
//! local stack (Tansu's memory engine, Alertmanager) started by the project's own scripts:
//!
//! ```text
//! cargo bench --bench incidents                              # 10 000 readings/s for 30 s (after 5 s of warm-up)
//! cargo bench --bench incidents -- --rate 20000 --seconds 60
//! ```
//!
//! `tributary run anomalies incidents alerts` (a release build of this repository) with a
//! threshold detector, an `each` rule (every anomaly its own incident, so every anomaly has an
//! incident to time) and a `section` rule (≥ 3 devices of a section within 120 s) beside it as
//! load. The bench produces Avro readings of 2 000 devices to `telemetry` (each stamped with its
//! send time as event time); in each round of 2 000, the 20 devices of one residue mod 100 read
//! 90 °C (above the threshold), the others 60 °C, so 1 % of the readings open an anomaly and the
//! next round resolves it. Consumers outside the process follow `telemetry`, `anomalies` and
//! `incidents` from their ends, and Alertmanager is reached through a forwarding proxy in the
//! bench that notes when Alertmanager answered 200 for each incident's first post. Reported, in
//! the same run: the bare Kafka hop (reading produced → arrived at a bare consumer: the floor
//! of any stage), reading → anomaly, **anomaly → incident** on the topic (the incident stages:
//! routing, `incident-inputs`, correlation) and **incident → Alertmanager** (the alerts stage),
//! and reading → Alertmanager end to end; p50, p99, max.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use support::{Stack, free_port};
use tributary_schemas::avro::{self, Anomaly, AnomalyState, Incident, IncidentChange};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::{Micros, Reading, now_micros};

const DEVICES: u64 = 2_000;
const SECTIONS: u64 = 50;

const CONFIG: &str = r#"
[anomalies]
clock_grace_secs = 5
sweep_secs = 1

[anomalies.detectors.hot]
metric = "temperature"
kind = "threshold"
above = 80.0
clear_for_secs = 0
severity = "critical"

[incidents]
clock_grace_secs = 5
sweep_secs = 1

[incidents.rules.each]
correlate = "anomaly"
quiet_secs = 5

[incidents.rules.section]
correlate = "site"
level = 2
min_devices = 3
window_secs = 120
quiet_secs = 30

[alerts]
repost_secs = 60
"#;

struct Options {
    rate: u64,
    seconds: u64,
}

fn options() -> Options {
    let mut o = Options {
        rate: 10_000,
        seconds: 30,
    };
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        let value = || args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--rate" => o.rate = value().unwrap_or(o.rate),
            "--seconds" => o.seconds = value().unwrap_or(o.seconds),
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    o
}

fn reading(i: u64, now: Micros) -> Reading {
    let d = i % DEVICES;
    let round = i / DEVICES;
    let hot = d % 100 == round % 100;
    Reading {
        tenant: "tenant-1".into(),
        device: format!("device-{d:05}"),
        metric: "temperature".into(),
        value: if hot { 90.0 } else { 60.0 } + (i % 7) as f64 / 10.0,
        unit: Some("Cel".into()),
        original_value: None,
        original_unit: None,
        late: false,
        event_time: now,
        ingest_time: now,
        event_id: format!("m-{i}"),
        source_topic: "raw".into(),
        source_partition: 0,
        source_offset: i as i64,
        source_index: 0,
        measurement: Some(0),
        name: None,
        conflict: false,
        device_group: Some("pumps".into()),
        device_model: None,
        site: vec!["hall-1".into(), format!("section-{}", d % SECTIONS)],
    }
}

/// What the consumers and the proxy saw, in wall-clock microseconds.
#[derive(Default)]
struct Seen {
    /// Bare hop: reading sent → arrived.
    hops: Vec<i64>,
    /// Anomaly id → (arrived, the reading's event time).
    anomalies: HashMap<String, (Micros, Micros)>,
    /// `each` incident id → (arrived, its anomaly's id).
    incidents: HashMap<String, (Micros, String)>,
    /// Incident id → Alertmanager answered 200 to its first post.
    alertmanager: HashMap<String, Micros>,
}

type Shared = Arc<Mutex<Seen>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct Proxy {
    client: reqwest::Client,
    upstream: String,
    seen: Shared,
}

/// `POST /api/v2/alerts`, forwarded to Alertmanager; on its 200, each alert's `incident_id` is
/// noted (first time only).
async fn forward(State(p): State<Proxy>, body: Bytes) -> StatusCode {
    let alerts: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap_or_default();
    let answer = p
        .client
        .post(format!("{}/api/v2/alerts", p.upstream))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let status = match answer {
        Ok(r) => r.status().as_u16(),
        Err(_) => 502,
    };
    if status == 200 {
        let at = now_micros();
        let mut seen = lock(&p.seen);
        for a in alerts {
            if let Some(id) = a["labels"]["incident_id"].as_str() {
                seen.alertmanager.entry(id.to_owned()).or_insert(at);
            }
        }
    }
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn from_end(kafka: &KafkaConfig, topic: &str, name: &str) -> StreamConsumer {
    let consumer: StreamConsumer = kafka
        .reader(name)
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..kafka.partitions {
        tpl.add_partition_offset(topic, p, Offset::End)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Follows `consumer` until `stop`, handing each payload and its arrival time to `each`.
async fn follow(
    consumer: StreamConsumer,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut each: impl FnMut(&[u8], Micros),
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Ok(Ok(m)) => {
                let at = now_micros();
                if let Some(p) = m.payload() {
                    each(p, at);
                }
            }
            Ok(Err(e)) => panic!("consumer: {e}"),
            Err(_) => {}
        }
    }
}

fn quantiles(mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return "no samples".to_owned();
    }
    v.sort_unstable();
    let q = |f: f64| v[((v.len() as f64 - 1.0) * f).round() as usize] as f64 / 1000.0;
    format!(
        "{:>7} samples: p50 {:>6.1} ms, p99 {:>6.1} ms, max {:>6.1} ms",
        v.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    )
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut stack = Stack::start_with_storage(3, &[], "memory://tansu/");
    stack.start_alertmanager();
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{}", stack.kafka_port),
        ..KafkaConfig::default()
    };
    let config = stack.path().join("incidents.toml");
    std::fs::write(&config, CONFIG).expect("config");
    stack.set_env("TRIBUTARY_CONFIG", &config.display().to_string());

    let seen: Shared = Arc::default();
    let proxy_port = free_port();
    let proxy = Proxy {
        client: reqwest::Client::new(),
        upstream: stack.alertmanager_url(),
        seen: seen.clone(),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _entered = runtime.enter();
    runtime.spawn(async move {
        let app = axum::Router::new()
            .route("/api/v2/alerts", axum::routing::post(forward))
            .with_state(proxy);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", proxy_port))
            .await
            .expect("proxy port");
        axum::serve(listener, app).await.expect("proxy");
    });

    // Consumers from the topics' ends, before anything is produced.
    let topics = &kafka.topics;
    let telemetry = from_end(&kafka, &topics.telemetry, "bench-hop");
    let anomalies = from_end(&kafka, &topics.anomalies, "bench-anomalies");
    let incidents = from_end(&kafka, &topics.incidents, "bench-incidents");
    let mut followers = Vec::new();
    {
        let s = seen.clone();
        followers.push(runtime.spawn(follow(telemetry, stop.clone(), move |p, at| {
            if let Ok(r) = avro::decode::<Reading>(p) {
                lock(&s).hops.push(at - r.event_time);
            }
        })));
        let s = seen.clone();
        followers.push(runtime.spawn(follow(anomalies, stop.clone(), move |p, at| {
            if let Ok(a) = avro::decode::<Anomaly>(p)
                && a.state == AnomalyState::Open
            {
                lock(&s)
                    .anomalies
                    .entry(a.anomaly_id)
                    .or_insert((at, a.start_time));
            }
        })));
        let s = seen.clone();
        followers.push(runtime.spawn(follow(incidents, stop.clone(), move |p, at| {
            if let Ok(i) = avro::decode::<Incident>(p)
                && i.change == IncidentChange::Open
                && i.rule == "each"
                && let Some(member) = i.members.first()
            {
                lock(&s)
                    .incidents
                    .entry(i.incident_id)
                    .or_insert((at, member.clone()));
            }
        })));
    }

    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let mut pipeline = stack.spawn_stages(
        &["anomalies", "incidents", "alerts"],
        "incidents-bench",
        &[("TRIBUTARY_ALERTS__ALERTMANAGER_URL", &proxy_url)],
    );
    // The stages hold their partitions once their groups have joined: the time that takes here.
    std::thread::sleep(Duration::from_secs(20));

    let warmup: u64 = 5;
    println!(
        "incidents bench: {} readings/s of {DEVICES} devices (1 % anomalous) for {} s after {warmup} s of warm-up → anomalies → incidents → Alertmanager",
        o.rate, o.seconds
    );
    let measured_from = now_micros() + warmup as i64 * 1_000_000;
    let produced = runtime.block_on(async {
        let producer: FutureProducer = kafka
            .producer("bench-readings")
            .set("enable.idempotence", "false")
            .set("linger.ms", "1")
            .create()
            .expect("producer");
        let tick = Duration::from_millis(10);
        let per_tick = (o.rate / 100).max(1);
        let started = Instant::now();
        let mut next = started;
        let mut i = 0u64;
        let mut pending = Vec::new();
        while started.elapsed() < Duration::from_secs(o.seconds + warmup) {
            let now = now_micros();
            for _ in 0..per_tick {
                let r = reading(i, now);
                let bytes = avro::encode(&r).expect("encode");
                let partition = ((i % DEVICES) as i32) % kafka.partitions;
                let p = producer.clone();
                let topic = kafka.topics.telemetry.clone();
                pending.push(tokio::spawn(async move {
                    p.send(
                        FutureRecord::to(&topic)
                            .key(&r.device)
                            .partition(partition)
                            .payload(&bytes),
                        Duration::from_secs(60),
                    )
                    .await
                    .is_ok()
                }));
                i += 1;
            }
            next += tick;
            tokio::time::sleep_until(next.into()).await;
        }
        let mut ok = 0u64;
        for p in pending {
            ok += u64::from(p.await.unwrap_or(false));
        }
        (i, ok, started.elapsed().as_secs_f64())
    });
    println!(
        "produced          {} readings ({} acked) in {:.1} s: {:.0}/s",
        produced.0,
        produced.1,
        produced.2,
        produced.0 as f64 / produced.2
    );
    // Let the last anomalies reach Alertmanager.
    std::thread::sleep(Duration::from_secs(15));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in followers {
        let _ = runtime.block_on(f);
    }
    support::kill(&mut pipeline);

    let seen = lock(&seen);
    let hops = seen.hops.clone();
    let by_member: HashMap<&str, (&str, Micros)> = seen
        .incidents
        .iter()
        .map(|(iid, (at, member))| (member.as_str(), (iid.as_str(), *at)))
        .collect();
    let mut to_anomaly = Vec::new();
    let mut to_incident = Vec::new();
    let mut to_am = Vec::new();
    let mut end_to_end = Vec::new();
    for (_, &(arrived, event_time)) in seen.anomalies.iter() {
        if event_time >= measured_from {
            to_anomaly.push(arrived - event_time);
        }
    }
    let mut measured = 0usize;
    let mut without_incident = 0usize;
    for (id, &(arrived, event_time)) in seen.anomalies.iter() {
        if event_time < measured_from {
            continue;
        }
        measured += 1;
        let Some(&(iid, at)) = by_member.get(id.as_str()) else {
            without_incident += 1;
            continue;
        };
        to_incident.push(at - arrived);
        if let Some(am) = seen.alertmanager.get(iid) {
            to_am.push(am - at);
            end_to_end.push(am - event_time);
        }
    }
    println!(
        "kafka hop         {}  (reading produced → bare consumer: the floor)",
        quantiles(hops)
    );
    println!("reading → anomaly {}", quantiles(to_anomaly));
    println!(
        "anomaly → incident{}  (on the topic; {without_incident} of {measured} anomalies without an incident)",
        quantiles(to_incident)
    );
    println!(
        "incident → AM     {}  (Alertmanager answered 200 to the first post)",
        quantiles(to_am)
    );
    println!("reading → AM      {}", quantiles(end_to_end));
}
