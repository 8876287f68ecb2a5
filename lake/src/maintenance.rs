//! Table maintenance: compaction (Delta `OPTIMIZE`: bin-packing small files up to the target file
//! size, or Z-ordering), vacuum, the properties tables are created with, and the schema check that
//! refuses an incompatible change.
//!
//! Compaction never conflicts with the live writers:
//! - an `OPTIMIZE` commit changes no data, so delta-rs checks it at snapshot isolation: appends
//!   committed meanwhile (the `telemetry` and `deadletter` sinks) neither fail it nor are failed by
//!   it, and the files it rewrites keep their rows (the `txn` offsets live in the log, untouched);
//! - the scheduled compaction of a table runs inside that table's sink, between its own commits, by
//!   the instance that owns partition 0 of the drained topic (one compactor per table), so a MERGE
//!   table's sink (`usage`, `devices`), whose commits read files, never races it.
//!
//! An on-demand `tributary optimize` of a MERGE table may make the sink's next commit fail its
//! conflict check; the sink then re-reads from the table's offsets (nothing lost, nothing twice).

use std::num::NonZeroU64;
use std::time::Duration;

use arrow::datatypes::Schema;
use deltalake::operations::optimize::{Metrics, OptimizeType};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTable, FilterOp, FilterValue};
use serde::Serialize;

use crate::LakeError;

/// What to compact, and how.
#[derive(Debug, Clone, Default)]
pub struct Compaction {
    /// Z-order by these columns (rewrites every file of each chosen partition); empty: bin-pack
    /// small files only (files already at the target size are left alone).
    pub zorder_by: Vec<String>,
    /// Only this tenant's partitions.
    pub tenant: Option<String>,
    /// Only partitions of this `day` (`YYYY-MM-DD`) and later.
    pub since_day: Option<String>,
    /// Only partitions before this `day` (the scheduled compaction leaves today's, still growing).
    pub before_day: Option<String>,
    /// Target file size in bytes; `None`: the table's `delta.targetFileSize`.
    pub target_file_size: Option<u64>,
}

/// What a compaction did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompactionReport {
    pub version_before: Option<u64>,
    pub version_after: Option<u64>,
    pub partitions: u64,
    pub files_removed: u64,
    pub files_added: u64,
    pub bytes_removed: i64,
    pub bytes_added: i64,
}

impl CompactionReport {
    fn from_metrics(before: Option<u64>, after: Option<u64>, m: &Metrics) -> Self {
        Self {
            version_before: before,
            version_after: after,
            partitions: m.partitions_optimized,
            files_removed: m.num_files_removed,
            files_added: m.num_files_added,
            bytes_removed: m.files_removed.total_size,
            bytes_added: m.files_added.total_size,
        }
    }
}

impl std::fmt::Display for CompactionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.files_removed == 0 {
            return write!(f, "nothing to compact (version {:?})", self.version_before);
        }
        write!(
            f,
            "{} files ({:.1} MB) → {} files ({:.1} MB) in {} partitions; version {:?} → {:?}",
            self.files_removed,
            self.bytes_removed as f64 / 1e6,
            self.files_added,
            self.bytes_added as f64 / 1e6,
            self.partitions,
            self.version_before,
            self.version_after
        )
    }
}

/// Compacts `table` as `c` says. Tables partitioned without `day` ignore the day bounds.
pub async fn compact(
    table: DeltaTable,
    c: &Compaction,
) -> Result<(DeltaTable, CompactionReport), LakeError> {
    let before = table.version();
    if before.is_none() {
        return Ok((table, CompactionReport::default()));
    }
    let partition_columns = table.snapshot()?.metadata().partition_columns().to_vec();
    let has = |column: &str| partition_columns.iter().any(|p| p == column);
    let mut filters = Vec::new();
    if let Some(t) = c.tenant.as_deref().filter(|_| has("tenant")) {
        filters.push(("tenant", FilterOp::Eq, FilterValue::Scalar(t)));
    }
    if let Some(d) = c.since_day.as_deref().filter(|_| has("day")) {
        filters.push(("day", FilterOp::Ge, FilterValue::Scalar(d)));
    }
    if let Some(d) = c.before_day.as_deref().filter(|_| has("day")) {
        filters.push(("day", FilterOp::Lt, FilterValue::Scalar(d)));
    }
    let mut optimize = table.optimize().with_filters(&filters);
    if !c.zorder_by.is_empty() {
        optimize = optimize.with_type(OptimizeType::ZOrder(c.zorder_by.clone()));
    }
    if let Some(size) = c.target_file_size.and_then(NonZeroU64::new) {
        optimize = optimize.with_target_size(size);
    }
    let (table, metrics) = optimize.await?;
    let report = CompactionReport::from_metrics(before, table.version(), &metrics);
    Ok((table, report))
}

