//! Tables `shadows` (each device shadow as it is now) and `shadow_history` (every accepted
//! version with the time it was valid), both drained from the compacted topic `shadows` (Avro
//! `ShadowDocument`, the whole document after each accepted update) and partitioned by tenant.
//!
//! - `shadows`: `MERGE` on (tenant, device, name), a row replaced only by a higher `version`:
//!   the shadow stage re-emits some documents after a crash (the same versions, identical), and
//!   an older version read again never takes the place of a newer one.
//! - `shadow_history`: one row per (tenant, device, name, version), inserted when absent;
//!   `valid_from` is when the version was made, `valid_to` when the next one was (null: current).
//!   Versions are gap-free per shadow, so the row that version `v` closes is `v - 1`: within a
//!   batch it is closed as it is written, otherwise by a close row the merge matches.
//!
//! `desired`, `reported` and `delta` are the sections of the document as JSON text, queried
//! with the JSON functions of the query engine (`json_get_str(reported, 'firmware')`);
//! `document` is the whole document as `GET /v1/devices/{id}/shadow` serves it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;
use tributary_schemas::Micros;
use tributary_schemas::avro::{ShadowDocument, ShadowOrigin};

use super::{LakeRow, MergeSpec, TableWrite, i64s, named_batch, strings, timestamps, ts};

/// One shadow document as a row: its key, version and origin, its sections as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRow {
    pub tenant: String,
    pub device: String,
    /// Empty for the classic shadow.
    pub name: String,
    pub version: i64,
    /// When this version was made (µs).
    pub updated: Micros,
    pub request_id: String,
    pub origin: ShadowOrigin,
    pub desired: Option<String>,
    pub reported: Option<String>,
    pub delta: Option<String>,
    pub document: String,
}

impl ShadowRow {
    fn of(doc: ShadowDocument) -> Self {
        let parsed: Value = serde_json::from_str(&doc.document).unwrap_or(Value::Null);
        let section = |s: &str| parsed["state"].get(s).map(Value::to_string);
        Self {
            desired: section("desired"),
            reported: section("reported"),
            delta: section("delta"),
            tenant: doc.tenant,
            device: doc.device,
            name: doc.name,
            version: doc.version,
            updated: doc.updated,
            request_id: doc.request_id,
            origin: doc.origin,
            document: doc.document,
        }
    }

    fn key(&self) -> (&str, &str, &str) {
        (&self.tenant, &self.device, &self.name)
    }
}

fn origin(o: ShadowOrigin) -> &'static str {
    match o {
        ShadowOrigin::Device => "device",
        ShadowOrigin::App => "app",
    }
}

/// The columns after the key, version and time columns: the same in both tables.
fn content_fields() -> Vec<Field> {
    vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("origin", DataType::Utf8, false),
        Field::new("desired", DataType::Utf8, true),
        Field::new("reported", DataType::Utf8, true),
        Field::new("delta", DataType::Utf8, true),
        Field::new("document", DataType::Utf8, false),
    ]
}

fn key_fields() -> Vec<Field> {
    vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("version", DataType::Int64, false),
    ]
}

/// The key, version and content columns of `rows`, named, around `times` (the time columns).
fn columns<'a>(
    rows: &[&'a ShadowRow],
    times: Vec<(&'a str, ArrayRef)>,
) -> Vec<(&'a str, ArrayRef)> {
    let text = |f: fn(&ShadowRow) -> &str| strings(rows.iter().map(|r| Some(f(r))));
    let json = |f: fn(&ShadowRow) -> Option<&str>| strings(rows.iter().map(|r| f(r)));
    let mut out = vec![
        ("tenant", text(|r| &r.tenant)),
        ("device", text(|r| &r.device)),
        ("name", text(|r| &r.name)),
        ("version", i64s(rows.iter().map(|r| r.version))),
    ];
    out.extend(times);
    out.extend([
        ("request_id", text(|r| &r.request_id)),
        ("origin", text(|r| origin(r.origin))),
        ("desired", json(|r| r.desired.as_deref())),
        ("reported", json(|r| r.reported.as_deref())),
        ("delta", json(|r| r.delta.as_deref())),
        ("document", text(|r| &r.document)),
    ]);
    out
}

static CURRENT: MergeSpec = MergeSpec {
    on: "target.tenant = source.tenant AND target.device = source.device AND target.name = source.name",
    delete_when: None,
    update: None,
    update_when: Some("source.version > target.version"),
    insert_when: None,
};

impl LakeRow for ShadowRow {
    type Record = ShadowDocument;
    const TABLE: &'static str = "shadows";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant"];
    const WRITE: TableWrite = TableWrite::Merge(&CURRENT);

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            let mut fields = key_fields();
            fields.push(Field::new("updated_at", ts(), false));
            fields.extend(content_fields());
            Arc::new(Schema::new(fields))
        });
        S.clone()
    }

    fn from_record(doc: ShadowDocument) -> Option<Self> {
        Some(Self::of(doc))
    }

    /// The latest version of each shadow in `rows`.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut latest: HashMap<(&str, &str, &str), &ShadowRow> = HashMap::new();
        for r in rows {
            let slot = latest.entry(r.key()).or_insert(r);
            if r.version > slot.version {
                *slot = r;
            }
        }
        let mut picked: Vec<&ShadowRow> = latest.into_values().collect();
        picked.sort_by(|a, b| a.key().cmp(&b.key()));
        let times = vec![("updated_at", timestamps(picked.iter().map(|r| r.updated)))];
        named_batch(Self::arrow_schema(), columns(&picked, times))
    }
}

/// One version of a shadow, for `shadow_history`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowVersion(pub ShadowRow);

