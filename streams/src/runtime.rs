//! The runtime every consuming stage runs on: one consume loop, written once.
//!
//! Two layers, so that stages with different commit rules share what is the same:
//!
//! - [`StageConsumer`]: a member of a stage's consumer group on one topic — created with the
//!   shared client settings, the topic checked to exist, partitions assigned and revoked through
//!   [`RecordingContext`], and the "orphaned" check (no partitions for [`REJOIN_TIMEOUT`]: the
//!   supervisor starts the stage again with a new consumer). The Delta and time-series sinks,
//!   whose commits follow their own exactly-once rules, use this layer and [`send_dead_letter`].
//! - [`run`]: the whole loop of a processing stage ([`Stage`]: `raw` → cleanse, `telemetry` →
//!   anomalies, …). Per batch: restore the state of newly assigned partitions, process each record
//!   under [`containment`] (a panic is an error of that record; after
//!   [`containment::MAX_ATTEMPTS`] the stage's [`Stage::give_up`] dead-letters it), emit the
//!   outputs and [`Stage::after_batch`]'s and wait for Kafka's acks; every
//!   [`Batching::commit_every`], write the state's changelog ([`Stage::checkpoint`]) and wait
//!   again, and only then commit the input offsets.
//!
//! That order is what makes restored state consistent with the committed offsets. Outputs are at
//! least once (after a crash the records since the last commit are processed again and their
//! outputs emitted again, identical: stages are deterministic). State is exactly once: a stage
//! whose state lives for months keeps it in a [`KeyedState`], whose changelog (a compacted topic,
//! key = state key, partition = input partition) records with each key's state the last input
//! offset applied to it; after a restore, a replayed record at or below that offset is not applied
//! again (its outputs were acknowledged before the changelog was written). Stages whose state is a
//! bounded horizon of their input (cleanse's dedup window) rebuild it in [`Stage::restore`] by
//! reading that horizon again instead.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tributary_schemas::kafka::{
    self, KafkaConfig, PartitionChange, REJOIN_TIMEOUT, RecordingContext,
};
use tributary_schemas::{DeadLetter, Micros, avro, now_micros};

use crate::StreamError;
use crate::containment::{self, Attempts, FaultInjection, RecordId};

/// A member of a stage's consumer group, reading one topic.
pub struct StageConsumer {
    consumer: StreamConsumer<RecordingContext>,
    context: RecordingContext,
    topic: String,
}

/// What one poll brought: partitions the consumer lost and got since the last poll, and a record.
pub struct Polled<'a> {
    pub revoked: Vec<i32>,
    pub assigned: Vec<i32>,
    pub record: Option<BorrowedMessage<'a>>,
}

impl StageConsumer {
    /// A consumer in group `<prefix>-<stage>` for `topic` (checked to exist), not yet subscribed:
    /// a sink first aligns the group's offsets with its table.
    pub fn new(kafka: &KafkaConfig, stage: &str, topic: &str) -> Result<Self, StreamError> {
        let context = RecordingContext::default();
        let consumer: StreamConsumer<RecordingContext> =
            kafka.consumer(stage).create_with_context(context.clone())?;
        let this = Self {
            consumer,
            context,
            topic: topic.to_owned(),
        };
        this.partitions(topic)?;
        Ok(this)
    }

