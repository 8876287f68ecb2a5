//! Kafka client settings shared by every stage, so producers and consumers agree on them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::Topics;

/// `[kafka]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Partitions of every topic created by `tributary topics create`.
    pub partitions: i32,
    /// Prefix of every consumer group id (`<prefix>-cleanse`, `<prefix>-lake-telemetry`, …).
    pub group_prefix: String,
    /// This instance's name within each consumer group (static membership, `group.instance.id`):
    /// a restarted instance takes its partitions back at once instead of waiting for the session
    /// of its dead predecessor to expire. Give every instance of a stage its own.
    #[serde(deserialize_with = "crate::config_value::text")]
    pub instance_id: String,
    /// How long a consumer may go without a heartbeat before its group reassigns its partitions.
    /// Longer sessions ride out a broker stall without a rebalance (Kafka's default is 45 s); shorter
    /// ones let a restarted stack settle sooner. 10 s by default: on Tansu 0.6, members of a stopped
    /// run linger for a whole session and the first assignments after a restart get revoked.
    pub session_timeout_ms: u32,
    /// How long a consumer's fetch may wait at the broker for records (`fetch.wait.max.ms`). A
    /// broker that answers as soon as a record is there (Kafka, with `fetch.min.bytes` = 1) makes
    /// this only the idle poll interval; Tansu 0.6 holds every fetch this long, so it is a floor
    /// on each hop's latency there: 50 ms by default (librdkafka's 500 ms made MQTT → anomaly
    /// take 1.2 s at p50 instead of 0.25 s, `benches/anomalies.rs`).
    pub fetch_wait_max_ms: u32,
    pub topics: Topics,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            partitions: 3,
            group_prefix: "tributary".into(),
            instance_id: "1".into(),
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 50,
            topics: Topics::default(),
        }
    }
}

impl KafkaConfig {
    /// Consumer group id of a stage.
    pub fn group_id(&self, stage: &str) -> String {
        format!("{}-{stage}", self.group_prefix)
    }

    /// An idempotent, compressed producer: acks=all, per-key order kept across retries.
    ///
    /// A produce request waits up to 60 s for the broker before it is retried, and a message up to
    /// 120 s (Kafka's `delivery.timeout.ms`) before it is reported failed (callers retry or answer
    /// 503 on their own, shorter, clocks). The long request timeout means a broker stalled for less
    /// than a minute sees no retried produce at all: Tansu 0.6's sqlite engine panics on a retried
    /// idempotent produce (`idempotent_message_check`, lite.rs:503) and then fails every request.
    pub fn producer(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.kbytes", "65536")
            .set("request.timeout.ms", "60000")
            .set("message.timeout.ms", "120000");
        c
    }

