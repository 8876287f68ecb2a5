//! Avro schemas of every topic, their Rust types, and the Confluent wire format.
//!
//! Every Kafka value is `0x00` (magic byte), a 4-byte big-endian schema id, then the Avro binary
//! datum, so ordinary Kafka tooling with a schema registry can read the topics. The ids are fixed
//! here ([`SchemaId`]) and a registry can be seeded with the `.avsc` files under `schemas/avro/`.

use std::sync::LazyLock;

use apache_avro::Schema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::Micros;

/// Errors of encoding or decoding a framed Avro record.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    #[error("record is {0} bytes, shorter than the 5-byte Confluent header")]
    TooShort(usize),
    #[error("record starts with magic byte {0:#04x}, expected 0x00 (Confluent wire format)")]
    BadMagic(u8),
    #[error("record has schema id {found}, expected {expected} ({name})")]
    WrongSchema {
        found: u32,
        expected: u32,
        name: &'static str,
    },
    #[error("avro: {0}")]
    Avro(#[from] Box<apache_avro::Error>),
}

impl From<apache_avro::Error> for AvroError {
    fn from(e: apache_avro::Error) -> Self {
        AvroError::Avro(Box::new(e))
    }
}

/// Where a raw event came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Mqtt,
    Http,
    /// A copy of a raw record re-driven by `tributary deadletter replay`.
    Replay,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Http => "http",
            Source::Replay => "replay",
        }
    }
}

/// Topic `raw`: one device message exactly as received. Schema: `schemas/avro/raw_envelope.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawEnvelope {
    pub event_id: String,
    pub tenant: String,
    pub device: String,
    pub source: Source,
    pub received_at: Micros,
    pub content_type: String,
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub payload: Vec<u8>,
    pub subject: Option<String>,
    pub encryption_key_id: Option<String>,
    /// For [`Source::Replay`]: when the copy was made (its dedup clock).
    #[serde(default)]
    pub replayed_at: Option<Micros>,
    /// For [`Source::Replay`]: the measurements to re-drive; `None`: the whole message.
    #[serde(default)]
    pub replay_measurements: Option<Vec<i32>>,
    /// The device's group, model and site as the registry had them at receipt (like `tenant`).
    #[serde(default)]
    pub device_group: Option<String>,
    #[serde(default)]
    pub device_model: Option<String>,
    #[serde(default)]
    pub site: Vec<String>,
}

impl RawEnvelope {
    /// The time dedup windows advance by: when this record was written to `raw`.
    pub fn dedup_clock(&self) -> Micros {
        self.replayed_at.unwrap_or(self.received_at)
    }
}

/// Where a derived record came from: its raw record and its position among that record's outputs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provenance {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub index: i32,
}

/// Topic `telemetry`: one clean reading. Schema: `schemas/avro/reading.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub tenant: String,
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub unit: Option<String>,
    /// The value as sent, when it was converted to the canonical unit.
    #[serde(default)]
    pub original_value: Option<f64>,
    /// The unit as sent, when it was converted.
    #[serde(default)]
    pub original_unit: Option<String>,
    /// Behind the partition's event-time watermark by more than the tenant's allowed lateness.
    #[serde(default)]
    pub late: bool,
    pub event_time: Micros,
    pub ingest_time: Micros,
    pub event_id: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub source_index: i32,
    /// The measurement's index in its message (as [`DeadLetter::measurement`]); with (tenant,
    /// device, event id) the reading's identity.
    #[serde(default)]
    pub measurement: Option<i32>,
    /// SenML: the resolved name (base name + name) as sent; `None` for our JSON.
    #[serde(default)]
    pub name: Option<String>,
    /// A different value of the same (tenant, device, metric, event time) came first and the
    /// tenant's policy keeps both.
    #[serde(default)]
    pub conflict: bool,
    /// The device's group, model and site, from the raw envelope (stamped at ingest).
    #[serde(default)]
    pub device_group: Option<String>,
    #[serde(default)]
    pub device_model: Option<String>,
    #[serde(default)]
    pub site: Vec<String>,
}

/// The lifecycle state an [`Anomaly`] record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyState {
    Open,
    Update,
    Resolved,
}

