//! The lake's tables: their Arrow schemas, how topic records become rows, and how rows are
//! written (appended, or merged into the rows already there).
//!
//! One module per table, each with its schema beside its row type:
//! - [`telemetry`]: clean readings (topic `telemetry`), appended, partitioned by tenant and day;
//! - [`deadletter`]: rejected inputs (topic `deadletter`), appended, partitioned by tenant and day;
//! - [`devices`]: the device registry's current state (topic `registry`), one row per device, merged;
//! - [`anomalies`], [`incidents`]: lifecycle records (topics `anomalies`, `incidents`), merged
//!   (inserted when absent), partitioned by tenant and day;
//! - [`usage`]: events and bytes received per tenant, device and hour (topic `raw`), merged (added);
//! - [`shadows`]: device shadows (topic `shadows`): `shadows` as they are now (merged, newest
//!   version wins) and `shadow_history`, every version with its validity (merged, inserted when
//!   absent), partitioned by tenant.
//!
//! Timestamps are UTC microseconds (`timestamp`, not `timestamp_ntz`, so every Delta reader can read
//! them); lists and maps use Delta's field names (`element`, `key_value`/`key`/`value`) so what is
//! written reads back with the same Arrow type.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Date32Builder, Int32Builder, Int64Builder, ListBuilder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use tributary_schemas::Micros;
use tributary_schemas::avro::{Provenance, TopicRecord};

pub mod anomalies;
pub mod deadletter;
pub mod devices;
pub mod incidents;
pub mod shadows;
pub mod telemetry;
pub mod usage;

/// Every table the pipeline writes, by name.
pub const TABLES: [&str; 8] = [
    <tributary_schemas::Reading as LakeRow>::TABLE,
    <tributary_schemas::avro::Anomaly as LakeRow>::TABLE,
    <tributary_schemas::avro::Incident as LakeRow>::TABLE,
    <tributary_schemas::DeadLetter as LakeRow>::TABLE,
    <devices::DeviceState as LakeRow>::TABLE,
    <usage::UsageEvent as LakeRow>::TABLE,
    <shadows::ShadowRow as LakeRow>::TABLE,
    <shadows::ShadowVersion as LakeRow>::TABLE,
];

/// How a table takes a batch of rows.
#[derive(Debug, Clone, Copy)]
pub enum TableWrite {
    /// Appended as new rows.
    Append,
    /// Merged into the table's rows (Delta `MERGE`): see [`MergeSpec`].
    Merge(&'static MergeSpec),
}

/// A `MERGE INTO <table> AS target USING <batch> AS source`. Expressions are SQL over `target` and
/// `source`.
#[derive(Debug)]
pub struct MergeSpec {
    /// The join condition: which table row a batch row is about.
    pub on: &'static str,
    /// Matched rows are deleted where this holds (before any update).
    pub delete_when: Option<&'static str>,
    /// Matched rows get these columns set; `None`: every table column from `source`.
    pub update: Option<&'static [(&'static str, &'static str)]>,
    /// Matched rows are updated only where this holds (always when `None`).
    pub update_when: Option<&'static str>,
    /// Unmatched batch rows are inserted where this holds (always when `None`).
    pub insert_when: Option<&'static str>,
}

/// A lake row: what one topic record becomes in one table.
pub trait LakeRow: Sized + Send + Sync + 'static {
    /// The record type of the topic the table is drained from.
    type Record: TopicRecord + Send;
    /// Default table name.
    const TABLE: &'static str;
    /// The table's partition columns.
    const PARTITION_COLUMNS: &'static [&'static str];
    const WRITE: TableWrite;
    /// The table's schema.
    fn arrow_schema() -> SchemaRef;
    /// The row one topic record becomes; `None` when the record is not a row of this table.
    fn from_record(record: Self::Record) -> Option<Self>;
    /// The row a tombstone (null value) of `key` becomes, for compacted topics; `None`: the table
    /// does not expect tombstones and the sink dead-letters them.
    fn from_tombstone(_key: &[u8]) -> Option<Self> {
        None
    }
    /// For rows of a derived topic: the raw record they came from, so outputs an upstream stage
    /// re-emitted after a crash are dropped. `None` when the consumed record is itself the source.
    fn provenance(&self) -> Option<Provenance> {
        None
    }
    /// The batch written for `rows` (for [`TableWrite::Merge`], the merge's `source`, which may
    /// have more columns than the table).
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError>;
}

/// A batch of `schema` from columns given by name: each column must be the schema's column of its
/// position, by name and type, so two columns swapped are an error, not silently wrong data.
pub fn named_batch(
    schema: SchemaRef,
    columns: Vec<(&str, ArrayRef)>,
) -> Result<RecordBatch, ArrowError> {
    if columns.len() != schema.fields().len() {
        return Err(ArrowError::SchemaError(format!(
            "{} columns for a schema of {}",
            columns.len(),
            schema.fields().len()
        )));
    }
    for (i, (field, (name, array))) in schema.fields().iter().zip(&columns).enumerate() {
        if field.name() != name {
            return Err(ArrowError::SchemaError(format!(
                "column {i} is `{name}`, the schema's is `{}`",
                field.name()
            )));
        }
        if field.data_type() != array.data_type() {
            return Err(ArrowError::SchemaError(format!(
                "column `{name}` is {}, the schema says {}",
                array.data_type(),
                field.data_type()
            )));
        }
    }
    RecordBatch::try_new(schema, columns.into_iter().map(|(_, a)| a).collect())
}

/// A list of strings as Delta writes it (item field `element`).
pub(crate) fn string_list() -> DataType {
    DataType::List(Arc::new(Field::new("element", DataType::Utf8, true)))
}

pub(crate) fn string_lists<'a>(values: impl Iterator<Item = &'a [String]>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new()).with_field(Field::new(
        "element",
        DataType::Utf8,
        true,
    ));
    for list in values {
        for s in list {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

pub(crate) fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// UTC day number since the epoch of a timestamp.
pub fn day_of(t: Micros) -> i32 {
    t.div_euclid(86_400_000_000) as i32
}

pub(crate) fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish())
}

pub(crate) fn timestamps(values: impl Iterator<Item = Micros>) -> ArrayRef {
    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

pub(crate) fn days(values: impl Iterator<Item = Micros>) -> ArrayRef {
    let mut b = Date32Builder::new();
    for v in values {
        b.append_value(day_of(v));
    }
    Arc::new(b.finish())
}

pub(crate) fn i32s(values: impl Iterator<Item = i32>) -> ArrayRef {
    let mut b = Int32Builder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

pub(crate) fn i64s(values: impl Iterator<Item = i64>) -> ArrayRef {
    let mut b = Int64Builder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

pub(crate) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_with_two_columns_swapped_is_refused_by_name() {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new("source_partition", DataType::Int32, false),
            Field::new("source_index", DataType::Int32, false),
        ]));
        let a = i32s([1, 2].into_iter());
        let b = i32s([3, 4].into_iter());
        assert!(
            named_batch(
                schema.clone(),
                vec![("source_partition", a.clone()), ("source_index", b.clone())]
            )
            .is_ok()
        );
        let e =
            named_batch(schema, vec![("source_index", b), ("source_partition", a)]).unwrap_err();
        assert!(e.to_string().contains("column 0 is `source_index`"), "{e}");
    }

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
