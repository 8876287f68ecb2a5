//! [`SnapshotTable`]: one version of a Delta table as DataFusion reads it — the data files that
//! version's log lists (delta-rs), scanned by DataFusion's own Parquet scan.
//!
//! Why not delta-rs's provider: it re-runs the Delta kernel's scan planning for every query and
//! injects partition values through a per-batch kernel expression; over a snapshot already in
//! memory that planning is the largest fixed cost of a short query. Here the snapshot's file list
//! is turned into DataFusion's file groups once per version, files are pruned with the Delta
//! log's statistics and partition values (DataFusion's `PruningPredicate` over delta-rs's
//! `PruningStatistics`), row groups and pages with the Parquet footers (cached across queries),
//! and partition columns are constants of each file.
//!
//! Only tables whose every feature this reader understands take this path (reader version 1: no
//! column mapping, no deletion vectors); any other table is read by delta-rs's provider
//! ([`lake_provider`] chooses).

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::Session;
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::stats::Precision;
use datafusion::common::{Column, ColumnStatistics, DFSchema, ScalarValue, Statistics};
use datafusion::datasource::TableProvider;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use deltalake::DeltaTable;
use deltalake::logstore::LogStoreRef;
use deltalake::table::state::DeltaTableState;

use crate::QueryError;

/// The provider of `table` at its loaded version: a [`SnapshotTable`] when this reader supports
/// every feature of the table, else delta-rs's own.
pub async fn lake_provider(table: &DeltaTable) -> Result<Arc<dyn TableProvider>, QueryError> {
    let state = table.snapshot()?;
    if state.protocol().min_reader_version() <= 1 {
        return Ok(Arc::new(SnapshotTable::try_new(
            state.clone(),
            table.log_store(),
        )?));
    }
    Ok(table.table_provider().await?)
}

/// One Delta table version as a DataFusion table (see the module doc).
#[derive(Debug)]
pub struct SnapshotTable {
    state: DeltaTableState,
    log_store: LogStoreRef,
    /// The table's columns in the table's order (strings and binaries as views).
    schema: SchemaRef,
    /// The columns the data files hold, then the partition columns: the scan's own order.
    scan_schema: TableSchema,
    /// For each column of `schema`, its index in `scan_schema`.
    scan_index: Vec<usize>,
    /// Every data file of the version, in the log's order.
    files: Vec<PartitionedFile>,
}

/// `data_type` as DataFusion reads it fastest: strings and binaries as views.
fn read_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 => DataType::Utf8View,
        DataType::Binary | DataType::LargeBinary => DataType::BinaryView,
        other => other.clone(),
    }
}

