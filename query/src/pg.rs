//! The Postgres wire protocol (simple and extended query) over [`QueryService`], for psql,
//! DBeaver, Grafana's PostgreSQL data source and Python drivers.
//!
//! Login: cleartext password (`[query.users]`: the user's password or token), checked against its
//! SHA-256; the session's [`Principal`] decides every query's tenant and role. Each query runs in
//! a fresh DataFusion session, so the tables are always at their latest version; `SET`, `BEGIN`,
//! `COMMIT`, … are acknowledged and ignored (every query reads a consistent snapshot of each table,
//! and there is nothing to write).
//!
//! Clients' metadata queries (psql's `\d`, DBeaver's and Grafana's schema browsers) read
//! `pg_catalog`, which every session emulates over its own tables (`datafusion-pg-catalog`), after
//! [`pg_statements`] rewrote the Postgres-only syntax they use (`::regclass`, `OPERATOR(…)`, …).

use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions as DisplayOptions};
use arrow_pg::datatypes::df::deserialize_parameters;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::DFParser;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::{Sink, SinkExt, StreamExt, stream};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, METADATA_USER, PgWireConnectionState, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use crate::config::{Principal, QueryConfig};
use crate::{QueryError, QueryService, QueryStream};

/// The Postgres wire protocol server.
pub struct PgServer {
    handlers: Arc<PgHandlers>,
}

struct PgHandlers {
    backend: Arc<PgBackend>,
    startup: Arc<PasswordStartup>,
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.backend.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

impl PgServer {
    pub fn new(service: Arc<QueryService>, config: QueryConfig) -> Self {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = format!("16.0 (tributary {})", env!("CARGO_PKG_VERSION"));
        let backend = Arc::new(PgBackend {
            parser: Arc::new(PgParser {
                service: service.clone(),
            }),
            service,
        });
        Self {
            handlers: Arc::new(PgHandlers {
                backend,
                startup: Arc::new(PasswordStartup { config, params }),
            }),
        }
    }

    /// Accepts connections on `listen` until the process ends.
    pub async fn serve(self, listen: &str) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(addr = %listen, "sql over the postgres wire protocol listening");
        loop {
            let (socket, peer) = listener.accept().await?;
            let handlers = self.handlers.clone();
            tokio::spawn(async move {
                if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                    tracing::debug!(%peer, error = %e, "postgres connection ended");
                }
            });
        }
    }
}

/// Cleartext password login against `[query.users]`.
struct PasswordStartup {
    config: QueryConfig,
    params: DefaultServerParameterProvider,
}

#[async_trait]
impl StartupHandler for PasswordStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let password = pwd.into_password()?.password;
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let Some(principal) = self.config.authenticate(&user, &password) else {
                    tracing::info!(%user, "postgres login refused");
                    return Err(PgWireError::InvalidPassword(user));
                };
                tracing::debug!(%user, "postgres login");
                client.session_extensions().insert(principal);
                finish_authentication(client, &self.params).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The principal the connection logged in as.
fn principal<C: ClientInfo>(client: &C) -> PgWireResult<Arc<Principal>> {
    client
        .session_extensions()
        .get::<Principal>()
        .ok_or(PgWireError::NotReadyForQuery)
}

/// A query error as Postgres reports it (with the SQLSTATE clients act on).
fn pg_error(e: QueryError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        e.codes().sqlstate.into(),
        e.to_string(),
    )))
}

/// Statements a session-per-query engine acknowledges without running.
fn acknowledged(sql: &str) -> Option<&'static str> {
    let first = sql.split_whitespace().next()?.to_ascii_uppercase();
    Some(match first.trim_end_matches(';') {
        "SET" | "RESET" => "SET",
        "BEGIN" | "START" => "BEGIN",
        "COMMIT" | "END" => "COMMIT",
        "ROLLBACK" | "ABORT" => "ROLLBACK",
        "DISCARD" => "DISCARD",
        "DEALLOCATE" => "DEALLOCATE",
        _ => return None,
    })
}

/// Columns the Postgres encoder has no type for (maps, …) are sent as their text.
fn pg_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if into_pg_type(f.data_type()).is_ok() {
                    f.as_ref().clone()
                } else {
                    Field::new(f.name(), DataType::Utf8, true)
                }
            })
            .collect::<Vec<_>>(),
    ))
}

fn pg_batch(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, QueryError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let options = DisplayOptions::default();
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                return Ok(column.clone());
            }
            let text = ArrayFormatter::try_new(column.as_ref(), &options)?;
            let mut b = StringBuilder::new();
            for i in 0..column.len() {
                if column.is_null(i) {
                    b.append_null();
                } else {
                    b.append_value(text.value(i).to_string());
                }
            }
            Ok::<ArrayRef, QueryError>(Arc::new(b.finish()))
        })
        .collect::<Result<_, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Rows of `stream` as Postgres data rows in `format`.