/// Deletes files no version within `retention` refers to any more: what compactions and erasures
/// removed, and files of commits that never happened (a crash, a lost conflict) older than
/// `retention`. A retention shorter than the longest write in flight deletes that write's files:
/// keep it in hours. `dry_run`: only lists them.
pub async fn vacuum(
    table: DeltaTable,
    retention: Duration,
    dry_run: bool,
) -> Result<(DeltaTable, Vec<String>), LakeError> {
    if table.version().is_none() {
        return Ok((table, Vec::new()));
    }
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let (table, metrics) = table
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .with_dry_run(dry_run)
        .await?;
    Ok((table, metrics.files_deleted))
}

/// Why rows of schema `rows` cannot be written into a table of schema `table`, if they cannot.
/// Compatible: the same columns with the same types; new columns that are nullable (added to the
/// table by schema evolution, earlier rows read as null); table columns the rows lack, if nullable.
pub fn incompatibility(table: &Schema, rows: &Schema) -> Option<String> {
    for field in rows.fields() {
        match table.field_with_name(field.name()) {
            Ok(existing) => {
                if !existing.data_type().equals_datatype(field.data_type()) {
                    return Some(format!(
                        "column `{}` is {} in the table but {} in the rows",
                        field.name(),
                        existing.data_type(),
                        field.data_type()
                    ));
                }
                if field.is_nullable() && !existing.is_nullable() {
                    return Some(format!(
                        "column `{}` is required in the table but optional in the rows",
                        field.name()
                    ));
                }
            }
            Err(_) if !field.is_nullable() => {
                return Some(format!(
                    "new column `{}` is required, but the table's rows have no value for it (a new column must be optional)",
                    field.name()
                ));
            }
            Err(_) => {}
        }
    }
    for existing in table.fields() {
        if rows.field_with_name(existing.name()).is_err() && !existing.is_nullable() {
            return Some(format!(
                "required column `{}` of the table is no longer in the rows",
                existing.name()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};

    fn schema(fields: &[(&str, DataType, bool)]) -> Schema {
        Schema::new(
            fields
                .iter()
                .map(|(n, t, null)| Field::new(*n, t.clone(), *null))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn compatible_changes_pass_and_incompatible_ones_name_the_column() {
        let table = schema(&[
            ("device", DataType::Utf8, false),
            ("value", DataType::Float64, false),
            ("note", DataType::Utf8, true),
        ]);
        // Same; a new optional column; an optional column no longer written.
        for rows in [
            table.clone(),
            schema(&[
                ("device", DataType::Utf8, false),
                ("value", DataType::Float64, false),
                ("note", DataType::Utf8, true),
                ("unit", DataType::Utf8, true),
            ]),
            schema(&[
                ("device", DataType::Utf8, false),
                ("value", DataType::Float64, false),
            ]),
        ] {
            assert_eq!(incompatibility(&table, &rows), None, "{rows:?}");
        }
        let refused = |rows: Schema| incompatibility(&table, &rows).unwrap();
        assert_eq!(
            refused(schema(&[
                ("device", DataType::Utf8, false),
                ("value", DataType::Utf8, false),
            ])),
            "column `value` is Float64 in the table but Utf8 in the rows"
        );
        assert!(
            refused(schema(&[
                ("device", DataType::Utf8, false),
                ("value", DataType::Float64, false),
                ("unit", DataType::Utf8, false),
            ]))
            .starts_with("new column `unit` is required")
        );
        assert_eq!(
            refused(schema(&[("device", DataType::Utf8, false)])),
            "required column `value` of the table is no longer in the rows"
        );
        assert_eq!(
            refused(schema(&[
                ("device", DataType::Utf8, false),
                ("value", DataType::Float64, true),
            ])),
            "column `value` is required in the table but optional in the rows"
        );
    }
}