impl SnapshotTable {
    pub fn try_new(state: DeltaTableState, log_store: LogStoreRef) -> Result<Self, QueryError> {
        let logical = state.snapshot().arrow_schema();
        let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
        let fields: Vec<FieldRef> = logical
            .fields()
            .iter()
            .map(|f| {
                Arc::new(
                    Field::new(f.name(), read_type(f.data_type()), f.is_nullable())
                        .with_metadata(f.metadata().clone()),
                )
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(
            fields.clone(),
            logical.metadata().clone(),
        ));
        let is_partition = |f: &FieldRef| partition_columns.iter().any(|p| p == f.name());
        let file_fields: Vec<FieldRef> = fields
            .iter()
            .filter(|f| !is_partition(f))
            .cloned()
            .collect();
        let partition_fields: Vec<FieldRef> = partition_columns
            .iter()
            .map(|name| {
                fields
                    .iter()
                    .find(|f| f.name() == name)
                    .cloned()
                    .ok_or_else(|| {
                        DataFusionError::Plan(format!(
                            "partition column `{name}` is not in the schema"
                        ))
                    })
            })
            .collect::<Result<_>>()?;
        let scan_order: Vec<&FieldRef> = file_fields.iter().chain(&partition_fields).collect();
        let scan_index = fields
            .iter()
            .map(|f| {
                scan_order
                    .iter()
                    .position(|s| s.name() == f.name())
                    .unwrap_or_default()
            })
            .collect();
        let scan_schema = TableSchema::builder(Arc::new(Schema::new(file_fields.clone())))
            .with_table_partition_cols(partition_fields.clone())
            .build();
        let width = file_fields.len() + partition_fields.len();
        let mut files = Vec::new();
        for file in state.log_data().iter() {
            let values = file.partition_values_map();
            let partition_values = partition_fields
                .iter()
                .map(|field| match values.get(field.name()).cloned().flatten() {
                    Some(value) => ScalarValue::try_from_string(value, field.data_type()),
                    None => ScalarValue::try_from(field.data_type()),
                })
                .collect::<Result<Vec<_>>>()?;
            let num_rows = file
                .num_records()
                .map_or(Precision::Absent, Precision::Exact);
            let statistics = Statistics {
                num_rows,
                total_byte_size: Precision::Absent,
                column_statistics: vec![ColumnStatistics::new_unknown(); width],
            };
            files.push(
                PartitionedFile::new(
                    file.object_store_path().to_string(),
                    u64::try_from(file.size()).unwrap_or_default(),
                )
                .with_partition_values(partition_values)
                .with_statistics(Arc::new(statistics)),
            );
        }
        Ok(Self {
            state,
            log_store,
            schema,
            scan_schema,
            scan_index,
            files,
        })
    }

    /// Which files may hold rows matching `predicate` (a mask in the log's order): Delta's
    /// per-file statistics and partition values against it; every file when it cannot be judged.
    fn files_matching(&self, session: &dyn Session, predicate: &Expr) -> Vec<bool> {
        let judged = (|| {
            let df_schema = DFSchema::try_from(self.schema.clone())?;
            let physical = session.create_physical_expr(predicate.clone(), &df_schema)?;
            let pruning = PruningPredicateBuilder::new()
                .with_file_schema(self.schema.clone())
                .try_build(physical)?;
            let stats = LogStatistics {
                log: self.state.log_data(),
                schema: &self.schema,
            };
            pruning.prune(&stats)
        })();
        match judged {
            Ok(mask) if mask.len() == self.files.len() => mask,
            Ok(_) => vec![true; self.files.len()],
            Err(e) => {
                tracing::debug!(error = %e, "files not pruned by the Delta log's statistics");
                vec![true; self.files.len()]
            }
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        session: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let object_store_url = self.log_store.object_store_url();
        let runtime = session.runtime_env();
        if runtime.object_store(&object_store_url).is_err() {
            runtime.register_object_store(
                object_store_url.as_ref(),
                self.log_store.object_store(None),
            );
        }
        let predicate = conjunction(filters.iter().cloned());
        let keep = match &predicate {
            Some(p) => self.files_matching(session, p),
            None => vec![true; self.files.len()],
        };
        let files: Vec<PartitionedFile> = self
            .files
            .iter()
            .zip(keep)
            .filter_map(|(f, keep)| keep.then(|| f.clone()))
            .collect();
        let projection: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        if files.is_empty() {
            return Ok(Arc::new(EmptyExec::new(Arc::new(
                self.schema.project(&projection)?,
            ))));
        }
        let mut source = ParquetSource::new(self.scan_schema.clone())
            .with_table_parquet_options(session.table_options().parquet.clone());
        if let Some(predicate) = &predicate {
            let df_schema = DFSchema::try_from(self.scan_schema.table_schema().clone())?;
            let physical = session.create_physical_expr(predicate.clone(), &df_schema)?;
            source = source.with_predicate(physical);
        }
        let statistics = table_statistics(&files, self.scan_schema.table_schema().fields().len());
        let config = FileScanConfigBuilder::new(object_store_url, Arc::new(source))
            .with_statistics(statistics)
            .with_file_groups(file_groups(files, session.config().target_partitions()))
            .with_projection_indices(Some(
                projection.iter().map(|i| self.scan_index[*i]).collect(),
            ))?
            .with_limit(if filters.is_empty() { limit } else { None })
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Used to prune files, row groups and pages; rows are filtered again above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
}

/// What the planner knows of a scan of `files` before any filter: their rows (exact when the log
/// counted every file's) and bytes on storage. It orders joins (the small side builds).
fn table_statistics(files: &[PartitionedFile], width: usize) -> Statistics {
    let mut rows = Precision::Exact(0usize);
    for file in files {
        let n = file
            .statistics
            .as_ref()
            .map_or(Precision::Absent, |s| s.num_rows);
        rows = rows.add(&n);
    }
    let bytes: u64 = files.iter().map(|f| f.object_meta.size).sum();
    Statistics {
        num_rows: rows,
        total_byte_size: Precision::Inexact(usize::try_from(bytes).unwrap_or(usize::MAX)),
        column_statistics: vec![ColumnStatistics::new_unknown(); width],
    }
}

/// `files` in `n` groups of about the same bytes (DataFusion may split large files further).
fn file_groups(mut files: Vec<PartitionedFile>, n: usize) -> Vec<FileGroup> {
    let n = n.max(1).min(files.len().max(1));
    files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
    let mut groups: Vec<(u64, Vec<PartitionedFile>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for file in files {
        if let Some(group) = groups.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            group.0 += file.object_meta.size;
            group.1.push(file);
        }
    }
    groups
        .into_iter()
        .filter(|(_, files)| !files.is_empty())
        .map(|(_, files)| FileGroup::new(files))
        .collect()
}

/// The Delta log's per-file statistics, typed as the table reads its columns.
struct LogStatistics<'a> {
    log: deltalake::kernel::LogDataHandler<'a>,
    schema: &'a Schema,
}

impl LogStatistics<'_> {
    fn typed(
        &self,
        column: &Column,
        values: Option<arrow::array::ArrayRef>,
    ) -> Option<arrow::array::ArrayRef> {
        let values = values?;
        let field = self.schema.field_with_name(&column.name).ok()?;
        if values.data_type() == field.data_type() {
            return Some(values);
        }
        cast(&values, field.data_type()).ok()
    }
}

impl PruningStatistics for LogStatistics<'_> {
    fn min_values(&self, column: &Column) -> Option<arrow::array::ArrayRef> {
        self.typed(column, self.log.min_values(column))
    }

