//! The time-series sink: drains `telemetry` into a time-series store over the InfluxDB 2 write API
//! (`POST /api/v2/write`, InfluxDB line protocol), spoken by InfluxDB 2 and 3 and VictoriaMetrics.
//!
//! - Points are batched by count (`timeseries.batch_points`) and time (`timeseries.flush_interval_ms`),
//!   gzip-compressed, and written with retries and exponential backoff.
//! - Kafka offsets are committed only after the store acknowledged the batch: a store that is down
//!   for minutes loses nothing; while it is down the sink keeps its consumer-group membership
//!   (partitions paused, the consumer polled) and the backlog drains when the store returns.
//! - Delivery is at least once; a point is its series and timestamp, so a batch written twice (after
//!   a crash, a retry or a rebalance) leaves the store as if written once.
//! - A batch the store refuses as malformed (HTTP 400/422) is written point by point; each point
//!   still refused goes to `deadletter` (stage `timeseries`, rule `store_rejected`) with the store's
//!   answer, its line and its `telemetry` position. Undecodable `telemetry` records are skipped here:
//!   the Delta sink of `telemetry` dead-letters them.
//!
//! Why not the `influxdb2` crate: its last release is from 2024-07 and it pins reqwest 0.11 (with
//! advisories against its dependencies); the write API is one POST, which `reqwest` (maintained, and
//! already in the build through `object_store`) speaks directly.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tributary_schemas::avro::decode;
use tributary_schemas::kafka::{KafkaConfig, RecordingContext};
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::{DeadLetter, Reading, now_micros};
use tributary_streams::runtime::{self, StageConsumer};

use crate::line_protocol::{push_point, series_key};
use crate::{LakeError, rewind};

/// Errors of the time-series sink's configuration.
#[derive(Debug, thiserror::Error)]
pub enum TimeSeriesError {
    #[error("timeseries.url `{url}` is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("HTTP client: {0}")]
    Client(String),
}

/// `[timeseries]` in the config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeSeriesConfig {
    /// Base URL of an InfluxDB-2-compatible write API (VictoriaMetrics, InfluxDB 2/3); empty: no
    /// time-series sink.
    pub url: String,
    /// InfluxDB organisation (`org`); VictoriaMetrics ignores it.
    pub org: String,
    /// InfluxDB bucket (`bucket`); VictoriaMetrics ignores it.
    pub bucket: String,
    /// InfluxDB API token, sent as `Authorization: Token …`. Never logged.
    pub token: Option<String>,
    /// HTTP Basic user (VictoriaMetrics' `-httpAuth.username`), with `password`.
    pub username: Option<String>,
    /// HTTP Basic password. Never logged.
    pub password: Option<String>,
    /// The measurement of every point.
    pub measurement: String,
    /// A batch is written when it holds this many points…
    pub batch_points: usize,
    /// …or when its oldest point waited this long (milliseconds).
    pub flush_interval_ms: u64,
    /// Compress request bodies with gzip.
    pub gzip: bool,
    /// Timeout of one write request (milliseconds).
    pub request_timeout_ms: u64,
    /// Longest pause between two attempts at a batch (milliseconds); pauses double from 200 ms.
    pub max_backoff_ms: u64,
}

impl std::fmt::Debug for TimeSeriesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeSeriesConfig")
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("measurement", &self.measurement)
            .field("batch_points", &self.batch_points)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("gzip", &self.gzip)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .finish()
    }
}

impl Default for TimeSeriesConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8428".into(),
            org: "tributary".into(),
            bucket: "telemetry".into(),
            token: None,
            username: None,
            password: None,
            measurement: "telemetry".into(),
            batch_points: 20_000,
            flush_interval_ms: 1_000,
            gzip: true,
            request_timeout_ms: 10_000,
            max_backoff_ms: 30_000,
        }
    }
}

impl TimeSeriesConfig {
    /// Whether a time-series store is configured.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The write endpoint: `<url>/api/v2/write?org=…&bucket=…&precision=us`.
    pub fn write_url(&self) -> Result<url::Url, TimeSeriesError> {
        let bad = |reason: String| TimeSeriesError::BadUrl {
            url: self.url.clone(),
            reason,
        };
        let base = url::Url::parse(&self.url).map_err(|e| bad(e.to_string()))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(bad(format!(
                "scheme `{}` is not supported; allowed: http, https",
                base.scheme()
            )));
        }
        let mut write = base.join("api/v2/write").map_err(|e| bad(e.to_string()))?;
        if !base.path().ends_with('/') && base.path() != "/" {
            // `http://host/influx` means `http://host/influx/api/v2/write`.
            write.set_path(&format!("{}/api/v2/write", base.path()));
        }
        write
            .query_pairs_mut()
            .append_pair("org", &self.org)
            .append_pair("bucket", &self.bucket)
            .append_pair("precision", "us");
        Ok(write)
    }
}