impl AnomalyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Update => "update",
            Self::Resolved => "resolved",
        }
    }
}

/// Topic `anomalies`: one lifecycle record of an anomaly, with its evidence. Schema (every field
/// documented): `schemas/avro/anomaly.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub anomaly_id: String,
    pub seq: i32,
    pub state: AnomalyState,
    pub tenant: String,
    pub device: String,
    pub metric: String,
    pub detector: String,
    pub kind: String,
    pub severity: String,
    #[serde(default)]
    pub device_group: Option<String>,
    #[serde(default)]
    pub site: Vec<String>,
    pub start_time: Micros,
    #[serde(default)]
    pub end_time: Option<Micros>,
    pub event_time: Micros,
    pub value: f64,
    #[serde(default)]
    pub baseline: Option<f64>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub score: Option<f64>,
    #[serde(default)]
    pub window_secs: Option<f64>,
    #[serde(default)]
    pub predicted_time: Option<Micros>,
    pub readings: i64,
    pub flaps: i32,
    pub suppressed: i32,
    pub message: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// What an [`Incident`] record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentChange {
    Open,
    Update,
    Acknowledge,
    Snooze,
    Resolve,
    Reopen,
}

impl IncidentChange {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Update => "update",
            Self::Acknowledge => "acknowledge",
            Self::Snooze => "snooze",
            Self::Resolve => "resolve",
            Self::Reopen => "reopen",
        }
    }
}

/// An incident's state after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentStatus {
    Open,
    Acknowledged,
    Snoozed,
    Resolved,
}

impl IncidentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Snoozed => "snoozed",
            Self::Resolved => "resolved",
        }
    }
}

/// Topic `incidents`: one lifecycle record of an incident with its whole current state. Schema
/// (every field documented): `schemas/avro/incident.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub incident_id: String,
    pub seq: i32,
    pub change: IncidentChange,
    pub status: IncidentStatus,
    pub tenant: String,
    pub rule: String,
    pub correlate: String,
    pub scope: String,
    #[serde(default)]
    pub site: Vec<String>,
    #[serde(default)]
    pub device_group: Option<String>,
    pub severity: String,
    pub first_time: Micros,
    pub last_time: Micros,
    #[serde(default)]
    pub end_time: Option<Micros>,
    pub event_time: Micros,
    pub members: Vec<String>,
    pub devices: Vec<String>,
    pub metrics: Vec<String>,
    #[serde(default)]
    pub detectors: Vec<String>,
    #[serde(default)]
    pub correlation_key: String,
    pub member_count: i32,
    pub open_members: i32,
    pub device_count: i32,
    pub anomaly_records: i64,
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub acted_at: Option<Micros>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub snoozed_until: Option<Micros>,
    pub message: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// What a person does to an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentActionKind {
    Acknowledge,
    Snooze,
    Resolve,
}

/// An action on an incident through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentAction {
    pub incident_id: String,
    pub action: IncidentActionKind,
    pub actor: String,
    pub at: Micros,
    #[serde(default)]
    pub until: Option<Micros>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// Internal topic `incident-inputs`: an anomaly re-keyed by an incident rule, or an action.
/// Schema: `schemas/avro/incident_input.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentInput {
    pub tenant: String,
    pub rule: String,
    pub key: String,
    /// The anomaly record as on `anomalies` (Confluent-framed).
    #[serde(default, with = "apache_avro::serde_avro_bytes_opt")]
    pub anomaly: Option<Vec<u8>>,
    #[serde(default)]
    pub action: Option<IncidentAction>,
}

/// Topic `deadletter`: a rejected input with the rule, reason and provenance. Schema:
/// `schemas/avro/dead_letter.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub tenant: String,
    pub device: String,
    pub event_id: Option<String>,
    pub stage: String,
    pub rule: String,
    pub field: Option<String>,
    pub reason: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub source_index: i32,
    pub received_at: Micros,
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub original: Vec<u8>,
    /// The refused measurement's index in its message; `None` when the whole message was refused.
    #[serde(default)]
    pub measurement: Option<i32>,
}