    /// Joins the group: partitions come with the following polls.
    pub fn subscribe(&self) -> Result<(), StreamError> {
        self.consumer.subscribe(&[&self.topic])?;
        Ok(())
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The librdkafka consumer, for what only some stages do (pause, seek, assignment).
    pub fn consumer(&self) -> &StreamConsumer<RecordingContext> {
        &self.consumer
    }

    /// How many partitions `topic` has; [`StreamError::MissingTopic`] when it does not exist.
    pub fn partitions(&self, topic: &str) -> Result<i32, StreamError> {
        // A blocking librdkafka call: keep it off the async workers (the HTTP ingest shares them).
        let md = tokio::task::block_in_place(|| {
            self.consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
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

    /// Waits up to `wait` for a record. A consume error is logged and polls as nothing.
    pub async fn poll(&self, wait: Duration) -> Polled<'_> {
        let received =
            tokio::time::timeout(wait.max(Duration::from_millis(1)), self.consumer.recv()).await;
        let (mut revoked, mut assigned) = (Vec::new(), Vec::new());
        for change in self.context.drain() {
            match change {
                PartitionChange::Revoked(parts) => {
                    revoked.extend(parts.into_iter().map(|(_, p)| p));
                }
                PartitionChange::Assigned(parts) => {
                    assigned.extend(parts.into_iter().map(|(_, p)| p));
                }
            }
        }
        let record = match received {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.topic, error = %e, "consume error");
                None
            }
            Err(_) => None,
        };
        Polled {
            revoked,
            assigned,
            record,
        }
    }

    /// [`StreamError::Orphaned`] once the consumer has had no partition for [`REJOIN_TIMEOUT`].
    pub fn check_orphaned(&self) -> Result<(), StreamError> {
        match self.context.orphaned_for() {
            Some(d) if d > REJOIN_TIMEOUT => Err(StreamError::Orphaned(d)),
            _ => Ok(()),
        }
    }

    /// Commits the next offset to read of each partition (synchronously, off the async workers).
    pub fn commit(&self, next: impl IntoIterator<Item = (i32, i64)>) -> Result<(), StreamError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o))?;
        }
        if tpl.count() > 0 {
            tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync))?;
        }
        Ok(())
    }
}

/// The dead-letter partition for records of input partition `partition`: the same index (modulo
/// the dead-letter topic's partitions), so a stage restoring a partition finds its dead letters in
/// one place.
pub fn dead_letter_partition(partition: i32, deadletter_partitions: i32) -> i32 {
    partition.rem_euclid(deadletter_partitions.max(1))
}

/// Sends one dead letter and waits for Kafka's acknowledgement (`partition`: see
/// [`dead_letter_partition`]; `None`: by key).
pub async fn send_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    dead_letter: &DeadLetter,
) -> Result<(), StreamError> {
    let encoded = avro::encode(dead_letter)?;
    let delivery = kafka::enqueue(
        producer,
        topic,
        partition,
        dead_letter.device.as_str(),
        &encoded,
    )
    .await?;
    kafka::delivered(delivery).await?;
    Ok(())
}

/// Who a record a stage gave up on was about, as far as it could be decoded.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub tenant: String,
    pub device: String,
    pub event_id: Option<String>,
}

/// The `stage_failure` dead letter of a record `stage` failed on [`containment::MAX_ATTEMPTS`]
/// times (what [`Stage::give_up`] returns), on the input partition's dead-letter partition.
pub fn stage_failure(
    stage: &str,
    at: Position<'_>,
    record: &[u8],
    subject: Subject,
    error: &str,
    deadletter: &Arc<str>,
    deadletter_partitions: i32,
) -> Vec<Emit> {
    let reason = format!("the {stage} stage failed on this record: {error}");
    let dead = input_dead_letter(
        stage,
        containment::STAGE_FAILURE,
        reason,
        at,
        record,
        subject,
    );
    emit_dead_letter(&dead, at.partition, deadletter, deadletter_partitions)
}

/// The dead letter of one input record of `stage`, kept whole with its position.
pub fn input_dead_letter(
    stage: &str,
    rule: &str,
    reason: String,
    at: Position<'_>,
    record: &[u8],
    subject: Subject,
) -> DeadLetter {
    DeadLetter {
        tenant: subject.tenant,
        device: subject.device,
        event_id: subject.event_id,
        stage: stage.into(),
        rule: rule.into(),
        field: None,
        reason,
        source_topic: at.topic.to_owned(),
        source_partition: at.partition,
        source_offset: at.offset,
        source_index: 0,
        received_at: at.written_at,
        original: record.to_vec(),
        measurement: None,
    }
}

