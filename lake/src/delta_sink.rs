//! The Delta sink: drains one topic into one Delta table, exactly once.
//!
//! Each commit appends the buffered rows and, atomically with them, `txn` actions:
//! - `tributary-lake/<table>/<topic>/<partition>` = next Kafka offset to read of that partition;
//! - `tributary-lake/<table>/source/<source topic>/<source partition>` = last source position
//!   (offset × 2¹⁶ + index) written, so outputs re-emitted upstream after a crash are dropped.
//!
//! Before joining its consumer group the sink commits the table's offsets to the group, so consumption
//! resumes exactly where the table ends; records below the table's offset (Kafka's copy may lag after a
//! crash) are skipped. Kafka offsets are committed after every Delta commit. A zombie writer of the
//! same partition loses its commit to Delta's conflict check on the same app id.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tributary_schemas::avro::{TopicRecord, decode};
use tributary_schemas::kafka::{KafkaConfig, RecordingContext};
use tributary_schemas::{DeadLetter, now_micros};
use tributary_streams::runtime::{self, StageConsumer};

use crate::maintenance::{self, Compaction};
use crate::tables::{LakeRow, TableWrite};
use crate::{LakeConfig, LakeError, rewind};

/// Packs a source position into one `txn` version: offset × 2¹⁶ + index.
pub fn source_seq(offset: i64, index: i32) -> i64 {
    (offset << 16) | i64::from(index.clamp(0, 0xFFFF))
}

/// Writes `batch` the way `R`'s table takes rows, with `txns` in the same commit.
/// A table that does not exist yet is created with `properties`.
async fn write<R: LakeRow>(
    table: DeltaTable,
    batch: RecordBatch,
    txns: Vec<Transaction>,
    properties: &[(String, Option<String>)],
) -> Result<DeltaTable, DeltaTableError> {
    let commit = CommitProperties::default().with_application_transactions(txns);
    let created_with = if table.version().is_none() {
        properties.to_vec()
    } else {
        Vec::new()
    };
    let spec = match R::WRITE {
        TableWrite::Append => {
            return table
                .write(vec![batch])
                .with_save_mode(SaveMode::Append)
                // A column added to the row type since the table was created (always nullable)
                // is added to the table's schema by this commit; existing files are not rewritten.
                .with_schema_mode(SchemaMode::Merge)
                .with_partition_columns(R::PARTITION_COLUMNS.iter().copied())
                .with_configuration(created_with)
                .with_commit_properties(commit)
                .await;
        }
        TableWrite::Merge(spec) => spec,
    };
    let table = if table.version().is_none() {
        // MERGE needs a table: create it empty, with its schema and partitioning.
        table
            .write(vec![RecordBatch::new_empty(R::arrow_schema())])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(R::PARTITION_COLUMNS.iter().copied())
            .with_configuration(created_with)
            .await?
    } else {
        table
    };
    let columns: Vec<String> = R::arrow_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let source = SessionContext::new().read_batch(batch)?;
    let mut merge = table
        .merge(source, spec.on)
        .with_source_alias("source")
        .with_target_alias("target")
        .with_commit_properties(commit);
    if let Some(when) = spec.delete_when {
        merge = merge.when_matched_delete(|d| d.predicate(when))?;
    }
    // `update: Some(&[])`: a matched row stays as it is (insert-if-absent).
    if spec.update.is_none_or(|sets| !sets.is_empty()) {
        merge = merge.when_matched_update(|mut u| {
            match spec.update {
                Some(sets) => {
                    for (column, value) in sets {
                        u = u.update(*column, *value);
                    }
                }
                None => {
                    for c in &columns {
                        u = u.update(c.as_str(), format!("source.{c}"));
                    }
                }
            }
            match spec.update_when {
                Some(when) => u.predicate(when),
                None => u,
            }
        })?;
    }
    merge = merge.when_not_matched_insert(|mut i| {
        for c in &columns {
            i = i.set(c.as_str(), format!("source.{c}"));
        }
        match spec.insert_when {
            Some(when) => i.predicate(when),
            None => i,
        }
    })?;
    let (table, metrics) = merge.await?;
    tracing::debug!(
        inserted = metrics.num_target_rows_inserted,
        updated = metrics.num_target_rows_updated,
        deleted = metrics.num_target_rows_deleted,
        "merge"
    );
    Ok(table)
}

