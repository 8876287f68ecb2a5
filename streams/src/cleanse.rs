//! The cleanse stage: `raw` → `telemetry` (clean readings) + `deadletter` (everything refused, with
//! the rule, the field, the reason and the raw record's position).
//!
//! Outputs of raw partition *p* go to partition *p* (mod the output's partition count) of each output
//! topic, in raw order, each stamped with its source position (topic, partition, offset, index). The
//! stage is at-least-once (offsets committed after the outputs are acknowledged); the lake sink drops
//! re-emitted outputs by that position, which makes the whole path exactly-once without Kafka
//! transactions.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tributary_schemas::avro::{self, decode};
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::payload::parse_message;
use tributary_schemas::{DeadLetter, Micros, RawEnvelope, Reading, now_micros};

use crate::StreamError;
use crate::dedup::DedupWindow;
use tributary_schemas::kafka::{PartitionChange, REJOIN_TIMEOUT, RecordingContext};

/// The name of this stage (consumer group suffix, `stage` of its dead letters).
pub const STAGE: &str = "cleanse";

/// `[cleanse]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanseConfig {
    /// Events with the same (tenant, device, event id) within this many seconds are duplicates.
    pub dedup_horizon_secs: u64,
    /// Most raw records processed before outputs are awaited and offsets committed.
    pub batch_size: usize,
    /// Longest wait for a batch to fill (milliseconds).
    pub batch_ms: u64,
}

impl Default for CleanseConfig {
    fn default() -> Self {
        Self {
            dedup_horizon_secs: 24 * 3600,
            batch_size: 2000,
            batch_ms: 100,
        }
    }
}

/// One output of the cleanse logic.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reading(Reading),
    DeadLetter(DeadLetter),
}

/// Where a raw record sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The pure cleanse logic: validation, dedup, shaping. No I/O.
pub struct Cleanser {
    horizon: Micros,
    windows: HashMap<i32, DedupWindow>,
    /// Duplicates dropped so far (they are expected redundancy, not rejections).
    pub duplicates: u64,
}

struct Rejection<'a> {
    tenant: &'a str,
    device: &'a str,
    event_id: Option<&'a str>,
    rule: &'a str,
    field: Option<&'a str>,
    reason: String,
    received_at: Micros,
    original: &'a [u8],
}

impl Cleanser {
    pub fn new(dedup_horizon_secs: u64) -> Self {
        Self {
            horizon: dedup_horizon_secs.saturating_mul(1_000_000) as Micros,
            windows: HashMap::new(),
            duplicates: 0,
        }
    }

    /// Forgets a partition's state (after a revocation).
    pub fn forget(&mut self, partition: i32) {
        self.windows.remove(&partition);
    }

    /// Installs a partition's dedup state (after a warm-up).
    pub fn install(&mut self, partition: i32, window: DedupWindow) {
        self.windows.insert(partition, window);
    }

    /// An empty dedup window with this cleanser's horizon.
    pub fn new_window(&self) -> DedupWindow {
        DedupWindow::new(self.horizon)
    }

    /// Updates dedup state with a record already processed before (warm-up), emitting nothing.
    pub fn observe(window: &mut DedupWindow, record: &[u8]) {
        if let Ok(e) = decode::<RawEnvelope>(record) {
            window.check_and_insert(&e.tenant, &e.device, &e.event_id, e.received_at);
        }
    }