/// What a write attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    /// The store is unreachable, overloaded or refused the credentials: try again later.
    Retry(String),
    /// The store refused the body as malformed: retrying it as is would fail again.
    Rejected(String),
    /// The body is too large for the store (HTTP 413): write it in smaller parts.
    TooLarge,
}

/// What an HTTP answer of the write API means.
pub fn outcome_of(status: u16, body: &str) -> WriteOutcome {
    match status {
        200..=299 => WriteOutcome::Written,
        413 => WriteOutcome::TooLarge,
        // Bad credentials are a configuration error, not bad data: keep the points, retry.
        400 | 422 => WriteOutcome::Rejected(format!("HTTP {status}: {}", body.trim())),
        _ => WriteOutcome::Retry(format!("HTTP {status}: {}", body.trim())),
    }
}

/// An InfluxDB-2-compatible write API client.
#[derive(Clone)]
pub struct LineProtocolWriter {
    http: reqwest::Client,
    url: url::Url,
    token: Option<String>,
    basic: Option<(String, Option<String>)>,
    gzip: bool,
}

impl LineProtocolWriter {
    pub fn new(config: &TimeSeriesConfig) -> Result<Self, TimeSeriesError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build()
            .map_err(|e| TimeSeriesError::Client(e.to_string()))?;
        Ok(Self {
            http,
            url: config.write_url()?,
            token: config.token.clone(),
            basic: config
                .username
                .clone()
                .map(|u| (u, config.password.clone())),
            gzip: config.gzip,
        })
    }

    /// Writes lines (each ending in `\n`) once.
    pub async fn write(&self, lines: &str) -> WriteOutcome {
        let mut request = self
            .http
            .post(self.url.clone())
            .header("Content-Type", "text/plain; charset=utf-8");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Token {token}"));
        } else if let Some((user, password)) = &self.basic {
            request = request.basic_auth(user, password.as_ref());
        }
        request = if self.gzip {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(lines.len() / 8),
                flate2::Compression::fast(),
            );
            match gz.write_all(lines.as_bytes()).and_then(|()| gz.finish()) {
                Ok(body) => request.header("Content-Encoding", "gzip").body(body),
                Err(e) => return WriteOutcome::Retry(format!("gzip: {e}")),
            }
        } else {
            request.body(lines.to_owned())
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                outcome_of(status, &body)
            }
            Err(e) => WriteOutcome::Retry(e.to_string()),
        }
    }
}

/// The points buffered from one partition.
#[derive(Debug, Default)]
struct PartitionLines {
    lines: String,
    /// Offset of each line, in order (for dead letters of refused lines).
    offsets: Vec<i64>,
    /// The next offset to read once these lines are written.
    next: i64,
}

/// A batch taken out of the buffer to be written.
struct Batch {
    lines: String,
    /// (partition, offset) of each line, in order.
    positions: Vec<(i32, i64)>,
    /// The offsets to commit once written.
    commit: HashMap<i32, i64>,
}

/// Drains `telemetry` into the time-series store.
pub struct TimeSeriesSink {
    kafka: KafkaConfig,
    config: TimeSeriesConfig,
    topic: String,
    registry: Arc<DeviceRegistry>,
}

impl TimeSeriesSink {
    /// `registry`: the device registry view (kept current by the caller) that gives each device its
    /// site tags.
    pub fn new(
        kafka: KafkaConfig,
        config: TimeSeriesConfig,
        topic: String,
        registry: Arc<DeviceRegistry>,
    ) -> Self {
        Self {
            kafka,
            config,
            topic,
            registry,
        }
    }

    const STAGE: &'static str = "timeseries";

