//! SQL over the lake with DataFusion.
//!
//! This crate owns the query engine ([`SqlEngine`]: every Delta table under the lake root registered
//! by its name, at its latest version) and result formatting ([`OutputFormat`]).
//!
//! It must not touch: Kafka, or any table's data (it only reads).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::open_table;

/// Errors of the query engine.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("{0}")]
    Lake(#[from] tributary_lake::LakeError),
    #[error("delta: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("listing the lake: {0}")]
    Io(#[from] std::io::Error),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Csv,
    Json,
}

/// Tables the pipeline writes, registered even on object stores that cannot be listed cheaply.
pub const KNOWN_TABLES: [&str; 4] = tributary_lake::tables::TABLES;

/// A DataFusion session with every lake table registered.
pub struct SqlEngine {
    ctx: SessionContext,
    tables: Vec<String>,
}

impl SqlEngine {
    /// Registers every Delta table under the lake root.
    pub async fn over_lake(lake: &LakeConfig) -> Result<Self, QueryError> {
        let ctx = SessionContext::new();
        let mut names: Vec<String> = KNOWN_TABLES.iter().map(|s| s.to_string()).collect();
        if lake.is_local()
            && let Ok(root) = lake.root_url()
            && let Ok(dir) = root.to_file_path()
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
        let provider = table.table_provider().await?;
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, Arc::clone(&provider))?;
        if !self.tables.iter().any(|t| t == name) {
            self.tables.push(name.to_owned());
            self.tables.sort();
        }
        Ok(true)
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

/// Renders batches as a table, CSV (with header) or JSON (an array of objects).
pub fn render(batches: &[RecordBatch], format: OutputFormat) -> Result<String, QueryError> {
    match format {
        OutputFormat::Table => Ok(arrow::util::pretty::pretty_format_batches(batches)?.to_string()),
        OutputFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for b in batches {
                    w.write(b)?;
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        OutputFormat::Json => {
            let mut out = Vec::new();
            {
                let mut w = arrow::json::ArrayWriter::new(&mut out);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// Batches as an Arrow IPC stream (what pyarrow's `ipc.open_stream`, polars and DuckDB read).
pub fn arrow_ipc(batches: &[RecordBatch]) -> Result<Vec<u8>, QueryError> {
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(arrow::datatypes::Schema::empty()),
    };
    let mut out = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn renders_csv_and_json() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("avg", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["d1", "d2"])),
                Arc::new(Float64Array::from(vec![1.5, 2.0])),
            ],
        )
        .unwrap();
        assert_eq!(
            render(std::slice::from_ref(&batch), OutputFormat::Csv).unwrap(),
            "device,avg\nd1,1.5\nd2,2.0\n"
        );
        let json: serde_json::Value = serde_json::from_str(
            &render(std::slice::from_ref(&batch), OutputFormat::Json).unwrap(),
        )
        .unwrap();
        assert_eq!(json[1]["device"], "d2");
        assert!(
            render(std::slice::from_ref(&batch), OutputFormat::Table)
                .unwrap()
                .contains("| d1     | 1.5 |")
        );
        assert_eq!(render(&[], OutputFormat::Json).unwrap(), "[]");
        let ipc = arrow_ipc(std::slice::from_ref(&batch)).unwrap();
        let back: Vec<RecordBatch> =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(back, vec![batch]);
    }
}
