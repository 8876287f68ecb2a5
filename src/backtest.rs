//! `tributary anomalies backtest`: a detector catalog (the live one: the config file's with the
//! tenants' API entries over it; or a file) run over readings from the lake's `telemetry` table or
//! from a file, with the live stage's code
//! ([`tributary_streams::anomaly::Detection`]), printing what would have fired.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, TimestampMicrosecondType};
use tributary_query::SqlEngine;
use tributary_registry::follower;
use tributary_schemas::avro::{Anomaly, AnomalyState};
use tributary_schemas::detectors::{DetectorCatalog, DetectorOverrides};
use tributary_schemas::{Micros, Reading};
use tributary_streams::anomaly::{AnomalyConfig, Detection};

use crate::config::Config;
use crate::deadletters::quote;

#[derive(clap::Args)]
pub struct BacktestArgs {
    /// A detector catalog: a TOML file shaped like the `[anomalies]` section (`[detectors.<name>]`,
    /// `[tenants.<tenant>.detectors.<name>]`). Default: the live one (config file and admin API).
    #[arg(long)]
    detectors: Option<PathBuf>,
    /// Readings from a file instead of the `telemetry` table: CSV with the header
    /// `tenant,device,metric,time,value` (time in RFC 3339), or Parquet with those columns.
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    metric: Option<String>,
    /// From this event time on (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Before this event time (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    #[arg(long, value_enum, default_value_t = BacktestFormat::Jsonl)]
    format: BacktestFormat,
    /// Write here instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BacktestFormat {
    /// One JSON object per anomaly.
    Jsonl,
    Csv,
}

fn time(s: &str, flag: &str) -> anyhow::Result<String> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("--{flag} {s:?}: not an RFC 3339 time"))?;
    Ok(quote(&t.with_timezone(&chrono::Utc).to_rfc3339()))
}