    /// Cleanses one raw record.
    pub fn process(&mut self, pos: Position<'_>, record: &[u8]) -> Vec<Output> {
        let mut out = Outputs {
            pos,
            out: Vec::new(),
        };
        let envelope = match decode::<RawEnvelope>(record) {
            Ok(e) => e,
            Err(e) => {
                out.reject(Rejection {
                    tenant: "",
                    device: "",
                    event_id: None,
                    rule: "bad_envelope",
                    field: None,
                    reason: format!("not a raw envelope: {e}"),
                    received_at: now_micros(),
                    original: record,
                });
                return out.out;
            }
        };
        let window = self
            .windows
            .entry(pos.partition)
            .or_insert_with(|| DedupWindow::new(self.horizon));
        if window.check_and_insert(
            &envelope.tenant,
            &envelope.device,
            &envelope.event_id,
            envelope.received_at,
        ) {
            self.duplicates += 1;
            tracing::debug!(device = %envelope.device, event_id = %envelope.event_id, "duplicate dropped");
            return out.out;
        }
        let e = &envelope;
        let base = |rule: &'static str, field: Option<&'static str>, reason: String| Rejection {
            tenant: &e.tenant,
            device: &e.device,
            event_id: Some(&e.event_id),
            rule,
            field,
            reason,
            received_at: e.received_at,
            original: &e.payload,
        };
        // The ingest stamped the tenant from the registry as it was when the event arrived: an
        // empty tenant means the device was unknown then. Replaying `raw` later gives the same
        // answer whatever the registry says by then.
        if e.tenant.is_empty() {
            let reason = if e.device.is_empty() {
                "the event names no device".to_owned()
            } else {
                format!("device `{}` is not in the registry", e.device)
            };
            out.reject(base("unknown_device", Some("device"), reason));
            return out.out;
        }
        let message = match parse_message(&e.content_type, &e.payload, e.received_at) {
            Ok(m) => m,
            Err(err) => {
                let field = err.field.clone();
                let mut r = base(err.rule, None, err.to_string());
                r.field = field.as_deref();
                out.reject(r);
                return out.out;
            }
        };
        if let Some(claimed) = message.device.as_deref().filter(|d| *d != e.device) {
            out.reject(base(
                "device_mismatch",
                Some("device"),
                format!(
                    "payload names device `{claimed}` but was sent by `{}`",
                    e.device
                ),
            ));
            return out.out;
        }
        for m in message.measurements {
            match m {
                Ok(m) => {
                    let source_index = out.next_index();
                    out.out.push(Output::Reading(Reading {
                        tenant: e.tenant.clone(),
                        device: e.device.clone(),
                        metric: m.metric,
                        value: m.value,
                        unit: m.unit,
                        event_time: m.time,
                        ingest_time: e.received_at,
                        event_id: e.event_id.clone(),
                        source_topic: pos.topic.to_owned(),
                        source_partition: pos.partition,
                        source_offset: pos.offset,
                        source_index,
                    }));
                }
                Err(err) => {
                    let field = err.field.clone();
                    let mut r = base(err.rule, None, err.to_string());
                    r.field = field.as_deref();
                    out.reject(r);
                }
            }
        }
        out.out
    }
}

/// The outputs of one raw record, numbered in order.
struct Outputs<'a> {
    pos: Position<'a>,
    out: Vec<Output>,
}

impl Outputs<'_> {
    fn next_index(&self) -> i32 {
        self.out.len() as i32
    }

    fn reject(&mut self, r: Rejection<'_>) {
        let source_index = self.next_index();
        self.out.push(Output::DeadLetter(DeadLetter {
            tenant: r.tenant.to_owned(),
            device: r.device.to_owned(),
            event_id: r.event_id.map(str::to_owned),
            stage: STAGE.into(),
            rule: r.rule.into(),
            field: r.field.map(str::to_owned),
            reason: r.reason,
            source_topic: self.pos.topic.to_owned(),
            source_partition: self.pos.partition,
            source_offset: self.pos.offset,
            source_index,
            received_at: r.received_at,
            original: r.original.to_vec(),
        }));
    }
}

/// The cleanse stage: one member of the `<prefix>-cleanse` consumer group.
pub struct CleanseStage {
    kafka: KafkaConfig,
    config: CleanseConfig,
}

impl CleanseStage {
    pub fn new(kafka: KafkaConfig, config: CleanseConfig) -> Self {
        Self { kafka, config }
    }

