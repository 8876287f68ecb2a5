//! `tributary simulate`: devices sending plausible telemetry over MQTT or HTTP, with a few malformed
//! messages and duplicates (the same message id sent twice). As real devices do, each simulated
//! device sends on one channel (give two simulators running at once different `--first-device`s)
//! and its event times strictly increase (one millisecond apart at least), so no two of its
//! readings of a metric share an instant. It keeps exact count of what the lake
//! should end up holding and prints it as JSON, so a run can be checked end to end. With
//! `--anomalies` it sends a labelled fleet instead (`tributary_streams::labelled`): anomalies of
//! every detector kind at known event times, backfilled, with the labels written to a file. With
//! `--failures` it lays its devices out in zones and sections (through the admin API) and breaks
//! them together (`tributary_streams::failures`): sections, pumps and lone overheats, backfilled,
//! with the incidents they should give written to a file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;
use serde_json::json;

use tributary_schemas::Micros;
use tributary_streams::failures::FailureFleet;
use tributary_streams::labelled::{Fleet, LabelledFleet};

use crate::config::Config;
use crate::devices::{AdminClient, DeviceSecret, load_secrets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Mqtt,
    Http,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Number of devices (taken from the seeded registry).
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Only the seeded devices of this tenant (`--first-device` and `--devices` count among them).
    #[arg(long)]
    pub tenant: Option<String>,
    /// The first of the seeded devices to use (0-based): simulators running at once over MQTT
    /// and HTTP take disjoint ranges, as a device sends on one channel.
    #[arg(long, default_value_t = 0)]
    pub first_device: usize,
    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// How long to send, e.g. 30s, 2m (ignored when --messages is given).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Send exactly this many distinct messages instead of running for --duration.
    #[arg(long)]
    pub messages: Option<u64>,
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Share of messages that are malformed (bad JSON over MQTT; non-numeric or NaN values).
    #[arg(long, default_value_t = 0.02)]
    pub malformed: f64,
    /// Share of messages sent a second time with the same message id.
    #[arg(long, default_value_t = 0.02)]
    pub duplicates: f64,
    /// Messages per HTTP request (one device per request).
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// HTTP requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Random seed (values, which messages are malformed or duplicated; where labelled anomalies
    /// go).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Send labelled anomalies of every detector kind (`tributary_streams::labelled`: seven
    /// metrics per device, episodes at known times) instead of the plain signals: `--duration` of
    /// event time (an hour at least) ending now, one message per device every `--step`, as fast as `--rate` allows
    /// (a backfill); no malformed messages or duplicates. The labels go to `--labels`.
    #[arg(long)]
    pub anomalies: bool,
    /// Send correlated failures (`tributary_streams::failures`: temperature and pressure, the
    /// devices of one tenant laid out in zones and sections through the admin API, sections,
    /// pumps and lone devices failing at known times) instead of the plain signals: `--duration`
    /// of event time (90 minutes at least) ending now, backfilled like `--anomalies`. The
    /// expected incidents go to `--labels`.
    #[arg(long, conflicts_with = "anomalies")]
    pub failures: bool,
    /// With `--failures`: devices per section (at least 4).
    #[arg(long, default_value_t = 8)]
    pub per_section: usize,
    /// With `--anomalies` or `--failures`: event time between a device's messages, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub step: Duration,
    /// With `--anomalies`: write the labels here (JSON lines: device, metric, kind, start, end in
    /// RFC 3339). With `--failures`: the failures and the incident each should give (JSON lines:
    /// kind, rule, scope, devices, start, end).
    #[arg(long)]
    pub labels: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a duration we can wait"))
}

/// What was sent and what the lake should hold because of it.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub via: Option<Via>,
    pub run_id: String,
    /// Distinct messages.
    pub messages: u64,
    /// Messages sent again with the same id.
    pub duplicates: u64,
    pub malformed: u64,
    /// Rows `telemetry` should gain.
    pub expected_readings: u64,
    /// Rows `deadletter` should gain.
    pub expected_dead_letters: u64,
    /// Messages acknowledged (after Kafka acknowledged them), duplicates included.
    pub acked: u64,
    pub retries: u64,
    pub elapsed_secs: f64,
    pub acked_per_sec: f64,
}

/// One generated message.
struct Generated {
    body: Vec<u8>,
    readings: u64,
    dead_letters: u64,
    malformed: bool,
}