/// `dead` to the dead-letter partition of input partition `partition` (none when it cannot be
/// encoded, which is logged).
pub fn emit_dead_letter(
    dead: &DeadLetter,
    partition: i32,
    deadletter: &Arc<str>,
    deadletter_partitions: i32,
) -> Vec<Emit> {
    let partition = dead_letter_partition(partition, deadletter_partitions);
    match Emit::record(deadletter, partition, &dead.device, dead) {
        Ok(e) => vec![e],
        Err(e) => {
            tracing::error!(error = %e, rule = %dead.rule, "a dead letter could not be encoded");
            Vec::new()
        }
    }
}

/// A record a stage sends: to `topic`, partition `partition` (or by key when `None`), `value`
/// `None` is a tombstone (compacted topics: the key's state is gone).
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub topic: Arc<str>,
    pub partition: Option<i32>,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Emit {
    /// An Avro record (Confluent framing) to `topic`'s partition `partition`.
    pub fn record<R: avro::TopicRecord>(
        topic: &Arc<str>,
        partition: i32,
        key: &str,
        record: &R,
    ) -> Result<Self, StreamError> {
        Ok(Self {
            topic: topic.clone(),
            partition: Some(partition),
            key: key.to_owned(),
            value: Some(avro::encode(record)?),
        })
    }
}

/// Where an input record is: what stages put in outputs' provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp (µs): when it was written.
    pub written_at: Micros,
}

impl<'a> Position<'a> {
    /// The position of a consumed message.
    pub fn of(m: &'a impl Message) -> Self {
        Self {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            written_at: m.timestamp().to_millis().unwrap_or(0).saturating_mul(1000),
        }
    }
}

/// A processing stage: its logic, with I/O left to [`run`].
///
/// `process` is the stage: a function of the stage's state and one record to outputs. Everything
/// else has defaults or is one line.
pub trait Stage: Send {
    /// Names the consumer group (`<prefix>-<NAME>`) and the stage in dead letters.
    const NAME: &'static str;

    /// Restore a partition's state as soon as it is assigned (offset `-1`), not on its first
    /// record: for stages whose timers must act on restored state before anything new arrives
    /// (alert delivery retrying what a crashed member had not delivered).
    const RESTORE_ON_ASSIGN: bool = false;

    /// The topic consumed.
    fn input(&self) -> &str;

    /// Topics emitted to (checked to exist before the stage joins its group), with their
    /// partition counts handed to [`Stage::open`].
    fn outputs(&self) -> Vec<String>;

    /// Called once the partition counts are known (the input's first).
    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError>;

    /// Rebuilds the state of `partition`, newly assigned, whose first record to process is at
    /// `offset` (`-1` when [`Stage::RESTORE_ON_ASSIGN`]). Blocking is fine (the runtime calls it off the async workers).
    fn restore(
        &mut self,
        kafka: &KafkaConfig,
        partition: i32,
        offset: i64,
    ) -> Result<(), StreamError>;

    /// `partition` went to another member: drop its state.
    fn revoke(&mut self, partition: i32);

    /// One record: the outputs it makes. Must not panic on any input (a panic is contained, but
    /// costs restarts).
    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError>;

    /// The outputs for a record the stage failed on [`containment::MAX_ATTEMPTS`] times: its dead
    /// letter (`stage_failure`, with `error`).
    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit>;

    /// Time passed with nothing to read (every owned partition caught up): outputs of timers
    /// (e.g. a missing heartbeat), `now` being the wall clock.
    fn idle(&mut self, _now: Micros) -> Result<Vec<Emit>, StreamError> {
        Ok(Vec::new())
    }

    /// Between batches: e.g. apply a changed catalog.
    fn refresh(&mut self) {}

    /// After each batch, under load as much as when idle: outputs of work that must not wait for
    /// the input to go quiet (alert delivery starting the posts of the records just read), `now`
    /// being the wall clock.
    fn after_batch(&mut self, _now: Micros) -> Result<Vec<Emit>, StreamError> {
        Ok(Vec::new())
    }

    /// Before the input offsets are committed (every [`Batching::commit_every`], after the
    /// outputs of every batch since were acknowledged): the state's changelog records
    /// ([`KeyedState::changelog`]).
    fn checkpoint(&mut self) -> Result<Vec<Emit>, StreamError> {
        Ok(Vec::new())
    }

