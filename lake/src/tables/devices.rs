//! Table `devices`: the device registry as it is now, one row per device, partitioned by tenant.
//!
//! Drained from the compacted topic `registry` (Avro `RegistryEvent`, which carries the device's whole
//! state after each change): every commit merges the batch's latest state of each device into the
//! table (`MERGE` on `device`: update, insert, or delete when the device was deleted). Applying the
//! same event twice gives the same table, so a replay of the topic (or of its compacted form) rebuilds
//! it. Token hashes are not copied here: the table is for joins and reports, not authentication.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    BooleanBuilder, ListBuilder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    StructBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use tributary_schemas::registry::{Device, RegistryChange, RegistryEvent};

use super::{LakeRow, MergeSpec, TableWrite, named_batch, string_list, strings, timestamps, ts};

/// The latest state of one device (`None`: deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    pub device: String,
    /// The device's tenant (the one it had, when deleted; empty after a bare tombstone).
    pub tenant: String,
    pub state: Option<Device>,
}

static MERGE: MergeSpec = MergeSpec {
    on: "target.device = source.device",
    delete_when: Some("source.deleted"),
    update: None,
    update_when: None,
    insert_when: Some("NOT source.deleted"),
};

fn span_fields() -> Fields {
    Fields::from(vec![
        Field::new("subject", DataType::Utf8, true),
        Field::new("since", ts(), true),
    ])
}

fn tags_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "key_value",
            DataType::Struct(Fields::from(vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ])),
            false,
        )),
        false,
    )
}

fn columns() -> Vec<Field> {
    vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, false),
        Field::new("device_group", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
        Field::new("tags", tags_type(), true),
        Field::new("metrics", string_list(), true),
        Field::new("site", string_list(), true),
        Field::new("enabled", DataType::Boolean, false),
        Field::new("subject", DataType::Utf8, true),
        Field::new(
            "subject_history",
            DataType::List(Arc::new(Field::new(
                "element",
                DataType::Struct(span_fields()),
                true,
            ))),
            true,
        ),
        Field::new("created_at", ts(), false),
        Field::new("updated_at", ts(), false),
    ]
}