struct DeviceModel {
    secret: DeviceSecret,
    seq: u64,
    phase: f64,
    battery: f64,
    last: Option<Vec<u8>>,
    /// The event time of its latest message (ms): the next is later.
    last_time: i64,
}

struct Generator {
    rng: StdRng,
    run_id: String,
    malformed: f64,
    duplicates: f64,
    allow_bad_json: bool,
}

impl Generator {
    /// The next message of a device, or a duplicate of its previous one (`None` readings then).
    fn next(&mut self, d: &mut DeviceModel) -> (Vec<u8>, Option<Generated>) {
        if let Some(last) = &d.last
            && self.rng.random_bool(self.duplicates.clamp(0.0, 1.0))
        {
            let dup = last.clone();
            d.last = None;
            return (dup, None);
        }
        d.seq += 1;
        let id = format!("{}-{}-{}", self.run_id, d.secret.device, d.seq);
        let now = chrono::Utc::now().timestamp_millis();
        d.last_time = now.max(d.last_time.saturating_add(1));
        let t = chrono::DateTime::from_timestamp_millis(d.last_time).unwrap_or_default();
        let secs = t.timestamp() as f64;
        let temperature =
            20.0 + 4.0 * ((secs / 600.0) + d.phase).sin() + self.rng.random_range(-0.3..0.3);
        let humidity =
            45.0 + 10.0 * ((secs / 900.0) + d.phase).cos() + self.rng.random_range(-1.0..1.0);
        d.battery = (d.battery - self.rng.random_range(0.0..0.0005)).max(3.2);
        let round = |v: f64| (v * 100.0).round() / 100.0;
        let time = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let malformed = self.rng.random_bool(self.malformed.clamp(0.0, 1.0));
        let generated = if !malformed {
            let body = json!({"id": id, "time": time, "metrics": {
                "temperature": {"value": round(temperature), "unit": "Cel"},
                "humidity": {"value": round(humidity), "unit": "%RH"},
                "battery_voltage": {"value": round(d.battery), "unit": "V"}}});
            Generated {
                body: body.to_string().into_bytes(),
                readings: 3,
                dead_letters: 0,
                malformed: false,
            }
        } else {
            match self.rng.random_range(0..if self.allow_bad_json { 3 } else { 2 }) {
                0 => Generated {
                    body: json!({"id": id, "time": time, "metrics": {"temperature": "hot", "humidity": round(humidity)}})
                        .to_string()
                        .into_bytes(),
                    readings: 1,
                    dead_letters: 1,
                    malformed: true,
                },
                1 => Generated {
                    body: json!({"id": id, "time": time, "metrics": {"temperature": "NaN", "battery_voltage": round(d.battery)}})
                        .to_string()
                        .into_bytes(),
                    readings: 1,
                    dead_letters: 1,
                    malformed: true,
                },
                _ => Generated {
                    body: format!("{{\"id\":\"{id}\",\"metrics\":{{\"temperature\":").into_bytes(),
                    readings: 0,
                    dead_letters: 1,
                    malformed: true,
                },
            }
        };
        // Only well-formed JSON can be deduplicated by id, so only it is ever sent twice.
        d.last = (generated.readings > 0).then(|| generated.body.clone());
        (generated.body.clone(), Some(generated))
    }
}

/// Where the messages come from, in sending order: the device's index and its message.
enum MessageSource {
    /// The plain signals: `per_device` messages of a device (an HTTP batch), then the next one.
    Plain {
        generator: Box<Generator>,
        per_device: usize,
        i: usize,
    },
    /// A fleet of known ground truth, in event-time order (HTTP: `per_device` steps of a device at
    /// a time).
    Labelled {
        fleet: Box<dyn Fleet>,
        order: Vec<(usize, u64)>,
        next: usize,
        run_id: String,
    },
}

impl MessageSource {
    fn labelled(fleet: Box<dyn Fleet>, per_device: usize, run_id: String) -> Self {
        let per_device = per_device.max(1) as u64;
        let mut order: Vec<(usize, u64)> = (0..fleet.steps())
            .flat_map(|i| (0..fleet.devices()).map(move |d| (d, i)))
            .filter(|&(d, i)| fleet.readings(d, i).is_some())
            .collect();
        order.sort_by_key(|&(d, i)| (i / per_device, d, i));
        Self::Labelled {
            fleet,
            order,
            next: 0,
            run_id,
        }
    }