    /// A line for the log after each committed batch.
    fn summary(&self) -> String {
        String::new()
    }
}

/// How a stage batches: at most `size` records or `wait` after the first; the outputs of each
/// batch are acknowledged before the next, the state changelog and the input offsets are written
/// at most every `commit_every` (a key changed many times in between is written once).
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub size: usize,
    pub wait: Duration,
    pub commit_every: Duration,
}

/// How often a stage commits by default (and writes its changelog): Kafka Streams' default is
/// 30 s; a shorter one replays less after a crash.
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);

impl Batching {
    pub fn new(size: usize, wait_ms: u64) -> Self {
        Self {
            size,
            wait: Duration::from_millis(wait_ms),
            commit_every: COMMIT_EVERY,
        }
    }
}

/// What a stage keeps across its restarts by the supervisor: how often each record made it fail
/// (so one that keeps failing is given up on), and the fault-injection hook of the tests.
#[derive(Debug, Default)]
pub struct Restarts {
    attempts: Attempts,
    faults: FaultInjection,
}

impl Restarts {
    pub fn new() -> Self {
        Self {
            attempts: Attempts::default(),
            faults: FaultInjection::from_env(),
        }
    }

    /// [`run`]s `stage` (a fresh one per start).
    pub async fn run<S: Stage>(
        &self,
        kafka: &KafkaConfig,
        stage: S,
        batching: Batching,
    ) -> Result<(), StreamError> {
        run(kafka, stage, batching, &self.attempts, &self.faults).await
    }
}

