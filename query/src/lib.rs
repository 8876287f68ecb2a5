//! SQL over the lake with DataFusion, for users of many tenants.
//!
//! This crate owns the query engine: [`QueryService`] (a session per query over the latest version
//! of every Delta table, tenant isolation below SQL, role checks, the limits of one query), its
//! endpoints ([`http`]: `POST /v1/sql`; [`incidents`]: the incident lifecycle API over the
//! `incidents` table, actions handed to an [`incidents::IncidentActionLog`]; [`pg`]: the Postgres wire protocol with an emulated
//! `pg_catalog`), their configuration ([`config`]), result formats ([`format`]), how a Delta
//! version is read ([`snapshot_table`]: the log's files through DataFusion's Parquet scan), what
//! the sessions add to DataFusion ([`functions`]: UTC `date_trunc`; [`count_from_statistics`]:
//! counts per partition from the log's row counts), and [`SqlEngine`], the local operator's engine
//! behind `tributary sql`, dead-letter tools and rebuild checks.
//!
//! It must not touch: Kafka (incident actions go through the log the process hands in), or any
//! table's data (it only reads).

pub mod config;
pub mod count_from_statistics;
pub mod format;
pub mod functions;
pub mod http;
pub mod incidents;
pub mod pg;
pub mod service;
pub mod shadows;
pub mod snapshot_table;

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::open_table;

pub use config::{Principal, QueryConfig, QueryLimits, Role};
pub use format::{OutputFormat, arrow_ipc, render};
pub use service::{QueryService, QueryStream};

/// Errors of the query engine. [`QueryError::is_users_fault`] tells a bad query from a failure.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{}", .0.strip_backtrace())]
    DataFusion(DataFusionError),
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("{0}")]
    Lake(#[from] tributary_lake::LakeError),
    #[error("delta: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("listing the lake: {0}")]
    Io(#[from] std::io::Error),
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("too many queries running (query.max_concurrent = {0}); retry shortly")]
    Busy(usize),
    #[error("query timed out after {0} s (query.timeout_secs)")]
    Timeout(u64),
    #[error("result has more than {0} rows (query.max_rows); add a LIMIT or aggregate")]
    TooManyRows(usize),
    #[error("query needs more memory than its limit (query.max_memory_mb): {0}")]
    MemoryLimit(String),
}

/// DataFusion's errors, with memory-pool exhaustion told apart as [`QueryError::MemoryLimit`].
impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::ResourcesExhausted(msg) => QueryError::MemoryLimit(msg.clone()),
            _ => QueryError::DataFusion(e),
        }
    }
}

/// How an endpoint reports a [`QueryError`]: an HTTP status and a Postgres SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCodes {
    pub http: u16,
    pub sqlstate: &'static str,
}

impl QueryError {
    /// The codes both endpoints answer this error with.
    pub fn codes(&self) -> ErrorCodes {
        let (http, sqlstate) = match self {
            QueryError::NotAllowed(_) => (403, "42501"),
            QueryError::Busy(_) => (429, "53300"),
            QueryError::Timeout(_) => (504, "57014"),
            QueryError::TooManyRows(_) => (413, "54000"),
            QueryError::MemoryLimit(_) => (507, "53200"),
            e if e.is_users_fault() => (400, "42000"),
            _ => (500, "XX000"),
        };
        ErrorCodes { http, sqlstate }
    }

    /// A query the user should change (syntax, unknown table or column, types), not a failure.
    pub fn is_users_fault(&self) -> bool {
        match self {
            QueryError::DataFusion(e) => matches!(
                e.find_root(),
                DataFusionError::SQL(..)
                    | DataFusionError::Plan(_)
                    | DataFusionError::SchemaError(..)
                    | DataFusionError::NotImplemented(_)
            ),
            _ => false,
        }
    }
}

