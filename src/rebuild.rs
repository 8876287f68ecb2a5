//! `tributary rebuild <table>`: derive a lake table again from the `raw` log alone, into a new
//! table, and (with `--check`) show that it holds exactly the rows the live pipeline wrote.
//!
//! This is the event-sourcing promise made checkable: `telemetry` and `deadletter` are the cleanse
//! stage's outputs over `raw` (same code, same catalog, partitions in log order), `usage` is raw
//! metering, `anomalies` the anomaly stage's outputs over those readings (same code, today's
//! detector catalog; its clock runs on the readings' event time, and at the end stands where the
//! live stage's stands after idling until now). The check compares the two tables as multisets of
//! rows (every column), restricted for derived tables to the raw records the rebuild read; for
//! `anomalies` over the columns that are functions of the readings alone (ids, lifecycle, who,
//! what, start and end: not the evidence of records the clock made, nor the telemetry offsets,
//! which a rebuild from `raw` does not have), over the whole table: check it when the live stage
//! has caught up and idled for a sweep. `shadows` and `shadow_history` are the shadow stage's
//! documents over `shadow-updates` (each shadow's updates in log order, the same document
//! algebra and limits), compared over every column: check them when the stage has caught up.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use clap::{Args, ValueEnum};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{BorrowedMessage, Message};
use tributary_lake::delta_sink::{open_table, write_rows};
use tributary_lake::tables::LakeRow;
use tributary_lake::tables::shadows::{ShadowRow, ShadowVersion};
use tributary_lake::tables::usage::UsageEvent;
use tributary_query::SqlEngine;
use tributary_registry::follower;
use tributary_schemas::avro::{Anomaly, ShadowDocument, ShadowUpdate, decode};
use tributary_schemas::catalog::CatalogOverrides;
use tributary_schemas::kafka::read_to_end;
use tributary_schemas::shadows::{self, Limits, Shadow};
use tributary_schemas::{DeadLetter, Micros, RawEnvelope, Reading, micros_of_secs};
use tributary_streams::anomaly::Detection;
use tributary_streams::cleanse::{Cleanser, Output, Position};

use crate::config::Config;
use crate::progress::Progress;

/// The tables that can be rebuilt from the logs (`raw`; `shadow-updates` for the shadows).
#[derive(Clone, Copy, ValueEnum)]
pub enum Rebuildable {
    Telemetry,
    Deadletter,
    Usage,
    Anomalies,
    /// `shadows`, from `shadow-updates`.
    Shadows,
    /// `shadow_history`, from `shadow-updates`.
    ShadowHistory,
}

/// Turns each raw record into rows of `R`.
trait Derive<R>: Send + 'static {
    /// The log it derives from: `raw`, unless it says otherwise.
    fn source(&self, topics: &tributary_schemas::topics::Topics) -> String {
        topics.raw.clone()
    }
    fn record(&mut self, cleanser: &mut Cleanser, m: &BorrowedMessage<'_>, rows: &mut Vec<R>);
    /// After the last record.
    fn finish(&mut self, _rows: &mut Vec<R>) {}
    /// What the check compares, when not every column of every row: the columns, and the rows
    /// of both tables (an SQL condition).
    fn check(&self) -> Option<(&'static [&'static str], String)> {
        None
    }
}

