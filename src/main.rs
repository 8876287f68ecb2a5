//! `tributary`: one binary for every stage, the device simulator and SQL.
//!
//! The binary owns the command line, the configuration ([`config`]), wiring stages together
//! ([`pipeline`]), topic creation ([`admin`]), device seeding ([`devices`]), the simulator
//! ([`simulator`]), dead-letter tools ([`deadletters`]), rebuilds from `raw` ([`rebuild`]) and table maintenance
//! ([`maintenance`]). Stage logic lives in the crates; nothing here touches a payload.

mod admin;
mod alerts_tail;
mod backtest;
mod config;
mod deadletters;
mod devices;
mod incident_actions;
mod maintenance;
mod pipeline;
mod progress;
mod rebuild;
mod shadow_log;
mod simulator;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// Tributary: an event-sourced IoT data pipeline (MQTT/HTTP → Kafka raw log → cleanse → Delta Lake → SQL).
#[derive(Parser)]
#[command(name = "tributary", version, about, long_about = None)]
struct Cli {
    /// Config file (TOML). Default: ./tributary.toml when present. Every key can be overridden by
    /// TRIBUTARY_<SECTION>__<KEY>, e.g. TRIBUTARY_KAFKA__BROKERS=127.0.0.1:9092.
    #[arg(long, global = true, env = "TRIBUTARY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: every stage in one process, or some stages (each stage is its own
    /// consumer group or endpoint, so it scales out by starting more instances), e.g.
    /// `run http mqtt` for the ingest tier and `run cleanse lake` for processing.
    Run {
        /// The stages to run; all of them when omitted.
        #[arg(value_enum)]
        stages: Vec<pipeline::Stage>,
    },
    /// Simulate devices sending telemetry (plausible metrics, a few malformed messages, duplicates),
    /// then print a JSON summary of what was sent and what the lake should hold.
    Simulate(simulator::SimulateArgs),
    /// Run SQL over every lake table and print the result: on the lake itself (as the local
    /// operator), or on a query server (`--server`) as a `[query.users]` user.
    Sql {
        /// The SQL statement, e.g. "SELECT device, avg(value) FROM telemetry GROUP BY device".
        query: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// A query server's base URL, e.g. http://127.0.0.1:8081 (its `POST /v1/sql`).
        #[arg(long, env = "TRIBUTARY_SQL_SERVER")]
        server: Option<String>,
        /// The user's token (or password) on the server.
        #[arg(long, env = "TRIBUTARY_SQL_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// The configuration.
    #[command(name = "config")]
    ConfigCmd {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The device registry: create, bulk-create from a recipe, list, get, update, delete, groups
    /// (over the admin API), and `seed` for simulated devices.
    Devices {
        #[command(subcommand)]
        command: devices::DevicesCommand,
    },
    /// Dead letters (the lake's `deadletter` table): list, show one, replay after a catalog fix.
    Deadletter {
        #[command(subcommand)]
        command: deadletters::DeadLetterCommand,
    },
    /// Rebuild a lake table from the logs (`raw`; `shadow-updates` for shadows) into a new table;
    /// `--check` compares it with the live one.
    Rebuild(rebuild::RebuildArgs),
    /// Compact a lake table's small files (Delta OPTIMIZE), optionally Z-ordered; safe beside
    /// the running sinks.
    Optimize(maintenance::OptimizeArgs),
    /// Delete files a lake table no longer refers to (after compactions and erasures).
    Vacuum(maintenance::VacuumArgs),
    /// Alerts: follow anomalies and incidents live on a terminal.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Anomaly detection: try a detector catalog on history before it pages anyone.
    Anomalies {
        #[command(subcommand)]
        command: AnomaliesCommand,
    },
}

#[derive(Subcommand)]
enum AlertsCommand {
    /// Follow `anomalies` (and `incidents` with `--incidents`) from their end, one line per
    /// lifecycle record, filtered by tenant and severity.
    Tail(alerts_tail::TailArgs),
}

#[derive(Subcommand)]
enum AnomaliesCommand {
    /// Run a detector catalog over readings of the `telemetry` table (or a CSV/Parquet file)
    /// with the live stage's code, and print what would have fired.
    Backtest(backtest::BacktestArgs),
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every topic with `kafka.partitions` partitions (existing ones are left as they are).
    Create,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration; print it (secrets masked) when valid.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
    /// Arrow IPC stream (binary), for pyarrow, polars, DuckDB.
    Arrow,
}

/// `tributary sql --server`: the query server answers in the wanted format (Arrow IPC for
/// `--format arrow`, CSV rendered as is, JSON pretty-printed, a table drawn from Arrow).
async fn remote_sql(
    server: &str,
    token: Option<&str>,
    query: &str,
    format: Format,
) -> anyhow::Result<()> {
    use std::io::Write;
    let token = token.context("--server needs --token (or TRIBUTARY_SQL_TOKEN)")?;
    let wire = match format {
        Format::Csv => "csv",
        Format::Json => "json",
        Format::Table | Format::Arrow => "arrow",
    };
    let url = format!("{}/v1/sql", server.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token)
        .json(&serde_json::json!({ "sql": query, "format": wire }))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body = response.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        anyhow::bail!("query failed ({status}): {message}");
    }
    match format {
        Format::Table => {
            let batches: Vec<arrow::array::RecordBatch> =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)?
                    .collect::<Result<_, _>>()?;
            println!(
                "{}",
                tributary_query::render(&batches, tributary_query::OutputFormat::Table)?
            );
        }
        _ => std::io::stdout().lock().write_all(&body)?,
    }
    Ok(())
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("TRIBUTARY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            EnvFilter::new(
                "info,rdkafka=warn,deltalake_core=error,buoyant_kernel=warn,datafusion=warn",
            )
        });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // A panic is logged where operators look (the stage's supervisor then restarts the stage).
    std::panic::set_hook(Box::new(|info| {
        let message = tributary_streams::containment::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, %message, "panic");
    }));
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let config = Config::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { stages } => pipeline::run(config, &stages).await,
            Command::Simulate(args) => simulator::run(&config, args).await,
            Command::Sql {
                query,
                format,
                server: Some(server),
                token,
            } => remote_sql(&server, token.as_deref(), &query, format).await,
            Command::Sql { query, format, .. } => {
                let engine = tributary_query::SqlEngine::over_lake(&config.lake).await?;
                let batches = engine
                    .query(&query)
                    .await
                    .with_context(|| format!("query failed: {query}"))?;
                let format = match format {
                    Format::Table => tributary_query::OutputFormat::Table,
                    Format::Csv => tributary_query::OutputFormat::Csv,
                    Format::Json => tributary_query::OutputFormat::Json,
                    Format::Arrow => {
                        use std::io::Write;
                        let bytes = tributary_query::arrow_ipc(&batches)?;
                        std::io::stdout().lock().write_all(&bytes)?;
                        return Ok(());
                    }
                };
                println!("{}", tributary_query::render(&batches, format)?);
                Ok(())
            }
            Command::Topics {
                command: TopicsCommand::Create,
            } => admin::create_topics(&config.kafka).await,
            Command::ConfigCmd {
                command: ConfigCommand::Check,
            } => {
                println!("{}", config.to_redacted_toml());
                eprintln!("configuration is valid");
                Ok(())
            }
            Command::Devices { command } => devices::run(&config, command).await,
            Command::Deadletter { command } => deadletters::run(&config, command).await,
            Command::Rebuild(args) => rebuild::run(&config, args).await,
            Command::Optimize(args) => maintenance::optimize(&config, args).await,
            Command::Vacuum(args) => maintenance::vacuum(&config, args).await,
            Command::Anomalies {
                command: AnomaliesCommand::Backtest(args),
            } => backtest::run(&config, args).await,
            Command::Alerts {
                command: AlertsCommand::Tail(args),
            } => alerts_tail::tail(&config, args).await,
        }
    })
}
