//! [`CountFromStatistics`]: `count(*)` grouped by partition columns answered from the files'
//! row counts, without reading a row.
//!
//! "Rows per day", "rows per tenant and day": a Delta log records each data file's row count and
//! partition values, so the partial aggregate of `SELECT day, count(*) … GROUP BY day` over an
//! unfiltered scan is known before any file is opened. This physical optimizer rule replaces such
//! a partial aggregate (every aggregate a `count` of a constant, every group key a partition
//! column, no filter on the scan but dynamic ones) with those counts, one row per file; the final aggregate above
//! adds them up as it would have added the scan's.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::compute::cast;
use datafusion::common::ScalarValue;
use datafusion::common::config::ConfigOptions;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::FileSource;
use datafusion::datasource::physical_plan::ParquetSource;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::physical_expr::expressions::{Column, DynamicFilterPhysicalExpr, Literal};
use datafusion::physical_expr::split_conjunction;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::{ExecutionPlan, Partitioning};

/// See the module doc.
#[derive(Debug, Default)]
pub struct CountFromStatistics;

impl PhysicalOptimizerRule for CountFromStatistics {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_down(|node| {
            Ok(match counts(node.as_ref())? {
                Some(replacement) => Transformed::yes(replacement),
                None => Transformed::no(node),
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "count_from_statistics"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The counts replacing `node`, when it is a partial count over partition columns of an
/// unfiltered Parquet scan whose every file has an exact row count.
fn counts(node: &dyn ExecutionPlan) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
        return Ok(None);
    };
    if *aggregate.mode() != AggregateMode::Partial
        || aggregate.group_expr().has_grouping_set()
        || aggregate.filter_expr().iter().any(Option::is_some)
        || aggregate.aggr_expr().iter().any(|a| {
            a.fun().name() != "count"
                || a.is_distinct()
                || a.expressions().iter().any(|e| {
                    e.downcast_ref::<Literal>()
                        .is_none_or(|l| l.value().is_null())
                })
        })
    {
        return Ok(None);
    }
    let Some(scan) = aggregate.input().downcast_ref::<DataSourceExec>() else {
        return Ok(None);
    };
    let Some((config, parquet)) = scan.downcast_to_file_source::<ParquetSource>() else {
        return Ok(None);
    };
    // A dynamic filter (a TopK's bound, a join's keys) only drops rows that cannot reach the
    // result, so counting without it answers the same.
    let filtered = parquet.filter().is_some_and(|f| {
        split_conjunction(&f)
            .iter()
            .any(|e| e.downcast_ref::<DynamicFilterPhysicalExpr>().is_none())
    });
    if filtered
        || config.limit.is_some()
        || !matches!(
            scan.properties().output_partitioning(),
            Partitioning::UnknownPartitioning(_)
        )
    {
        return Ok(None);
    }
    // Each group key: a column of the scan that is a partition column of the table.
    let file_width = config.file_schema().fields().len();
    let Some(projection) = parquet.projection() else {
        return Ok(None);
    };
    let outputs: Vec<_> = projection.iter().collect();
    let mut partition_index = Vec::new();
    for (expr, _) in aggregate.group_expr().expr() {
        let Some(column) = expr.downcast_ref::<Column>() else {
            return Ok(None);
        };
        let Some(table_column) = outputs
            .get(column.index())
            .and_then(|p| p.expr.downcast_ref::<Column>())
        else {
            return Ok(None);
        };
        let Some(i) = table_column.index().checked_sub(file_width) else {
            return Ok(None);
        };
        partition_index.push(i);
    }
    // One row per data file (a file split into byte ranges counted once).
    let mut seen = HashSet::new();
    let mut keys: Vec<Vec<ScalarValue>> = vec![Vec::new(); partition_index.len()];
    let mut rows = Vec::new();
    for file in config.file_groups.iter().flat_map(|g| g.iter()) {
        if !seen.insert(file.object_meta.location.clone()) {
            continue;
        }
        let Some(Precision::Exact(n)) = file.statistics.as_ref().map(|s| s.num_rows) else {
            return Ok(None);
        };
        for (key, i) in keys.iter_mut().zip(&partition_index) {
            let Some(value) = file.partition_values.get(*i) else {
                return Ok(None);
            };
            key.push(value.clone());
        }
        rows.push(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let schema = aggregate.schema();
    if schema.fields().len() != partition_index.len() + aggregate.aggr_expr().len() {
        return Ok(None);
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (key, field) in keys.into_iter().zip(schema.fields()) {
        let array = if key.is_empty() {
            arrow::array::new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(key)?
        };
        columns.push(cast(&array, field.data_type())?);
    }
    for _ in aggregate.aggr_expr() {
        columns.push(Arc::new(Int64Array::from(rows.clone())));
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let width = aggregate
        .properties()
        .output_partitioning()
        .partition_count();
    let mut partitions = vec![Vec::new(); width.max(1)];
    partitions[0].push(batch);
    let exec: Arc<dyn ExecutionPlan> = MemorySourceConfig::try_new_exec(&partitions, schema, None)?;
    Ok(Some(exec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// Hive-partitioned Parquet files with known row counts.
    fn lake(dir: &std::path::Path) {
        for (day, tenant, n) in [
            ("2026-11-27", "a", 3),
            ("2026-11-27", "b", 5),
            ("2026-11-28", "a", 7),
        ] {
            let path = dir.join(format!("day={day}/tenant={tenant}"));
            std::fs::create_dir_all(&path).unwrap();
            let values: Vec<i64> = (0..n).collect();
            let batch =
                RecordBatch::try_from_iter([("v", Arc::new(Int64Array::from(values)) as ArrayRef)])
                    .unwrap();
            let file = std::fs::File::create(path.join("part-0.parquet")).unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
    }

    async fn answer(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        let batches = df.collect().await.unwrap();
        (
            arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string(),
            shown,
        )
    }

    #[tokio::test]
    async fn counts_per_partition_without_reading_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        lake(dir.path());
        let config = SessionConfig::new().with_collect_statistics(true);
        let plain = SessionContext::new_with_config(config.clone());
        let state =
            SessionStateBuilder::new_from_existing(SessionContext::new_with_config(config).state())
                .with_physical_optimizer_rule(Arc::new(CountFromStatistics))
                .build();
        let ours = SessionContext::new_with_state(state);
        let create = format!(
            "CREATE EXTERNAL TABLE t (v BIGINT, day DATE, tenant VARCHAR) STORED AS PARQUET \
             PARTITIONED BY (day, tenant) LOCATION '{}/'",
            dir.path().display()
        );
        for ctx in [&plain, &ours] {
            ctx.sql(&create).await.unwrap();
        }
        let answered = [
            "SELECT day, count(*) AS n FROM t GROUP BY day ORDER BY day",
            "SELECT tenant, day, count(1) AS n, count(*) AS m FROM t GROUP BY tenant, day ORDER BY 1, 2",
        ];
        for sql in answered {
            let (expected, _) = answer(&plain, sql).await;
            let (got, plan) = answer(&ours, sql).await;
            assert_eq!(got, expected, "{sql}");
            assert!(
                !plan.contains("ParquetSource") && !plan.contains("file_type=parquet"),
                "{sql}: {plan}"
            );
        }
        assert!(
            answer(&ours, answered[0])
                .await
                .0
                .contains("| 2026-11-27 | 8 |")
        );
        // Anything else reads the files.
        for sql in [
            "SELECT day, count(*) FROM t WHERE v > 1 GROUP BY day ORDER BY day",
            "SELECT day, count(v) FROM t GROUP BY day ORDER BY day",
            "SELECT v, count(*) FROM t GROUP BY v ORDER BY v",
            "SELECT day, count(DISTINCT v) FROM t GROUP BY day ORDER BY day",
        ] {
            let (expected, _) = answer(&plain, sql).await;
            let (got, plan) = answer(&ours, sql).await;
            assert_eq!(got, expected, "{sql}");
            assert!(plan.contains("file_type=parquet"), "{sql}: {plan}");
        }
    }
}