    /// Delta writes timestamp statistics truncated to milliseconds: a file's true maximum may
    /// lie up to a millisecond above the recorded one, so the bound is raised by that much.
    fn max_values(&self, column: &Column) -> Option<arrow::array::ArrayRef> {
        let max = self.typed(column, self.log.max_values(column))?;
        let slack = match max.data_type() {
            DataType::Timestamp(TimeUnit::Microsecond, _) => 999,
            DataType::Timestamp(TimeUnit::Nanosecond, _) => 999_999,
            _ => return Some(max),
        };
        let raised: arrow::array::Int64Array = cast(&max, &DataType::Int64)
            .ok()?
            .as_primitive::<arrow::datatypes::Int64Type>()
            .unary(|v| v.saturating_add(slack));
        cast(&raised, max.data_type()).ok()
    }

    fn num_containers(&self) -> usize {
        self.log.num_containers()
    }

    fn null_counts(&self, column: &Column) -> Option<arrow::array::ArrayRef> {
        self.log.null_counts(column)
    }

    fn row_counts(&self) -> Option<arrow::array::ArrayRef> {
        self.log.row_counts()
    }

    /// Not judged: the log's partition values are typed as Delta types them, the literals as
    /// the table reads them; min/max prune equalities instead.
    fn contained(
        &self,
        _column: &Column,
        _values: &std::collections::HashSet<ScalarValue>,
    ) -> Option<arrow::array::BooleanArray> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;
    use tributary_lake::LakeConfig;
    use tributary_lake::delta_sink::{open_table, write_rows};
    use tributary_lake::tables::LakeRow;
    use tributary_schemas::Reading;

