//! Table `anomalies`: one row per anomaly lifecycle record (open, updates, resolved), partitioned
//! by tenant and the UTC day of the record's event time. Drained from topic `anomalies` (Avro
//! `Anomaly`). Written by MERGE, inserting only records whose (anomaly_id, seq) the table does not
//! hold: after a crash the anomaly stage publishes some records again (identical ids and seqs),
//! and the table still holds each once.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tributary_schemas::avro::Anomaly;

use super::{
    LakeRow, MergeSpec, TableWrite, days, i32s, i64s, named_batch, string_list, string_lists,
    strings, timestamps, ts,
};

static MERGE: MergeSpec = MergeSpec {
    on: "target.tenant = source.tenant AND target.day = source.day AND target.anomaly_id = source.anomaly_id AND target.seq = source.seq",
    delete_when: None,
    // Matched: already there, nothing to change.
    update: Some(&[]),
    update_when: None,
    insert_when: None,
};

impl LakeRow for Anomaly {
    type Record = Anomaly;
    const TABLE: &'static str = "anomalies";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant", "day"];
    const WRITE: TableWrite = TableWrite::Merge(&MERGE);

    fn from_record(record: Anomaly) -> Option<Self> {
        Some(record)
    }

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![
                Field::new("anomaly_id", DataType::Utf8, false),
                Field::new("seq", DataType::Int32, false),
                Field::new("state", DataType::Utf8, false),
                Field::new("tenant", DataType::Utf8, false),
                Field::new("device", DataType::Utf8, false),
                Field::new("metric", DataType::Utf8, false),
                Field::new("detector", DataType::Utf8, false),
                Field::new("kind", DataType::Utf8, false),
                Field::new("severity", DataType::Utf8, false),
                Field::new("device_group", DataType::Utf8, true),
                Field::new("site", string_list(), true),
                Field::new("start_time", ts(), false),
                Field::new("end_time", ts(), true),
                Field::new("event_time", ts(), false),
                Field::new("value", DataType::Float64, false),
                Field::new("baseline", DataType::Float64, true),
                Field::new("threshold", DataType::Float64, true),
                Field::new("score", DataType::Float64, true),
                Field::new("window_secs", DataType::Float64, true),
                Field::new("predicted_time", ts(), true),
                Field::new("readings", DataType::Int64, false),
                Field::new("flaps", DataType::Int32, false),
                Field::new("suppressed", DataType::Int32, false),
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
        // A record published twice within one batch is merged once (MERGE refuses a source with
        // two rows for one target row).
        let mut seen = HashSet::new();
        let rows: Vec<&Anomaly> = rows
            .iter()
            .filter(|a| seen.insert((a.anomaly_id.as_str(), a.seq)))
            .collect();
        let f64s = |f: fn(&Anomaly) -> Option<f64>| -> ArrayRef {
            Arc::new(rows.iter().map(|a| f(a)).collect::<Float64Array>())
        };
        let opt_ts = |f: fn(&Anomaly) -> Option<i64>| -> ArrayRef {
            Arc::new(
                rows.iter()
                    .map(|a| f(a))
                    .collect::<TimestampMicrosecondArray>()
                    .with_timezone("UTC"),
            )
        };
        named_batch(
            Self::arrow_schema(),
            vec![
                (
                    "anomaly_id",
                    strings(rows.iter().map(|a| Some(a.anomaly_id.as_str()))),
                ),
                ("seq", i32s(rows.iter().map(|a| a.seq))),
                (
                    "state",
                    strings(rows.iter().map(|a| Some(a.state.as_str()))),
                ),
                (
                    "tenant",
                    strings(rows.iter().map(|a| Some(a.tenant.as_str()))),
                ),
                (
                    "device",
                    strings(rows.iter().map(|a| Some(a.device.as_str()))),
                ),
                (
                    "metric",
                    strings(rows.iter().map(|a| Some(a.metric.as_str()))),
                ),
                (
                    "detector",
                    strings(rows.iter().map(|a| Some(a.detector.as_str()))),
                ),
                ("kind", strings(rows.iter().map(|a| Some(a.kind.as_str())))),
                (
                    "severity",
                    strings(rows.iter().map(|a| Some(a.severity.as_str()))),
                ),
                (
                    "device_group",
                    strings(rows.iter().map(|a| a.device_group.as_deref())),
                ),
                ("site", string_lists(rows.iter().map(|a| a.site.as_slice()))),
                ("start_time", timestamps(rows.iter().map(|a| a.start_time))),
                ("end_time", opt_ts(|a| a.end_time)),
                ("event_time", timestamps(rows.iter().map(|a| a.event_time))),
                (
                    "value",
                    Arc::new(rows.iter().map(|a| a.value).collect::<Float64Array>()),
                ),
                ("baseline", f64s(|a| a.baseline)),
                ("threshold", f64s(|a| a.threshold)),
                ("score", f64s(|a| a.score)),
                ("window_secs", f64s(|a| a.window_secs)),
                ("predicted_time", opt_ts(|a| a.predicted_time)),
                (
                    "readings",
                    Arc::new(rows.iter().map(|a| a.readings).collect::<Int64Array>()),
                ),
                (
                    "flaps",
                    Arc::new(rows.iter().map(|a| a.flaps).collect::<Int32Array>()),
                ),
                (
                    "suppressed",
                    Arc::new(rows.iter().map(|a| a.suppressed).collect::<Int32Array>()),
                ),
                (
                    "message",
                    strings(rows.iter().map(|a| Some(a.message.as_str()))),
                ),
                (
                    "source_topic",
                    strings(rows.iter().map(|a| Some(a.source_topic.as_str()))),
                ),
                (
                    "source_partition",
                    i32s(rows.iter().map(|a| a.source_partition)),
                ),
                ("source_offset", i64s(rows.iter().map(|a| a.source_offset))),
                ("day", days(rows.iter().map(|a| a.event_time))),
            ],
        )
    }
}