    /// The next message, or `None` when `done` (plain) or the fleet has sent all (labelled).
    fn next(
        &mut self,
        devices: &mut [DeviceModel],
        done: bool,
    ) -> Option<(usize, Vec<u8>, Option<Generated>)> {
        match self {
            Self::Plain {
                generator,
                per_device,
                i,
            } => {
                if done {
                    return None;
                }
                let k = (*i / (*per_device).max(1)) % devices.len();
                *i += 1;
                let (body, g) = generator.next(&mut devices[k]);
                Some((k, body, g))
            }
            Self::Labelled {
                fleet,
                order,
                next,
                run_id,
            } => {
                let &(d, i) = order.get(*next)?;
                *next += 1;
                let (t, values) = fleet.readings(d, i)?;
                let time = chrono::DateTime::from_timestamp_micros(t)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let readings = values.len() as u64;
                let metrics: serde_json::Map<String, serde_json::Value> = values
                    .into_iter()
                    .map(|(m, v)| (m.to_owned(), json!((v * 1000.0).round() / 1000.0)))
                    .collect();
                let body = json!({"id": format!("{run_id}-{}-{i}", fleet.device(d)), "time": time, "metrics": metrics});
                let body = body.to_string().into_bytes();
                let g = Generated {
                    body: body.clone(),
                    readings,
                    dead_letters: 0,
                    malformed: false,
                };
                Some((d, body, Some(g)))
            }
        }
    }
}