    fn reading(tenant: &str, device: &str, i: i64) -> Reading {
        // Two days, a reading every 20 minutes per device.
        let t = 1_795_737_600_000_000 + i * 1_200_000_000;
        Reading {
            tenant: tenant.into(),
            device: device.into(),
            metric: if i % 2 == 0 {
                "temperature"
            } else {
                "humidity"
            }
            .into(),
            value: i as f64,
            unit: (i % 3 == 0).then(|| "Cel".into()),
            original_value: None,
            original_unit: None,
            late: i % 5 == 0,
            event_time: t,
            ingest_time: t + 1_000_000,
            event_id: format!("{device}-{i}"),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: i,
            source_index: 0,
            measurement: Some(0),
            name: None,
            conflict: false,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    /// Every answer of `sql` over `ours` and `theirs` (delta-rs's provider), as text.
    async fn both(ctx: &SessionContext, sql: &str) -> (Vec<String>, Vec<String>) {
        let mut out = Vec::new();
        for table in ["ours", "theirs"] {
            let batches = ctx
                .sql(&sql.replace("{t}", &format!("{table} AS t")))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            out.push(
                arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string()
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            );
        }
        let theirs = out.pop().unwrap_or_default();
        (out.pop().unwrap_or_default(), theirs)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_what_delta_rs_reads_across_schema_evolution_compaction_and_time_travel() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LakeConfig {
            url: dir.path().display().to_string(),
            ..LakeConfig::default()
        };
        // Version 0 as an earlier release wrote it: without the `measurement` column.
        let first: Vec<Reading> = (0..144)
            .step_by(2)
            .flat_map(|i| [reading("acme", "a-1", i), reading("globex", "g-1", i)])
            .collect();
        let full = Reading::to_batch(&first).unwrap();
        let older: Vec<usize> = (0..full.num_columns())
            .filter(|i| full.schema().field(*i).name() != "measurement")
            .collect();
        open_table(&lake, "telemetry")
            .await
            .unwrap()
            .write(vec![full.project(&older).unwrap()])
            .with_partition_columns(["tenant", "day"])
            .await
            .unwrap();
        // Version 1 adds the column (and a second file to acme's days); version 2 compacts them.
        let mut second: Vec<Reading> = (1..144)
            .step_by(2)
            .map(|i| reading("acme", "a-2", i))
            .collect();
        // The latest reading of its file, 0.9 ms past a millisecond (Delta's statistics keep
        // milliseconds): a filter just below it must still find it.
        let mut late = reading("acme", "a-2", 143);
        late.event_time += 900;
        late.event_id = "a-2-sub-ms".into();
        second.push(late);
        write_rows::<Reading>(&lake, "telemetry", &second)
            .await
            .unwrap();
        let (table, _) = open_table(&lake, "telemetry")
            .await
            .unwrap()
            .optimize()
            .await
            .unwrap();
        assert_eq!(table.version(), Some(2));

        let queries = [
            "SELECT * FROM {t} ORDER BY event_id",
            "SELECT count(*) FROM {t}",
            "SELECT day, tenant, count(*), sum(value) FROM {t} GROUP BY day, tenant ORDER BY 1, 2",
            "SELECT event_id, measurement FROM {t} WHERE measurement IS NULL ORDER BY event_id",
            "SELECT event_id FROM {t} WHERE tenant = 'globex' AND day = DATE '2026-11-28' ORDER BY 1",
            "SELECT event_id, value FROM {t} WHERE event_time >= TIMESTAMP '2026-11-27T23:00:00Z' \
             AND event_time < TIMESTAMP '2026-11-28T01:00:00Z' AND device = 'a-1' ORDER BY 1",
            "SELECT device, max(value) FROM {t} WHERE tenant IN ('acme') AND value > 100 GROUP BY 1 ORDER BY 1",
            "SELECT event_id FROM {t} WHERE tenant = 'nobody'",
            "SELECT event_id FROM {t} WHERE event_time > TIMESTAMP '2026-11-28T23:40:00.000800Z'",
            "SELECT value, tenant, event_id FROM {t} WHERE unit IS NOT NULL ORDER BY event_id LIMIT 5",
        ];
        for version in [None, Some(0), Some(1)] {
            let mut table = open_table(&lake, "telemetry").await.unwrap();
            if let Some(v) = version {
                table.load_version(v).await.unwrap();
            } else {
                table.load().await.unwrap();
            }
            let ctx = SessionContext::new();
            let ours: Arc<dyn TableProvider> = Arc::new(
                SnapshotTable::try_new(table.snapshot().unwrap().clone(), table.log_store())
                    .unwrap(),
            );
            let theirs = table.table_provider().await.unwrap();
            let names = |p: &Arc<dyn TableProvider>| -> Vec<String> {
                p.schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect()
            };
            assert_eq!(names(&ours), names(&theirs), "column order");
            table.update_datafusion_session(&ctx.state()).unwrap();
            ctx.register_table("ours", ours).unwrap();
            ctx.register_table("theirs", theirs).unwrap();
            for sql in queries {
                if version == Some(0) && sql.contains("measurement") {
                    continue; // not a column yet
                }
                let (ours, theirs) = both(&ctx, sql).await;
                if version.is_none() {
                    assert!(ours.len() > 3 || sql.contains("nobody"), "{sql}: {ours:?}");
                }
                assert_eq!(ours, theirs, "version {version:?}: {sql}");
            }
        }
    }
}
