//! Table `telemetry`: one row per clean reading, appended, partitioned by tenant and the UTC day of
//! its event time. Drained from topic `telemetry` (Avro `Reading`).
//!
//! `original_value`, `original_unit`, `late` and `measurement` came with the metric catalog, `name`
//! (the resolved SenML name) and `conflict` (a second value kept for the same instant) after, then
//! `device_group`, `device_model` and `site` (stamped at ingest from the registry): they
//! are the last columns, nullable, so a table written before them gains them on its next commit (Delta schema
//! evolution; older files read them as null).

use std::sync::{Arc, LazyLock};

use arrow::array::{BooleanArray, Float64Array, Float64Builder, Int32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tributary_schemas::Reading;
use tributary_schemas::avro::{Derived, Provenance};

use super::{
    LakeRow, TableWrite, days, i32s, i64s, named_batch, string_list, string_lists, strings,
    timestamps, ts,
};

impl LakeRow for Reading {
    type Record = Reading;
    const TABLE: &'static str = "telemetry";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant", "day"];
    const WRITE: TableWrite = TableWrite::Append;

    fn from_record(record: Reading) -> Option<Self> {
        Some(record)
    }

    fn provenance(&self) -> Option<Provenance> {
        Some(Derived::provenance(self))
    }

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
                // Added with the metric catalog (schema evolution: nullable, appended).
                Field::new("original_value", DataType::Float64, true),
                Field::new("original_unit", DataType::Utf8, true),
                Field::new("late", DataType::Boolean, true),
                Field::new("measurement", DataType::Int32, true),
                // Added with SenML names and conflicting readings (issue 14).
                Field::new("name", DataType::Utf8, true),
                Field::new("conflict", DataType::Boolean, true),
                // Stamped at ingest from the registry (issue 15): a per-zone average needs no join.
                Field::new("device_group", DataType::Utf8, true),
                Field::new("device_model", DataType::Utf8, true),
                Field::new("site", string_list(), true),
            ]))
        });
        S.clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut value = Float64Builder::with_capacity(rows.len());
        for r in rows {
            value.append_value(r.value);
        }
        named_batch(
            Self::arrow_schema(),
            vec![
                (
                    "tenant",
                    strings(rows.iter().map(|r| Some(r.tenant.as_str()))),
                ),
                (
                    "device",
                    strings(rows.iter().map(|r| Some(r.device.as_str()))),
                ),
                (
                    "metric",
                    strings(rows.iter().map(|r| Some(r.metric.as_str()))),
                ),
                ("value", Arc::new(value.finish())),
                ("unit", strings(rows.iter().map(|r| r.unit.as_deref()))),
                ("event_time", timestamps(rows.iter().map(|r| r.event_time))),
                (
                    "ingest_time",
                    timestamps(rows.iter().map(|r| r.ingest_time)),
                ),
                (
                    "event_id",
                    strings(rows.iter().map(|r| Some(r.event_id.as_str()))),
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
                ("day", days(rows.iter().map(|r| r.event_time))),
                (
                    "original_value",
                    Arc::new(
                        rows.iter()
                            .map(|r| r.original_value)
                            .collect::<Float64Array>(),
                    ),
                ),
                (
                    "original_unit",
                    strings(rows.iter().map(|r| r.original_unit.as_deref())),
                ),
                (
                    "late",
                    Arc::new(rows.iter().map(|r| Some(r.late)).collect::<BooleanArray>()),
                ),
                (
                    "measurement",
                    Arc::new(rows.iter().map(|r| r.measurement).collect::<Int32Array>()),
                ),
                ("name", strings(rows.iter().map(|r| r.name.as_deref()))),
                (
                    "conflict",
                    Arc::new(
                        rows.iter()
                            .map(|r| Some(r.conflict))
                            .collect::<BooleanArray>(),
                    ),
                ),
                (
                    "device_group",
                    strings(rows.iter().map(|r| r.device_group.as_deref())),
                ),
                (
                    "device_model",
                    strings(rows.iter().map(|r| r.device_model.as_deref())),
                ),
                ("site", string_lists(rows.iter().map(|r| r.site.as_slice()))),
            ],
        )
    }
}
