//! Table `usage`: metering. One row per tenant, device and hour (UTC, of the time ingest received the
//! events) with the number of raw events and their payload bytes, partitioned by tenant and day.
//!
//! Events of devices ingest could not place in a tenant (unknown devices) are metered with a null
//! tenant. Drained from topic `raw` (Avro `RawEnvelope`), so it counts what devices sent, accepted or not by
//! the cleanse stage, and is rebuilt from the raw log like every other table. A commit adds its counts
//! to the rows already there (`MERGE … events = target.events + source.events`) in the same Delta
//! commit as the `txn` offsets it covers, so each raw event is counted exactly once.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tributary_schemas::{Micros, RawEnvelope, Source};

use super::{
    LakeRow, MergeSpec, TableWrite, days, i64s, named_batch, non_empty, strings, timestamps, ts,
};

const HOUR_MICROS: Micros = 3_600_000_000;

/// One raw event, as metering sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub tenant: String,
    pub device: String,
    /// Start of the hour the event was received in.
    pub hour: Micros,
    pub bytes: i64,
}

static MERGE: MergeSpec = MergeSpec {
    // Events of devices ingest could not place (unknown, tenant empty) are metered with tenant null.
    // (Parenthesised: delta-rs's predicate parser binds IS NOT DISTINCT FROM looser than AND.)
    on: "target.day = source.day AND (target.tenant IS NOT DISTINCT FROM source.tenant) \
         AND target.device = source.device AND target.hour = source.hour",
    delete_when: None,
    update: Some(&[
        ("events", "target.events + source.events"),
        ("bytes", "target.bytes + source.bytes"),
    ]),
    update_when: None,
    insert_when: None,
};

impl LakeRow for UsageEvent {
    type Record = RawEnvelope;
    const TABLE: &'static str = "usage";
    const PARTITION_COLUMNS: &'static [&'static str] = &["tenant", "day"];
    const WRITE: TableWrite = TableWrite::Merge(&MERGE);

    fn arrow_schema() -> SchemaRef {
        static S: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![
                Field::new("tenant", DataType::Utf8, true),
                Field::new("device", DataType::Utf8, false),
                Field::new("hour", ts(), false),
                Field::new("events", DataType::Int64, false),
                Field::new("bytes", DataType::Int64, false),
                Field::new("day", DataType::Date32, false),
            ]))
        });
        S.clone()
    }

    /// Replays (copies re-driven from the dead letters) are not device traffic: not metered.
    fn from_record(raw: RawEnvelope) -> Option<Self> {
        if raw.source == Source::Replay {
            return None;
        }
        Some(UsageEvent {
            // Saturating: a record no ingest wrote may carry any time (none panics the sink).
            hour: raw
                .received_at
                .saturating_sub(raw.received_at.rem_euclid(HOUR_MICROS)),
            bytes: raw.payload.len() as i64,
            tenant: raw.tenant,
            device: raw.device,
        })
    }

    /// One row per (tenant, device, hour) of the batch, with its counts.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut totals: BTreeMap<(&str, &str, Micros), (i64, i64)> = BTreeMap::new();
        for r in rows {
            let t = totals
                .entry((r.tenant.as_str(), r.device.as_str(), r.hour))
                .or_default();
            t.0 += 1;
            t.1 += r.bytes;
        }
        named_batch(
            Self::arrow_schema(),
            vec![
                ("tenant", strings(totals.keys().map(|k| non_empty(k.0)))),
                ("device", strings(totals.keys().map(|k| Some(k.1)))),
                ("hour", timestamps(totals.keys().map(|k| k.2))),
                ("events", i64s(totals.values().map(|v| v.0))),
                ("bytes", i64s(totals.values().map(|v| v.1))),
                ("day", days(totals.keys().map(|k| k.2))),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    use super::*;

    fn raw(device: &str, received_at: Micros, payload: &[u8]) -> RawEnvelope {
        RawEnvelope {
            event_id: "e".into(),
            tenant: "t1".into(),
            device: device.into(),
            source: Source::Http,
            received_at,
            content_type: "application/json".into(),
            payload: payload.to_vec(),
            subject: None,
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    #[test]
    fn events_and_bytes_are_summed_per_device_and_hour() {
        let h = 1_795_392_000_000_000; // an hour boundary
        let rows: Vec<UsageEvent> = [
            raw("d1", h, b"abc"),
            raw("d1", h + HOUR_MICROS - 1, b"de"),
            raw("d1", h + HOUR_MICROS, b"f"),
            raw("d2", h + 5, b"ghij"),
            RawEnvelope {
                source: Source::Replay,
                replayed_at: Some(h + 9),
                ..raw("d2", h + 5, b"ghij")
            },
        ]
        .into_iter()
        .filter_map(UsageEvent::from_record)
        .collect();
        assert_eq!(rows.len(), 4, "the replay is not metered");
        let b = UsageEvent::to_batch(&rows).unwrap();
        assert_eq!(b.num_rows(), 3);
        let device = b.column(1).as_string::<i32>();
        let events = b.column(3).as_primitive::<Int64Type>();
        let bytes = b.column(4).as_primitive::<Int64Type>();
        let got: Vec<(&str, i64, i64)> = (0..3)
            .map(|i| (device.value(i), events.value(i), bytes.value(i)))
            .collect();
        assert_eq!(got, vec![("d1", 2, 5), ("d1", 1, 1), ("d2", 1, 4)]);
    }
}