/// Who made a shadow update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowOrigin {
    /// The device itself (MQTT, or HTTP with its token).
    Device,
    /// An app or operator (the query HTTP API, a tenant user).
    App,
}

/// Topic `shadow-updates`: one shadow update request as received, before it is applied. Schema:
/// `schemas/avro/shadow_update.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowUpdate {
    pub request_id: String,
    pub tenant: String,
    pub device: String,
    /// Empty for the classic shadow.
    pub name: String,
    pub origin: ShadowOrigin,
    pub actor: String,
    pub received_at: Micros,
    /// The request body as received.
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub body: Vec<u8>,
}

/// What the shadow stage answered to an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowResponseKind {
    Accepted,
    Rejected,
    /// The shadow's delta changed (published to the device, retained).
    Delta,
}

impl ShadowResponseKind {
    /// The last segment of the MQTT topic it is published on.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowResponseKind::Accepted => "accepted",
            ShadowResponseKind::Rejected => "rejected",
            ShadowResponseKind::Delta => "delta",
        }
    }
}

/// Topic `shadow-responses`: the shadow stage's answer to one update. Schema:
/// `schemas/avro/shadow_response.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowResponse {
    pub request_id: String,
    pub tenant: String,
    pub device: String,
    pub name: String,
    pub kind: ShadowResponseKind,
    pub status: i32,
    pub version: i64,
    pub at: Micros,
    /// The JSON message (empty: the delta became empty).
    pub body: String,
}

/// Topic `shadows` (compacted): the current document of one shadow. Schema:
/// `schemas/avro/shadow_document.avsc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowDocument {
    pub tenant: String,
    pub device: String,
    pub name: String,
    pub version: i64,
    pub updated: Micros,
    pub request_id: String,
    pub origin: ShadowOrigin,
    /// The document in AWS IoT's form (JSON).
    pub document: String,
}

/// A record type carried on a topic: its schema, its fixed schema id, its provenance.
pub trait TopicRecord: Serialize + DeserializeOwned {
    const NAME: &'static str;
    const SCHEMA_ID: u32;
    fn schema() -> &'static Schema;
    /// Earlier versions of the schema, by id, that records on the topic may still carry: they are
    /// read through Avro schema resolution into the current type (a field added since gets its
    /// default). A schema change is a new id, never a new meaning for an old one.
    fn earlier_schemas() -> &'static [(u32, &'static Schema)] {
        &[]
    }
}

/// Derived records know the raw record they came from.
pub trait Derived {
    fn provenance(&self) -> Provenance;
}

macro_rules! avsc {
    ($file:literal) => {{
        static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
            Schema::parse_str(include_str!(concat!("../avro/", $file)))
                .expect(concat!($file, " is a valid Avro schema (checked by tests)"))
        });
        &*SCHEMA
    }};
}

macro_rules! topic_record {
    ($ty:ty, $name:literal, $id:expr, $file:literal $(, earlier: [$(($old_id:expr, $old_file:literal)),*])?) => {
        impl TopicRecord for $ty {
            const NAME: &'static str = $name;
            const SCHEMA_ID: u32 = $id;
            fn schema() -> &'static Schema {
                avsc!($file)
            }
            $(
            fn earlier_schemas() -> &'static [(u32, &'static Schema)] {
                static EARLIER: LazyLock<Vec<(u32, &'static Schema)>> =
                    LazyLock::new(|| vec![$(($old_id, avsc!($old_file))),*]);
                &EARLIER
            }
            )?
        }
    };
}