impl<R, F> Derive<R> for F
where
    F: FnMut(&mut Cleanser, &BorrowedMessage<'_>, &mut Vec<R>) + Send + 'static,
{
    fn record(&mut self, cleanser: &mut Cleanser, m: &BorrowedMessage<'_>, rows: &mut Vec<R>) {
        self(cleanser, m, rows)
    }
}

/// The anomaly stage over the cleansed readings of each raw partition (telemetry partition *p*
/// holds the readings of raw partition *p*, in that order).
struct Anomalies {
    detection: Detection,
    /// Per partition: readings so far (the offsets the state's changelog positions would be).
    positions: HashMap<i32, i64>,
    /// Per partition: the newest reading's event time.
    newest: HashMap<i32, Micros>,
    telemetry: String,
    grace: Micros,
    sweep: Micros,
    longest_clear_for: Micros,
}

impl Derive<Anomaly> for Anomalies {
    fn record(&mut self, c: &mut Cleanser, m: &BorrowedMessage<'_>, rows: &mut Vec<Anomaly>) {
        let p = m.partition();
        let written_at = m
            .timestamp()
            .to_millis()
            .map_or(0, |ms| ms.saturating_mul(1000));
        for out in c.process(Position::of(m), m.payload().unwrap_or_default()) {
            let Output::Reading(r) = out else { continue };
            let position = self.positions.entry(p).or_insert_with(|| {
                self.detection.start_empty(p);
                0
            });
            let offset = *position;
            *position += 1;
            let newest = self.newest.entry(p).or_insert(r.event_time);
            *newest = (*newest).max(r.event_time);
            rows.extend(
                self.detection
                    .reading(p, offset, written_at, &r, &self.telemetry),
            );
        }
    }

    /// The rows both must hold whenever the live stage's clock ran: anomalies that started
    /// before the clock stood at `bound` in every partition (the oldest partition's newest
    /// reading, less the grace and a sweep), and their resolutions by then with room for the
    /// longest quiet period.
    fn check(&self) -> Option<(&'static [&'static str], String)> {
        let oldest = self.newest.values().min().copied().unwrap_or(Micros::MIN);
        let bound = oldest.saturating_sub(self.grace).saturating_sub(self.sweep);
        let resolved_by = bound.saturating_sub(self.longest_clear_for);
        Some((
            ANOMALY_COLUMNS,
            format!(
                "CAST(start_time AS BIGINT) <= {bound} AND (state <> 'resolved' OR CAST(end_time AS BIGINT) <= {resolved_by})"
            ),
        ))
    }

    fn finish(&mut self, rows: &mut Vec<Anomaly>) {
        let now = tributary_schemas::now_micros();
        rows.extend(
            self.detection
                .idle(now, &self.telemetry)
                .into_iter()
                .map(|(_, a)| a),
        );
    }
}

/// The shadow stage over `shadow-updates` (each shadow's updates are in one partition, in log
/// order): every accepted update's document, as the live stage wrote it to `shadows`.
struct Shadows {
    shadows: HashMap<String, Shadow>,
    limits: Limits,
}

impl<R: LakeRow<Record = ShadowDocument>> Derive<R> for Shadows {
    fn source(&self, topics: &tributary_schemas::topics::Topics) -> String {
        topics.shadow_updates.clone()
    }
    fn record(&mut self, _: &mut Cleanser, m: &BorrowedMessage<'_>, rows: &mut Vec<R>) {
        let Some(Ok(update)) = m.payload().map(decode::<ShadowUpdate>) else {
            return;
        };
        let key = shadows::key(&update.tenant, &update.device, &update.name);
        let shadow = self.shadows.entry(key).or_default();
        if let Some(doc) = tributary_streams::shadows::apply(shadow, &update, &self.limits).document
        {
            rows.extend(R::from_record(doc));
        }
    }
}

/// The columns of `anomalies` a rebuild must reproduce (see the module doc).
const ANOMALY_COLUMNS: &[&str] = &[
    "anomaly_id",
    "seq",
    "state",
    "tenant",
    "device",
    "metric",
    "detector",
    "kind",
    "severity",
    "device_group",
    "site",
    "start_time",
    "end_time",
    "source_topic",
    "source_partition",
];

#[derive(Args)]
pub struct RebuildArgs {
    #[arg(value_enum)]
    table: Rebuildable,
    /// The new table's name (default `<table>_rebuild`); it must not exist.
    #[arg(long)]
    into: Option<String>,
    /// Then compare it with the live table and fail when they differ.
    #[arg(long)]
    check: bool,
    /// Rows per Delta commit of the new table.
    #[arg(long, default_value_t = 200_000)]
    commit_rows: usize,
}