fn respond(stream: QueryStream, format: &Format) -> PgWireResult<Response> {
    let schema = pg_schema(&stream.schema());
    let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, None)?);
    let row_fields = fields.clone();
    let rows = stream
        .map(move |batch| {
            let rows: Box<dyn Iterator<Item = PgWireResult<_>> + Send + Sync> =
                match batch.and_then(|b| pg_batch(b, &schema)) {
                    Ok(b) => encode_recordbatch(row_fields.clone(), b),
                    Err(e) => Box::new(std::iter::once(Err(pg_error(e)))),
                };
            stream::iter(rows)
        })
        .flatten();
    Ok(Response::Query(QueryResponse::new(fields, rows)))
}

/// The statements of `sql` as SQL DataFusion plans: Postgres clients' catalog queries rewritten
/// for the emulated `pg_catalog`; what the rewriter cannot parse (DataFusion's own statements,
/// `CREATE EXTERNAL TABLE`, `COPY`, …) parsed as DataFusion SQL.
pub fn pg_statements(sql: &str) -> Result<Vec<String>, QueryError> {
    static PARSER: std::sync::OnceLock<PostgresCompatibilityParser> = std::sync::OnceLock::new();
    let parser = PARSER.get_or_init(PostgresCompatibilityParser::new);
    match parser.parse(sql) {
        Ok(statements) => Ok(statements.iter().map(ToString::to_string).collect()),
        Err(_) => Ok(DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
            .map_err(QueryError::from)?
            .iter()
            .map(ToString::to_string)
            .collect()),
    }
}

struct PgBackend {
    service: Arc<QueryService>,
    parser: Arc<PgParser>,
}

#[async_trait]
impl SimpleQueryHandler for PgBackend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let principal = principal(client)?;
        let statements = pg_statements(query).map_err(pg_error)?;
        let mut responses = Vec::with_capacity(statements.len());
        for sql in statements {
            if let Some(tag) = acknowledged(&sql) {
                responses.push(Response::Execution(Tag::new(tag)));
                continue;
            }
            let stream = self
                .service
                .execute(&principal, &sql)
                .await
                .map_err(pg_error)?;
            responses.push(respond(stream, &Format::UnifiedText)?);
        }
        Ok(responses)
    }
}

/// A parsed statement: its SQL (planned again at execution, in a fresh session) and the plan
/// it had at parse time (parameter and result types).
#[derive(Clone)]
pub struct PgStatement {
    sql: String,
    plan: Option<LogicalPlan>,
}

struct PgParser {
    service: Arc<QueryService>,
}

impl PgParser {
    fn parameter_types(statement: &PgStatement) -> PgWireResult<Vec<Option<DataType>>> {
        let Some(plan) = &statement.plan else {
            return Ok(Vec::new());
        };
        let mut types: Vec<(usize, Option<DataType>)> = plan
            .get_parameter_types()
            .map_err(|e| pg_error(e.into()))?
            .into_iter()
            .map(|(k, t)| (k.trim_start_matches('$').parse().unwrap_or(0), t))
            .collect();
        types.sort_by_key(|(i, _)| *i);
        Ok(types.into_iter().map(|(_, t)| t).collect())
    }
}

#[async_trait]
impl QueryParser for PgParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if acknowledged(sql).is_some() {
            return Ok(Some(PgStatement {
                sql: sql.to_owned(),
                plan: None,
            }));
        }
        let principal = principal(client)?;
        let sql = match pg_statements(sql).map_err(pg_error)?.as_slice() {
            [one] => one.clone(),
            _ => sql.to_owned(), // planning names the problem
        };
        let ctx = self.service.session(&principal).await.map_err(pg_error)?;
        let plan = self
            .service
            .plan(&ctx, &principal, &sql)
            .await
            .map_err(pg_error)?;
        Ok(Some(PgStatement {
            sql,
            plan: Some(plan),
        }))
    }

    fn get_parameter_types(&self, statement: &PgStatement) -> PgWireResult<Vec<Type>> {
        Self::parameter_types(statement)?
            .iter()
            .map(|t| t.as_ref().map_or(Ok(Type::UNKNOWN), into_pg_type))
            .collect()
    }

    fn get_result_schema(
        &self,
        statement: &PgStatement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let Some(plan) = &statement.plan else {
            return Ok(Vec::new());
        };
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        arrow_schema_to_pg_fields(
            &pg_schema(&schema),
            format.unwrap_or(&Format::UnifiedText),
            None,
        )
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgBackend {
    type Statement = PgStatement;
    type QueryParser = PgParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let statement = &portal.statement.statement;
        if let Some(tag) = acknowledged(&statement.sql) {
            return Ok(Response::Execution(Tag::new(tag)));
        }
        let principal = principal(client)?;
        let types = PgParser::parameter_types(statement)?;
        let refs: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
        let params = deserialize_parameters(portal, &refs)?;
        let stream = self
            .service
            .execute_with(&principal, &statement.sql, Some(params))
            .await
            .map_err(pg_error)?;
        respond(stream, &portal.result_column_format)
    }
}