impl LakeRow for DeviceState {
    type Record = RegistryEvent;
    const TABLE: &'static str = "devices";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant"];
    const WRITE: TableWrite = TableWrite::Merge(&MERGE);

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| Arc::new(Schema::new(columns())));
        S.clone()
    }

    fn from_record(event: RegistryEvent) -> Option<Self> {
        let state = match event.change {
            RegistryChange::Deleted => None,
            _ => event.state,
        };
        Some(DeviceState {
            device: event.device,
            tenant: event.tenant,
            state,
        })
    }

    fn from_tombstone(key: &[u8]) -> Option<Self> {
        Some(DeviceState {
            device: String::from_utf8_lossy(key).into_owned(),
            tenant: String::new(),
            state: None,
        })
    }

    /// The latest state of each device in `rows`, plus a `deleted` flag the merge reads.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            latest.insert(r.device.as_str(), i);
        }
        let mut keep: Vec<usize> = latest.into_values().collect();
        keep.sort_unstable();
        let picked: Vec<&DeviceState> = keep.iter().map(|&i| &rows[i]).collect();
        let gone = Device::default();
        let devices: Vec<&Device> = picked
            .iter()
            .map(|r| r.state.as_ref().unwrap_or(&gone))
            .collect();

        let mut tags = MapBuilder::new(
            Some(MapFieldNames {
                entry: "key_value".into(),
                key: "key".into(),
                value: "value".into(),
            }),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let mut metrics = ListBuilder::new(StringBuilder::new()).with_field(Field::new(
            "element",
            DataType::Utf8,
            true,
        ));
        let mut site = ListBuilder::new(StringBuilder::new()).with_field(Field::new(
            "element",
            DataType::Utf8,
            true,
        ));
        let mut history = ListBuilder::new(StructBuilder::from_fields(span_fields(), 0))
            .with_field(Field::new("element", DataType::Struct(span_fields()), true));
        let mut enabled = BooleanBuilder::new();
        let mut deleted = BooleanBuilder::new();
        for (r, d) in picked.iter().zip(&devices) {
            for (k, v) in &d.tags {
                tags.keys().append_value(k);
                tags.values().append_value(v);
            }
            tags.append(true)?;
            for m in &d.metrics {
                metrics.values().append_value(m);
            }
            metrics.append(true);
            for s in &d.site {
                site.values().append_value(s);
            }
            site.append(true);
            let spans = history.values();
            for span in &d.subject_history {
                spans
                    .field_builder::<StringBuilder>(0)
                    .ok_or_else(|| bad("subject_history.subject"))?
                    .append_option(span.subject.as_deref());
                spans
                    .field_builder::<TimestampMicrosecondBuilder>(1)
                    .ok_or_else(|| bad("subject_history.since"))?
                    .append_value(span.since);
                spans.append(true);
            }
            history.append(true);
            enabled.append_value(d.enabled);
            deleted.append_value(r.state.is_none());
        }
        let mut fields = columns();
        fields.push(Field::new("deleted", DataType::Boolean, false));
        named_batch(
            Arc::new(Schema::new(fields)),
            vec![
                (
                    "tenant",
                    strings(picked.iter().map(|r| Some(r.tenant.as_str()))),
                ),
                (
                    "device",
                    strings(picked.iter().map(|r| Some(r.device.as_str()))),
                ),
                (
                    "device_group",
                    strings(devices.iter().map(|d| d.group.as_deref())),
                ),
                ("model", strings(devices.iter().map(|d| d.model.as_deref()))),
                ("tags", Arc::new(tags.finish())),
                ("metrics", Arc::new(metrics.finish())),
                ("site", Arc::new(site.finish())),
                ("enabled", Arc::new(enabled.finish())),
                (
                    "subject",
                    strings(devices.iter().map(|d| d.subject.as_deref())),
                ),
                ("subject_history", Arc::new(history.finish())),
                (
                    "created_at",
                    timestamps(devices.iter().map(|d| d.created_at)),
                ),
                (
                    "updated_at",
                    timestamps(devices.iter().map(|d| d.updated_at)),
                ),
                ("deleted", Arc::new(deleted.finish())),
            ],
        )
    }
}

fn bad(what: &str) -> arrow::error::ArrowError {
    arrow::error::ArrowError::SchemaError(format!("builder for {what} has another type"))
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use tributary_schemas::registry::SubjectSpan;

    use super::*;

    fn event(id: &str, change: RegistryChange, model: &str) -> RegistryEvent {
        let mut d = Device::new(id, "t1", 10);
        d.model = Some(model.into());
        d.tags.insert("room".into(), "2".into());
        d.site = vec!["z1".into(), "s1".into()];
        d.subject_history.push(SubjectSpan {
            subject: Some("p1".into()),
            since: 10,
        });
        RegistryEvent {
            device: id.into(),
            tenant: "t1".into(),
            change,
            at: 10,
            actor: "admin".into(),
            state: (change != RegistryChange::Deleted).then_some(d),
        }
    }

    #[test]
    fn the_latest_state_per_device_wins_and_deletions_are_flagged() {
        let rows: Vec<DeviceState> = [
            event("a", RegistryChange::Created, "m1"),
            event("b", RegistryChange::Created, "m1"),
            event("a", RegistryChange::Updated, "m2"),
            event("b", RegistryChange::Deleted, ""),
        ]
        .into_iter()
        .filter_map(DeviceState::from_record)
        .collect();
        let batch = DeviceState::to_batch(&rows).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let device = batch.column_by_name("device").unwrap().as_string::<i32>();
        let model = batch.column_by_name("model").unwrap().as_string::<i32>();
        let deleted = batch.column_by_name("deleted").unwrap().as_boolean();
        assert_eq!((device.value(0), model.value(0)), ("a", "m2"));
        assert!(!deleted.value(0));
        assert_eq!(device.value(1), "b");
        assert!(deleted.value(1));
        // The table's columns are the batch's, less the merge flag, with the same types.
        let table = DeviceState::arrow_schema();
        for f in table.fields() {
            let got = batch.schema().field_with_name(f.name()).unwrap().clone();
            assert_eq!(got.data_type(), f.data_type(), "column {}", f.name());
        }
    }
}
