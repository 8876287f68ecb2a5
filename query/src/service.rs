//! [`QueryService`]: SQL for many users at once, each query in its own DataFusion session over the
//! latest version of every lake table, seen through the user's tenant, within the query limits.
//!
//! Tenant isolation is enforced below SQL: a tenant's session has no catalog entry for the real
//! tables, only views that scan them with `tenant = '<tenant>'` ([`scoped`]). Whatever the SQL
//! (joins, subqueries, CTEs, UNION, `information_schema`, time travel), every scan it can reach
//! carries the predicate; tables without a `tenant` column are not registered for tenants at all.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableFunctionImpl;
use datafusion::catalog::view::ViewTable;
use datafusion::common::ParamValues;
use datafusion::datasource::{TableProvider, provider_as_source};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{Expr, SQLOptions, SessionConfig, SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use deltalake::DeltaTable;
use futures::{Stream, StreamExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::open_table;

use crate::config::{Principal, QueryLimits};
use crate::{QueryError, lake_table_names};

/// The column every tenant-scoped table is filtered on.
pub const TENANT_COLUMN: &str = "tenant";

/// The time-travel table function: `table_at('telemetry', 3)` (a version) or
/// `table_at('telemetry', '2026-11-28T10:00:00Z')` (the version current at that time).
pub const TIME_TRAVEL_FUNCTION: &str = "table_at";

/// A table kept at its latest version, with the provider of that version (built once per version:
/// it holds the snapshot's file list).
struct LiveTable {
    table: DeltaTable,
    provider: Option<(deltalake::kernel::Version, Arc<dyn TableProvider>)>,
}

/// Runs users' queries over the lake.
pub struct QueryService {
    lake: LakeConfig,
    limits: QueryLimits,
    /// Every table seen so far, kept current by incremental log reads before each query.
    tables: Mutex<BTreeMap<String, LiveTable>>,
    slots: Arc<Semaphore>,
}

impl QueryService {
    pub fn new(lake: LakeConfig, limits: QueryLimits) -> Self {
        Self {
            lake,
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
            tables: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every lake table at its latest version, with its provider.
    async fn latest_tables(
        &self,
    ) -> Result<Vec<(String, DeltaTable, Arc<dyn TableProvider>)>, QueryError> {
        let names = lake_table_names(&self.lake)?;
        let mut tables = self.tables.lock().await;
        for name in names {
            if let std::collections::btree_map::Entry::Vacant(slot) = tables.entry(name) {
                let table = open_table(&self.lake, slot.key()).await?;
                slot.insert(LiveTable {
                    table,
                    provider: None,
                });
            }
        }
        let mut out = Vec::with_capacity(tables.len());
        for (name, live) in tables.iter_mut() {
            if live.table.version().is_none() && !self.may_exist(name) {
                continue;
            }
            if let Err(e) = live.table.update_incremental(None).await {
                if live.table.version().is_none() {
                    continue; // not created yet
                }
                return Err(e.into());
            }
            let Some(version) = live.table.version() else {
                continue;
            };
            let provider = match &live.provider {
                Some((v, provider)) if *v == version => provider.clone(),
                _ => {
                    let provider = live.table.table_provider().await?;
                    live.provider = Some((version, provider.clone()));
                    provider
                }
            };
            out.push((name.clone(), live.table.clone(), provider));
        }
        Ok(out)
    }

    /// Whether table `name` may exist: on a local lake, only when its `_delta_log` does (reading a
    /// missing table's log is an error the Delta kernel logs loudly).
    fn may_exist(&self, name: &str) -> bool {
        if !self.lake.is_local() {
            return true;
        }
        match self.lake.table_url(name).map(|u| u.to_file_path()) {
            Ok(Ok(dir)) => dir.join("_delta_log").is_dir(),
            _ => true,
        }
    }

    /// A fresh session for one query of `principal`: their view of every table, the memory limit.
    pub async fn session(&self, principal: &Principal) -> Result<SessionContext, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.max_memory_bytes, 1.0)
            .build_arc()?;
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let tables = self.latest_tables().await?;
        let mut names = Vec::with_capacity(tables.len());
        for (name, table, provider) in tables {
            table.update_datafusion_session(&ctx.state())?;
            if let Some(provider) = scoped(&name, provider, principal.tenant_scope())? {
                ctx.register_table(name.as_str(), provider)?;
                names.push(name);
            }
        }
        ctx.register_udtf(
            TIME_TRAVEL_FUNCTION,
            Arc::new(TimeTravel {
                lake: self.lake.clone(),
                tables: names,
                tenant: principal.tenant_scope().map(str::to_owned),
            }),
        );
        Ok(ctx)
    }

    /// Plans one statement as `principal` (refusing what their role may not run) in `ctx`.
    pub async fn plan(
        &self,
        ctx: &SessionContext,
        principal: &Principal,
        sql: &str,
    ) -> Result<LogicalPlan, QueryError> {
        let plan = ctx.state().create_logical_plan(sql).await?;
        allowed(principal).verify_plan(&plan).map_err(|e| {
            QueryError::NotAllowed(format!(
                "role {:?} may only read: {}",
                principal.role,
                e.strip_backtrace()
            ))
        })?;
        Ok(plan)
    }

    /// Runs one SQL statement as `principal`; the rows stream within the limits.
    pub async fn execute(
        self: &Arc<Self>,
        principal: &Principal,
        sql: &str,
    ) -> Result<QueryStream, QueryError> {
        self.execute_with(principal, sql, None).await
    }

    /// [`QueryService::execute`] with values for the statement's `$1`, `$2`, … parameters.
    ///
    /// The query is planned and executed on the query executor (its own threads), so CPU-heavy
    /// queries never starve the endpoints' accept loops and I/O; batches cross over a channel.
    pub async fn execute_with(
        self: &Arc<Self>,
        principal: &Principal,
        sql: &str,
        params: Option<ParamValues>,
    ) -> Result<QueryStream, QueryError> {
        let permit = self.permit()?;
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (batches_tx, batches_rx) = tokio::sync::mpsc::channel(2);
        let (service, principal, sql) = (self.clone(), principal.clone(), sql.to_owned());
        executor().spawn(async move {
            let started = async {
                let ctx = service.session(&principal).await?;
                let mut plan = service.plan(&ctx, &principal, &sql).await?;
                if let Some(params) = &params {
                    plan = plan.replace_params_with_values(params)?;
                }
                service.stream_plan(&ctx, plan).await
            }
            .await;
            let mut stream = match started {
                Ok(stream) => {
                    if started_tx.send(Ok(stream.schema.clone())).is_err() {
                        return;
                    }
                    stream.stream
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            // Ends when the stream does, on its first error, or when the reader went away
            // (dropping the DataFusion stream cancels the query's work).
            loop {
                let batch = tokio::select! {
                    batch = stream.next() => batch,
                    // The reader gave up (timeout, client gone) while no batch was ready.
                    () = batches_tx.closed() => return,
                };
                let Some(batch) = batch else { return };
                let failed = batch.is_err();
                if batches_tx
                    .send(batch.map_err(QueryError::from))
                    .await
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        });
        let schema = match tokio::time::timeout_at(deadline, started_rx).await {
            Err(_) => return Err(QueryError::Timeout(self.limits.timeout.as_secs())),
            Ok(Err(_)) => {
                return Err(QueryError::Io(std::io::Error::other(
                    "the query executor dropped the query",
                )));
            }
            Ok(Ok(started)) => started?,
        };
        let batches = futures::stream::unfold(batches_rx, |mut rx| async move {
            rx.recv().await.map(|batch| (batch, rx))
        });
        Ok(QueryStream {
            schema,
            stream: Box::pin(batches),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            limits: self.limits,
            rows: 0,
            done: false,
            _permit: permit,
        })
    }

    /// A slot among the concurrent queries, or [`QueryError::Busy`].
    pub fn permit(&self) -> Result<OwnedSemaphorePermit, QueryError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| QueryError::Busy(self.limits.max_concurrent))
    }

    /// Executes a verified plan (at most `max_rows + 1` rows, so an overflow is seen).
    pub async fn stream_plan(
        &self,
        ctx: &SessionContext,
        plan: LogicalPlan,
    ) -> Result<UnboundedQueryStream, QueryError> {
        let df = ctx.execute_logical_plan(plan).await?;
        let df = match df.logical_plan() {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => df,
            _ => df.limit(0, Some(self.limits.max_rows.saturating_add(1)))?,
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let stream = df.execute_stream().await?;
        Ok(UnboundedQueryStream { schema, stream })
    }
}

/// What `principal`'s role may run.
fn allowed(principal: &Principal) -> SQLOptions {
    let admin = principal.is_admin();
    SQLOptions::new()
        .with_allow_ddl(admin)
        .with_allow_dml(admin)
        .with_allow_statements(admin)
}

/// `provider` as `tenant` sees it: a view filtering on the tenant column; `None` when the table has
/// no tenant column (tenants do not see it). Unscoped (admins): the provider itself.
pub fn scoped(
    name: &str,
    provider: Arc<dyn TableProvider>,
    tenant: Option<&str>,
) -> Result<Option<Arc<dyn TableProvider>>, QueryError> {
    let Some(tenant) = tenant else {
        return Ok(Some(provider));
    };
    if provider.schema().field_with_name(TENANT_COLUMN).is_err() {
        return Ok(None);
    }
    let plan = LogicalPlanBuilder::scan(name, provider_as_source(provider), None)?
        .filter(col(TENANT_COLUMN).eq(lit(tenant)))?
        .build()?;
    Ok(Some(Arc::new(ViewTable::new(plan, None))))
}

/// `table_at(name, version | timestamp)`.
#[derive(Debug)]
struct TimeTravel {
    lake: LakeConfig,
    /// The tables this session may read (never a path).
    tables: Vec<String>,
    tenant: Option<String>,
}

enum AsOf {
    Version(u64),
    Time(chrono::DateTime<chrono::Utc>),
}

impl TableFunctionImpl for TimeTravel {
    fn call_with_args(
        &self,
        args: datafusion::catalog::TableFunctionArgs,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let usage = || {
            DataFusionError::Plan(format!(
                "{TIME_TRAVEL_FUNCTION}(table, version | 'RFC 3339 timestamp'): e.g. {TIME_TRAVEL_FUNCTION}('telemetry', 3)"
            ))
        };
        let (name, as_of) = match args.exprs() {
            [
                Expr::Literal(ScalarValue::Utf8(Some(name)), _),
                Expr::Literal(at, _),
            ] => {
                let as_of = match at {
                    ScalarValue::Int64(Some(v)) => AsOf::Version(u64::try_from(*v).map_err(|_| {
                        DataFusionError::Plan(format!("{TIME_TRAVEL_FUNCTION}: version {v} < 0"))
                    })?),
                    ScalarValue::Utf8(Some(t)) => AsOf::Time(
                        chrono::DateTime::parse_from_rfc3339(t)
                            .map_err(|e| {
                                DataFusionError::Plan(format!(
                                    "{TIME_TRAVEL_FUNCTION}: `{t}` is not an RFC 3339 timestamp: {e}"
                                ))
                            })?
                            .to_utc(),
                    ),
                    _ => return Err(usage()),
                };
                (name.clone(), as_of)
            }
            _ => return Err(usage()),
        };
        if !self.tables.contains(&name) {
            return Err(DataFusionError::Plan(format!(
                "{TIME_TRAVEL_FUNCTION}: no table `{name}`"
            )));
        }
        // Table functions are planned synchronously; loading a version reads the log.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            return Err(DataFusionError::Plan(format!(
                "{TIME_TRAVEL_FUNCTION} needs a multi-threaded runtime"
            )));
        }
        let lake = self.lake.clone();
        let table_name = name.clone();
        let provider = tokio::task::block_in_place(move || {
            tokio::runtime::Handle::current().block_on(async move {
                let mut table = open_table(&lake, &table_name).await?;
                match as_of {
                    AsOf::Version(v) => table.load_version(v).await?,
                    AsOf::Time(t) => table.load_with_datetime(t).await?,
                }
                Ok::<_, QueryError>(table.table_provider().await?)
            })
        })
        .map_err(|e| DataFusionError::Plan(format!("{TIME_TRAVEL_FUNCTION}('{name}'): {e}")))?;
        scoped(&name, provider, self.tenant.as_deref())
            .map_err(|e| DataFusionError::Plan(e.to_string()))?
            .ok_or_else(|| {
                DataFusionError::Plan(format!("{TIME_TRAVEL_FUNCTION}: no table `{name}`"))
            })
    }
}

/// A planned query's rows before the limits are put around them.
pub struct UnboundedQueryStream {
    pub schema: SchemaRef,
    pub stream: SendableRecordBatchStream,
}

/// The threads queries run on, apart from the endpoints' runtime.
fn executor() -> &'static tokio::runtime::Runtime {
    static EXECUTOR: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    EXECUTOR.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("query-executor")
            .enable_all()
            .build()
            .expect("the query executor's threads can be started")
    })
}

/// A running query's rows: ends with [`QueryError::TooManyRows`] past `max_rows` and with
/// [`QueryError::Timeout`] at the deadline.
pub struct QueryStream {
    schema: SchemaRef,
    stream: Pin<Box<dyn Stream<Item = Result<RecordBatch, QueryError>> + Send>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limits: QueryLimits,
    rows: usize,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl QueryStream {
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, QueryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(QueryError::Timeout(
                self.limits.timeout.as_secs(),
            ))));
        }
        match self.stream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                self.rows += batch.num_rows();
                if self.rows > self.limits.max_rows {
                    self.done = true;
                    return Poll::Ready(Some(Err(QueryError::TooManyRows(self.limits.max_rows))));
                }
                Poll::Ready(Some(Ok(batch)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