/// Fixed schema ids of the Confluent header.
pub struct SchemaId;
impl SchemaId {
    /// `raw_envelope.v1.avsc`: before `Source::Replay` and `replayed_at`; still read.
    pub const RAW_ENVELOPE_V1: u32 = 1;
    /// `reading.v1.avsc`: before `original_value`, `original_unit` and `late`; still read.
    pub const READING_V1: u32 = 2;
    pub const DEAD_LETTER: u32 = 8;
    /// `registry_event.v1.avsc`: before `Device.mqtt_password_hash`; still read.
    pub const REGISTRY_EVENT_V1: u32 = 4;
    pub const REGISTRY_EVENT: u32 = 5;
    /// `raw_envelope.v2.avsc`: before `device_group`, `device_model` and `site`; still read.
    pub const RAW_ENVELOPE_V2: u32 = 6;
    pub const RAW_ENVELOPE: u32 = 13;
    /// `dead_letter.v1.avsc`: before `measurement`; still read.
    pub const DEAD_LETTER_V1: u32 = 3;
    /// `catalog_event.v1.avsc`: before `Policy.conflicting_readings` and `MetricSpec.names`.
    pub const CATALOG_EVENT_V1: u32 = 9;
    /// `reading.v2.avsc`: before `name` (SenML) and `conflict`; still read.
    pub const READING_V2: u32 = 7;
    /// `reading.v3.avsc`: before `device_group`, `device_model` and `site`; still read.
    pub const READING_V3: u32 = 10;
    pub const READING: u32 = 14;
    pub const CATALOG_EVENT: u32 = 11;
    pub const ANOMALY: u32 = 12;
    pub const DETECTOR_EVENT: u32 = 15;
    /// `incident.v1.avsc`: before `detectors` and `correlation_key`; still read.
    pub const INCIDENT_V1: u32 = 16;
    pub const INCIDENT: u32 = 18;
    pub const INCIDENT_INPUT: u32 = 17;
    pub const INCIDENT_RULES_EVENT: u32 = 19;
    pub const SHADOW_UPDATE: u32 = 20;
    pub const SHADOW_RESPONSE: u32 = 21;
    pub const SHADOW_DOCUMENT: u32 = 22;
}

topic_record!(
    RawEnvelope,
    "RawEnvelope",
    SchemaId::RAW_ENVELOPE,
    "raw_envelope.avsc",
    earlier: [
        (SchemaId::RAW_ENVELOPE_V1, "raw_envelope.v1.avsc"),
        (SchemaId::RAW_ENVELOPE_V2, "raw_envelope.v2.avsc")
    ]
);
topic_record!(
    Reading,
    "Reading",
    SchemaId::READING,
    "reading.avsc",
    earlier: [
        (SchemaId::READING_V1, "reading.v1.avsc"),
        (SchemaId::READING_V2, "reading.v2.avsc"),
        (SchemaId::READING_V3, "reading.v3.avsc")
    ]
);
topic_record!(Anomaly, "Anomaly", SchemaId::ANOMALY, "anomaly.avsc");
topic_record!(
    Incident,
    "Incident",
    SchemaId::INCIDENT,
    "incident.avsc",
    earlier: [(SchemaId::INCIDENT_V1, "incident.v1.avsc")]
);
topic_record!(
    IncidentInput,
    "IncidentInput",
    SchemaId::INCIDENT_INPUT,
    "incident_input.avsc"
);
topic_record!(
    DeadLetter,
    "DeadLetter",
    SchemaId::DEAD_LETTER,
    "dead_letter.avsc",
    earlier: [(SchemaId::DEAD_LETTER_V1, "dead_letter.v1.avsc")]
);

topic_record!(
    crate::registry::RegistryEvent,
    "RegistryEvent",
    SchemaId::REGISTRY_EVENT,
    "registry_event.avsc",
    earlier: [(SchemaId::REGISTRY_EVENT_V1, "registry_event.v1.avsc")]
);

topic_record!(
    crate::catalog::CatalogEvent,
    "CatalogEvent",
    SchemaId::CATALOG_EVENT,
    "catalog_event.avsc",
    earlier: [(SchemaId::CATALOG_EVENT_V1, "catalog_event.v1.avsc")]
);

topic_record!(
    crate::detectors::DetectorEvent,
    "DetectorEvent",
    SchemaId::DETECTOR_EVENT,
    "detector_event.avsc"
);

topic_record!(
    crate::incidents::IncidentRulesEvent,
    "IncidentRulesEvent",
    SchemaId::INCIDENT_RULES_EVENT,
    "incident_rules_event.avsc"
);

