//! `tributary optimize` and `tributary vacuum`: table maintenance on demand (the sinks also
//! compact on a schedule; see `tributary_lake::maintenance`).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tributary_lake::delta_sink::open_table;
use tributary_lake::maintenance::{self, Compaction};
use tributary_lake::tables::TABLES;

use crate::config::Config;

/// `tributary optimize`.
#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// The table (telemetry, deadletter, devices, usage).
    pub table: String,
    /// Z-order by these columns (comma-separated), e.g. `device`; rewrites every file of each
    /// chosen partition. Without it: bin-packing of small files only.
    #[arg(long, value_delimiter = ',')]
    pub zorder_by: Vec<String>,
    /// Only this tenant's partitions.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only partitions of this day (YYYY-MM-DD) and later.
    #[arg(long)]
    pub since: Option<chrono::NaiveDate>,
    /// Target file size in MB (default: the table's `delta.targetFileSize`).
    #[arg(long)]
    pub target_file_size_mb: Option<u64>,
}

/// `tributary vacuum`.
#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// The table (telemetry, deadletter, devices, usage).
    pub table: String,
    /// Keep files that versions of the last this many hours still refer to (time travel).
    #[arg(long, default_value_t = 168)]
    pub retention_hours: u64,
    /// Only list what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow a retention under one hour (it can delete the files of a commit in flight: stop the
    /// sinks first).
    #[arg(long)]
    pub force: bool,
}

fn known(table: &str) -> anyhow::Result<()> {
    if TABLES.contains(&table) {
        Ok(())
    } else {
        anyhow::bail!("unknown table `{table}`; tables: {}", TABLES.join(", "))
    }
}

pub async fn optimize(config: &Config, args: OptimizeArgs) -> anyhow::Result<()> {
    known(&args.table)?;
    let table = open_table(&config.lake, &args.table).await?;
    let compaction = Compaction {
        zorder_by: args.zorder_by,
        tenant: args.tenant,
        since_day: args.since.map(|d| d.to_string()),
        before_day: None,
        target_file_size: args.target_file_size_mb.map(|mb| mb * 1_000_000),
    };
    let started = Instant::now();
    let (_, report) = maintenance::compact(table, &compaction).await?;
    println!(
        "optimize {}: {report} ({:.1} s)",
        args.table,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn vacuum(config: &Config, args: VacuumArgs) -> anyhow::Result<()> {
    known(&args.table)?;
    if args.retention_hours < 1 && !args.force && !args.dry_run {
        anyhow::bail!(
            "--retention-hours {} can delete files a running sink is about to commit; stop the sinks and add --force",
            args.retention_hours
        );
    }
    let table = open_table(&config.lake, &args.table).await?;
    let retention = args
        .retention_hours
        .checked_mul(3600)
        .map(Duration::from_secs)
        .context("--retention-hours is too large")?;
    let (_, files) = maintenance::vacuum(table, retention, args.dry_run).await?;
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!("vacuum {}: {verb} {} files", args.table, files.len());
    for f in files.iter().take(20) {
        println!("  {f}");
    }
    Ok(())
}