pub async fn run(config: &Config, args: RebuildArgs) -> anyhow::Result<()> {
    match args.table {
        Rebuildable::Telemetry => {
            let pick = |o| match o {
                Output::Reading(r) => Some(r),
                Output::DeadLetter(_) => None,
            };
            rebuild::<Reading>(config, &args, true, cleansed(pick)).await
        }
        Rebuildable::Deadletter => {
            let pick = |o| match o {
                Output::DeadLetter(d) => Some(d),
                Output::Reading(_) => None,
            };
            rebuild::<DeadLetter>(config, &args, true, cleansed(pick)).await
        }
        Rebuildable::Usage => {
            rebuild::<UsageEvent>(
                config,
                &args,
                false,
                |_: &mut Cleanser, m: &BorrowedMessage<'_>, rows: &mut Vec<UsageEvent>| {
                    if let Some(row) = m
                        .payload()
                        .and_then(|p| decode::<RawEnvelope>(p).ok())
                        .and_then(UsageEvent::from_record)
                    {
                        rows.push(row);
                    }
                },
            )
            .await
        }
        Rebuildable::Anomalies => {
            let catalog = crate::backtest::live_detectors(config).await?;
            let a = &config.anomalies;
            let derive = Anomalies {
                longest_clear_for: catalog.longest_clear_for(),
                detection: Detection::new(Arc::new(catalog), a, "rebuild-anomaly-state"),
                positions: HashMap::new(),
                newest: HashMap::new(),
                telemetry: config.kafka.topics.telemetry.clone(),
                grace: micros_of_secs(a.clock_grace_secs),
                sweep: micros_of_secs(a.sweep_secs.max(1)),
            };
            rebuild::<Anomaly>(config, &args, false, derive).await
        }
        Rebuildable::Shadows => rebuild::<ShadowRow>(config, &args, false, shadows(config)).await,
        Rebuildable::ShadowHistory => {
            rebuild::<ShadowVersion>(config, &args, false, shadows(config)).await
        }
    }
}

fn shadows(config: &Config) -> Shadows {
    Shadows {
        shadows: HashMap::new(),
        limits: config.shadows.limits(),
    }
}

/// Rows of a table of the cleanse stage's outputs: each raw record cleansed, the outputs `pick`
/// keeps.
fn cleansed<R: 'static>(
    pick: fn(Output) -> Option<R>,
) -> impl FnMut(&mut Cleanser, &BorrowedMessage<'_>, &mut Vec<R>) + Send + 'static {
    move |c, m, rows| {
        let outputs = c.process(Position::of(m), m.payload().unwrap_or_default());
        rows.extend(outputs.into_iter().filter_map(pick));
    }
}

/// Reads `raw` to its end, turning each record into rows of `R` with `derive`, and writes them into
/// the new table; `derived`: rows carry their raw position (the check is scoped by it).
async fn rebuild<R: LakeRow>(
    config: &Config,
    args: &RebuildArgs,
    derived: bool,
    mut derive: impl Derive<R>,
) -> anyhow::Result<()> {
    let into = args
        .into
        .clone()
        .unwrap_or_else(|| format!("{}_rebuild", R::TABLE));
    if into == R::TABLE {
        bail!("--into must name a new table, not the live `{into}`");
    }
    if open_table(&config.lake, &into).await?.version().is_some() {
        bail!("table `{into}` exists already: remove it or pass --into <another name>");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<R>>(2);
    let kafka = config.kafka.clone();
    // Today's catalog: the file's, with the tenants' API entries over it.
    let overrides = Arc::new(CatalogOverrides::default());
    let follower = follower::follow_catalog(&config.kafka, overrides.clone()).await?;
    follower.abort();
    let mut cleanser = Cleanser::new(&config.cleanse)?;
    cleanser.set_catalog(
        config
            .cleanse
            .catalog_base()
            .compile(&overrides.snapshot())?,
    );
    let commit_rows = args.commit_rows.max(1);
    let source = derive.source(&kafka.topics);
    let read = source.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka.reader("rebuild").create()?;
        let mut rows = Vec::new();
        let mut records = 0u64;
        let mut progress = Progress::new("records read", None);
        let ends = read_to_end(&consumer, &read, |m| {
            derive.record(&mut cleanser, m, &mut rows);
            records += 1;
            progress.add(1);
            if rows.len() >= commit_rows {
                // The writer is gone only if it failed; its error is reported below.
                let _ = tx.blocking_send(std::mem::take(&mut rows));
            }
        })?;
        derive.finish(&mut rows);
        let _ = tx.blocking_send(rows);
        progress.finish();
        anyhow::Ok((ends, records, derive.check()))
    });
    let mut written = 0usize;
    let mut commits = 0usize;
    while let Some(chunk) = rx.recv().await {
        if chunk.is_empty() && commits > 0 {
            continue;
        }
        write_rows::<R>(&config.lake, &into, &chunk)
            .await
            .with_context(|| format!("writing table `{into}`"))?;
        written += chunk.len();
        commits += 1;
    }
    let (ends, records, check) = reader.await.context("raw reader")??;
    println!(
        "rebuilt `{into}` from `{source}`: {records} records → {written} rows in {commits} commits"
    );
    if !args.check {
        return Ok(());
    }
    let all: Vec<String> = R::arrow_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let (columns, live_scope, rebuilt_scope) = match check {
        Some((columns, scope)) => {
            println!("check: over {} where {scope}", columns.join(", "));
            let columns = columns.iter().map(|c| (*c).to_owned()).collect();
            (columns, scope.clone(), scope)
        }
        None if derived => (
            all,
            derived_scope::<R>(&config.kafka.topics.raw, &ends),
            "TRUE".to_owned(),
        ),
        None => (all, "TRUE".to_owned(), "TRUE".to_owned()),
    };
    let diff = compare::<R>(config, &into, (&live_scope, &rebuilt_scope), &columns).await?;
    println!(
        "check: live `{}` ({} rows in scope) vs `{into}` ({} rows): {} distinct rows (with their copies) only in the live table, {} only in the rebuild",
        R::TABLE,
        diff.live,
        diff.rebuilt,
        diff.only_live,
        diff.only_rebuilt
    );
    if diff.only_live > 0 || diff.only_rebuilt > 0 {
        bail!("the rebuilt table differs from the live one");
    }
    println!("check: equal");
    Ok(())
}

