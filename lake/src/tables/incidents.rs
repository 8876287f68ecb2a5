//! Table `incidents`: one row per incident lifecycle record (open, updates, actions, resolve),
//! partitioned by tenant and the UTC day the incident began (its earliest member's start), so an
//! incident's records stay in one partition. Drained from topic `incidents` (Avro `Incident`).
//! Written by MERGE, inserting only records whose (incident_id, seq) the table does not hold: after
//! a crash the incident stage publishes some records again (identical ids and seqs).
//! The current state of each incident is its row of highest `seq`.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tributary_schemas::avro::Incident;

use super::{
    LakeRow, MergeSpec, TableWrite, days, i32s, i64s, named_batch, string_list, string_lists,
    strings, timestamps, ts,
};

static MERGE: MergeSpec = MergeSpec {
    on: "target.tenant = source.tenant AND target.day = source.day AND target.incident_id = source.incident_id AND target.seq = source.seq",
    delete_when: None,
    update: Some(&[]),
    update_when: None,
    insert_when: None,
};

impl LakeRow for Incident {
    type Record = Incident;
    const TABLE: &'static str = "incidents";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant", "day"];
    const WRITE: TableWrite = TableWrite::Merge(&MERGE);

    fn from_record(record: Incident) -> Option<Self> {
        Some(record)
    }

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![
                Field::new("incident_id", DataType::Utf8, false),
                Field::new("seq", DataType::Int32, false),
                Field::new("change", DataType::Utf8, false),
                Field::new("status", DataType::Utf8, false),
                Field::new("tenant", DataType::Utf8, false),
                Field::new("rule", DataType::Utf8, false),
                Field::new("correlate", DataType::Utf8, false),
                Field::new("scope", DataType::Utf8, false),
                Field::new("site", string_list(), true),
                Field::new("device_group", DataType::Utf8, true),
                Field::new("severity", DataType::Utf8, false),
                Field::new("first_time", ts(), false),
                Field::new("last_time", ts(), false),
                Field::new("end_time", ts(), true),
                Field::new("event_time", ts(), false),
                Field::new("members", string_list(), true),
                Field::new("devices", string_list(), true),
                Field::new("metrics", string_list(), true),
                Field::new("detectors", string_list(), true),
                Field::new("correlation_key", DataType::Utf8, true),
                Field::new("member_count", DataType::Int32, false),
                Field::new("open_members", DataType::Int32, false),
                Field::new("device_count", DataType::Int32, false),
                Field::new("anomaly_records", DataType::Int64, false),
                Field::new("actor", DataType::Utf8, true),
                Field::new("acted_at", ts(), true),
                Field::new("comment", DataType::Utf8, true),
                Field::new("snoozed_until", ts(), true),
                Field::new("message", DataType::Utf8, false),
                Field::new("source_topic", DataType::Utf8, false),
                Field::new("source_partition", DataType::Int32, false),
                Field::new("source_offset", DataType::Int64, false),
                Field::new("day", DataType::Date32, false),
            ]))
        });
        S.clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut seen = HashSet::new();
        let rows: Vec<&Incident> = rows
            .iter()
            .filter(|i| seen.insert((i.incident_id.as_str(), i.seq)))
            .collect();
        let text = |f: fn(&Incident) -> &str| strings(rows.iter().map(|i| Some(f(i))));
        let opt_text = |f: fn(&Incident) -> Option<&str>| strings(rows.iter().map(|i| f(i)));
        let lists = |f: fn(&Incident) -> &[String]| string_lists(rows.iter().map(|i| f(i)));
        let opt_ts = |f: fn(&Incident) -> Option<i64>| -> ArrayRef {
            Arc::new(
                rows.iter()
                    .map(|i| f(i))
                    .collect::<TimestampMicrosecondArray>()
                    .with_timezone("UTC"),
            )
        };
        named_batch(
            Self::arrow_schema(),
            vec![
                ("incident_id", text(|i| &i.incident_id)),
                ("seq", i32s(rows.iter().map(|i| i.seq))),
                ("change", text(|i| i.change.as_str())),
                ("status", text(|i| i.status.as_str())),
                ("tenant", text(|i| &i.tenant)),
                ("rule", text(|i| &i.rule)),
                ("correlate", text(|i| &i.correlate)),
                ("scope", text(|i| &i.scope)),
                ("site", lists(|i| &i.site)),
                ("device_group", opt_text(|i| i.device_group.as_deref())),
                ("severity", text(|i| &i.severity)),
                ("first_time", timestamps(rows.iter().map(|i| i.first_time))),
                ("last_time", timestamps(rows.iter().map(|i| i.last_time))),
                ("end_time", opt_ts(|i| i.end_time)),
                ("event_time", timestamps(rows.iter().map(|i| i.event_time))),
                ("members", lists(|i| &i.members)),
                ("devices", lists(|i| &i.devices)),
                ("metrics", lists(|i| &i.metrics)),
                ("detectors", lists(|i| &i.detectors)),
                (
                    "correlation_key",
                    opt_text(|i| Some(i.correlation_key.as_str())),
                ),
                ("member_count", i32s(rows.iter().map(|i| i.member_count))),
                ("open_members", i32s(rows.iter().map(|i| i.open_members))),
                ("device_count", i32s(rows.iter().map(|i| i.device_count))),
                (
                    "anomaly_records",
                    i64s(rows.iter().map(|i| i.anomaly_records)),
                ),
                ("actor", opt_text(|i| i.actor.as_deref())),
                ("acted_at", opt_ts(|i| i.acted_at)),
                ("comment", opt_text(|i| i.comment.as_deref())),
                ("snoozed_until", opt_ts(|i| i.snoozed_until)),
                ("message", text(|i| &i.message)),
                ("source_topic", text(|i| &i.source_topic)),
                (
                    "source_partition",
                    i32s(rows.iter().map(|i| i.source_partition)),
                ),
                ("source_offset", i64s(rows.iter().map(|i| i.source_offset))),
                ("day", days(rows.iter().map(|i| i.first_time))),
            ],
        )
    }
}