    /// A group consumer with manual offset commits, starting at the earliest offset when the group has
    /// none.
    pub fn consumer(&self, stage: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", self.group_id(stage))
            .set(
                "group.instance.id",
                format!("{}-{}", self.group_id(stage), self.instance_id),
            )
            .set("client.id", format!("tributary-{stage}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string());
        c
    }

    /// A consumer outside any group, for reading a partition range by hand (state warm-up, checks).
    pub fn reader(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set(
                "group.id",
                format!("{}-reader-{client_id}", self.group_prefix),
            )
            .set("client.id", client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string());
        c
    }

    /// An admin client.
    pub fn admin(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }
}

/// Hands a record to the producer (to `partition`, or by key when `None`), waiting while the
/// producer's bounded queue is full: backpressure, never a drop.
pub async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) -> Result<DeliveryFuture, KafkaError> {
    enqueue_record(producer, topic, partition, key, Some(payload)).await
}

/// [`enqueue`] for a record whose value may be absent (`None`: a tombstone, on compacted topics).
pub async fn enqueue_record(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: Option<&[u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for Kafka's acknowledgement of an enqueued record: its (partition, offset).
pub async fn delivered(delivery: DeliveryFuture) -> Result<(i32, i64), KafkaError> {
    match delivery.await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// How long reading a topic "to its end" goes on after every partition reached the high watermark
/// it had when the read began. Tansu 0.6 reports a high watermark inside the last record batch (the
/// batch's later records exist and are served): trusting the watermark stops short.
pub const TAIL_SETTLE: Duration = Duration::from_secs(1);

/// Reads every record of `topic` (all its partitions, oldest first) that was there when the read
/// began, handing each to `record`; returns the next offset of each partition read. Blocking: call
/// it off the async workers.
pub fn read_to_end(
    reader: &BaseConsumer,
    topic: &str,
    record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<HashMap<i32, i64>, KafkaError> {
    let md = reader.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut starts = Vec::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, _) = reader.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            starts.push((p.id(), low));
        }
    }
    read_from(reader, topic, &starts, record)
}

/// The first offset of `partition` with a timestamp at or after `since_ms` (the high watermark
/// when there is none).
pub fn offset_at_time(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    since_ms: i64,
) -> Result<i64, KafkaError> {
    let (low, high) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut query = TopicPartitionList::new();
    query.add_partition_offset(topic, partition, Offset::Offset(since_ms))?;
    let found = reader.offsets_for_times(query, Duration::from_secs(10))?;
    Ok(
        match found.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => high,
        },
    )
}

/// Reads `topic` from each `(partition, offset)` of `starts` to the end it had when the read
/// began (see [`TAIL_SETTLE`]), handing each record to `record`; returns the next offset of each
/// partition. Blocking.
pub fn read_from(
    reader: &BaseConsumer,
    topic: &str,
    starts: &[(i32, i64)],
    mut record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<HashMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    let mut next = HashMap::new();
    for &(p, from) in starts {
        let (_, high) = reader.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > from {
            remaining.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(from))?;
        }
        next.insert(p, from);
    }
    if remaining.is_empty() {
        return Ok(next);
    }
    reader.assign(&tpl)?;
    let mut last = Instant::now();
    while !remaining.is_empty() || last.elapsed() < TAIL_SETTLE {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                record(&m);
                next.insert(m.partition(), m.offset() + 1);
                if remaining
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    remaining.remove(&m.partition());
                }
            }
            Some(Err(e)) => return Err(e),
            None if !remaining.is_empty() && last.elapsed() > Duration::from_secs(30) => {
                // The watermark promised records that never came.
                tracing::warn!(topic, partitions = ?remaining.keys().collect::<Vec<_>>(), "read idle 30 s before the high watermark; going on with what was read");
                remaining.clear();
            }
            None => {}
        }
    }
    Ok(next)
}

/// Reads the records of one partition in `[from, until)` (offsets known to exist, e.g. below a
/// committed offset), handing each to `record`; returns how many were read. Blocking.
pub fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    until: i64,
    mut record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<u64, KafkaError> {
    if from >= until {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&tpl)?;
    let mut read = 0;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(60) {
        match reader.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                last = Instant::now();
                if m.offset() >= until {
                    break;
                }
                record(&m);
                read += 1;
                if m.offset() + 1 >= until {
                    break;
                }
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(read)
}

// A consumer context that records partition assignments and revocations, so a stage's loop can
// reset per-partition state between two `recv` calls.

/// A change of a consumer's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionChange {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// How long a consumer may stay without partitions after losing all it had before its stage gives
/// up on this consumer and starts a new one. (After a broker stall, Tansu may never hand the
/// partitions back to the member whose session timed out; a new consumer re-takes them.)
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Records [`PartitionChange`]s for the stage loop to drain, and whether the consumer lost all its
/// partitions and got none back.
#[derive(Clone, Default)]
pub struct RecordingContext {
    state: Arc<Mutex<ContextState>>,
}

#[derive(Default)]
struct ContextState {
    changes: Vec<PartitionChange>,
    assigned: HashSet<(String, i32)>,
    orphaned_since: Option<Instant>,
}

impl RecordingContext {
    fn with<T>(&self, f: impl FnOnce(&mut ContextState) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The changes since the last call.
    pub fn drain(&self) -> Vec<PartitionChange> {
        self.with(|s| std::mem::take(&mut s.changes))
    }

    /// How long ago the consumer lost its last partition, if it has none now.
    pub fn orphaned_for(&self) -> Option<Duration> {
        self.with(|s| s.orphaned_since.map(|t| t.elapsed()))
    }

    fn push(&self, change: PartitionChange) {
        self.with(|s| {
            match &change {
                PartitionChange::Assigned(parts) => {
                    s.assigned.extend(parts.iter().cloned());
                    s.orphaned_since = None;
                }
                PartitionChange::Revoked(parts) => {
                    for p in parts {
                        s.assigned.remove(p);
                    }
                    if s.assigned.is_empty() {
                        s.orphaned_since = Some(Instant::now());
                    }
                }
            }
            s.changes.push(change);
        });
    }
}

impl ClientContext for RecordingContext {}

impl ConsumerContext for RecordingContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(?parts, "partitions revoked");
            self.push(PartitionChange::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(?parts, "partitions assigned");
            self.push(PartitionChange::Assigned(parts));
        }
    }
}