topic_record!(
    ShadowUpdate,
    "ShadowUpdate",
    SchemaId::SHADOW_UPDATE,
    "shadow_update.avsc"
);
topic_record!(
    ShadowResponse,
    "ShadowResponse",
    SchemaId::SHADOW_RESPONSE,
    "shadow_response.avsc"
);
topic_record!(
    ShadowDocument,
    "ShadowDocument",
    SchemaId::SHADOW_DOCUMENT,
    "shadow_document.avsc"
);

impl Derived for Reading {
    fn provenance(&self) -> Provenance {
        Provenance {
            topic: self.source_topic.clone(),
            partition: self.source_partition,
            offset: self.source_offset,
            index: self.source_index,
        }
    }
}

impl Derived for DeadLetter {
    fn provenance(&self) -> Provenance {
        Provenance {
            topic: self.source_topic.clone(),
            partition: self.source_partition,
            offset: self.source_offset,
            index: self.source_index,
        }
    }
}

/// Encodes a record in the Confluent wire format.
pub fn encode<T: TopicRecord>(record: &T) -> Result<Vec<u8>, AvroError> {
    let mut out = Vec::with_capacity(128);
    out.push(0u8);
    out.extend_from_slice(&T::SCHEMA_ID.to_be_bytes());
    apache_avro::write_avro_datum_ref(T::schema(), record, &mut out)?;
    Ok(out)
}