    /// Runs until the task is cancelled or a non-retryable error.
    pub async fn run(&self) -> Result<(), LakeError> {
        let writer = LineProtocolWriter::new(&self.config)?;
        let input = StageConsumer::new(&self.kafka, Self::STAGE, &self.topic)?;
        let consumer = input.consumer();
        let producer: FutureProducer = self
            .kafka
            .producer(&format!("tributary-{}", Self::STAGE))
            .create()?;
        input.subscribe()?;
        tracing::info!(topic = %self.topic, url = %self.config.url, "time-series sink started");

        let mut parts: HashMap<i32, PartitionLines> = HashMap::new();
        let mut points = 0usize;
        let mut oldest: Option<Instant> = None;
        // Series keys of devices, rebuilt when the registry changes.
        let mut series: HashMap<(String, String), String> = HashMap::new();
        let mut registry_generation = self.registry.generation();
        let flush_interval = Duration::from_millis(self.config.flush_interval_ms);
        let (mut written, mut batches) = (0u64, 0u64);
        loop {
            let wait = match oldest {
                Some(t) => flush_interval.saturating_sub(t.elapsed()),
                None => flush_interval,
            };
            let polled = input.poll(wait).await;
            points -= drop_revoked(&polled.revoked, &mut parts);
            match polled.record {
                Some(msg) => {
                    let (p, offset) = (msg.partition(), msg.offset());
                    let buffer = parts.entry(p).or_default();
                    buffer.next = offset + 1;
                    let reading = match msg.payload().map(decode::<Reading>) {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            tracing::debug!(partition = p, offset, error = %e, "undecodable telemetry record skipped (the Delta sink dead-letters it)");
                            continue;
                        }
                        None => continue,
                    };
                    if self.registry.generation() != registry_generation {
                        registry_generation = self.registry.generation();
                        series.clear();
                    }
                    let key = series
                        .entry((reading.tenant.clone(), reading.device.clone()))
                        .or_insert_with(|| {
                            let site = self
                                .registry
                                .get(&reading.device)
                                .filter(|d| d.tenant == reading.tenant)
                                .map(|d| d.site.clone())
                                .unwrap_or_default();
                            series_key(
                                &self.config.measurement,
                                &reading.tenant,
                                &reading.device,
                                &site,
                            )
                        });
                    push_point(&mut buffer.lines, key, &reading);
                    buffer.offsets.push(offset);
                    points += 1;
                    oldest.get_or_insert_with(Instant::now);
                }
                None => {
                    if points == 0 {
                        input.check_orphaned()?;
                    }
                }
            }
            let due = oldest.is_some_and(|t| t.elapsed() >= flush_interval)
                || points >= self.config.batch_points;
            if !due {
                continue;
            }
            let batch = take_batch(&mut parts);
            let count = batch.positions.len();
            points = 0;
            oldest = None;
            let started = Instant::now();
            self.write_batch(&writer, consumer, &producer, &batch)
                .await?;
            written += count as u64;
            batches += 1;
            tracing::info!(
                points = count,
                ms = started.elapsed().as_millis() as u64,
                written,
                batches,
                "time-series batch written"
            );
            // Offsets of partitions this consumer still owns (a revoked one's new owner re-reads
            // from the last commit and writes the same points again: harmless).
            let assigned = consumer.assignment().unwrap_or_default();
            let mut offsets = TopicPartitionList::new();
            for (p, next) in &batch.commit {
                if assigned.find_partition(&self.topic, *p).is_some() {
                    offsets.add_partition_offset(&self.topic, *p, Offset::Offset(*next))?;
                }
            }
            if offsets.count() > 0
                && let Err(e) =
                    tokio::task::block_in_place(|| consumer.commit(&offsets, CommitMode::Sync))
            {
                tracing::warn!(error = %e, "kafka offset commit failed; these points will be written again (harmless)");
            }
        }
    }

    /// Writes `batch` until the store takes it: retries with backoff while the store is away,
    /// keeping the consumer in its group (partitions paused, the consumer polled); splits it when
    /// too large; writes it point by point when refused, dead-lettering what is still refused.
    async fn write_batch(
        &self,
        writer: &LineProtocolWriter,
        consumer: &StreamConsumer<RecordingContext>,
        producer: &FutureProducer,
        batch: &Batch,
    ) -> Result<(), LakeError> {
        // Parts still to write: (first line, line count) ranges of the batch.
        let starts = line_starts(&batch.lines);
        let mut todo: Vec<(usize, usize)> = vec![(0, starts.len())];
        let mut pause = Duration::from_millis(200);
        let max_pause = Duration::from_millis(self.config.max_backoff_ms.max(200));
        let mut paused: Option<TopicPartitionList> = None;
        // First offset per partition of records fetched before the pause took effect: read again.
        let mut refetch: HashMap<i32, i64> = HashMap::new();
        let mut failing_since: Option<Instant> = None;
        while let Some((first, n)) = todo.pop() {
            let text = slice_lines(&batch.lines, &starts, first, n);
            match writer.write(text).await {
                WriteOutcome::Written => {
                    pause = Duration::from_millis(200);
                    if let Some(since) = failing_since.take() {
                        tracing::info!(down_for = ?since.elapsed(), "time-series store writes again");
                    }
                }
                WriteOutcome::TooLarge if n > 1 => {
                    todo.push((first + n / 2, n - n / 2));
                    todo.push((first, n / 2));
                }
                WriteOutcome::Rejected(reason) if n > 1 => {
                    tracing::warn!(points = n, reason = %reason_of_refusal(&reason), "store refused a batch; writing it point by point");
                    todo.extend((first..first + n).rev().map(|i| (i, 1)));
                }
                WriteOutcome::Rejected(reason) => {
                    let (partition, offset) = batch.positions[first];
                    self.dead_letter(producer, partition, offset, text, &reason)
                        .await?;
                }
                WriteOutcome::TooLarge => {
                    let (partition, offset) = batch.positions[first];
                    let reason = "HTTP 413: one point is larger than the store takes";
                    self.dead_letter(producer, partition, offset, text, reason)
                        .await?;
                }
                WriteOutcome::Retry(reason) => {
                    todo.push((first, n));
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                    }
                    tracing::warn!(error = %reason, retry_in = ?pause, down_for = ?failing_since.map(|t| t.elapsed()), "time-series store write failed; retrying (offsets are not committed)");
                    if paused.is_none() {
                        let assignment = consumer.assignment()?;
                        consumer.pause(&assignment)?;
                        paused = Some(assignment);
                    }
                    // Poll (paused: no records come) so the consumer stays in its group.
                    let deadline = Instant::now() + pause;
                    while Instant::now() < deadline {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if let Ok(Ok(msg)) = tokio::time::timeout(left, consumer.recv()).await {
                            refetch.entry(msg.partition()).or_insert(msg.offset());
                        }
                    }
                    pause = (pause * 2).min(max_pause);
                }
            }
        }
        if let Some(assignment) = paused {
            // Revoked partitions are not resumed; ones assigned during the pause were never paused.
            let current = consumer.assignment()?;
            let mut resume = TopicPartitionList::new();
            for e in assignment.elements() {
                if current.find_partition(e.topic(), e.partition()).is_some() {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
            consumer.resume(&resume)?;
            for (p, offset) in refetch {
                if current.find_partition(&self.topic, p).is_some() {
                    rewind(consumer, &self.topic, p, offset)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps a point the store refused in `deadletter`, with its `telemetry` position.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        partition: i32,
        offset: i64,
        line: &str,
        reason: &str,
    ) -> Result<(), LakeError> {
        tracing::warn!(
            partition,
            offset,
            reason,
            "time-series store refused a point; dead-lettered"
        );
        let (tenant, device) = tenant_and_device(line);
        let dl = DeadLetter {
            tenant,
            device,
            event_id: None,
            stage: Self::STAGE.into(),
            rule: "store_rejected".into(),
            field: None,
            reason: format!("the time-series store refused the point: {reason}"),
            source_topic: self.topic.clone(),
            source_partition: partition,
            source_offset: offset,
            source_index: 0,
            received_at: now_micros(),
            original: line.as_bytes().to_vec(),
            measurement: None,
        };
        Ok(runtime::send_dead_letter(producer, &self.kafka.topics.deadletter, None, &dl).await?)
    }
}

/// Drops the buffered lines of partitions the consumer lost; returns how many points went.
fn drop_revoked(revoked: &[i32], parts: &mut HashMap<i32, PartitionLines>) -> usize {
    revoked
        .iter()
        .filter_map(|p| parts.remove(p))
        .map(|lines| lines.offsets.len())
        .sum()
}

/// Takes every buffered line out as one batch.
fn take_batch(parts: &mut HashMap<i32, PartitionLines>) -> Batch {
    let mut batch = Batch {
        lines: String::new(),
        positions: Vec::new(),
        commit: HashMap::new(),
    };
    for (p, buffer) in parts.drain() {
        batch.lines.push_str(&buffer.lines);
        batch
            .positions
            .extend(buffer.offsets.iter().map(|o| (p, *o)));
        batch.commit.insert(p, buffer.next);
    }
    batch
}

/// Byte offset of the start of each line.
fn line_starts(lines: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    for line in lines.split_inclusive('\n') {
        starts.push(at);
        at += line.len();
    }
    starts
}

/// Lines `first .. first + n`.
fn slice_lines<'a>(lines: &'a str, starts: &[usize], first: usize, n: usize) -> &'a str {
    let from = starts.get(first).copied().unwrap_or(lines.len());
    let to = starts.get(first + n).copied().unwrap_or(lines.len());
    &lines[from..to]
}

/// The store's answer, shortened for a log line.
fn reason_of_refusal(reason: &str) -> &str {
    match reason.char_indices().nth(300) {
        Some((i, _)) => &reason[..i],
        None => reason,
    }
}

/// The `tenant` and `device` tags of a line, unescaped (for a dead letter's columns).
fn tenant_and_device(line: &str) -> (String, String) {
    let (mut tenant, mut device) = (String::new(), String::new());
    let (mut key, mut value) = (String::new(), String::new());
    let (mut in_measurement, mut in_value, mut escaped) = (true, false, false);
    for c in line.chars() {
        let target = if in_value { &mut value } else { &mut key };
        if escaped {
            target.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            ',' | ' ' => {
                if !in_measurement {
                    match key.as_str() {
                        "tenant" => tenant = std::mem::take(&mut value),
                        "device" => device = std::mem::take(&mut value),
                        _ => {}
                    }
                }
                key.clear();
                value.clear();
                in_measurement = false;
                in_value = false;
                if c == ' ' {
                    break;
                }
            }
            '=' if !in_measurement && !in_value => in_value = true,
            _ => target.push(c),
        }
    }
    (tenant, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_url_carries_org_bucket_and_precision() {
        let c = TimeSeriesConfig::default();
        assert_eq!(
            c.write_url().unwrap().as_str(),
            "http://127.0.0.1:8428/api/v2/write?org=tributary&bucket=telemetry&precision=us"
        );
        let c = TimeSeriesConfig {
            url: "https://influx.example/prefix".into(),
            bucket: "a b".into(),
            ..Default::default()
        };
        assert_eq!(
            c.write_url().unwrap().as_str(),
            "https://influx.example/prefix/api/v2/write?org=tributary&bucket=a+b&precision=us"
        );
        let c = TimeSeriesConfig {
            url: "ftp://x".into(),
            ..Default::default()
        };
        assert!(
            c.write_url()
                .unwrap_err()
                .to_string()
                .contains("allowed: http, https")
        );
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(outcome_of(204, ""), WriteOutcome::Written);
        assert_eq!(outcome_of(413, ""), WriteOutcome::TooLarge);
        assert!(
            matches!(outcome_of(400, "bad line"), WriteOutcome::Rejected(r) if r.contains("bad line"))
        );
        for retry in [401, 403, 404, 429, 500, 503] {
            assert!(
                matches!(outcome_of(retry, ""), WriteOutcome::Retry(_)),
                "{retry}"
            );
        }
    }

    #[test]
    fn batches_slice_by_line_and_name_their_positions() {
        let mut parts = HashMap::new();
        parts.insert(
            0,
            PartitionLines {
                lines: "a,tenant=t1,device=d\\ 1 x=1.0 1\nb x=2.0 2\n".into(),
                offsets: vec![4, 5],
                next: 6,
            },
        );
        let batch = take_batch(&mut parts);
        assert!(parts.is_empty());
        let starts = line_starts(&batch.lines);
        assert_eq!(slice_lines(&batch.lines, &starts, 1, 1), "b x=2.0 2\n");
        assert_eq!(slice_lines(&batch.lines, &starts, 0, 2), batch.lines);
        assert_eq!(batch.positions, vec![(0, 4), (0, 5)]);
        assert_eq!(batch.commit[&0], 6);
        assert_eq!(
            tenant_and_device(slice_lines(&batch.lines, &starts, 0, 1)),
            ("t1".into(), "d 1".into())
        );
    }

    #[test]
    fn debug_hides_the_secrets() {
        let c = TimeSeriesConfig {
            token: Some("hunter2".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