/// Every table under the lake root: the pipeline's tables, and on a local lake every directory
/// holding a Delta log (rebuilt tables, …).
pub fn lake_table_names(lake: &LakeConfig) -> Result<Vec<String>, QueryError> {
    let mut names: Vec<String> = KNOWN_TABLES.iter().map(|s| s.to_string()).collect();
    if lake.is_local()
        && let Ok(root) = lake.root_url()
        && let Ok(dir) = root.to_file_path()
        && dir.is_dir()
    {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.path().join("_delta_log").is_dir()
                && let Some(name) = entry.file_name().to_str()
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Tables the pipeline writes, registered even on object stores that cannot be listed cheaply.
pub const KNOWN_TABLES: [&str; 8] = tributary_lake::tables::TABLES;

/// A DataFusion session as every engine of this crate runs it: filters evaluated while Parquet
/// pages are decoded (selective predicates — one device, one hour — skip most of the other
/// columns' decoding), `date_trunc` on UTC by arithmetic ([`functions::UtcDateTrunc`]), counts
/// per partition from the files' row counts ([`count_from_statistics::CountFromStatistics`]), and
/// JSON path functions over JSON text columns (`datafusion-functions-json`: `json_get_str(reported,
/// 'firmware')`, `json_get_float`, `json_contains`, `reported->>'firmware'`, …) for the shadow
/// tables' `desired`, `reported` and `delta`.
pub fn engine_session(mut config: SessionConfig, runtime: Arc<RuntimeEnv>) -> SessionContext {
    let parquet = &mut config.options_mut().execution.parquet;
    parquet.pushdown_filters = true;
    parquet.reorder_filters = true;
    let mut state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(count_from_statistics::CountFromStatistics))
        .build();
    if let Err(e) = datafusion_functions_json::register_all(&mut state) {
        tracing::error!(error = %e, "JSON functions not registered");
    }
    let ctx = SessionContext::new_with_state(state);
    ctx.register_udf(functions::UtcDateTrunc::udf());
    ctx
}

/// The local operator's engine: one DataFusion session with every lake table registered, unscoped.
pub struct SqlEngine {
    ctx: SessionContext,
    tables: Vec<String>,
}

impl SqlEngine {
    /// Registers every Delta table under the lake root.
    pub async fn over_lake(lake: &LakeConfig) -> Result<Self, QueryError> {
        let ctx = engine_session(SessionConfig::new(), Arc::new(RuntimeEnv::default()));
        let names = lake_table_names(lake)?;
        let mut engine = Self {
            ctx,
            tables: Vec::new(),
        };
        for name in names {
            engine.register(lake, &name).await?;
        }
        Ok(engine)
    }

    /// Registers the lake table `name` (at its latest version) when it exists; `true` if it does.
    pub async fn register(&mut self, lake: &LakeConfig, name: &str) -> Result<bool, QueryError> {
        let table = open_table(lake, name).await?;
        if table.version().is_none() {
            return Ok(false);
        }
        table.update_datafusion_session(&self.ctx.state())?;
        let provider = snapshot_table::lake_provider(&table).await?;
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, Arc::clone(&provider))?;
        if !self.tables.iter().any(|t| t == name) {
            self.tables.push(name.to_owned());
            self.tables.sort();
        }
        Ok(true)
    }

    /// Registers a CSV (with a header) or Parquet file as table `name`, by its extension.
    pub async fn register_file(
        &mut self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<(), QueryError> {
        let location = path.to_string_lossy();
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("parquet") => {
                self.ctx
                    .register_parquet(name, location.as_ref(), Default::default())
                    .await?
            }
            _ => {
                self.ctx
                    .register_csv(name, location.as_ref(), Default::default())
                    .await?
            }
        }
        if !self.tables.iter().any(|t| t == name) {
            self.tables.push(name.to_owned());
            self.tables.sort();
        }
        Ok(())
    }

    /// The registered tables.
    pub fn tables(&self) -> &[String] {
        &self.tables
    }

    /// Runs one SQL statement.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.ctx.sql(sql).await?.collect().await?)
    }
}
