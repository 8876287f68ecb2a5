//! `tributary deadletter list|show|replay`: read the `deadletter` table and re-drive dead letters.
//!
//! A replay copies the raw record of each *open* dead letter back onto `raw` (same partition, same
//! bytes, but `source = replay`, `replayed_at` and the refused measurements' indexes): the cleanse
//! stage re-drives only those measurements. A dead letter is open while no reading of its identity
//! (tenant, device, event id, measurement) is in `telemetry`; the replay waits until its copies
//! are cleansed into the lake, so replaying again right after re-drives only what is still refused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tributary_query::{OutputFormat, SqlEngine, render};
use tributary_schemas::avro::{decode, encode};
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::{RawEnvelope, Source, now_micros};

use crate::config::Config;
use crate::progress::Progress;

/// Rules whose dead letters a replay cannot fix: the record is not an envelope, or ingest did not
/// know the device (the tenant is stamped at ingest, never later).
const NOT_REPLAYABLE: [&str; 2] = ["bad_envelope", "unknown_device"];

#[derive(Subcommand)]
pub enum DeadLetterCommand {
    /// The latest dead letters (newest first), with the id `show` takes.
    List {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter in full, with its original bytes.
    Show {
        /// `<topic>/<partition>/<offset>/<index>`, as `list` prints it.
        id: String,
    },
    /// Re-drive the matching dead letters through the cleanse stage (after a catalog fix).
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Print what would be replayed; replay nothing.
        #[arg(long)]
        dry_run: bool,
        /// Return once the copies are on `raw`, without waiting for them to be cleansed.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Which dead letters.
#[derive(Args)]
pub struct Filter {
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    device: Option<String>,
    /// The rule, e.g. out_of_range.
    #[arg(long)]
    rule: Option<String>,
    /// Received at or after: an RFC 3339 time or an age such as 30m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
}

/// A SQL string literal.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Filter {
    fn sql(&self) -> anyhow::Result<String> {
        let mut conditions = vec!["TRUE".to_owned()];
        for (column, value) in [
            ("tenant", &self.tenant),
            ("device", &self.device),
            ("rule", &self.rule),
        ] {
            if let Some(v) = value {
                conditions.push(format!("{column} = {}", quote(v)));
            }
        }
        if let Some(since) = &self.since {
            conditions.push(format!("received_at >= {}", quote(&since_time(since)?)));
        }
        Ok(conditions.join(" AND "))
    }
}

/// An RFC 3339 time, or now minus an age (`90s`, `30m`, `2h`, `7d`), as RFC 3339.
fn since_time(s: &str) -> anyhow::Result<String> {
    if chrono::DateTime::parse_from_rfc3339(s).is_ok() {
        return Ok(s.to_owned());
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .with_context(|| format!("--since `{s}`: not an RFC 3339 time nor an age like 2h"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--since `{s}`: an age's unit is s, m, h or d"),
    };
    let t = n
        .checked_mul(unit_secs)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
        .with_context(|| format!("--since `{s}`: the age is too large"))?;
    Ok(t.to_rfc3339())
}

const ID: &str = "concat(source_topic, '/', CAST(source_partition AS VARCHAR), '/', \
                  CAST(source_offset AS VARCHAR), '/', CAST(source_index AS VARCHAR))";

pub async fn run(config: &Config, command: DeadLetterCommand) -> anyhow::Result<()> {
    let engine = SqlEngine::over_lake(&config.lake).await?;
    if !engine.tables().iter().any(|t| t == "deadletter") {
        bail!(
            "the lake at {} has no `deadletter` table yet (no dead letter was written)",
            config.lake.url
        );
    }
    match command {
        DeadLetterCommand::List { filter, limit } => {
            let sql = format!(
                "SELECT {ID} AS id, received_at, tenant, device, rule, field, reason \
                 FROM deadletter WHERE {} ORDER BY received_at DESC, id LIMIT {limit}",
                filter.sql()?
            );
            let batches = engine.query(&sql).await?;
            println!("{}", render(&batches, OutputFormat::Table)?);
            Ok(())
        }
        DeadLetterCommand::Show { id } => show(&engine, &id).await,
        DeadLetterCommand::Replay {
            filter,
            dry_run,
            no_wait,
        } => replay(config, &engine, &filter, dry_run, !no_wait).await,
    }
}

async fn show(engine: &SqlEngine, id: &str) -> anyhow::Result<()> {
    let batches = engine
        .query(&format!(
            "SELECT {ID} AS id, stage, rule, field, reason, tenant, device, event_id, received_at, \
             original FROM deadletter WHERE {ID} = {}",
            quote(id)
        ))
        .await?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
        bail!(
            "no dead letter `{id}` (ids look like raw/3/1234/0; see `tributary deadletter list`)"
        );
    };
    let fields = batch.schema();
    for (i, field) in fields.fields().iter().enumerate() {
        let column = batch.column(i);
        let value = if field.name() == "original" {
            // Delta readers may hand binary back as a view or large array.
            let column = arrow::compute::cast(column, &DataType::Binary)?;
            let bytes = column.as_binary::<i32>().value(0);
            match std::str::from_utf8(bytes) {
                Ok(text) => text.to_owned(),
                Err(_) => format!("(binary, hex) {}", hex::encode(bytes)),
            }
        } else if column.is_null(0) {
            String::new()
        } else {
            arrow::util::display::array_value_to_string(column, 0)?
        };
        println!("{:>11}: {value}", field.name());
    }
    Ok(())
}

/// The measurements of one raw record to re-drive; `None`: the whole message.
type Measurements = Option<BTreeSet<i32>>;

/// The matching dead letters that are still open (no reading of the same identity has landed
/// since), one raw record per event: partition → offset → measurements.
async fn open_dead_letters(
    engine: &SqlEngine,
    raw: &str,
    filter: &Filter,
) -> anyhow::Result<BTreeMap<i32, BTreeMap<i64, Measurements>>> {
    let excluded: Vec<String> = NOT_REPLAYABLE.iter().map(|r| quote(r)).collect();
    let resolved = if engine.tables().iter().any(|t| t == "telemetry") {
        "AND NOT EXISTS (SELECT 1 FROM telemetry t WHERE t.tenant = d.tenant \
         AND t.device = d.device AND t.event_id = d.event_id \
         AND (d.measurement IS NULL OR t.measurement = d.measurement))"
    } else {
        ""
    };
    let sql = format!(
        "SELECT tenant, device, event_id, source_partition, source_offset, measurement \
         FROM deadletter d WHERE stage = 'cleanse' AND source_topic = {} AND rule NOT IN ({}) \
         AND {} {resolved} ORDER BY source_partition, source_offset",
        quote(raw),
        excluded.join(", "),
        filter.sql()?
    );
    // (tenant, device, event id) → (its first raw position, measurements).
    type Event = (String, String, String);
    let mut events: BTreeMap<Event, ((i32, i64), Measurements)> = BTreeMap::new();
    for b in engine.query(&sql).await? {
        let strings: Vec<ArrayRef> = (0..3)
            .map(|c| arrow::compute::cast(b.column(c), &DataType::Utf8))
            .collect::<Result<_, _>>()?;
        let text = |c: usize, i: usize| {
            let a = strings[c].as_string::<i32>();
            if a.is_null(i) {
                String::new()
            } else {
                a.value(i).to_owned()
            }
        };
        let (p, o, m) = (
            b.column(3).as_primitive::<Int32Type>(),
            b.column(4).as_primitive::<Int64Type>(),
            b.column(5).as_primitive::<Int32Type>(),
        );
        for i in 0..b.num_rows() {
            let key = (text(0, i), text(1, i), text(2, i));
            let entry = events
                .entry(key)
                .or_insert_with(|| ((p.value(i), o.value(i)), Some(BTreeSet::new())));
            match (entry.1.as_mut(), m.is_null(i)) {
                (Some(set), false) => {
                    set.insert(m.value(i));
                }
                // A dead letter of the whole message: re-drive all of it.
                _ => entry.1 = None,
            }
        }
    }
    let mut out: BTreeMap<i32, BTreeMap<i64, Measurements>> = BTreeMap::new();
    for ((p, o), measurements) in events.into_values() {
        out.entry(p).or_default().insert(o, measurements);
    }
    Ok(out)
}

async fn replay(
    config: &Config,
    engine: &SqlEngine,
    filter: &Filter,
    dry_run: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let raw = config.kafka.topics.raw.clone();
    let wanted = open_dead_letters(engine, &raw, filter).await?;
    let total: usize = wanted.values().map(BTreeMap::len).sum();
    let skipped: usize = count(
        engine,
        &format!(
            "SELECT count(DISTINCT {ID}) FROM deadletter WHERE rule IN ({}) AND {}",
            NOT_REPLAYABLE
                .iter()
                .map(|r| quote(r))
                .collect::<Vec<_>>()
                .join(", "),
            filter.sql()?
        ),
    )
    .await?;
    if skipped > 0 {
        eprintln!(
            "{skipped} matching dead letters are not replayable ({}): left as they are",
            NOT_REPLAYABLE.join(", ")
        );
    }
    if total == 0 {
        println!("nothing to replay: no open dead letter matches");
        return Ok(());
    }
    if dry_run {
        println!("would replay {total} raw records");
        return Ok(());
    }
    let kafka = config.kafka.clone();
    let topic = raw.clone();
    let records = tokio::task::spawn_blocking(move || read_positions(&kafka, &topic, &wanted))
        .await
        .context("raw reader")??;
    let producer: FutureProducer = config
        .kafka
        .producer("tributary-deadletter-replay")
        .create()
        .context("kafka producer")?;
    let mut deliveries = Vec::with_capacity(records.len());
    let replayed_at = now_micros();
    for (partition, bytes, measurements) in &records {
        let mut envelope: RawEnvelope = decode(bytes)?;
        envelope.source = Source::Replay;
        envelope.replayed_at = Some(replayed_at);
        envelope.replay_measurements = measurements.as_ref().map(|m| m.iter().copied().collect());
        let copy = encode(&envelope)?;
        deliveries.push(
            kafka::enqueue(&producer, &raw, Some(*partition), &envelope.device, &copy).await?,
        );
    }
    let mut copies: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for d in deliveries {
        let (p, o) = kafka::delivered(d).await?;
        copies.entry(p).or_default().push(o);
    }
    println!(
        "replayed {} raw records onto `{raw}` ({} of them not found in `{raw}`)",
        records.len(),
        total - records.len()
    );
    if wait {
        landed(config, &raw, &copies).await?;
    }
    Ok(())
}

/// Waits until every replayed copy has been cleansed into the lake; prints what became of them.
async fn landed(
    config: &Config,
    raw: &str,
    copies: &BTreeMap<i32, Vec<i64>>,
) -> anyhow::Result<()> {
    let total: usize = copies.values().map(Vec::len).sum();
    let positions: Vec<String> = copies
        .iter()
        .map(|(p, offsets)| {
            let list: Vec<String> = offsets.iter().map(i64::to_string).collect();
            format!(
                "(source_partition = {p} AND source_offset IN ({}))",
                list.join(", ")
            )
        })
        .collect();
    let scope = format!(
        "source_topic = {} AND ({})",
        quote(raw),
        positions.join(" OR ")
    );
    let mut progress = Progress::new("cleansed", Some(total as u64));
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut done, mut readings, mut dead) = (0usize, 0usize, 0usize);
    while Instant::now() < deadline {
        let engine = SqlEngine::over_lake(&config.lake).await?;
        let from = |table: &str| {
            if engine.tables().iter().any(|t| t == table) {
                format!("SELECT source_partition, source_offset FROM {table} WHERE {scope}")
            } else {
                "SELECT CAST(0 AS INT) AS source_partition, CAST(0 AS BIGINT) AS source_offset \
                 WHERE FALSE"
                    .to_owned()
            }
        };
        let seen = count(
            &engine,
            &format!(
                "SELECT count(*) FROM (SELECT DISTINCT source_partition, source_offset FROM ({} UNION ALL {}))",
                from("telemetry"),
                from("deadletter")
            ),
        )
        .await?;
        readings = count(
            &engine,
            &format!("SELECT count(*) FROM ({})", from("telemetry")),
        )
        .await?;
        dead = count(
            &engine,
            &format!("SELECT count(*) FROM ({})", from("deadletter")),
        )
        .await?;
        progress.add(seen.saturating_sub(done) as u64);
        done = seen;
        if done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    progress.finish();
    println!(
        "cleansed {done} of {total} replayed records: {readings} readings landed, {dead} dead letters again"
    );
    if done < total {
        bail!(
            "{} replayed records were not in the lake after 5 minutes (is `tributary run cleanse lake` running?)",
            total - done
        );
    }
    Ok(())
}

async fn count(engine: &SqlEngine, sql: &str) -> anyhow::Result<usize> {
    let batches: Vec<RecordBatch> = engine.query(sql).await?;
    Ok(batches.iter().find(|b| b.num_rows() > 0).map_or(0, |b| {
        b.column(0).as_primitive::<Int64Type>().value(0) as usize
    }))
}

/// Reads the records at `wanted` positions of `topic`: (partition, bytes, measurements). Blocking.
fn read_positions(
    kafka: &KafkaConfig,
    topic: &str,
    wanted: &BTreeMap<i32, BTreeMap<i64, Measurements>>,
) -> anyhow::Result<Vec<(i32, Vec<u8>, Measurements)>> {
    let reader: BaseConsumer = kafka.reader("deadletter-replay").create()?;
    let mut out = Vec::new();
    let mut progress = Progress::new(
        "read raw",
        Some(wanted.values().map(|s| s.len() as u64).sum()),
    );
    for (&partition, offsets) in wanted {
        let mut position: Option<i64> = None;
        for (&offset, measurements) in offsets {
            // Seek unless the wanted record is a short read ahead.
            if position.is_none_or(|p| offset < p || offset - p > 1000) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
                reader.assign(&tpl)?;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if Instant::now() > deadline {
                    tracing::warn!(partition, offset, "raw record not found (retention?)");
                    position = None;
                    break;
                }
                match reader.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        position = Some(m.offset() + 1);
                        if m.offset() == offset {
                            let bytes = m.payload().unwrap_or_default().to_vec();
                            out.push((partition, bytes, measurements.clone()));
                            break;
                        }
                        if m.offset() > offset {
                            tracing::warn!(
                                partition,
                                offset,
                                "raw record gone (compacted or deleted)"
                            );
                            break;
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => {}
                }
            }
            progress.add(1);
        }
    }
    progress.finish();
    Ok(out)
}