/// Writes `rows` into `table` the way `R`'s table takes rows (creating the table if needed), in
/// one commit without offsets: for rebuilds of a table from its source, not for live sinks.
pub async fn write_rows<R: LakeRow>(
    lake: &LakeConfig,
    table: &str,
    rows: &[R],
) -> Result<DeltaTable, LakeError> {
    let handle = open_table(lake, table).await?;
    check_schema::<R>(&handle, table)?;
    if rows.is_empty() && handle.version().is_some() {
        return Ok(handle);
    }
    let properties = lake.table_properties();
    Ok(write::<R>(handle, R::to_batch(rows)?, Vec::new(), &properties).await?)
}

/// Refuses to write rows of `R` into `table` when its schema cannot take them (see
/// [`maintenance::incompatibility`]); a new optional column is fine: the next commit adds it.
pub fn check_schema<R: LakeRow>(table: &DeltaTable, name: &str) -> Result<(), LakeError> {
    if table.version().is_none() {
        return Ok(());
    }
    let existing = table.snapshot()?.snapshot().arrow_schema();
    match maintenance::incompatibility(&existing, &R::arrow_schema()) {
        Some(reason) => Err(LakeError::IncompatibleSchema {
            table: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Opens a table at `url`, or a handle on the empty location when no table is there yet.
pub async fn open_table(lake: &LakeConfig, table: &str) -> Result<DeltaTable, LakeError> {
    let url = lake.table_url(table)?;
    if let Ok(dir) = url.to_file_path() {
        std::fs::create_dir_all(&dir).map_err(|e| LakeError::BadUrl {
            url: url.to_string(),
            reason: format!("cannot create the table directory: {e}"),
        })?;
        if !dir.join("_delta_log").is_dir() {
            // No table yet (version `None`): not loaded, so the kernel logs no error for a log
            // that is not there.
            return Ok(deltalake::DeltaTableBuilder::from_url(url)?
                .with_storage_options(lake.storage_options.clone())
                .build()?);
        }
    }
    Ok(DeltaTable::try_from_url_with_storage_options(url, lake.storage_options.clone()).await?)
}

/// The `txn` version of `app_id` in the table's current snapshot.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>, LakeError> {
    if table.version().is_none() {
        return Ok(None);
    }
    let snapshot = table.snapshot()?;
    Ok(snapshot
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?)
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Next offset to accept; set once the partition is checked against the table.
    next: Option<i64>,
    /// Next offset as of the last commit.
    committed: Option<i64>,
    /// The first offset taken since the last commit: where to read again if the commit fails.
    first: Option<i64>,
}

/// Drains `topic` into the Delta table `table`.
pub struct DeltaSink<R: LakeRow> {
    kafka: KafkaConfig,
    lake: LakeConfig,
    topic: String,
    table: String,
    _row: PhantomData<R>,
}

impl<R: LakeRow> DeltaSink<R> {
    pub fn new(kafka: KafkaConfig, lake: LakeConfig, topic: String) -> Self {
        Self {
            kafka,
            lake,
            topic,
            table: R::TABLE.to_owned(),
            _row: PhantomData,
        }
    }

    fn stage(&self) -> String {
        format!("lake-{}", self.table)
    }

    fn partition_app_id(&self, partition: i32) -> String {
        format!("tributary-lake/{}/{}/{}", self.table, self.topic, partition)
    }

    fn source_app_id(&self, topic: &str, partition: i32) -> String {
        format!(
            "tributary-lake/{}/source/{}/{}",
            self.table, topic, partition
        )
    }

    /// Runs until the task is cancelled or a non-retryable error.
    pub async fn run(&self) -> Result<(), LakeError> {
        let input = StageConsumer::new(&self.kafka, &self.stage(), &self.topic)?;
        let consumer = input.consumer();
        let producer: FutureProducer = self
            .kafka
            .producer(&format!("tributary-{}", self.stage()))
            .create()?;
        let mut table = open_table(&self.lake, &self.table).await?;
        check_schema::<R>(&table, &self.table)?;
        let properties = self.lake.table_properties();
        self.align_group_offsets(consumer, &table).await?;
        input.subscribe()?;
        tracing::info!(topic = %self.topic, table = %self.table, version = ?table.version(), "delta sink started");

        let mut parts: HashMap<i32, PartitionState> = HashMap::new();
        let mut sources: HashMap<(String, i32), Option<i64>> = HashMap::new();
        let mut touched_sources: HashMap<(String, i32), i64> = HashMap::new();
        let mut rows: Vec<R> = Vec::new();
        let mut row_parts: Vec<i32> = Vec::new();
        let mut oldest: Option<Instant> = None;
        let flush_interval = Duration::from_millis(self.lake.flush_interval_ms);
        let (mut written, mut dropped) = (0u64, 0u64);
        let mut schedule = CompactionSchedule::new(&self.lake);

        loop {
            let wait = match oldest {
                Some(t) => flush_interval.saturating_sub(t.elapsed()),
                None => flush_interval,
            };
            let polled = input.poll(wait).await;
            for p in polled.revoked {
                parts.remove(&p);
                let kept: Vec<(i32, R)> = row_parts
                    .drain(..)
                    .zip(rows.drain(..))
                    .filter(|(rp, _)| *rp != p)
                    .collect();
                (row_parts, rows) = kept.into_iter().unzip();
                touched_sources.clear();
                sources.clear();
                if rows.is_empty() {
                    oldest = None;
                }
            }
            for p in polled.assigned {
                parts.insert(p, PartitionState::default());
                sources.clear();
            }
            match polled.record {
                Some(msg) => {
                    let p = msg.partition();
                    let offset = msg.offset();
                    let state = parts.entry(p).or_default();
                    if state.next.is_none() {
                        // The group offset was aligned with the table, but another instance may have
                        // committed since: the table decides where this partition resumes.
                        table.update_state().await.ok();
                        let stored = txn_version(&table, &self.partition_app_id(p)).await?;
                        state.committed = stored;
                        state.next = Some(stored.unwrap_or(offset));
                    }
                    let next = state.next.unwrap_or(offset);
                    if offset < next {
                        // Already in the table.
                        continue;
                    }
                    if offset > next {
                        // Offsets may have gaps (records a killed producer never completed).
                        tracing::debug!(partition = p, expected = next, got = offset, "offset gap");
                    }
                    state.next = Some(offset + 1);
                    state.first.get_or_insert(offset);
                    let row = match msg.payload() {
                        Some(payload) => match decode::<R::Record>(payload) {
                            Ok(record) => match R::from_record(record) {
                                Some(row) => row,
                                // Not a row of this table (e.g. a replay, for metering).
                                None => continue,
                            },
                            Err(e) => {
                                self.dead_letter(&producer, p, offset, payload, &e.to_string())
                                    .await?;
                                continue;
                            }
                        },
                        None => match R::from_tombstone(msg.key().unwrap_or_default()) {
                            Some(row) => row,
                            None => {
                                let reason =
                                    "a tombstone (null value), which this table does not take";
                                self.dead_letter(&producer, p, offset, &[], reason).await?;
                                continue;
                            }
                        },
                    };
                    // Rows of a derived topic: drop re-emissions by their source position. (When
                    // the consumed record is itself the source, its offset, checked above, is enough.)
                    if let Some(prov) = row.provenance() {
                        let key = (prov.topic.clone(), prov.partition);
                        let hwm = match sources.get(&key) {
                            Some(h) => *h,
                            None => {
                                let h =
                                    txn_version(&table, &self.source_app_id(&key.0, key.1)).await?;
                                sources.insert(key.clone(), h);
                                h
                            }
                        };
                        let seq = source_seq(prov.offset, prov.index);
                        if hwm.is_some_and(|h| seq <= h) {
                            dropped += 1;
                            continue;
                        }
                        sources.insert(key.clone(), Some(seq));
                        touched_sources.insert(key, seq);
                    }
                    rows.push(row);
                    row_parts.push(p);
                    oldest.get_or_insert_with(Instant::now);
                }
                None => {
                    if rows.is_empty() {
                        // The supervisor starts this sink again with a new consumer.
                        input.check_orphaned()?;
                    }
                }
            }
            let due = oldest.is_some_and(|t| t.elapsed() >= flush_interval)
                || rows.len() >= self.lake.flush_rows;
            if !due {
                continue;
            }
            let mut txns: Vec<Transaction> = Vec::new();
            let mut offsets = TopicPartitionList::new();
            for (p, s) in &parts {
                if let Some(next) = s.next
                    && s.committed != Some(next)
                {
                    txns.push(Transaction::new(self.partition_app_id(*p), next));
                    offsets.add_partition_offset(&self.topic, *p, Offset::Offset(next))?;
                }
            }
            for ((topic, sp), seq) in &touched_sources {
                txns.push(Transaction::new(self.source_app_id(topic, *sp), *seq));
            }
            let batch = R::to_batch(&rows)?;
            let count = batch.num_rows();
            let started = Instant::now();
            let result = write::<R>(table.clone(), batch, txns, &properties).await;
            match result {
                Ok(t) => {
                    table = t;
                    written += count as u64;
                    for s in parts.values_mut() {
                        s.committed = s.next;
                        s.first = None;
                    }
                    rows.clear();
                    row_parts.clear();
                    touched_sources.clear();
                    oldest = None;
                    tracing::info!(table = %self.table, rows = count, version = ?table.version(), ms = started.elapsed().as_millis() as u64, written, dropped, "delta commit");
                    if offsets.count() > 0
                        && let Err(e) = tokio::task::block_in_place(|| {
                            consumer.commit(&offsets, CommitMode::Sync)
                        })
                    {
                        tracing::debug!(error = %e, "kafka offset commit (advisory) failed");
                    }
                    if parts.contains_key(&0) {
                        table = schedule.run_due(table, &self.table).await;
                    }
                }
                Err(e) => {
                    // A concurrent writer's commit conflicted, another instance got these partitions,
                    // or storage failed: start over from what the table says, reading the
                    // uncommitted records again from Kafka (the consumer is rewound to them).
                    tracing::warn!(table = %self.table, error = %e, "delta commit failed; re-reading from the table's recorded offsets");
                    rows.clear();
                    row_parts.clear();
                    touched_sources.clear();
                    sources.clear();
                    oldest = None;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    table = open_table(&self.lake, &self.table).await?;
                    for (p, s) in parts.iter_mut() {
                        let stored = txn_version(&table, &self.partition_app_id(*p)).await?;
                        if let Some(target) = stored.or(s.first) {
                            rewind(consumer, &self.topic, *p, target)?;
                        }
                        *s = PartitionState::default();
                    }
                }
            }
        }
    }

    /// Commits the offsets recorded in the table to the consumer group before joining it, so every
    /// partition starts exactly where the table ends (the table is the truth; Kafka's copy may lag).
    async fn align_group_offsets(
        &self,
        consumer: &StreamConsumer<RecordingContext>,
        table: &DeltaTable,
    ) -> Result<(), LakeError> {
        // Blocking librdkafka calls: keep them off the async workers (the HTTP ingest shares them).
        let metadata = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(10))
        })?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            if let Some(v) = txn_version(table, &self.partition_app_id(p)).await? {
                tpl.add_partition_offset(&self.topic, p, Offset::Offset(v))?;
            }
        }
        if tpl.count() > 0 {
            tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))?;
            tracing::info!(topic = %self.topic, offsets = ?tpl.to_topic_map(), "group offsets aligned with the table");
        }
        Ok(())
    }

    /// Keeps a record this sink cannot decode in `deadletter`, with its position.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        partition: i32,
        offset: i64,
        bytes: &[u8],
        reason: &str,
    ) -> Result<(), LakeError> {
        tracing::warn!(topic = %self.topic, partition, offset, reason, "undecodable record dead-lettered");
        let dl = DeadLetter {
            tenant: String::new(),
            device: String::new(),
            event_id: None,
            stage: self.stage(),
            rule: "bad_record".into(),
            field: None,
            reason: format!("not a {} record: {reason}", R::Record::NAME),
            source_topic: self.topic.clone(),
            source_partition: partition,
            source_offset: offset,
            source_index: 0,
            received_at: now_micros(),
            original: bytes.to_vec(),
            measurement: None,
        };
        Ok(runtime::send_dead_letter(producer, &self.kafka.topics.deadletter, None, &dl).await?)
    }
}