/// Decodes a record from the Confluent wire format, checking the schema id.
pub fn decode<T: TopicRecord>(bytes: &[u8]) -> Result<T, AvroError> {
    if bytes.len() < 5 {
        return Err(AvroError::TooShort(bytes.len()));
    }
    if bytes[0] != 0 {
        return Err(AvroError::BadMagic(bytes[0]));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut body = &bytes[5..];
    let value = if id == T::SCHEMA_ID {
        apache_avro::from_avro_datum(T::schema(), &mut body, None)?
    } else if let Some((_, writer)) = T::earlier_schemas().iter().find(|(old, _)| *old == id) {
        apache_avro::from_avro_datum(writer, &mut body, Some(T::schema()))?
    } else {
        return Err(AvroError::WrongSchema {
            found: id,
            expected: T::SCHEMA_ID,
            name: T::NAME,
        });
    };
    Ok(apache_avro::from_value(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> RawEnvelope {
        RawEnvelope {
            event_id: "m-1".into(),
            tenant: "acme".into(),
            device: "dev-1".into(),
            source: Source::Mqtt,
            received_at: 1_763_780_000_000_000,
            content_type: "application/json".into(),
            payload: br#"{"metrics":{"t":1}}"#.to_vec(),
            subject: Some("person-9".into()),
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    #[test]
    fn raw_envelope_round_trips_with_confluent_header() {
        let e = envelope();
        let bytes = encode(&e).unwrap();
        assert_eq!(bytes[0], 0);
        assert_eq!(&bytes[1..5], &SchemaId::RAW_ENVELOPE.to_be_bytes());
        assert_eq!(decode::<RawEnvelope>(&bytes).unwrap(), e);
    }

    #[test]
    fn reading_and_dead_letter_round_trip() {
        let r = Reading {
            tenant: "acme".into(),
            device: "d".into(),
            metric: "temperature".into(),
            value: 21.5,
            unit: Some("Cel".into()),
            original_value: Some(70.7),
            original_unit: Some("degF".into()),
            late: true,
            event_time: 1,
            ingest_time: 2,
            event_id: "e".into(),
            source_topic: "raw".into(),
            source_partition: 2,
            source_offset: 77,
            source_index: 1,
            measurement: Some(1),
            name: None,
            conflict: false,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        };
        assert_eq!(decode::<Reading>(&encode(&r).unwrap()).unwrap(), r);
        let d = DeadLetter {
            tenant: String::new(),
            device: "d".into(),
            event_id: None,
            stage: "cleanse".into(),
            rule: "malformed_json".into(),
            field: None,
            reason: "expected value at line 1 column 1".into(),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: 5,
            source_index: 0,
            received_at: 3,
            original: vec![0xff, 0x00],
            measurement: Some(2),
        };
        let old = as_earlier(&d, &["measurement"]);
        assert_eq!(
            decode::<DeadLetter>(&old).unwrap(),
            DeadLetter {
                measurement: None,
                ..d.clone()
            }
        );
        assert_eq!(decode::<DeadLetter>(&encode(&d).unwrap()).unwrap(), d);
    }

    #[test]
    fn registry_events_of_the_earlier_schema_are_still_read() {
        use crate::registry::{Device, RegistryChange, RegistryEvent};
        let mut device = Device::new("d1", "acme", 7);
        device.model = Some("m".into());
        let event = RegistryEvent {
            device: "d1".into(),
            tenant: "acme".into(),
            change: RegistryChange::Created,
            at: 7,
            actor: "admin".into(),
            state: Some(device),
        };
        // The same event as a writer of the earlier schema (no mqtt_password_hash) framed it.
        fn drop_field(v: apache_avro::types::Value) -> apache_avro::types::Value {
            use apache_avro::types::Value;
            match v {
                Value::Record(fields) => Value::Record(
                    fields
                        .into_iter()
                        .filter(|(k, _)| k != "mqtt_password_hash")
                        .map(|(k, v)| (k, drop_field(v)))
                        .collect(),
                ),
                Value::Union(i, inner) => Value::Union(i, Box::new(drop_field(*inner))),
                other => other,
            }
        }
        let (_, v1) = RegistryEvent::earlier_schemas()[0];
        let value = drop_field(apache_avro::to_value(&event).unwrap())
            .resolve(v1)
            .unwrap();
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&SchemaId::REGISTRY_EVENT_V1.to_be_bytes());
        bytes.extend(apache_avro::to_avro_datum(v1, value).unwrap());
        assert_eq!(decode::<RegistryEvent>(&bytes).unwrap(), event);
        // And the current schema is a new id.
        assert_eq!(
            &encode(&event).unwrap()[1..5],
            &SchemaId::REGISTRY_EVENT.to_be_bytes()
        );
    }

    /// `record` framed as a writer of the earlier schema `(id, schema)` would have written it,
    /// without the fields added since.
    fn as_earlier<T: TopicRecord>(record: &T, added: &[&str]) -> Vec<u8> {
        use apache_avro::types::Value;
        let Value::Record(fields) = apache_avro::to_value(record).unwrap() else {
            panic!("a record")
        };
        let value = Value::Record(
            fields
                .into_iter()
                .filter(|(k, _)| !added.contains(&k.as_str()))
                .collect(),
        );
        let (id, schema) = T::earlier_schemas()[0];
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend(apache_avro::to_avro_datum(schema, value.resolve(schema).unwrap()).unwrap());
        bytes
    }

    #[test]
    fn raw_envelopes_and_readings_of_earlier_schemas_are_still_read() {
        let e = envelope();
        let old = as_earlier(&e, &["replayed_at", "replay_measurements"]);
        assert_eq!(&old[1..5], &SchemaId::RAW_ENVELOPE_V1.to_be_bytes());
        assert_eq!(decode::<RawEnvelope>(&old).unwrap(), e);
        let r = Reading {
            tenant: "acme".into(),
            device: "d".into(),
            metric: "t".into(),
            value: 1.0,
            unit: None,
            original_value: None,
            original_unit: None,
            late: false,
            event_time: 1,
            ingest_time: 2,
            event_id: "e".into(),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: 1,
            source_index: 0,
            measurement: None,
            name: None,
            conflict: false,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        };
        let old = as_earlier(
            &r,
            &["original_value", "original_unit", "late", "measurement"],
        );
        assert_eq!(decode::<Reading>(&old).unwrap(), r);
        let replay = RawEnvelope {
            source: Source::Replay,
            replayed_at: Some(9),
            replay_measurements: Some(vec![0, 2]),
            device_group: None,
            device_model: None,
            site: Vec::new(),
            ..e
        };
        assert_eq!(
            decode::<RawEnvelope>(&encode(&replay).unwrap()).unwrap(),
            replay
        );
        assert_eq!(replay.dedup_clock(), 9);
    }

    #[test]
    fn decode_refuses_wrong_schema_and_garbage() {
        let bytes = encode(&envelope()).unwrap();
        assert!(matches!(
            decode::<Reading>(&bytes),
            Err(AvroError::WrongSchema {
                found: SchemaId::RAW_ENVELOPE,
                ..
            })
        ));
        assert!(matches!(
            decode::<RawEnvelope>(b"{}"),
            Err(AvroError::TooShort(2))
        ));
        assert!(matches!(
            decode::<RawEnvelope>(b"\x07\0\0\0\x01abc"),
            Err(AvroError::BadMagic(7))
        ));
        assert!(decode::<RawEnvelope>(b"\0\0\0\0\x01\xff\xff").is_err());
    }

    #[test]
    fn detector_events_round_trip_with_every_field() {
        use crate::detectors::{DetectorEvent, DetectorKind, DetectorSpec, Direction, Severity};
        let full = DetectorSpec {
            metric: "temperature".into(),
            kind: Some(DetectorKind::Spike),
            severity: Severity::Critical,
            clear_for_secs: Some(30.0),
            cooldown_secs: Some(5.0),
            group: Some("pumps".into()),
            model: Some("p-1".into()),
            site: vec!["hall-1".into(), "line-2".into()],
            above: Some(1e308),
            below: Some(-1e308),
            clear_above: Some(2.0),
            clear_below: Some(-2.0),
            for_secs: Some(0.5),
            min_count: Some(u32::MAX),
            window_secs: Some(600.0),
            k: Some(6.0),
            warmup: Some(20),
            direction: Some(Direction::Down),
            min_deviation: Some(0.1),
            slack: Some(0.5),
            max_per_sec: Some(3.0),
            epsilon: Some(1e-9),
            interval_secs: Some(60.0),
            limit: Some(10.0),
            horizon_secs: Some(3600.0),
        };
        let event = DetectorEvent {
            tenant: "acme".into(),
            at: 7,
            actor: "admin".into(),
            detectors: Some(
                [
                    ("full".to_owned(), full),
                    ("bare".to_owned(), DetectorSpec::default()),
                ]
                .into(),
            ),
        };
        let bytes = encode(&event).unwrap();
        assert_eq!(&bytes[1..5], &SchemaId::DETECTOR_EVENT.to_be_bytes());
        assert_eq!(decode::<DetectorEvent>(&bytes).unwrap(), event);
        let removed = DetectorEvent {
            detectors: None,
            ..event
        };
        assert_eq!(
            decode::<DetectorEvent>(&encode(&removed).unwrap()).unwrap(),
            removed
        );
    }

    #[test]
    fn incident_rules_events_round_trip_with_every_field() {
        use crate::detectors::Severity;
        use crate::incidents::{Correlate, IncidentRuleSpec, IncidentRulesEvent};
        let full = IncidentRuleSpec {
            correlate: Some(Correlate::Site),
            level: Some(u32::MAX),
            min_devices: Some(3),
            min_metrics: Some(2),
            window_secs: Some(1e308),
            quiet_secs: Some(0.5),
            min_severity: Some(Severity::Warning),
            detectors: Some(vec!["hot".into(), String::new()]),
        };
        let event = IncidentRulesEvent {
            tenant: "acme".into(),
            at: i64::MIN,
            actor: "admin".into(),
            rules: Some(
                [
                    ("full".to_owned(), full),
                    ("bare".to_owned(), IncidentRuleSpec::default()),
                ]
                .into(),
            ),
        };
        let bytes = encode(&event).unwrap();
        assert_eq!(&bytes[1..5], &SchemaId::INCIDENT_RULES_EVENT.to_be_bytes());
        assert_eq!(decode::<IncidentRulesEvent>(&bytes).unwrap(), event);
        let removed = IncidentRulesEvent {
            rules: None,
            ..event
        };
        assert_eq!(
            decode::<IncidentRulesEvent>(&encode(&removed).unwrap()).unwrap(),
            removed
        );
    }

    #[test]
    fn incidents_and_their_inputs_round_trip_with_every_field() {
        let incident = Incident {
            incident_id: "0".repeat(32),
            seq: i32::MAX,
            change: IncidentChange::Snooze,
            status: IncidentStatus::Snoozed,
            tenant: "acme".into(),
            rule: "sections".into(),
            correlate: "site".into(),
            scope: "north / hall 3".into(),
            site: vec!["north".into(), "hall 3".into()],
            device_group: Some("pumps".into()),
            severity: "critical".into(),
            first_time: i64::MIN,
            last_time: i64::MAX,
            end_time: Some(3),
            event_time: 4,
            members: vec!["a".into(), "b".into()],
            devices: vec!["d1".into(), "d2".into()],
            metrics: vec!["temperature".into()],
            detectors: vec!["hot".into()],
            correlation_key: "north\u{1f}hall 3".into(),
            member_count: 2,
            open_members: 1,
            device_count: 2,
            anomaly_records: 7,
            actor: Some("ops".into()),
            acted_at: Some(5),
            comment: Some("on it".into()),
            snoozed_until: Some(6),
            message: "2 devices".into(),
            source_topic: "incident-inputs".into(),
            source_partition: 1,
            source_offset: -1,
        };
        let bytes = encode(&incident).unwrap();
        assert_eq!(&bytes[1..5], &SchemaId::INCIDENT.to_be_bytes());
        assert_eq!(decode::<Incident>(&bytes).unwrap(), incident);
        // A record of the first schema (before detectors and the correlation key) is still read.
        let old = as_earlier(&incident, &["detectors", "correlation_key"]);
        assert_eq!(&old[1..5], &SchemaId::INCIDENT_V1.to_be_bytes());
        let read = decode::<Incident>(&old).unwrap();
        assert_eq!(
            (read.detectors.len(), read.correlation_key.as_str()),
            (0, "")
        );
        assert_eq!(read.members, incident.members);
        for input in [
            IncidentInput {
                tenant: "acme".into(),
                rule: "sections".into(),
                key: "north\u{1f}hall 3".into(),
                anomaly: Some(vec![0, 1, 2]),
                action: None,
            },
            IncidentInput {
                tenant: "acme".into(),
                rule: "sections".into(),
                key: "k".into(),
                anomaly: None,
                action: Some(IncidentAction {
                    incident_id: "i".into(),
                    action: IncidentActionKind::Snooze,
                    actor: "ops".into(),
                    at: 1,
                    until: Some(2),
                    comment: None,
                }),
            },
        ] {
            let bytes = encode(&input).unwrap();
            assert_eq!(decode::<IncidentInput>(&bytes).unwrap(), input);
        }
    }

    #[test]
    fn shadow_records_round_trip_with_every_field() {
        let update = ShadowUpdate {
            request_id: "r-1".into(),
            tenant: "acme".into(),
            device: "d1".into(),
            name: "firmware".into(),
            origin: ShadowOrigin::App,
            actor: "ops".into(),
            received_at: i64::MIN,
            body: br#"{"state":{"desired":{"a":1}}}"#.to_vec(),
        };
        let bytes = encode(&update).unwrap();
        assert_eq!(&bytes[1..5], &SchemaId::SHADOW_UPDATE.to_be_bytes());
        assert_eq!(decode::<ShadowUpdate>(&bytes).unwrap(), update);
        for kind in [
            ShadowResponseKind::Accepted,
            ShadowResponseKind::Rejected,
            ShadowResponseKind::Delta,
        ] {
            let response = ShadowResponse {
                request_id: "r-1".into(),
                tenant: "acme".into(),
                device: "d1".into(),
                name: String::new(),
                kind,
                status: 409,
                version: i64::MAX,
                at: 7,
                body: "{}".into(),
            };
            assert_eq!(
                decode::<ShadowResponse>(&encode(&response).unwrap()).unwrap(),
                response
            );
        }
        let doc = ShadowDocument {
            tenant: "acme".into(),
            device: "d1".into(),
            name: String::new(),
            version: 3,
            updated: 9,
            request_id: "r-1".into(),
            origin: ShadowOrigin::Device,
            document: r#"{"state":{}}"#.into(),
        };
        assert_eq!(
            decode::<ShadowDocument>(&encode(&doc).unwrap()).unwrap(),
            doc
        );
        assert!(decode::<ShadowDocument>(&encode(&update).unwrap()).is_err());
    }
}