    fn partitions_of(
        consumer: &StreamConsumer<RecordingContext>,
        topic: &str,
    ) -> Result<i32, StreamError> {
        // A blocking librdkafka call: keep it off the async workers (the HTTP ingest shares them).
        let md = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0);
        if n == 0 {
            return Err(StreamError::MissingTopic(topic.to_owned()));
        }
        Ok(n)
    }

    /// Rebuilds a partition's dedup state from the raw records before `until` within the horizon.
    fn warm_up(
        kafka: &KafkaConfig,
        topic: &str,
        partition: i32,
        until: i64,
        mut window: DedupWindow,
        horizon: Micros,
    ) -> Result<DedupWindow, StreamError> {
        let reader: BaseConsumer = kafka
            .reader(&format!("cleanse-warmup-{partition}"))
            .create()?;
        let (low, _) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        let mut start = low;
        let since = (now_micros() - horizon) / 1000;
        let mut query = TopicPartitionList::new();
        query.add_partition_offset(topic, partition, Offset::Offset(since))?;
        if let Ok(found) = reader.offsets_for_times(query, Duration::from_secs(10))
            && let Some(Offset::Offset(o)) =
                found.find_partition(topic, partition).map(|e| e.offset())
        {
            start = start.max(o);
        }
        if start >= until {
            return Ok(window);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        reader.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut read = 0u64;
        while Instant::now() < deadline {
            match reader.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if m.offset() >= until {
                        break;
                    }
                    if let Some(p) = m.payload() {
                        Cleanser::observe(&mut window, p);
                    }
                    read += 1;
                    if m.offset() + 1 >= until {
                        break;
                    }
                }
                Some(Err(e)) => return Err(StreamError::Kafka(e)),
                None => {}
            }
        }
        tracing::info!(
            partition,
            from = start,
            until,
            read,
            entries = window.len(),
            "dedup state rebuilt from raw"
        );
        Ok(window)
    }

    /// Runs until the task is cancelled or Kafka fails for good.
    pub async fn run(&self) -> Result<(), StreamError> {
        let context = RecordingContext::default();
        let consumer: StreamConsumer<RecordingContext> = self
            .kafka
            .consumer(STAGE)
            .create_with_context(context.clone())?;
        let producer: FutureProducer = self.kafka.producer("tributary-cleanse").create()?;
        let topics = &self.kafka.topics;
        let telemetry_parts = Self::partitions_of(&consumer, &topics.telemetry)?;
        let deadletter_parts = Self::partitions_of(&consumer, &topics.deadletter)?;
        Self::partitions_of(&consumer, &topics.raw)?;
        consumer.subscribe(&[&topics.raw])?;
        tracing::info!(raw = %topics.raw, "cleanse stage started");
        let mut cleanser = Cleanser::new(self.config.dedup_horizon_secs);
        let horizon = (self.config.dedup_horizon_secs as i64).saturating_mul(1_000_000);
        let mut warmed: HashSet<i32> = HashSet::new();
        let (mut readings, mut rejected) = (0u64, 0u64);
        loop {
            let started = Instant::now();
            let mut deliveries: Vec<DeliveryFuture> = Vec::new();
            let mut next_offsets: HashMap<i32, i64> = HashMap::new();
            let mut count = 0usize;
            while count < self.config.batch_size {
                let left =
                    Duration::from_millis(self.config.batch_ms).saturating_sub(started.elapsed());
                if left.is_zero() && count > 0 {
                    break;
                }
                let msg =
                    match tokio::time::timeout(left.max(Duration::from_millis(1)), consumer.recv())
                        .await
                    {
                        Err(_) => {
                            if count > 0 {
                                break;
                            }
                            if let Some(d) = context.orphaned_for().filter(|d| *d > REJOIN_TIMEOUT)
                            {
                                // The supervisor starts this stage again with a new consumer.
                                return Err(StreamError::Orphaned(d));
                            }
                            continue;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "consume error");
                            continue;
                        }
                        Ok(Ok(m)) => m,
                    };
                for change in context.drain() {
                    if let PartitionChange::Revoked(parts) = change {
                        for (_, p) in parts {
                            cleanser.forget(p);
                            warmed.remove(&p);
                            next_offsets.remove(&p);
                        }
                    }
                }
                let partition = msg.partition();
                let offset = msg.offset();
                if !warmed.contains(&partition) {
                    let kafka = self.kafka.clone();
                    let topic = topics.raw.clone();
                    let window = cleanser.new_window();
                    let window = tokio::task::spawn_blocking(move || {
                        Self::warm_up(&kafka, &topic, partition, offset, window, horizon)
                    })
                    .await
                    .map_err(|e| StreamError::WarmUp(e.to_string()))??;
                    cleanser.install(partition, window);
                    warmed.insert(partition);
                }
                let pos = Position {
                    topic: msg.topic(),
                    partition,
                    offset,
                };
                for output in cleanser.process(pos, msg.payload().unwrap_or_default()) {
                    let (topic, part, key, bytes) = match &output {
                        Output::Reading(r) => {
                            readings += 1;
                            (
                                &topics.telemetry,
                                partition % telemetry_parts,
                                r.device.as_str(),
                                avro::encode(r)?,
                            )
                        }
                        Output::DeadLetter(d) => {
                            rejected += 1;
                            tracing::debug!(rule = %d.rule, reason = %d.reason, offset, "dead letter");
                            (
                                &topics.deadletter,
                                partition % deadletter_parts,
                                d.device.as_str(),
                                avro::encode(d)?,
                            )
                        }
                    };
                    deliveries
                        .push(kafka::enqueue(&producer, topic, Some(part), key, &bytes).await?);
                }
                next_offsets.insert(partition, offset + 1);
                count += 1;
            }
            for d in deliveries {
                kafka::delivered(d).await?;
            }
            if !next_offsets.is_empty() {
                let mut tpl = TopicPartitionList::new();
                for (p, o) in &next_offsets {
                    tpl.add_partition_offset(&topics.raw, *p, Offset::Offset(*o))?;
                }
                if let Err(e) =
                    tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
                {
                    // Outputs are already written; the next owner re-emits and the sink drops them.
                    tracing::warn!(error = %e, "offset commit failed");
                }
                tracing::debug!(
                    records = count,
                    readings,
                    rejected,
                    duplicates = cleanser.duplicates,
                    "batch committed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_schemas::{Source, avro::encode};

    fn cleanser() -> Cleanser {
        Cleanser::new(3600)
    }

    fn raw(device: &str, id: &str, payload: &str) -> Vec<u8> {
        encode(&RawEnvelope {
            event_id: id.into(),
            tenant: if device == "d1" {
                "acme".into()
            } else {
                String::new()
            },
            device: device.into(),
            source: Source::Mqtt,
            received_at: 1_763_780_000_000_000,
            content_type: "application/json".into(),
            payload: payload.as_bytes().to_vec(),
            subject: None,
            encryption_key_id: None,
        })
        .unwrap()
    }

    fn pos(offset: i64) -> Position<'static> {
        Position {
            topic: "raw",
            partition: 1,
            offset,
        }
    }

    fn dead(out: &[Output]) -> Vec<&DeadLetter> {
        out.iter()
            .filter_map(|o| match o {
                Output::DeadLetter(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn valid_message_becomes_readings_with_provenance() {
        let mut c = cleanser();
        let out = c.process(
            pos(7),
            &raw("d1", "m1", r#"{"id":"m1","metrics":{"t":1.5,"h":40}}"#),
        );
        assert_eq!(out.len(), 2);
        let Output::Reading(r) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!((r.tenant.as_str(), r.event_id.as_str()), ("acme", "m1"));
        assert_eq!(
            (r.source_partition, r.source_offset, r.source_index),
            (1, 7, 1)
        );
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let mut c = cleanser();
        let rec = raw("d1", "m1", r#"{"metrics":{"t":1}}"#);
        assert_eq!(c.process(pos(1), &rec).len(), 1);
        assert!(c.process(pos(2), &rec).is_empty());
        assert_eq!(c.duplicates, 1);
    }

    #[test]
    fn rejections_name_rule_field_and_keep_original() {
        let mut c = cleanser();
        let out = c.process(pos(3), &raw("d1", "m2", "{\"metrics\":"));
        let d = dead(&out);
        assert_eq!(d[0].rule, "malformed_json");
        assert_eq!(d[0].original, b"{\"metrics\":");
        assert_eq!((d[0].source_topic.as_str(), d[0].source_offset), ("raw", 3));

        let out = c.process(pos(4), &raw("ghost", "m3", r#"{"metrics":{"t":1}}"#));
        assert_eq!(dead(&out)[0].rule, "unknown_device");
        assert_eq!(dead(&out)[0].field.as_deref(), Some("device"));

        let out = c.process(
            pos(5),
            &raw(
                "d1",
                "m4",
                r#"{"metrics":{"t":"hot","u":"-Infinity","ok":2}}"#,
            ),
        );
        let d = dead(&out);
        assert_eq!(out.len(), 3);
        let rules: HashSet<_> = d
            .iter()
            .map(|d| (d.rule.as_str(), d.field.clone().unwrap_or_default()))
            .collect();
        assert!(rules.contains(&("non_numeric_value", "metrics.t".into())));
        assert!(rules.contains(&("non_finite_value", "metrics.u".into())));

        let out = c.process(pos(6), b"garbage");
        assert_eq!(dead(&out)[0].rule, "bad_envelope");
        assert_eq!(dead(&out)[0].original, b"garbage");

        let out = c.process(
            pos(8),
            &raw("d1", "m5", r#"{"device":"d2","metrics":{"t":1}}"#),
        );
        assert_eq!(dead(&out)[0].rule, "device_mismatch");
    }

    #[test]
    fn observed_history_dedups_after_restart() {
        let mut c = cleanser();
        let rec = raw("d1", "m1", r#"{"metrics":{"t":1}}"#);
        let mut w = c.new_window();
        Cleanser::observe(&mut w, &rec);
        c.install(1, w);
        assert!(c.process(pos(9), &rec).is_empty());
    }
}
