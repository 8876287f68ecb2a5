//! `tributary alerts tail`: follows `anomalies` (and with `--incidents`, `incidents`) live on a
//! terminal, one line per lifecycle record, or one JSON object per line (`--json`).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tributary_schemas::avro::{self, Anomaly, Incident};
use tributary_schemas::incidents::severity_of;

use crate::config::Config;

#[derive(Args)]
pub struct TailArgs {
    /// Only this tenant's records.
    #[arg(long)]
    tenant: Option<String>,
    /// Only records of at least this severity (info, warning, critical).
    #[arg(long)]
    severity: Option<String>,
    /// Follow incidents too (`--incidents-only` for incidents alone).
    #[arg(long)]
    incidents: bool,
    /// Follow incidents, not anomalies.
    #[arg(long)]
    incidents_only: bool,
    /// Start at the beginning of the topics instead of their end.
    #[arg(long)]
    from_beginning: bool,
    /// One JSON object per line (with `"topic"`) instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this many records (default: follow until interrupted).
    #[arg(long)]
    limit: Option<u64>,
}

fn time(t: i64) -> String {
    chrono::DateTime::from_timestamp_micros(t)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// One anomaly record as a line.
pub fn anomaly_line(a: &Anomaly) -> String {
    format!(
        "{} anomaly  {:<8} {:<8} {} {} {}/{} [{}] {}",
        time(a.event_time),
        a.severity,
        a.state.as_str(),
        a.tenant,
        a.device,
        a.metric,
        a.detector,
        a.anomaly_id,
        a.message
    )
}

/// One incident record as a line.
pub fn incident_line(i: &Incident) -> String {
    let by = i
        .actor
        .as_deref()
        .map(|a| format!(" (by {a})"))
        .unwrap_or_default();
    format!(
        "{} incident {:<8} {:<8} {} {} {} [{} #{}]{} {}",
        time(i.event_time),
        i.severity,
        i.change.as_str(),
        i.tenant,
        i.rule,
        i.scope,
        i.incident_id,
        i.seq,
        by,
        i.message
    )
}

pub async fn tail(config: &Config, args: TailArgs) -> anyhow::Result<()> {
    if let Some(s) = &args.severity
        && !["info", "warning", "critical"].contains(&s.as_str())
    {
        anyhow::bail!("--severity `{s}`: info, warning or critical");
    }
    let topics = &config.kafka.topics;
    let mut follow = Vec::new();
    if !args.incidents_only {
        follow.push(topics.anomalies.clone());
    }
    if args.incidents || args.incidents_only {
        follow.push(topics.incidents.clone());
    }
    let consumer: StreamConsumer = config
        .kafka
        .reader(&format!("alerts-tail-{}", std::process::id()))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in &follow {
        let md = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })
        .with_context(|| format!("reading the metadata of {topic}"))?;
        let parts = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if parts == 0 {
            anyhow::bail!(
                "topic `{topic}` does not exist; create it with `tributary topics create`"
            );
        }
        for p in 0..parts as i32 {
            let start = if args.from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            };
            tpl.add_partition_offset(topic, p, start)?;
        }
    }
    consumer.assign(&tpl)?;
    let min = args.severity.as_deref().map(severity_of);
    let wanted = |tenant: &str, severity: &str| {
        args.tenant.as_deref().is_none_or(|t| t == tenant)
            && min.is_none_or(|m| severity_of(severity) >= m)
    };
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    while args.limit.is_none_or(|l| shown < l) {
        let m = tokio::select! {
            m = consumer.recv() => m?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(bytes) = m.payload() else { continue };
        let line = if m.topic() == topics.incidents {
            let Ok(i) = avro::decode::<Incident>(bytes) else {
                continue;
            };
            if !wanted(&i.tenant, &i.severity) {
                continue;
            }
            if args.json {
                let mut v = serde_json::to_value(&i)?;
                v["topic"] = "incidents".into();
                v.to_string()
            } else {
                incident_line(&i)
            }
        } else {
            let Ok(a) = avro::decode::<Anomaly>(bytes) else {
                continue;
            };
            if !wanted(&a.tenant, &a.severity) {
                continue;
            }
            if args.json {
                let mut v = serde_json::to_value(&a)?;
                v["topic"] = "anomalies".into();
                v.to_string()
            } else {
                anomaly_line(&a)
            }
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        shown += 1;
    }
    Ok(())
}
