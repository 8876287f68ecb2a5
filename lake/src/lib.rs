//! Sinks: Kafka topics into Delta Lake tables on object storage, exactly once, and into a
//! time-series store over InfluxDB line protocol.
//!
//! This crate owns the Delta sink ([`delta_sink::DeltaSink`]), the lake's table layouts
//! ([`tables`]: Arrow schemas, partitioning by tenant and day), where tables live ([`LakeConfig`]:
//! a local directory or `s3://`), and the time-series sink ([`timeseries_sink::TimeSeriesSink`],
//! points as [`line_protocol`] defines them, at least once and idempotent).
//!
//! Exactly once rests on Delta alone (no Kafka transactions): every commit carries `txn` actions
//! recording, per Kafka partition, the next offset to read, and per raw source partition, the last
//! source position written. A sink reads them back when it gets a partition and seeks there; outputs
//! an upstream stage re-emitted after a crash are recognised by their source position and dropped.
//!
//! It must not touch: Kafka topics other than those it drains (and `deadletter` for undecodable
//! records), the device-facing endpoints, or any table it does not own.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use url::Url;

pub mod delta_sink;
pub mod line_protocol;
pub mod maintenance;
pub mod tables;
pub mod timeseries_sink;

/// Errors of the lake.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake.url `{url}` is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("delta: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding: {0}")]
    Encode(#[from] tributary_schemas::avro::AvroError),
    #[error(
        "table `{table}` cannot take these rows: {reason} (an incompatible schema change: write a new table, e.g. `tributary rebuild {table} --into {table}_v2`)"
    )]
    IncompatibleSchema { table: String, reason: String },
    #[error("time-series store: {0}")]
    TimeSeries(#[from] timeseries_sink::TimeSeriesError),
    #[error(transparent)]
    Stream(#[from] tributary_streams::StreamError),
}

/// `[lake]` in the config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LakeConfig {
    /// Root of every table: a local path, `file:///…` or `s3://bucket/prefix`.
    pub url: String,
    /// Object store options (e.g. `AWS_ENDPOINT_URL`, `AWS_REGION`, credentials). Never logged.
    pub storage_options: HashMap<String, String>,
    /// A sink commits when it holds this many rows…
    pub flush_rows: usize,
    /// …or when its oldest row waited this long (milliseconds).
    pub flush_interval_ms: u64,
    /// Compaction's target file size (`delta.targetFileSize` of tables created from now on).
    pub target_file_size_bytes: u64,
    /// A checkpoint every this many commits (`delta.checkpointInterval` of new tables).
    pub checkpoint_interval: u64,
    /// Each sink compacts its table's partitions of yesterday and today this often (seconds; 0:
    /// never), and once a day Z-orders yesterday's by `zorder_by`.
    pub compact_interval_secs: u64,
    /// Columns the daily compaction Z-orders by (empty: bin-packing only).
    pub zorder_by: Vec<String>,
}

impl std::fmt::Debug for LakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeConfig")
            .field("url", &self.url)
            .field(
                "storage_options",
                &self.storage_options.keys().collect::<Vec<_>>(),
            )
            .field("flush_rows", &self.flush_rows)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("target_file_size_bytes", &self.target_file_size_bytes)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("compact_interval_secs", &self.compact_interval_secs)
            .field("zorder_by", &self.zorder_by)
            .finish()
    }
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            url: "./data/lake".into(),
            storage_options: HashMap::new(),
            flush_rows: 50_000,
            flush_interval_ms: 2_000,
            target_file_size_bytes: 128 * 1024 * 1024,
            checkpoint_interval: 100,
            compact_interval_secs: 3_600,
            zorder_by: vec!["device".into()],
        }
    }
}

/// The schemes a lake may live on.
pub const LAKE_SCHEMES: &str = "a local path, file:// or s3://";

impl LakeConfig {
    /// The lake root as a URL (local paths are made absolute and created).
    pub fn root_url(&self) -> Result<Url, LakeError> {
        let bad = |reason: String| LakeError::BadUrl {
            url: self.url.clone(),
            reason,
        };
        if self.url.trim().is_empty() {
            return Err(bad(format!("empty; allowed: {LAKE_SCHEMES}")));
        }
        match Url::parse(&self.url) {
            Ok(u) if u.scheme() == "s3" || u.scheme() == "s3a" => {
                if u.host_str().unwrap_or("").is_empty() {
                    return Err(bad("s3:// needs a bucket".into()));
                }
                Ok(with_trailing_slash(u))
            }
            Ok(u) if u.scheme() == "file" => {
                let path = u
                    .to_file_path()
                    .map_err(|_| bad("not a local file path".into()))?;
                Self::local_url(&path).map_err(bad)
            }
            Ok(u) if u.scheme().len() > 1 => Err(bad(format!(
                "scheme `{}` is not supported; allowed: {LAKE_SCHEMES}",
                u.scheme()
            ))),
            _ => Self::local_url(std::path::Path::new(&self.url)).map_err(bad),
        }
    }

    fn local_url(path: &std::path::Path) -> Result<Url, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("cannot create directory: {e}"))?;
        let abs = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
        Url::from_directory_path(&abs).map_err(|_| "not an absolute path".to_owned())
    }

    /// Where one table lives.
    pub fn table_url(&self, table: &str) -> Result<Url, LakeError> {
        let root = self.root_url()?;
        root.join(&format!("{table}/"))
            .map_err(|e| LakeError::BadUrl {
                url: self.url.clone(),
                reason: e.to_string(),
            })
    }

    /// The Delta table properties every table is created with.
    pub fn table_properties(&self) -> Vec<(String, Option<String>)> {
        vec![
            (
                "delta.targetFileSize".into(),
                Some(self.target_file_size_bytes.to_string()),
            ),
            (
                "delta.checkpointInterval".into(),
                Some(self.checkpoint_interval.max(1).to_string()),
            ),
        ]
    }

    /// Whether the lake is on the local disk.
    pub fn is_local(&self) -> bool {
        self.root_url()
            .map(|u| u.scheme() == "file")
            .unwrap_or(false)
    }
}

/// Moves a consumer's position in one partition back to `offset`, so the records from there are
/// read again (a blocking librdkafka call: kept off the async workers).
pub(crate) fn rewind<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), LakeError> {
    use rdkafka::consumer::Consumer;
    tokio::task::block_in_place(|| {
        consumer.seek(
            topic,
            partition,
            rdkafka::Offset::Offset(offset),
            std::time::Duration::from_secs(10),
        )
    })?;
    Ok(())
}

fn with_trailing_slash(mut u: Url) -> Url {
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_urls() {
        let dir = tempfile::tempdir().unwrap();
        let c = LakeConfig {
            url: dir.path().join("lake").display().to_string(),
            ..Default::default()
        };
        let t = c.table_url("telemetry").unwrap();
        assert_eq!(t.scheme(), "file");
        assert!(t.path().ends_with("/lake/telemetry/"));
        let s3 = LakeConfig {
            url: "s3://bucket/prefix".into(),
            ..Default::default()
        };
        assert_eq!(
            s3.table_url("deadletter").unwrap().as_str(),
            "s3://bucket/prefix/deadletter/"
        );
        let bad = LakeConfig {
            url: "gopher://x".into(),
            ..Default::default()
        };
        assert!(
            bad.root_url()
                .unwrap_err()
                .to_string()
                .contains("allowed: a local path, file:// or s3://")
        );
    }

    #[test]
    fn debug_hides_storage_secrets() {
        let mut c = LakeConfig::default();
        c.storage_options
            .insert("AWS_SECRET_ACCESS_KEY".into(), "hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