/// Runs `stage` as a member of its consumer group until the task is cancelled or Kafka fails
/// (then the supervisor starts it again, with a fresh `stage`, from the committed offsets).
/// `attempts` outlives the restarts: it is how a record that keeps failing is given up on.
pub async fn run<S: Stage>(
    kafka: &KafkaConfig,
    mut stage: S,
    batching: Batching,
    attempts: &Attempts,
    faults: &FaultInjection,
) -> Result<(), StreamError> {
    let input = stage.input().to_owned();
    let consumer = StageConsumer::new(kafka, S::NAME, &input)?;
    let producer: FutureProducer = kafka.producer(&format!("tributary-{}", S::NAME)).create()?;
    let mut partitions = HashMap::new();
    partitions.insert(input.clone(), consumer.partitions(&input)?);
    for topic in stage.outputs() {
        let n = consumer.partitions(&topic)?;
        partitions.insert(topic, n);
    }
    stage.open(&partitions)?;
    consumer.subscribe()?;
    tracing::info!(stage = S::NAME, input = %input, "stage started");
    let mut restored: BTreeSet<i32> = BTreeSet::new();
    // Next offsets processed since the last commit, and when that was.
    let mut next_offsets: HashMap<i32, i64> = HashMap::new();
    let mut committed = Instant::now();
    let mut count = 0usize;
    loop {
        stage.refresh();
        let started = Instant::now();
        let mut deliveries = Vec::new();
        let mut in_batch = 0usize;
        while in_batch < batching.size {
            let left = batching.wait.saturating_sub(started.elapsed());
            if left.is_zero() && in_batch > 0 {
                break;
            }
            let polled = consumer.poll(left).await;
            for p in polled.revoked {
                stage.revoke(p);
                restored.remove(&p);
                next_offsets.remove(&p);
            }
            if S::RESTORE_ON_ASSIGN {
                for p in polled.assigned {
                    if restored.insert(p) {
                        tokio::task::block_in_place(|| stage.restore(kafka, p, -1))?;
                    }
                }
            }
            let Some(msg) = polled.record else {
                if in_batch > 0 {
                    break;
                }
                consumer.check_orphaned()?;
                if !restored.is_empty() {
                    for emit in stage.idle(now_micros())? {
                        deliveries.push(send(&producer, &emit).await?);
                    }
                }
                stage.refresh();
                // Timer outputs to send, or a commit due for what was processed before the quiet.
                let commit_due =
                    !next_offsets.is_empty() && committed.elapsed() >= batching.commit_every;
                if !deliveries.is_empty() || commit_due {
                    break;
                }
                continue;
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            if !restored.contains(&partition) {
                tokio::task::block_in_place(|| stage.restore(kafka, partition, offset))?;
                restored.insert(partition);
            }
            let at = Position::of(&msg);
            let record = msg.payload().unwrap_or_default();
            let outputs = match attempts.given_up(&input, partition, offset) {
                Some(error) => {
                    tracing::error!(stage = S::NAME, partition, offset, %error, "record dead-lettered after failing the stage {} times", containment::MAX_ATTEMPTS);
                    stage.give_up(at, record, &error)
                }
                None => match containment::guard(|| {
                    faults.check(record);
                    stage.process(at, record)
                }) {
                    Ok(outputs) => outputs?,
                    Err(message) => {
                        let id = RecordId {
                            topic: input.clone(),
                            partition,
                            offset,
                        };
                        return Err(attempts.failed(S::NAME, id, message).into());
                    }
                },
            };
            attempts.done(&input, partition, offset);
            for emit in &outputs {
                deliveries.push(send(&producer, emit).await?);
            }
            next_offsets.insert(partition, offset + 1);
            in_batch += 1;
            count += 1;
        }
        if in_batch > 0 {
            for emit in stage.after_batch(now_micros())? {
                deliveries.push(send(&producer, &emit).await?);
            }
        }
        for d in deliveries {
            kafka::delivered(d).await?;
        }
        if committed.elapsed() < batching.commit_every {
            continue;
        }
        committed = Instant::now();
        let mut changelog = Vec::new();
        for emit in stage.checkpoint()? {
            changelog.push(send(&producer, &emit).await?);
        }
        for d in changelog {
            kafka::delivered(d).await?;
        }
        if !next_offsets.is_empty() {
            if let Err(e) = consumer.commit(next_offsets.iter().map(|(p, o)| (*p, *o))) {
                // Outputs are already written; the next owner re-emits them (identical) and the
                // changelog tells it what its state already holds.
                tracing::warn!(stage = S::NAME, error = %e, "offset commit failed");
            }
            tracing::debug!(stage = S::NAME, records = count, offsets = ?next_offsets, summary = %stage.summary(), "committed");
            next_offsets.clear();
            count = 0;
        }
    }
}

async fn send(
    producer: &FutureProducer,
    emit: &Emit,
) -> Result<rdkafka::producer::DeliveryFuture, StreamError> {
    Ok(kafka::enqueue_record(
        producer,
        &emit.topic,
        emit.partition,
        &emit.key,
        emit.value.as_deref(),
    )
    .await?)
}

/// Keyed state of a stage, per input partition, restored from its changelog.
///
/// The changelog is a compacted topic with as many partitions as the input: the state of key `k`
/// of input partition `p` is the latest record with key `k` in changelog partition `p` (a
/// tombstone: no state). Each value is the JSON of [`Versioned`]: the state and the last input
/// offset applied to it. The changelog is the stage's own, not a contract between stages (its
/// values may change with the stage's code; a stage that cannot read them starts the key afresh,
/// logged).
pub struct KeyedState<S> {
    topic: Arc<str>,
    parts: HashMap<i32, Partition<S>>,
}

struct Partition<S> {
    entries: HashMap<String, Versioned<S>>,
    /// Keys changed since the last changelog.
    dirty: BTreeSet<String>,
}

impl<S> Default for Partition<S> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }
}

/// One key's state and the last input offset applied to it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Versioned<S> {
    pub through: i64,
    pub state: S,
}

impl<S: Serialize + DeserializeOwned + Default> KeyedState<S> {
    pub fn new(changelog_topic: &str) -> Self {
        Self {
            topic: Arc::from(changelog_topic),
            parts: HashMap::new(),
        }
    }

    /// The changelog topic.
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// Checks the changelog has a partition for each of `input`'s (`partitions`: the counts
    /// [`Stage::open`] is given).
    pub fn check_partitions(
        &self,
        partitions: &HashMap<String, i32>,
        input: &str,
    ) -> Result<(), StreamError> {
        let changelog = partitions.get(&*self.topic).copied().unwrap_or(0);
        let inputs = partitions.get(input).copied().unwrap_or(0);
        if changelog < inputs {
            return Err(StreamError::State(format!(
                "the changelog `{}` has {changelog} partitions, fewer than `{input}` ({inputs}): recreate it with as many",
                self.topic
            )));
        }
        Ok(())
    }

