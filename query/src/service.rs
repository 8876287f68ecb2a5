//! [`QueryService`]: SQL for many users at once, each query in its own DataFusion session over the
//! latest version of every lake table, seen through the user's tenant, within the query limits.
//!
//! A query's session is cheap: the tables' providers are built once per Delta version, and each
//! tenant's session template (functions, `pg_catalog`, `table_at`) once per set of versions; a
//! query clones the template with a catalog and a memory pool of its own. Every query shares the
//! Parquet metadata cache (footers and page indexes of immutable data files) and object stores.
//!
//! Tenant isolation is enforced below SQL: a tenant's session has no catalog entry for the real
//! tables, only views that scan them with `tenant = '<tenant>'` ([`scoped`]). Whatever the SQL
//! (joins, subqueries, CTEs, UNION, `information_schema`, time travel), every scan it can reach
//! carries the predicate; tables without a `tenant` column are not registered for tenants at all.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableFunctionImpl,
};
use datafusion::common::ParamValues;
use datafusion::datasource::{TableProvider, provider_as_source};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{
    LogicalPlan, LogicalPlanBuilder, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{Expr, SQLOptions, SessionConfig, SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use deltalake::DeltaTable;
use deltalake::kernel::Version;
use futures::{Stream, StreamExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::open_table;

use crate::config::{Principal, QueryLimits};
use crate::snapshot_table::lake_provider;
use crate::{QueryError, engine_session, lake_table_names};

/// The column every tenant-scoped table is filtered on.
pub const TENANT_COLUMN: &str = "tenant";

/// The time-travel table function: `table_at('telemetry', 3)` (a version) or
/// `table_at('telemetry', '2026-11-28T10:00:00Z')` (the version current at that time).
pub const TIME_TRAVEL_FUNCTION: &str = "table_at";

/// A table kept at its latest version, with the provider of that version (built once per version:
/// it holds the snapshot's file list).
struct LiveTable {
    table: DeltaTable,
    provider: Option<(Version, Arc<dyn TableProvider>)>,
    /// When a table that does not exist yet was last looked for on an object store.
    probed: Option<std::time::Instant>,
}

/// How often a table missing from an object store is looked for again (each look is a request
/// the Delta kernel logs as an error when the log is not there).
const MISSING_TABLE_PROBE: std::time::Duration = std::time::Duration::from_secs(10);

/// One table as a query sees it: its name, version and provider.
struct TableAt {
    name: String,
    version: Version,
    table: DeltaTable,
    provider: Arc<dyn TableProvider>,
}

/// What every session of one tenant scope holds at some table versions, cloned for each query.
struct SessionTemplate {
    versions: Vec<(String, Version)>,
    /// The session state (functions, `table_at`, `pg_catalog` functions, settings).
    state: SessionState,
    /// The tables this scope sees, each as the scope sees it.
    tables: Vec<(String, Arc<dyn TableProvider>)>,
    /// `pg_catalog` over these tables, shared by the template's queries: a client's catalog
    /// queries meet the same object ids from one query to the next (psql's `\d` looks a table up
    /// by name, then its columns by the id it got).
    pg_catalog: Arc<dyn SchemaProvider>,
}

/// The catalog and schema every table is registered in (DataFusion's defaults).
const CATALOG: &str = "datafusion";
const SCHEMA: &str = "public";

/// The Parquet metadata kept across queries (footers and page indexes of data files, which are
/// immutable in a Delta table).
const METADATA_CACHE_BYTES: usize = 256 << 20;

/// Runs users' queries over the lake.
pub struct QueryService {
    lake: LakeConfig,
    limits: QueryLimits,
    /// Every table seen so far, kept current by incremental log reads before each query.
    tables: Mutex<BTreeMap<String, LiveTable>>,
    /// Session templates by tenant scope (`None`: admins).
    templates: std::sync::Mutex<HashMap<Option<String>, Arc<SessionTemplate>>>,
    /// What queries share: object stores, the Parquet metadata cache, the spill directory.
    runtime: Arc<RuntimeEnv>,
    slots: Arc<Semaphore>,
}

impl QueryService {
    pub fn new(lake: LakeConfig, limits: QueryLimits) -> Self {
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(
                CacheManagerConfig::default().with_metadata_cache_limit(METADATA_CACHE_BYTES),
            )
            .build_arc()
            .unwrap_or_else(|_| Arc::new(RuntimeEnv::default()));
        Self {
            lake,
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
            tables: Mutex::new(BTreeMap::new()),
            templates: std::sync::Mutex::new(HashMap::new()),
            runtime,
        }
    }

    /// Every lake table at its latest version, with its provider.
    async fn latest_tables(&self) -> Result<Vec<TableAt>, QueryError> {
        let names = lake_table_names(&self.lake)?;
        let mut tables = self.tables.lock().await;
        for name in names {
            if let std::collections::btree_map::Entry::Vacant(slot) = tables.entry(name) {
                let table = open_table(&self.lake, slot.key()).await?;
                slot.insert(LiveTable {
                    table,
                    provider: None,
                    probed: None,
                });
            }
        }
        let mut out = Vec::with_capacity(tables.len());
        for (name, live) in tables.iter_mut() {
            if live.table.version().is_none() && !self.may_exist(name, live) {
                continue;
            }
            if let Err(e) = live.table.update_incremental(None).await {
                if live.table.version().is_none() {
                    live.probed = Some(std::time::Instant::now());
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
                    let provider = lake_provider(&live.table).await?;
                    live.provider = Some((version, provider.clone()));
                    provider
                }
            };
            out.push(TableAt {
                name: name.clone(),
                version,
                table: live.table.clone(),
                provider,
            });
        }
        Ok(out)
    }

    /// Whether table `name`, not seen yet, may exist now: on a local lake, only when its
    /// `_delta_log` does; on an object store, when it was last looked for over
    /// [`MISSING_TABLE_PROBE`] ago (reading a missing table's log is an error the Delta kernel
    /// logs loudly).
    fn may_exist(&self, name: &str, live: &LiveTable) -> bool {
        if !self.lake.is_local() {
            return live
                .probed
                .is_none_or(|at| at.elapsed() >= MISSING_TABLE_PROBE);
        }
        match self.lake.table_url(name).map(|u| u.to_file_path()) {
            Ok(Ok(dir)) => dir.join("_delta_log").is_dir(),
            _ => true,
        }
    }

    /// A fresh session for one query of `principal`: their view of every table at its latest
    /// version, a catalog of its own (DDL of one admin query never reaches another) and the
    /// query's own memory pool.
    pub async fn session(&self, principal: &Principal) -> Result<SessionContext, QueryError> {
        let tables = self.latest_tables().await?;
        let template = self.template(principal.tenant_scope(), tables)?;
        let runtime = RuntimeEnvBuilder::from_runtime_env(&self.runtime)
            .with_memory_limit(self.limits.max_memory_bytes, 1.0)
            .build_arc()?;
        let catalogs = catalog_of(&template.tables)?;
        if let Some(catalog) = catalogs.catalog(CATALOG) {
            catalog.register_schema("pg_catalog", template.pg_catalog.clone())?;
        }
        let state = SessionStateBuilder::new_from_existing(template.state.clone())
            .with_catalog_list(catalogs)
            .with_runtime_env(runtime)
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    /// The session template of tenant `scope` at the versions of `tables`, built when there is
    /// none yet at these versions.
    fn template(
        &self,
        scope: Option<&str>,
        tables: Vec<TableAt>,
    ) -> Result<Arc<SessionTemplate>, QueryError> {
        let versions: Vec<(String, Version)> =
            tables.iter().map(|t| (t.name.clone(), t.version)).collect();
        let key = scope.map(str::to_owned);
        if let Some(template) = self.cached_template(&key)
            && template.versions == versions
        {
            return Ok(template);
        }
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema(CATALOG, SCHEMA);
        let ctx = engine_session(config, self.runtime.clone());
        let mut scoped_tables = Vec::with_capacity(tables.len());
        for t in tables {
            t.table.update_datafusion_session(&ctx.state())?;
            if let Some(provider) = scoped(&t.name, t.provider, scope)? {
                ctx.register_table(t.name.as_str(), provider.clone())?;
                scoped_tables.push((t.name, provider));
            }
        }
        ctx.register_udtf(
            TIME_TRAVEL_FUNCTION,
            Arc::new(TimeTravel {
                lake: self.lake.clone(),
                tables: scoped_tables.iter().map(|(n, _)| n.clone()).collect(),
                tenant: key.clone(),
            }),
        );
        // pg_catalog's functions go into the state; its schema (over this context's tables) is
        // taken out of the catalog it lists, so the two do not hold each other, and added to each
        // query's own catalog.
        setup_pg_catalog(&ctx, CATALOG, EmptyContextProvider).map_err(|e| *e)?;
        let catalog = ctx.catalog(CATALOG).ok_or_else(|| {
            QueryError::Io(std::io::Error::other("the session has no default catalog"))
        })?;
        let pg_catalog = catalog
            .deregister_schema("pg_catalog", true)?
            .ok_or_else(|| QueryError::Io(std::io::Error::other("pg_catalog was not set up")))?;
        let template = Arc::new(SessionTemplate {
            versions,
            state: ctx.state(),
            tables: scoped_tables,
            pg_catalog,
        });
        if let Ok(mut templates) = self.templates.lock() {
            templates.insert(key, template.clone());
        }
        Ok(template)
    }

    fn cached_template(&self, key: &Option<String>) -> Option<Arc<SessionTemplate>> {
        self.templates.lock().ok()?.get(key).cloned()
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
        let now = tokio::time::Instant::now();
        // A timeout too large to add means none (a year stands in for it).
        let deadline = now
            .checked_add(self.limits.timeout)
            .unwrap_or_else(|| now + std::time::Duration::from_secs(365 * 86_400));
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

/// A catalog list holding `tables` in the default catalog and schema.
fn catalog_of(
    tables: &[(String, Arc<dyn TableProvider>)],
) -> Result<Arc<dyn CatalogProviderList>, QueryError> {
    let catalogs: Arc<dyn CatalogProviderList> = Arc::new(MemoryCatalogProviderList::new());
    let catalog = Arc::new(MemoryCatalogProvider::new());
    let schema = Arc::new(MemorySchemaProvider::new());
    for (name, provider) in tables {
        schema.register_table(name.clone(), provider.clone())?;
    }
    catalog.register_schema(SCHEMA, schema)?;
    catalogs.register_catalog(CATALOG.into(), catalog);
    Ok(catalogs)
}

/// What `principal`'s role may run.
fn allowed(principal: &Principal) -> SQLOptions {
    let admin = principal.is_admin();
    SQLOptions::new()
        .with_allow_ddl(admin)
        .with_allow_dml(admin)
        .with_allow_statements(admin)
}

/// `provider` as `tenant` sees it: a [`TenantTable`] filtering on the tenant column; `None` when
/// the table has no tenant column (tenants do not see it). Unscoped (admins): the provider itself.
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
    Ok(Some(Arc::new(TenantTable(ViewTable::new(plan, None)))))
}

/// One tenant's rows of a table: a view (`SELECT * FROM table WHERE tenant = '…'`) that the
/// planner inlines into every query reaching it, listed as a table (clients' schema browsers,
/// psql's `\dt` and `pg_catalog` show base tables; the tenant has no other).
#[derive(Debug)]
pub struct TenantTable(ViewTable);

#[async_trait::async_trait]
impl TableProvider for TenantTable {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_logical_plan(&self) -> Option<std::borrow::Cow<'_, LogicalPlan>> {
        self.0.get_logical_plan()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.0.supports_filters_pushdown(filters)
    }
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
                lake_provider(&table).await
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
