//! Table `deadletter`: one row per rejected input with the stage, rule, field and reason, and the
//! original bytes; appended, partitioned by tenant and the UTC day it was received. Drained from
//! topic `deadletter` (Avro `DeadLetter`).

use std::sync::{Arc, LazyLock};

use arrow::array::{BinaryBuilder, Int32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tributary_schemas::DeadLetter;
use tributary_schemas::avro::{Derived, Provenance};

use super::{
    LakeRow, TableWrite, days, i32s, i64s, named_batch, non_empty, strings, timestamps, ts,
};

impl LakeRow for DeadLetter {
    type Record = DeadLetter;
    const TABLE: &'static str = "deadletter";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant", "day"];
    const WRITE: TableWrite = TableWrite::Append;

    fn from_record(record: DeadLetter) -> Option<Self> {
        Some(record)
    }

    fn provenance(&self) -> Option<Provenance> {
        Some(Derived::provenance(self))
    }

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
                // Added for replays (schema evolution: nullable, appended).
                Field::new("measurement", DataType::Int32, true),
            ]))
        });
        S.clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut original = BinaryBuilder::new();
        for r in rows {
            original.append_value(&r.original);
        }
        // Unknown tenant or device: null (an empty partition value would read back as null anyway).
        named_batch(
            Self::arrow_schema(),
            vec![
                ("tenant", strings(rows.iter().map(|r| non_empty(&r.tenant)))),
                ("device", strings(rows.iter().map(|r| non_empty(&r.device)))),
                (
                    "event_id",
                    strings(rows.iter().map(|r| r.event_id.as_deref())),
                ),
                (
                    "stage",
                    strings(rows.iter().map(|r| Some(r.stage.as_str()))),
                ),
                ("rule", strings(rows.iter().map(|r| Some(r.rule.as_str())))),
                ("field", strings(rows.iter().map(|r| r.field.as_deref()))),
                (
                    "reason",
                    strings(rows.iter().map(|r| Some(r.reason.as_str()))),
                ),
                (
                    "source_topic",
                    strings(rows.iter().map(|r| Some(r.source_topic.as_str()))),
                ),
                (
                    "source_partition",
                    i32s(rows.iter().map(|r| r.source_partition)),
                ),
                ("source_offset", i64s(rows.iter().map(|r| r.source_offset))),
                ("source_index", i32s(rows.iter().map(|r| r.source_index))),
                (
                    "received_at",
                    timestamps(rows.iter().map(|r| r.received_at)),
                ),
                ("original", Arc::new(original.finish())),
                ("day", days(rows.iter().map(|r| r.received_at))),
                (
                    "measurement",
                    Arc::new(rows.iter().map(|r| r.measurement).collect::<Int32Array>()),
                ),
            ],
        )
    }
}