/// The live rows that came from the raw records the rebuild read.
fn derived_scope<R: LakeRow>(raw: &str, ends: &HashMap<i32, i64>) -> String {
    let mut ranges: Vec<String> = ends
        .iter()
        .map(|(p, end)| format!("(source_partition = {p} AND source_offset < {end})"))
        .collect();
    ranges.sort();
    if ranges.is_empty() {
        ranges.push("FALSE".into());
    }
    let stage = if R::TABLE == <DeadLetter as LakeRow>::TABLE {
        " AND stage = 'cleanse'"
    } else {
        ""
    };
    format!(
        "source_topic = '{}'{stage} AND ({})",
        raw.replace('\'', "''"),
        ranges.join(" OR ")
    )
}

struct Difference {
    live: i64,
    rebuilt: i64,
    only_live: i64,
    only_rebuilt: i64,
}

/// Compares the live table with `rebuilt` (rows in their `scopes`) as multisets over `columns`.
async fn compare<R: LakeRow>(
    config: &Config,
    rebuilt: &str,
    (scope, rebuilt_scope): (&str, &str),
    columns: &[String],
) -> anyhow::Result<Difference> {
    let mut engine = SqlEngine::over_lake(&config.lake).await?;
    if !engine.register(&config.lake, rebuilt).await? {
        bail!("the rebuilt table `{rebuilt}` cannot be read");
    }
    let live = R::TABLE;
    let columns: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
    let columns = columns.join(", ");
    let counted = |table: &str, filter: &str| {
        format!(
            "SELECT {columns}, count(*) AS copies FROM \"{table}\" WHERE {filter} GROUP BY {columns}"
        )
    };
    let count = |sql: String| {
        let engine = &engine;
        async move {
            let batches = engine.query(&sql).await?;
            anyhow::Ok(
                batches
                    .iter()
                    .find(|b| b.num_rows() > 0)
                    .map_or(0, |b| b.column(0).as_primitive::<Int64Type>().value(0)),
            )
        }
    };
    let (a, b) = (counted(live, scope), counted(rebuilt, rebuilt_scope));
    Ok(Difference {
        live: count(format!("SELECT count(*) FROM \"{live}\" WHERE {scope}")).await?,
        rebuilt: count(format!(
            "SELECT count(*) FROM \"{rebuilt}\" WHERE {rebuilt_scope}"
        ))
        .await?,
        only_live: count(format!("SELECT count(*) FROM ({a} EXCEPT {b})")).await?,
        only_rebuilt: count(format!("SELECT count(*) FROM ({b} EXCEPT {a})")).await?,
    })
}