static HISTORY: MergeSpec = MergeSpec {
    on: "target.tenant = source.tenant AND target.device = source.device AND target.name = source.name AND target.version = source.version",
    delete_when: None,
    update: Some(&[("valid_to", "source.valid_to")]),
    update_when: Some("source.valid_to IS NOT NULL"),
    insert_when: Some("NOT source.close"),
};

impl LakeRow for ShadowVersion {
    type Record = ShadowDocument;
    const TABLE: &'static str = "shadow_history";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant"];
    const WRITE: TableWrite = TableWrite::Merge(&HISTORY);

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| Arc::new(Schema::new(history_fields())));
        S.clone()
    }

    fn from_record(doc: ShadowDocument) -> Option<Self> {
        Some(Self(ShadowRow::of(doc)))
    }

    /// Each version of `rows` once, its `valid_to` set when the next version is in the batch; and
    /// a close row (`close`, never inserted) for each version the batch's earliest of a shadow
    /// follows.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut seen = HashSet::new();
        let versions: Vec<&ShadowRow> = rows
            .iter()
            .map(|v| &v.0)
            .filter(|r| seen.insert((r.key(), r.version)))
            .collect();
        let made: HashMap<((&str, &str, &str), i64), Micros> = versions
            .iter()
            .map(|r| ((r.key(), r.version), r.updated))
            .collect();
        // Versions the batch closes but does not hold: the table has them.
        let closes: Vec<ShadowRow> = versions
            .iter()
            .filter(|r| r.version > 1 && !made.contains_key(&(r.key(), r.version - 1)))
            .map(|r| ShadowRow {
                version: r.version - 1,
                request_id: String::new(),
                desired: None,
                reported: None,
                delta: None,
                document: String::new(),
                ..(*r).clone()
            })
            .collect();
        let all: Vec<&ShadowRow> = versions.iter().copied().chain(&closes).collect();
        let close: Vec<bool> = all
            .iter()
            .enumerate()
            .map(|(i, _)| i >= versions.len())
            .collect();
        let valid_to: TimestampMicrosecondArray = all
            .iter()
            .zip(&close)
            .map(|(r, &closing)| {
                if closing {
                    // The close row of `v - 1` is made from `v`: closed when `v` was made.
                    Some(r.updated)
                } else {
                    made.get(&(r.key(), r.version + 1)).copied()
                }
            })
            .collect::<TimestampMicrosecondArray>()
            .with_timezone("UTC");
        let times = vec![
            ("valid_from", timestamps(all.iter().map(|r| r.updated))),
            ("valid_to", Arc::new(valid_to) as ArrayRef),
        ];
        let mut named = columns(&all, times);
        named.push(("close", Arc::new(BooleanArray::from(close)) as ArrayRef));
        let mut fields = history_fields();
        fields.push(Field::new("close", DataType::Boolean, false));
        named_batch(Arc::new(Schema::new(fields)), named)
    }
}

fn history_fields() -> Vec<Field> {
    let mut fields = key_fields();
    fields.push(Field::new("valid_from", ts(), false));
    fields.push(Field::new("valid_to", ts(), true));
    fields.extend(content_fields());
    fields
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int64Type, TimestampMicrosecondType};

    use super::*;

    fn doc(device: &str, version: i64, firmware: &str) -> ShadowDocument {
        ShadowDocument {
            tenant: "acme".into(),
            device: device.into(),
            name: String::new(),
            version,
            updated: version * 1_000,
            request_id: format!("r{version}"),
            origin: ShadowOrigin::Device,
            document: format!(
                r#"{{"state":{{"desired":{{"fw":"2.4"}},"reported":{{"fw":"{firmware}"}},"delta":{{"fw":"2.4"}}}},"version":{version}}}"#
            ),
        }
    }

    #[test]
    fn the_current_table_takes_the_latest_version_of_each_shadow_with_its_sections() {
        let rows: Vec<ShadowRow> = [
            doc("d1", 2, "2.2"),
            doc("d1", 3, "2.3"),
            doc("d2", 1, "2.1"),
            doc("d1", 1, "2.0"),
        ]
        .into_iter()
        .filter_map(ShadowRow::from_record)
        .collect();
        let batch = ShadowRow::to_batch(&rows).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let versions = batch
            .column_by_name("version")
            .unwrap()
            .as_primitive::<Int64Type>();
        let reported = batch.column_by_name("reported").unwrap().as_string::<i32>();
        assert_eq!(
            (versions.value(0), reported.value(0)),
            (3, r#"{"fw":"2.3"}"#)
        );
        assert_eq!(
            (versions.value(1), reported.value(1)),
            (1, r#"{"fw":"2.1"}"#)
        );
    }

    #[test]
    fn history_closes_each_version_when_the_next_was_made() {
        // Versions 4 and 5 of d1 (3 is in the table already), 5 twice (re-emitted).
        let rows: Vec<ShadowVersion> = [
            doc("d1", 4, "a"),
            doc("d1", 5, "b"),
            doc("d1", 5, "b"),
            doc("d2", 1, "c"),
        ]
        .into_iter()
        .filter_map(ShadowVersion::from_record)
        .collect();
        let batch = ShadowVersion::to_batch(&rows).unwrap();
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        let versions = col("version");
        let versions = versions.as_primitive::<Int64Type>();
        let valid_to = col("valid_to");
        let valid_to = valid_to.as_primitive::<TimestampMicrosecondType>();
        let close = col("close");
        let close = close.as_boolean();
        let got: Vec<(i64, Option<i64>, bool)> = (0..batch.num_rows())
            .map(|i| {
                (
                    versions.value(i),
                    valid_to.is_valid(i).then(|| valid_to.value(i)),
                    close.value(i),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (4, Some(5_000), false),
                (5, None, false),
                (1, None, false),
                (3, Some(4_000), true),
            ]
        );
    }
}