    /// Reads `partition`'s changelog to its end (blocking): the state the committed offsets left.
    /// Returns how many keys it holds.
    pub fn restore(&mut self, kafka: &KafkaConfig, partition: i32) -> Result<usize, StreamError> {
        let reader: BaseConsumer = kafka
            .reader(&format!("{}-restore-{partition}", self.topic))
            .create()?;
        let (low, _) = reader.fetch_watermarks(&self.topic, partition, Duration::from_secs(10))?;
        let mut entries = HashMap::new();
        let mut unreadable = 0u64;
        kafka::read_from(&reader, &self.topic, &[(partition, low)], |m| {
            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                return;
            };
            match m.payload() {
                None => {
                    entries.remove(key);
                }
                Some(bytes) => match serde_json::from_slice::<Versioned<S>>(bytes) {
                    Ok(v) => {
                        entries.insert(key.to_owned(), v);
                    }
                    Err(_) => {
                        unreadable += 1;
                        entries.remove(key);
                    }
                },
            }
        })?;
        if unreadable > 0 {
            tracing::warn!(topic = %self.topic, partition, unreadable, "changelog records this version cannot read: those keys start afresh");
        }
        let n = entries.len();
        self.parts.insert(
            partition,
            Partition {
                entries,
                dirty: BTreeSet::new(),
            },
        );
        tracing::info!(topic = %self.topic, partition, keys = n, "state restored from its changelog");
        Ok(n)
    }

    /// Installs `partition` with no state (a test, or a stage that starts afresh).
    pub fn start_empty(&mut self, partition: i32) {
        self.parts.insert(partition, Partition::default());
    }

    pub fn forget(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    /// The state of `key` for applying the record at `offset` of `partition` (created when new),
    /// or `None` when the state already holds that record (applied before a crash, read again
    /// now: its outputs went out then).
    pub fn for_record(&mut self, partition: i32, key: &str, offset: i64) -> Option<&mut S> {
        let part = self.parts.entry(partition).or_default();
        if !part.entries.contains_key(key) {
            part.entries.insert(
                key.to_owned(),
                Versioned {
                    through: -1,
                    state: S::default(),
                },
            );
        }
        let entry = part.entries.get_mut(key)?;
        if entry.through >= offset {
            return None;
        }
        entry.through = offset;
        if !part.dirty.contains(key) {
            part.dirty.insert(key.to_owned());
        }
        Some(&mut entry.state)
    }

    /// Every key's state in `partition`, for timers; `f` returns whether it changed the state.
    pub fn for_each(&mut self, partition: i32, mut f: impl FnMut(&str, &mut S) -> bool) {
        if let Some(part) = self.parts.get_mut(&partition) {
            for (key, entry) in part.entries.iter_mut() {
                if f(key, &mut entry.state) {
                    part.dirty.insert(key.clone());
                }
            }
        }
    }

    /// The partitions held.
    pub fn partitions(&self) -> Vec<i32> {
        self.parts.keys().copied().collect()
    }

    /// How many keys `partition` holds.
    pub fn len(&self, partition: i32) -> usize {
        self.parts.get(&partition).map_or(0, |p| p.entries.len())
    }

    /// `key`'s state in `partition`, if held, marked changed (its changelog record is due).
    pub fn get_mut(&mut self, partition: i32, key: &str) -> Option<&mut S> {
        let part = self.parts.get_mut(&partition)?;
        let entry = part.entries.get_mut(key)?;
        if !part.dirty.contains(key) {
            part.dirty.insert(key.to_owned());
        }
        Some(&mut entry.state)
    }

    /// Drops `key`'s state (a tombstone goes to the changelog).
    pub fn remove(&mut self, partition: i32, key: &str) {
        if let Some(part) = self.parts.get_mut(&partition)
            && part.entries.remove(key).is_some()
        {
            part.dirty.insert(key.to_owned());
        }
    }

    /// The changelog records of every key changed since the last call.
    pub fn changelog(&mut self) -> Result<Vec<Emit>, StreamError> {
        let mut out = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            for key in std::mem::take(&mut part.dirty) {
                let value = match part.entries.get(&key) {
                    Some(v) => {
                        Some(serde_json::to_vec(v).map_err(|e| StreamError::State(e.to_string()))?)
                    }
                    None => None,
                };
                out.push(Emit {
                    topic: self.topic.clone(),
                    partition: Some(*p),
                    key,
                    value,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq, Serialize, serde::Deserialize)]
    struct Sum(i64);

    /// Applies records (offset, key, amount) as a stage would.
    fn apply(state: &mut KeyedState<Sum>, records: &[(i64, &str, i64)]) {
        for (offset, key, amount) in records {
            if let Some(s) = state.for_record(0, key, *offset) {
                s.0 += amount;
            }
        }
    }

    /// What a restore from the changelog records `emits` gives.
    fn restored(emits: &[Emit]) -> KeyedState<Sum> {
        let mut state = KeyedState::<Sum>::new("sum-state");
        state.start_empty(0);
        let part = state.parts.get_mut(&0).unwrap();
        for e in emits {
            match &e.value {
                Some(v) => {
                    part.entries
                        .insert(e.key.clone(), serde_json::from_slice(v).unwrap());
                }
                None => {
                    part.entries.remove(&e.key);
                }
            }
        }
        state
    }

    #[test]
    fn a_record_replayed_after_its_changelog_was_written_is_not_applied_twice() {
        let mut live = KeyedState::<Sum>::new("sum-state");
        live.start_empty(0);
        apply(&mut live, &[(0, "a", 1), (1, "b", 10), (2, "a", 2)]);
        let log = live.changelog().unwrap();
        assert_eq!(log.len(), 2, "one record per changed key");
        // The crash came after the changelog but before the offsets were committed (at 0): the
        // records 0..=2 are read again, then 3 is new.
        let mut after = restored(&log);
        apply(
            &mut after,
            &[(0, "a", 1), (1, "b", 10), (2, "a", 2), (3, "a", 4)],
        );
        let mut straight = KeyedState::<Sum>::new("sum-state");
        straight.start_empty(0);
        apply(
            &mut straight,
            &[(0, "a", 1), (1, "b", 10), (2, "a", 2), (3, "a", 4)],
        );
        assert_eq!(
            after.parts[&0].entries["a"].state,
            straight.parts[&0].entries["a"].state
        );
        assert_eq!(after.parts[&0].entries["a"].state, Sum(7));
        assert_eq!(after.parts[&0].entries["b"].state, Sum(10));
    }

    #[test]
    fn a_crash_before_the_changelog_replays_from_the_older_state() {
        let mut live = KeyedState::<Sum>::new("sum-state");
        live.start_empty(0);
        apply(&mut live, &[(0, "a", 1)]);
        let first = live.changelog().unwrap();
        apply(&mut live, &[(1, "a", 2)]);
        // Crash: the second changelog never went out, the committed offset is 1.
        let mut after = restored(&first);
        apply(&mut after, &[(1, "a", 2)]);
        assert_eq!(after.parts[&0].entries["a"].state, Sum(3));
    }

    #[test]
    fn removed_keys_become_tombstones_and_unchanged_keys_are_not_written_again() {
        let mut live = KeyedState::<Sum>::new("sum-state");
        live.start_empty(0);
        apply(&mut live, &[(0, "a", 1), (1, "b", 1)]);
        live.changelog().unwrap();
        live.remove(0, "a");
        let log = live.changelog().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!((log[0].key.as_str(), log[0].value.is_none()), ("a", true));
        assert!(live.changelog().unwrap().is_empty());
    }

    #[test]
    fn dead_letters_stay_on_the_input_partition_index() {
        assert_eq!(dead_letter_partition(5, 3), 2);
        assert_eq!(dead_letter_partition(2, 3), 2);
        assert_eq!(dead_letter_partition(7, 0), 0);
    }
}
