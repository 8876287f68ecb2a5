//! The lake's tables: their Arrow schemas and how topic records become rows.
//!
//! Every table is partitioned by `tenant` and `day` (UTC date). Timestamps are UTC microseconds
//! (`timestamp`, not `timestamp_ntz`, so every Delta reader can read them).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BinaryBuilder, Date32Builder, Float64Builder, Int32Builder, Int64Builder,
    RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use tributary_schemas::avro::{Derived, TopicRecord};
use tributary_schemas::{DeadLetter, Micros, Reading};

/// The partition columns of every table.
pub const PARTITION_COLUMNS: [&str; 2] = ["tenant", "day"];

/// A topic record that is also a lake row.
pub trait LakeRow: TopicRecord + Derived + Send + Sync + 'static {
    /// Default table name (and the topic it is drained from, by default).
    const TABLE: &'static str;
    fn arrow_schema() -> SchemaRef;
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError>;
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// UTC day number since the epoch of a timestamp.
pub fn day_of(t: Micros) -> i32 {
    t.div_euclid(86_400_000_000) as i32
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish())
}

fn timestamps(values: impl Iterator<Item = Micros>) -> ArrayRef {
    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn days(values: impl Iterator<Item = Micros>) -> ArrayRef {
    let mut b = Date32Builder::new();
    for v in values {
        b.append_value(day_of(v));
    }
    Arc::new(b.finish())
}

fn i32s(values: impl Iterator<Item = i32>) -> ArrayRef {
    let mut b = Int32Builder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn i64s(values: impl Iterator<Item = i64>) -> ArrayRef {
    let mut b = Int64Builder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl LakeRow for Reading {
    const TABLE: &'static str = "telemetry";

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![
                Field::new("tenant", DataType::Utf8, false),
                Field::new("device", DataType::Utf8, false),
                Field::new("metric", DataType::Utf8, false),
                Field::new("value", DataType::Float64, false),
                Field::new("unit", DataType::Utf8, true),
                Field::new("event_time", ts(), false),
                Field::new("ingest_time", ts(), false),
                Field::new("event_id", DataType::Utf8, false),
                Field::new("source_topic", DataType::Utf8, false),
                Field::new("source_partition", DataType::Int32, false),
                Field::new("source_offset", DataType::Int64, false),
                Field::new("source_index", DataType::Int32, false),
                Field::new("day", DataType::Date32, false),
            ]))
        });
        S.clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut value = Float64Builder::with_capacity(rows.len());
        for r in rows {
            value.append_value(r.value);
        }
        RecordBatch::try_new(
            Self::arrow_schema(),
            vec![
                strings(rows.iter().map(|r| Some(r.tenant.as_str()))),
                strings(rows.iter().map(|r| Some(r.device.as_str()))),
                strings(rows.iter().map(|r| Some(r.metric.as_str()))),
                Arc::new(value.finish()),
                strings(rows.iter().map(|r| r.unit.as_deref())),
                timestamps(rows.iter().map(|r| r.event_time)),
                timestamps(rows.iter().map(|r| r.ingest_time)),
                strings(rows.iter().map(|r| Some(r.event_id.as_str()))),
                strings(rows.iter().map(|r| Some(r.source_topic.as_str()))),
                i32s(rows.iter().map(|r| r.source_partition)),
                i64s(rows.iter().map(|r| r.source_offset)),
                i32s(rows.iter().map(|r| r.source_index)),
                days(rows.iter().map(|r| r.event_time)),
            ],
        )
    }
}

impl LakeRow for DeadLetter {
    const TABLE: &'static str = "deadletter";

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![
                Field::new("tenant", DataType::Utf8, true),
                Field::new("device", DataType::Utf8, true),
                Field::new("event_id", DataType::Utf8, true),
                Field::new("stage", DataType::Utf8, false),
                Field::new("rule", DataType::Utf8, false),
                Field::new("field", DataType::Utf8, true),
                Field::new("reason", DataType::Utf8, false),
                Field::new("source_topic", DataType::Utf8, false),
                Field::new("source_partition", DataType::Int32, false),
                Field::new("source_offset", DataType::Int64, false),
                Field::new("source_index", DataType::Int32, false),
                Field::new("received_at", ts(), false),
                Field::new("original", DataType::Binary, false),
                Field::new("day", DataType::Date32, false),
            ]))
        });
        S.clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut original = BinaryBuilder::new();
        for r in rows {
            original.append_value(&r.original);
        }
        RecordBatch::try_new(
            Self::arrow_schema(),
            vec![
                // Unknown tenant or device: null (an empty partition value would read back as null anyway).
                strings(rows.iter().map(|r| non_empty(&r.tenant))),
                strings(rows.iter().map(|r| non_empty(&r.device))),
                strings(rows.iter().map(|r| r.event_id.as_deref())),
                strings(rows.iter().map(|r| Some(r.stage.as_str()))),
                strings(rows.iter().map(|r| Some(r.rule.as_str()))),
                strings(rows.iter().map(|r| r.field.as_deref())),
                strings(rows.iter().map(|r| Some(r.reason.as_str()))),
                strings(rows.iter().map(|r| Some(r.source_topic.as_str()))),
                i32s(rows.iter().map(|r| r.source_partition)),
                i64s(rows.iter().map(|r| r.source_offset)),
                i32s(rows.iter().map(|r| r.source_index)),
                timestamps(rows.iter().map(|r| r.received_at)),
                Arc::new(original.finish()),
                days(rows.iter().map(|r| r.received_at)),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_partition_is_the_utc_date() {
        // 2026-11-22T23:59:59Z and 2026-11-23T00:00:00Z
        assert_eq!(
            day_of(1_795_391_999_000_000) + 1,
            day_of(1_795_392_000_000_000)
        );
        assert_eq!(day_of(-1), -1);
    }
}