fn rfc3339(t: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(t)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Writes the fleet's labels as JSON lines.
fn write_labels(fleet: &LabelledFleet, path: &std::path::Path) -> anyhow::Result<()> {
    let mut out = String::new();
    for l in fleet.labels() {
        out.push_str(&serde_json::to_string(&json!({
            "device": l.device,
            "metric": l.metric,
            "kind": l.kind.as_str(),
            "start": rfc3339(l.start),
            "end": rfc3339(l.end),
        }))?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Writes the failures and the incident each should give as JSON lines.
fn write_failures(fleet: &FailureFleet, path: &std::path::Path) -> anyhow::Result<()> {
    let mut out = String::new();
    for f in fleet.failures() {
        let (start, end) = f.span();
        let (rule, scope) = f.expected(fleet).unzip();
        let mut devices: Vec<&str> = f.hot.iter().map(|h| fleet.device(h.0)).collect();
        devices.sort_unstable();
        out.push_str(&serde_json::to_string(&json!({
            "kind": f.kind.as_str(),
            "rule": rule,
            "scope": scope,
            "section": f.section,
            "devices": devices,
            "start": rfc3339(start),
            "end": rfc3339(end),
        }))?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Puts each device of `fleet` at its site through the admin API.
async fn lay_out(config: &Config, fleet: &FailureFleet) -> anyhow::Result<()> {
    let api = AdminClient::new(config)?;
    for d in 0..fleet.devices() {
        let path = format!("/v1/devices/{}", fleet.device(d));
        api.call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"site": fleet.site(d)})),
        )
        .await
        .with_context(|| format!("placing device {} at its site", fleet.device(d)))?;
    }
    tracing::info!(
        devices = fleet.devices(),
        failures = fleet.failures().len(),
        "devices laid out in zones and sections"
    );
    Ok(())
}

pub async fn run(config: &Config, args: SimulateArgs) -> anyhow::Result<()> {
    let mut secrets = load_secrets(&config.simulator.tokens_path)?;
    if let Some(tenant) = &args.tenant {
        secrets.retain(|s| &s.tenant == tenant);
        anyhow::ensure!(!secrets.is_empty(), "no seeded device of tenant `{tenant}`");
    }
    anyhow::ensure!(
        args.devices >= 1 && args.first_device.saturating_add(args.devices) <= secrets.len(),
        "--first-device + --devices must be at most {} (the seeded devices), --devices at least 1",
        secrets.len()
    );
    anyhow::ensure!(
        args.rate.is_finite() && args.rate >= 0.001,
        "--rate must be at least 0.001 messages per second"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let run_id = format!("r{:08x}", rng.random::<u32>());
    let mut devices: Vec<DeviceModel> = secrets
        .into_iter()
        .skip(args.first_device)
        .take(args.devices)
        .map(|secret| DeviceModel {
            secret,
            seq: 0,
            phase: rng.random_range(0.0..std::f64::consts::TAU),
            battery: rng.random_range(3.7..4.2),
            last: None,
            last_time: 0,
        })
        .collect();
    let per_device = if args.via == Via::Http { args.batch } else { 1 };
    let event_time_from = |secs: u64| {
        tributary_schemas::now_micros().saturating_sub(tributary_schemas::micros_of_secs(secs))
    };
    let mut source = if args.failures {
        let tenants: std::collections::BTreeSet<&str> =
            devices.iter().map(|d| d.secret.tenant.as_str()).collect();
        anyhow::ensure!(
            tenants.len() == 1,
            "--failures breaks the sections of one tenant: pass --tenant (the devices are of {tenants:?})"
        );
        let names: Vec<String> = devices.iter().map(|d| d.secret.device.clone()).collect();
        let secs = args.duration.as_secs().max(5400);
        let fleet = FailureFleet::new(
            &names,
            args.per_section,
            seed,
            event_time_from(secs),
            secs,
            args.step.as_secs().max(1),
        );
        anyhow::ensure!(
            !fleet.failures().is_empty(),
            "--failures needs a zone: at least {} devices ({} sections of --per-section {})",
            tributary_streams::failures::SECTIONS * args.per_section.max(4),
            tributary_streams::failures::SECTIONS,
            args.per_section.max(4)
        );
        lay_out(config, &fleet).await?;
        if let Some(path) = &args.labels {
            write_failures(&fleet, path)?;
        }
        MessageSource::labelled(Box::new(fleet), per_device, run_id.clone())
    } else if args.anomalies {
        let names: Vec<String> = devices.iter().map(|d| d.secret.device.clone()).collect();
        // At least an hour: the warm-up and one episode.
        let secs = args.duration.as_secs().max(3600);
        let fleet = LabelledFleet::new(
            &names,
            seed,
            event_time_from(secs),
            secs,
            args.step.as_secs().max(1),
        );
        if let Some(path) = &args.labels {
            write_labels(&fleet, path)?;
        }
        MessageSource::labelled(Box::new(fleet), per_device, run_id.clone())
    } else {
        anyhow::ensure!(
            args.labels.is_none(),
            "--labels needs --anomalies or --failures"
        );
        MessageSource::Plain {
            generator: Box::new(Generator {
                rng,
                run_id: run_id.clone(),
                malformed: args.malformed,
                duplicates: args.duplicates,
                allow_bad_json: args.via == Via::Mqtt,
            }),
            per_device,
            i: 0,
        }
    };
    let mut summary = Summary {
        via: Some(args.via),
        run_id,
        ..Default::default()
    };
    let acked = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let total = args.messages;
    let deadline = started
        .checked_add(args.duration)
        .context("--duration is too long")?;
    let done = |summary: &Summary| match total {
        Some(n) => summary.messages >= n,
        // A labelled run ends when the fleet has sent everything.
        None => !(args.anomalies || args.failures) && Instant::now() >= deadline,
    };
    let mut sent_units = 0u64;
    let pace = |units: u64| {
        let wait = Duration::try_from_secs_f64(units as f64 / args.rate).unwrap_or(Duration::MAX);
        started.checked_add(wait).unwrap_or(deadline)
    };
    let record = |summary: &mut Summary, g: &Option<Generated>| match g {
        Some(g) => {
            summary.messages += 1;
            summary.expected_readings += g.readings;
            summary.expected_dead_letters += g.dead_letters;
            summary.malformed += u64::from(g.malformed);
        }
        None => summary.duplicates += 1,
    };

    // A line every 10 s, so a run that stalls shows where (nothing acked, or only retries).
    let progress = {
        let (acked, retries) = (acked.clone(), retries.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                tracing::info!(
                    acked = acked.load(Ordering::Relaxed),
                    retries = retries.load(Ordering::Relaxed),
                    elapsed_secs = started.elapsed().as_secs(),
                    "simulator progress"
                );
            }
        })
    };
    match args.via {
        Via::Http => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?;
            let url = format!(
                "{}/v1/telemetry",
                config.simulator.http_url.trim_end_matches('/')
            );
            let (tx, rx) = async_channel(args.concurrency * 2);
            let mut workers = Vec::new();
            for _ in 0..args.concurrency.max(1) {
                let rx = rx.clone();
                let client = client.clone();
                let url = url.clone();
                let acked = acked.clone();
                let retries = retries.clone();
                workers.push(tokio::spawn(async move {
                    while let Ok((token, body, n)) = rx.recv().await {
                        post_until_accepted(&client, &url, &token, body, &retries).await?;
                        acked.fetch_add(n, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                }));
            }
            // One device per request: consecutive messages of one device, up to --batch.
            let mut carry = None;
            while let Some((k, body, g)) = carry
                .take()
                .or_else(|| source.next(&mut devices, done(&summary)))
            {
                record(&mut summary, &g);
                let mut lines = body;
                lines.push(b'\n');
                let mut n = 1u64;
                while n < args.batch.max(1) as u64 {
                    match source.next(&mut devices, done(&summary)) {
                        Some((same, body, g)) if same == k => {
                            record(&mut summary, &g);
                            lines.extend_from_slice(&body);
                            lines.push(b'\n');
                            n += 1;
                        }
                        other => {
                            carry = other;
                            break;
                        }
                    }
                }
                sent_units += n;
                tokio::time::sleep_until(pace(sent_units).into()).await;
                tx.send((devices[k].secret.token.clone(), lines, n))
                    .await
                    .context("http workers stopped")?;
            }
            drop(tx);
            for w in workers {
                w.await??;
            }
        }
        Via::Mqtt => {
            let mut clients = Vec::new();
            let published_acked = acked.clone();
            for (n, d) in devices.iter().enumerate() {
                let mut opts = MqttOptions::new(
                    format!("sim-{}-{}", summary.run_id, n),
                    &config.mqtt.host,
                    config.mqtt.port,
                );
                opts.set_credentials(d.secret.device.clone(), d.secret.token.clone());
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut eventloop) = AsyncClient::new(opts, 1000);
                let acked = published_acked.clone();
                let retries = retries.clone();
                tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                                tracing::warn!(reason = ?d.reason_code, "broker disconnected a simulated device");
                            }
                            Ok(_) => {}
                            Err(e) => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "simulated device connection error");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                });
                clients.push(client);
            }
            let mut published = 0u64;
            while let Some((k, body, g)) = source.next(&mut devices, done(&summary)) {
                record(&mut summary, &g);
                sent_units += 1;
                tokio::time::sleep_until(pace(sent_units).into()).await;
                clients[k]
                    .publish(
                        config.mqtt.device_topic(&devices[k].secret.device),
                        QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await
                    .context("publishing")?;
                published += 1;
            }
            let wait_until = Instant::now() + Duration::from_secs(120);
            while acked.load(Ordering::Relaxed) < published && Instant::now() < wait_until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::ensure!(
                acked.load(Ordering::Relaxed) >= published,
                "only {} of {published} MQTT publishes were acknowledged by the broker",
                acked.load(Ordering::Relaxed)
            );
            for c in clients {
                c.disconnect().await.ok();
            }
        }
    }
    progress.abort();
    summary.acked = acked.load(Ordering::Relaxed);
    summary.retries = retries.load(Ordering::Relaxed);
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    summary.acked_per_sec = summary.acked as f64 / summary.elapsed_secs.max(1e-9);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

type Job = (String, Vec<u8>, u64);

/// A tiny multi-consumer queue over a tokio mutex (requests are big; the lock is not hot).
fn async_channel(cap: usize) -> (tokio::sync::mpsc::Sender<Job>, SharedReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (tx, SharedReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

#[derive(Clone)]
struct SharedReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Job>>>);

impl SharedReceiver {
    async fn recv(&self) -> Result<Job, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Posts until the ingest answers 202, as a device with at-least-once delivery does. Retries on
/// connection errors, 429 and 5xx; any other answer is an error.
async fn post_until_accepted(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Vec<u8>,
    retries: &AtomicU64,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    let give_up = Instant::now() + Duration::from_secs(180);
    loop {
        let result = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => return Ok(()),
            Ok(r)
                if r.status().is_server_error()
                    || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::debug!(status = %r.status(), "ingest asked to retry");
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                anyhow::bail!("ingest answered {status}: {text}");
            }
            Err(e) => tracing::debug!(error = %e, "ingest unreachable; retrying"),
        }
        retries.fetch_add(1, Ordering::Relaxed);
        anyhow::ensure!(
            Instant::now() < give_up,
            "ingest did not accept a request for 180 s"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert!(parse_duration("soon").is_err());
    }
}