fn rfc3339(t: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(t).map_or_else(
        || t.to_string(),
        |d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// The readings the arguments select, oldest first.
async fn readings(config: &Config, args: &BacktestArgs) -> anyhow::Result<Vec<Reading>> {
    let mut engine = SqlEngine::over_lake(&config.lake).await?;
    let (table, time_column, extra) = match &args.input {
        Some(path) => {
            if !path.exists() {
                bail!("--input {}: no such file", path.display());
            }
            engine.register_file("backtest_input", path).await?;
            (
                "backtest_input",
                "to_timestamp_micros(time)",
                "CAST(NULL AS VARCHAR) AS device_group, CAST(NULL AS VARCHAR) AS device_model",
            )
        }
        None => {
            if !engine.tables().iter().any(|t| t == "telemetry") {
                bail!(
                    "the lake at {} has no `telemetry` table yet",
                    config.lake.url
                );
            }
            ("telemetry", "event_time", "device_group, device_model")
        }
    };
    let mut filters = vec!["true".to_owned()];
    for (column, value) in [
        ("tenant", &args.tenant),
        ("device", &args.device),
        ("metric", &args.metric),
    ] {
        if let Some(v) = value {
            filters.push(format!("{column} = {}", quote(v)));
        }
    }
    if let Some(from) = &args.from {
        filters.push(format!("{time_column} >= {}", time(from, "from")?));
    }
    if let Some(to) = &args.to {
        filters.push(format!("{time_column} < {}", time(to, "to")?));
    }
    let sql = format!(
        "SELECT CAST(tenant AS VARCHAR) AS tenant, CAST(device AS VARCHAR) AS device, \
         CAST(metric AS VARCHAR) AS metric, CAST({time_column} AS TIMESTAMP) AS t, \
         CAST(value AS DOUBLE) AS value, {extra} FROM {table} WHERE {} ORDER BY t",
        filters.join(" AND ")
    );
    let batches = engine.query(&sql).await.context("reading the readings")?;
    let mut out = Vec::new();
    for b in &batches {
        collect(b, &mut out)?;
    }
    Ok(out)
}

fn collect(b: &RecordBatch, out: &mut Vec<Reading>) -> anyhow::Result<()> {
    let text = |i: usize| -> anyhow::Result<arrow::array::StringArray> {
        let c = arrow::compute::cast(b.column(i), &DataType::Utf8)?;
        Ok(c.as_string::<i32>().clone())
    };
    let (tenant, device, metric) = (text(0)?, text(1)?, text(2)?);
    let t = arrow::compute::cast(
        b.column(3),
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
    )?;
    let t = t.as_primitive::<TimestampMicrosecondType>();
    let value = b.column(4).as_primitive::<Float64Type>();
    let (group, model) = (text(5)?, text(6)?);
    for i in 0..b.num_rows() {
        if t.is_null(i) || value.is_null(i) {
            continue;
        }
        let opt = |a: &arrow::array::StringArray| (!a.is_null(i)).then(|| a.value(i).to_owned());
        out.push(Reading {
            tenant: tenant.value(i).to_owned(),
            device: device.value(i).to_owned(),
            metric: metric.value(i).to_owned(),
            value: value.value(i),
            unit: None,
            original_value: None,
            original_unit: None,
            late: false,
            event_time: t.value(i),
            ingest_time: t.value(i),
            event_id: String::new(),
            source_topic: "backtest".into(),
            source_partition: 0,
            source_offset: out.len() as i64,
            source_index: 0,
            measurement: None,
            name: None,
            conflict: false,
            device_group: opt(&group),
            device_model: opt(&model),
            site: Vec::new(),
        });
    }
    Ok(())
}

/// One anomaly, its lifecycle folded: what a person reviewing a backtest reads.
#[derive(serde::Serialize)]
struct Fired {
    anomaly_id: String,
    tenant: String,
    device: String,
    metric: String,
    detector: String,
    kind: String,
    severity: String,
    start_time: String,
    end_time: Option<String>,
    value: f64,
    baseline: Option<f64>,
    threshold: Option<f64>,
    score: Option<f64>,
    predicted_time: Option<String>,
    readings: i64,
    flaps: i32,
    message: String,
}

fn fold(records: Vec<Anomaly>) -> Vec<Fired> {
    let mut by_id: BTreeMap<(Micros, String), Anomaly> = BTreeMap::new();
    let mut starts: BTreeMap<String, Micros> = BTreeMap::new();
    for a in records {
        let start = *starts.entry(a.anomaly_id.clone()).or_insert(a.start_time);
        let key = (start, a.anomaly_id.clone());
        match by_id.get(&key) {
            Some(prev) if prev.seq >= a.seq => {}
            _ => {
                by_id.insert(key, a);
            }
        }
    }
    by_id
        .into_values()
        .map(|a| Fired {
            anomaly_id: a.anomaly_id,
            tenant: a.tenant,
            device: a.device,
            metric: a.metric,
            detector: a.detector,
            kind: a.kind,
            severity: a.severity,
            start_time: rfc3339(a.start_time),
            end_time: if a.state == AnomalyState::Resolved {
                a.end_time.map(rfc3339)
            } else {
                None
            },
            value: a.value,
            baseline: a.baseline,
            threshold: a.threshold,
            score: a.score,
            predicted_time: a.predicted_time.map(rfc3339),
            readings: a.readings,
            flaps: a.flaps,
            message: a.message,
        })
        .collect()
}

/// The detector catalog in effect now: the config file's, with the tenants' API entries (read
/// from `detector-catalog`) over it.
pub async fn live_detectors(config: &Config) -> anyhow::Result<DetectorCatalog> {
    let overrides = Arc::new(DetectorOverrides::default());
    let follower = follower::follow_detectors(&config.kafka, overrides.clone())
        .await
        .context("reading the tenants' detectors (pass --detectors <file> to use a file alone)")?;
    follower.abort();
    config
        .anomalies
        .base(config.cleanse.metric_names())
        .compile(&overrides.snapshot())
        .context("the detector catalog")
}

pub async fn run(config: &Config, args: BacktestArgs) -> anyhow::Result<()> {
    let anomalies: AnomalyConfig = match &args.detectors {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?
        }
        None => config.anomalies.clone(),
    };
    let catalog = match &args.detectors {
        Some(_) => anomalies
            .catalog(config.cleanse.metric_names().as_ref())
            .context("the detector catalog")?,
        None => live_detectors(config).await?,
    };
    if catalog.is_empty() {
        bail!("no detectors: configure `[anomalies.detectors]` or pass --detectors <file>");
    }
    let readings = readings(config, &args).await?;
    let mut detection = Detection::new(Arc::new(catalog), &anomalies, "backtest");
    detection.start_empty(0);
    let mut records = Vec::new();
    for (i, r) in readings.iter().enumerate() {
        records.extend(detection.reading(0, i as i64, r.event_time, r, "telemetry"));
    }
    // The clock at the newest reading: silences at the end count too.
    if let Some(last) = readings.last() {
        records.extend(detection.advance_to(0, last.event_time, "telemetry"));
    }
    let fired = fold(records);
    let mut sink: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    match args.format {
        BacktestFormat::Jsonl => {
            for f in &fired {
                serde_json::to_writer(&mut sink, f)?;
                writeln!(sink)?;
            }
        }
        BacktestFormat::Csv => {
            writeln!(
                sink,
                "anomaly_id,tenant,device,metric,detector,kind,severity,start_time,end_time,value,baseline,threshold,score,predicted_time,readings,flaps,message"
            )?;
            let field = |s: &str| {
                if s.contains([',', '"', '\n']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.to_owned()
                }
            };
            let num = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
            for f in &fired {
                writeln!(
                    sink,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    f.anomaly_id,
                    field(&f.tenant),
                    field(&f.device),
                    field(&f.metric),
                    field(&f.detector),
                    f.kind,
                    f.severity,
                    f.start_time,
                    f.end_time.clone().unwrap_or_default(),
                    f.value,
                    num(f.baseline),
                    num(f.threshold),
                    num(f.score),
                    f.predicted_time.clone().unwrap_or_default(),
                    f.readings,
                    f.flaps,
                    field(&f.message)
                )?;
            }
        }
    }
    sink.flush()?;
    eprintln!(
        "{} readings, {} anomalies ({} detectors' series)",
        readings.len(),
        fired.len(),
        detection.series(0)
    );
    Ok(())
}
