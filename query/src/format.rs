//! Result formats: rendered for the terminal ([`render`], [`arrow_ipc`]) and encoded as a stream of
//! chunks for HTTP ([`WireFormat`], [`StreamEncoder`]: JSON, CSV, Arrow IPC stream, Parquet).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;

use crate::QueryError;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Csv,
    Json,
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

/// A response format of `POST /v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// An array of objects (`application/json`).
    Json,
    /// CSV with a header line (`text/csv`).
    Csv,
    /// Arrow IPC stream (`application/vnd.apache.arrow.stream`).
    Arrow,
    /// A Parquet file (`application/vnd.apache.parquet`).
    Parquet,
}

impl WireFormat {
    pub const ALL: [WireFormat; 4] = [
        WireFormat::Json,
        WireFormat::Csv,
        WireFormat::Arrow,
        WireFormat::Parquet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WireFormat::Json => "json",
            WireFormat::Csv => "csv",
            WireFormat::Arrow => "arrow",
            WireFormat::Parquet => "parquet",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            WireFormat::Json => "application/json",
            WireFormat::Csv => "text/csv; charset=utf-8",
            WireFormat::Arrow => "application/vnd.apache.arrow.stream",
            WireFormat::Parquet => "application/vnd.apache.parquet",
        }
    }

    /// By name (`json`, `csv`, `arrow`, `parquet`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The first format an `Accept` header names; `None` when it names none of them (or `*/*`).
    pub fn from_accept(accept: &str) -> Option<Self> {
        accept.split(',').find_map(|part| {
            let mime = part.split(';').next().unwrap_or("").trim();
            Self::ALL.into_iter().find(|f| {
                f.content_type().split(';').next() == Some(mime)
                    || (mime == "application/vnd.apache.arrow.file" && *f == WireFormat::Arrow)
            })
        })
    }
}

/// Encodes a result batch by batch; each call returns the bytes ready to send.
pub struct StreamEncoder {
    inner: Encoder,
}

enum Encoder {
    Json {
        rows_sent: bool,
    },
    Csv {
        schema: SchemaRef,
        header_sent: bool,
    },
    Arrow(Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>),
    Parquet(Box<ArrowWriter<Vec<u8>>>),
}

impl StreamEncoder {
    pub fn new(format: WireFormat, schema: SchemaRef) -> Result<Self, QueryError> {
        let inner = match format {
            WireFormat::Json => Encoder::Json { rows_sent: false },
            WireFormat::Csv => Encoder::Csv {
                schema,
                header_sent: false,
            },
            WireFormat::Arrow => Encoder::Arrow(Box::new(
                arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema)?,
            )),
            WireFormat::Parquet => Encoder::Parquet(Box::new(
                ArrowWriter::try_new(Vec::new(), schema, None)
                    .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?,
            )),
        };
        Ok(Self { inner })
    }

    /// The bytes of `batch` (and whatever the format had buffered before it).
    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Bytes, QueryError> {
        Ok(match &mut self.inner {
            Encoder::Json { rows_sent } => {
                if batch.num_rows() == 0 {
                    return Ok(Bytes::new());
                }
                let mut out = Vec::new();
                {
                    let mut w = arrow::json::ArrayWriter::new(&mut out);
                    w.write(batch)?;
                    w.finish()?;
                }
                // `[{…},{…}]` → `[{…},{…}` first, `,{…},{…}` after.
                out.pop();
                if *rows_sent {
                    out[0] = b',';
                }
                *rows_sent = true;
                Bytes::from(out)
            }
            Encoder::Csv {
                header_sent,
                schema: _,
            } => {
                let mut out = Vec::new();
                {
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(!*header_sent)
                        .build(&mut out);
                    w.write(batch)?;
                }
                *header_sent = true;
                Bytes::from(out)
            }
            Encoder::Arrow(w) => {
                w.write(batch)?;
                Bytes::from(std::mem::take(w.get_mut()))
            }
            Encoder::Parquet(w) => {
                w.write(batch)
                    .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
                Bytes::from(std::mem::take(w.inner_mut()))
            }
        })
    }

    /// The format's closing bytes.
    pub fn finish(self) -> Result<Bytes, QueryError> {
        Ok(match self.inner {
            Encoder::Json { rows_sent } => Bytes::from_static(if rows_sent { b"]" } else { b"[]" }),
            Encoder::Csv {
                schema,
                header_sent,
            } => {
                if header_sent {
                    Bytes::new()
                } else {
                    let mut out = Vec::new();
                    {
                        let mut w = arrow::csv::WriterBuilder::new()
                            .with_header(true)
                            .build(&mut out);
                        w.write(&RecordBatch::new_empty(schema))?;
                    }
                    Bytes::from(out)
                }
            }
            Encoder::Arrow(mut w) => {
                w.finish()?;
                Bytes::from(std::mem::take(w.get_mut()))
            }
            Encoder::Parquet(mut w) => {
                w.finish()
                    .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
                Bytes::from(std::mem::take(w.inner_mut()))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
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

    fn sample(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("d{i}")),
                )),
                Arc::new(Int64Array::from_iter(
                    (0..n).map(|i| (i % 3 != 0).then_some(i)),
                )),
            ],
        )
        .unwrap()
    }

    fn encode_all(format: WireFormat, batches: &[RecordBatch]) -> Vec<u8> {
        let mut enc = StreamEncoder::new(format, sample(0).schema()).unwrap();
        let mut out = Vec::new();
        for b in batches {
            out.extend_from_slice(&enc.encode(b).unwrap());
        }
        out.extend_from_slice(&enc.finish().unwrap());
        out
    }

    #[test]
    fn every_wire_format_round_trips_across_batches() {
        let batches = vec![sample(5), sample(0), sample(3)];
        let rows = 8;
        let json: Vec<serde_json::Value> =
            serde_json::from_slice(&encode_all(WireFormat::Json, &batches)).unwrap();
        assert_eq!(json.len(), rows);
        assert_eq!(json[6]["device"], "d1");
        assert_eq!(json[6]["n"], 1);
        let empty: Vec<serde_json::Value> =
            serde_json::from_slice(&encode_all(WireFormat::Json, &[])).unwrap();
        assert!(empty.is_empty());
        let csv = String::from_utf8(encode_all(WireFormat::Csv, &batches)).unwrap();
        assert_eq!(csv.lines().count(), rows + 1);
        assert_eq!(csv.lines().next(), Some("device,n"));
        assert_eq!(
            String::from_utf8(encode_all(WireFormat::Csv, &[])).unwrap(),
            "device,n\n"
        );
        let ipc = encode_all(WireFormat::Arrow, &batches);
        let back: Vec<RecordBatch> =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(
            arrow::compute::concat_batches(&back[0].schema(), &back).unwrap(),
            arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
        );
        let parquet = Bytes::from(encode_all(WireFormat::Parquet, &batches));
        let back: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(parquet)
                .unwrap()
                .build()
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(back.iter().map(RecordBatch::num_rows).sum::<usize>(), rows);
        assert_eq!(
            WireFormat::from_accept("text/csv, */*"),
            Some(WireFormat::Csv)
        );
        assert_eq!(WireFormat::from_accept("*/*"), None);
        assert_eq!(WireFormat::from_name("parquet"), Some(WireFormat::Parquet));
    }
}