/// The scheduled compaction of one table, run by its sink between commits (see [`maintenance`]):
/// every `lake.compact_interval_secs`, bin-packing of the partitions of yesterday and today; on the
/// first run of each UTC day, Z-ordering of yesterday's by `lake.zorder_by`.
struct CompactionSchedule {
    interval: Option<Duration>,
    zorder_by: Vec<String>,
    last: Instant,
    zordered_day: Option<String>,
}

impl CompactionSchedule {
    fn new(lake: &LakeConfig) -> Self {
        Self {
            interval: (lake.compact_interval_secs > 0)
                .then(|| Duration::from_secs(lake.compact_interval_secs)),
            zorder_by: lake.zorder_by.clone(),
            last: Instant::now(),
            zordered_day: None,
        }
    }

    /// Compacts when due; a failed compaction is logged and tried again at the next interval.
    async fn run_due(&mut self, table: DeltaTable, name: &str) -> DeltaTable {
        let Some(interval) = self.interval.filter(|i| self.last.elapsed() >= *i) else {
            return table;
        };
        self.last = Instant::now();
        let today = chrono::Utc::now().date_naive();
        let yesterday = (today - chrono::Days::new(1)).to_string();
        let mut table = table;
        let mut runs = vec![Compaction {
            since_day: Some(yesterday.clone()),
            ..Default::default()
        }];
        if !self.zorder_by.is_empty() && self.zordered_day.as_deref() != Some(yesterday.as_str()) {
            runs.push(Compaction {
                zorder_by: self.zorder_by.clone(),
                since_day: Some(yesterday.clone()),
                before_day: Some(today.to_string()),
                ..Default::default()
            });
        }
        for run in runs {
            let started = Instant::now();
            match maintenance::compact(table.clone(), &run).await {
                Ok((t, report)) => {
                    table = t;
                    if !run.zorder_by.is_empty() {
                        self.zordered_day = Some(yesterday.clone());
                    }
                    tracing::info!(table = name, zorder_by = ?run.zorder_by, ms = started.elapsed().as_millis() as u64, "scheduled compaction: {report}");
                }
                Err(e) => {
                    tracing::warn!(table = name, error = %e, retry_in = ?interval, "scheduled compaction failed");
                }
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::devices::DeviceState;
    use crate::tables::usage::UsageEvent;
    use deltalake::datafusion::prelude::SessionContext;
    use std::sync::Arc;
    use tributary_schemas::registry::{Device, RegistryChange, RegistryEvent};
    use tributary_schemas::{RawEnvelope, Source};

    async fn query(table: &DeltaTable, sql: &str) -> Vec<String> {
        let ctx = SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("t", table.table_provider().await.unwrap())
            .unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        text.lines().map(str::to_owned).collect()
    }

    fn temp_lake(dir: &tempfile::TempDir) -> LakeConfig {
        LakeConfig {
            url: dir.path().display().to_string(),
            ..Default::default()
        }
    }

    fn raw(tenant: &str, device: &str, bytes: usize) -> UsageEvent {
        UsageEvent::from_record(RawEnvelope {
            event_id: "e".into(),
            tenant: tenant.into(),
            device: device.into(),
            source: Source::Mqtt,
            received_at: 1_795_392_000_000_000,
            content_type: "application/json".into(),
            payload: vec![b'x'; bytes],
            subject: None,
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        })
        .expect("device traffic is metered")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn usage_merges_add_up_and_record_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let lake = temp_lake(&dir);
        let table = open_table(&lake, "usage").await.unwrap();
        let first = vec![raw("t1", "d1", 10), raw("t1", "d1", 5), raw("", "ghost", 7)];
        let batch = UsageEvent::to_batch(&first).unwrap();
        let txn = vec![Transaction::new("app/raw/0", 3)];
        let table = write::<UsageEvent>(table, batch, txn, &[]).await.unwrap();
        let second = vec![raw("t1", "d1", 1), raw("", "ghost", 1), raw("t2", "d9", 2)];
        let batch = UsageEvent::to_batch(&second).unwrap();
        let txn = vec![Transaction::new("app/raw/0", 6)];
        let table = write::<UsageEvent>(table, batch, txn, &[]).await.unwrap();
        assert_eq!(txn_version(&table, "app/raw/0").await.unwrap(), Some(6));
        let rows = query(
            &table,
            "SELECT tenant, device, events, bytes FROM t ORDER BY device",
        )
        .await;
        assert_eq!(
            rows[3..6],
            [
                "| t1     | d1     | 3      | 16    |",
                "| t2     | d9     | 1      | 2     |",
                "|        | ghost  | 2      | 8     |",
            ]
        );
    }

    fn anomaly(id: &str, seq: i32) -> tributary_schemas::avro::Anomaly {
        tributary_schemas::avro::Anomaly {
            anomaly_id: id.into(),
            seq,
            state: if seq == 0 {
                tributary_schemas::avro::AnomalyState::Open
            } else {
                tributary_schemas::avro::AnomalyState::Resolved
            },
            tenant: "t1".into(),
            device: "d1".into(),
            metric: "temperature".into(),
            detector: "hot".into(),
            kind: "threshold".into(),
            severity: "critical".into(),
            device_group: Some("pumps".into()),
            site: vec!["north".into(), "hall 3".into()],
            start_time: 1_795_392_000_000_000,
            end_time: (seq > 0).then_some(1_795_392_060_000_000),
            event_time: 1_795_392_000_000_000 + i64::from(seq) * 60_000_000,
            value: 90.0,
            baseline: None,
            threshold: Some(80.0),
            score: Some(10.0),
            window_secs: None,
            predicted_time: None,
            readings: 3,
            flaps: 0,
            suppressed: 0,
            message: "temperature 90 above 80".into(),
            source_topic: "telemetry".into(),
            source_partition: 0,
            source_offset: 7,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn anomaly_records_published_again_are_merged_once() {
        use tributary_schemas::avro::Anomaly;
        let dir = tempfile::tempdir().unwrap();
        let lake = temp_lake(&dir);
        // After a crash the stage publishes records again: within one batch and across batches.
        write_rows::<Anomaly>(&lake, "anomalies", &[anomaly("a", 0), anomaly("a", 0)])
            .await
            .unwrap();
        let table = write_rows::<Anomaly>(
            &lake,
            "anomalies",
            &[anomaly("a", 0), anomaly("a", 1), anomaly("b", 0)],
        )
        .await
        .unwrap();
        let rows = query(
            &table,
            "SELECT anomaly_id, seq, state, site[2] AS section FROM t ORDER BY anomaly_id, seq",
        )
        .await;
        assert_eq!(
            rows[3..6],
            [
                "| a          | 0   | open     | hall 3  |",
                "| a          | 1   | resolved | hall 3  |",
                "| b          | 0   | open     | hall 3  |",
            ]
        );
        assert_eq!(rows.len(), 7, "{rows:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn device_merges_upsert_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let lake = temp_lake(&dir);
        let event = |id: &str, change: RegistryChange, model: &str| {
            let mut d = Device::new(id, "t1", 1);
            d.model = Some(model.into());
            DeviceState::from_record(RegistryEvent {
                device: id.into(),
                tenant: "t1".into(),
                change,
                at: 1,
                actor: "test".into(),
                state: Some(d),
            })
            .expect("every registry event is a row")
        };
        let table = open_table(&lake, "devices").await.unwrap();
        let batch = DeviceState::to_batch(&[
            event("a", RegistryChange::Created, "m1"),
            event("b", RegistryChange::Created, "m1"),
        ])
        .unwrap();
        let table = write::<DeviceState>(table, batch, vec![], &[])
            .await
            .unwrap();
        let batch = DeviceState::to_batch(&[
            event("a", RegistryChange::Updated, "m2"),
            event("b", RegistryChange::Deleted, ""),
            event("c", RegistryChange::Created, "m3"),
        ])
        .unwrap();
        let table = write::<DeviceState>(table, batch, vec![], &[])
            .await
            .unwrap();
        let rows = query(&table, "SELECT device, model FROM t ORDER BY device").await;
        assert_eq!(rows[3..5], ["| a      | m2    |", "| c      | m3    |"]);
        assert_eq!(rows.len(), 6, "{rows:#?}");
    }

    fn reading(event_id: &str) -> tributary_schemas::Reading {
        tributary_schemas::Reading {
            tenant: "t1".into(),
            device: "d1".into(),
            metric: "temperature".into(),
            value: 21.5,
            unit: Some("Cel".into()),
            original_value: None,
            original_unit: None,
            late: false,
            event_time: 1_795_392_000_000_000,
            ingest_time: 1_795_392_000_100_000,
            event_id: event_id.into(),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: 1,
            source_index: 0,
            measurement: Some(0),
            name: None,
            conflict: false,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_optional_column_is_added_without_a_rewrite_and_an_incompatible_change_is_refused() {
        use arrow::array::{ArrayRef, StringArray};
        use tributary_schemas::Reading;
        let dir = tempfile::tempdir().unwrap();
        let lake = temp_lake(&dir);
        // The table as the earlier version wrote it: without `measurement`.
        let full = Reading::to_batch(&[reading("e1")]).unwrap();
        let older: Vec<usize> = (0..full.num_columns())
            .filter(|i| full.schema().field(*i).name() != "measurement")
            .collect();
        let table = open_table(&lake, "telemetry")
            .await
            .unwrap()
            .write(vec![full.project(&older).unwrap()])
            .with_partition_columns(["tenant", "day"])
            .await
            .unwrap();
        let first: Vec<String> = table.get_file_uris().unwrap().collect();
        assert_eq!(first.len(), 1);
        check_schema::<Reading>(&table, "telemetry").unwrap();
        let table = write::<Reading>(
            table,
            Reading::to_batch(&[reading("e2")]).unwrap(),
            vec![],
            &[],
        )
        .await
        .unwrap();
        let rows = query(
            &table,
            "SELECT event_id, measurement FROM t ORDER BY event_id",
        )
        .await;
        assert_eq!(
            rows[3..5],
            ["| e1       |             |", "| e2       | 0           |"]
        );
        let files: Vec<String> = table.get_file_uris().unwrap().collect();
        assert!(first.iter().all(|f| files.contains(f)), "no rewrite");
        assert_eq!(files.len(), 2);

        // A table whose `value` column holds text cannot take readings.
        let mut columns: Vec<ArrayRef> = full.columns().to_vec();
        let mut fields: Vec<arrow::datatypes::FieldRef> = full.schema().fields().to_vec();
        let at = full.schema().index_of("value").unwrap();
        columns[at] = Arc::new(StringArray::from(vec!["21.5"]));
        fields[at] = Arc::new(arrow::datatypes::Field::new(
            "value",
            arrow::datatypes::DataType::Utf8,
            false,
        ));
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        let text = RecordBatch::try_new(schema, columns).unwrap();
        let other = open_table(&lake, "other")
            .await
            .unwrap()
            .write(vec![text])
            .await
            .unwrap();
        let err = check_schema::<Reading>(&other, "other")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "table `other` cannot take these rows: column `value` is Utf8 in the table but Float64 in the rows"
            ),
            "{err}"
        );
    }

    #[test]
    fn source_positions_order_like_offsets_then_index() {
        assert!(source_seq(5, 0xFFFF) < source_seq(6, 0));
        assert!(source_seq(5, 1) < source_seq(5, 2));
        assert_eq!(source_seq(0, 0), 0);
    }
}
