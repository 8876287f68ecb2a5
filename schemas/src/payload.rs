//! Device payload formats: what a device may send, and how it becomes readings.
//!
//! **Our JSON** (`application/json`; several messages as a JSON array or as NDJSON,
//! `application/x-ndjson`). One message:
//! ```json
//! {"id": "m-42", "time": "2026-11-22T03:00:00Z",
//!  "metrics": {"temperature": 21.5, "battery_voltage": {"value": 3.71, "unit": "V"}}}
//! ```
//! `id` (string, optional) is the message id used for dedup; `time` is RFC 3339 or epoch milliseconds
//! (optional, default: the time ingest received it); `device` (optional) must name the sending device.
//!
//! **SenML JSON** (`application/senml+json`, RFC 8428): one pack (a JSON array of records) is one
//! message. Base name/time/unit/value are resolved; the metric is the record's `n` (or the base name
//! when `n` is absent); times below 2^28 s are relative to the time of receipt, as RFC 8428 says.
//!
//! Ingest only splits a body into messages and checks their shape ([`split_body`]); the cleanse stage
//! interprets them ([`parse_message`]). Every error names the field at fault.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::Micros;

pub const JSON: &str = "application/json";
pub const NDJSON: &str = "application/x-ndjson";
pub const SENML_JSON: &str = "application/senml+json";

/// A body format ingest accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    NdJson,
    SenmlJson,
}

impl BodyFormat {
    /// The format of a `Content-Type` header value (parameters such as `charset` are ignored).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Self::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(Self::NdJson)
            }
            "application/senml+json" => Some(Self::SenmlJson),
            _ => None,
        }
    }

    /// The content type recorded on each message's raw envelope.
    pub fn message_content_type(self) -> &'static str {
        match self {
            Self::Json | Self::NdJson => JSON,
            Self::SenmlJson => SENML_JSON,
        }
    }
}

/// Why a body, a message or a reading was refused: the field at fault and a readable reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{location}{reason}", location = self.location())]
pub struct PayloadError {
    /// Machine-readable rule, e.g. `malformed_json`.
    pub rule: &'static str,
    /// The field at fault (`metrics.temperature`), when there is one.
    pub field: Option<String>,
    /// Which message of the body (0-based array index or 1-based NDJSON line), for ingest errors.
    pub position: Option<String>,
    pub reason: String,
}

impl PayloadError {
    fn new(rule: &'static str, field: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            rule,
            field: field.map(str::to_owned),
            position: None,
            reason: reason.into(),
        }
    }

    fn at(mut self, position: String) -> Self {
        self.position = Some(position);
        self
    }

    fn location(&self) -> String {
        match (&self.position, &self.field) {
            (Some(p), Some(f)) => format!("{p}: field `{f}`: "),
            (Some(p), None) => format!("{p}: "),
            (None, Some(f)) => format!("field `{f}`: "),
            (None, None) => String::new(),
        }
    }
}

/// One message of a body, as ingest forwards it: its exact bytes and the ids it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageSlice<'a> {
    pub bytes: &'a [u8],
    pub id: Option<String>,
    pub device: Option<String>,
}

/// Splits a request body into messages without changing their bytes, checking each one's shape.
pub fn split_body(format: BodyFormat, body: &[u8]) -> Result<Vec<MessageSlice<'_>>, PayloadError> {
    match format {
        BodyFormat::SenmlJson => {
            let pack: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| {
                PayloadError::new(
                    "malformed_json",
                    None,
                    format!("a SenML pack must be a JSON array of records: {e}"),
                )
            })?;
            if pack.is_empty() {
                return Err(PayloadError::new(
                    "empty",
                    None,
                    "the SenML pack has no records",
                ));
            }
            for (i, record) in pack.iter().enumerate() {
                if !record.get().trim_start().starts_with('{') {
                    return Err(PayloadError::new(
                        "not_an_object",
                        None,
                        "a SenML record must be a JSON object",
                    )
                    .at(format!("record {i}")));
                }
            }
            Ok(vec![MessageSlice {
                bytes: body,
                id: None,
                device: None,
            }])
        }
        BodyFormat::Json => {
            let text = std::str::from_utf8(body).map_err(|e| {
                PayloadError::new("malformed_json", None, format!("body is not UTF-8: {e}"))
            })?;
            if text.trim_start().starts_with('[') {
                let items: Vec<&RawValue> = serde_json::from_str(text)
                    .map_err(|e| PayloadError::new("malformed_json", None, e.to_string()))?;
                if items.is_empty() {
                    return Err(PayloadError::new(
                        "empty",
                        None,
                        "the array has no messages",
                    ));
                }
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, raw)| {
                        check_message(raw.get().as_bytes())
                            .map_err(|e| e.at(format!("message {i}")))
                    })
                    .collect()
            } else {
                Ok(vec![check_message(text.trim().as_bytes())?])
            }
        }
        BodyFormat::NdJson => {
            let mut out = Vec::new();
            let mut start = 0usize;
            for (n, line) in body.split(|b| *b == b'\n').enumerate() {
                let end = start + line.len();
                let slice = trim_ascii(&body[start..end]);
                start = end + 1;
                if slice.is_empty() {
                    continue;
                }
                out.push(check_message(slice).map_err(|e| e.at(format!("line {}", n + 1)))?);
            }
            if out.is_empty() {
                return Err(PayloadError::new("empty", None, "the body has no messages"));
            }
            Ok(out)
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

#[derive(serde::Deserialize)]
struct MessageShape<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    device: Option<&'a RawValue>,
    #[serde(default, borrow)]
    metrics: Option<&'a RawValue>,
}

fn check_message(bytes: &[u8]) -> Result<MessageSlice<'_>, PayloadError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return Err(PayloadError::new(
            "not_an_object",
            None,
            "a message must be a JSON object",
        ));
    }
    let shape: MessageShape<'_> = serde_json::from_slice(bytes)
        .map_err(|e| PayloadError::new("malformed_json", None, e.to_string()))?;
    let id = optional_string(shape.id, "id")?;
    let device = optional_string(shape.device, "device")?;
    match shape.metrics {
        None => {
            return Err(PayloadError::new(
                "missing_field",
                Some("metrics"),
                "is required",
            ));
        }
        Some(m) if !m.get().trim_start().starts_with('{') => {
            return Err(PayloadError::new(
                "wrong_type",
                Some("metrics"),
                "must be an object of metric name to value",
            ));
        }
        Some(_) => {}
    }
    Ok(MessageSlice { bytes, id, device })
}

fn optional_string(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, PayloadError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => match serde_json::from_str::<String>(r.get()) {
            Ok(s) if s.is_empty() => Err(PayloadError::new(
                "wrong_type",
                Some(field),
                "must not be empty",
            )),
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(PayloadError::new(
                "wrong_type",
                Some(field),
                "must be a string",
            )),
        },
    }
}

/// One measurement of a message, as the cleanse stage reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub metric: String,
    pub value: f64,
    pub unit: Option<String>,
    pub time: Micros,
}

/// A message read by the cleanse stage: its id and every measurement or the reason it was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedMessage {
    pub id: Option<String>,
    pub device: Option<String>,
    pub measurements: Vec<Result<Measurement, PayloadError>>,
}

/// Reads one message (as split by [`split_body`] or received over MQTT). An error here refuses the
/// whole message; a bad value refuses only its measurement.
pub fn parse_message(
    content_type: &str,
    bytes: &[u8],
    received_at: Micros,
) -> Result<ParsedMessage, PayloadError> {
    match BodyFormat::from_content_type(content_type) {
        Some(BodyFormat::SenmlJson) => parse_senml(bytes, received_at),
        Some(BodyFormat::Json) | Some(BodyFormat::NdJson) => parse_json(bytes, received_at),
        None => Err(PayloadError::new(
            "unsupported_content_type",
            Some("content_type"),
            format!("`{content_type}` is not one of {JSON}, {NDJSON}, {SENML_JSON}"),
        )),
    }
}

fn parse_json(bytes: &[u8], received_at: Micros) -> Result<ParsedMessage, PayloadError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| PayloadError::new("malformed_json", None, e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(PayloadError::new(
            "not_an_object",
            None,
            "a message must be a JSON object",
        ));
    };
    let id = string_field(&obj, "id")?;
    let device = string_field(&obj, "device")?;
    let time = match obj.get("time") {
        None | Some(Value::Null) => received_at,
        Some(t) => parse_time(t, "time")?,
    };
    let metrics = match obj.get("metrics") {
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(PayloadError::new(
                "wrong_type",
                Some("metrics"),
                "must be an object of metric name to value",
            ));
        }
        None => {
            return Err(PayloadError::new(
                "missing_field",
                Some("metrics"),
                "is required",
            ));
        }
    };
    if metrics.is_empty() {
        return Err(PayloadError::new(
            "empty",
            Some("metrics"),
            "has no metrics",
        ));
    }
    let measurements = metrics
        .iter()
        .map(|(name, v)| {
            let field = format!("metrics.{name}");
            let (raw_value, unit, time) = match v {
                Value::Object(o) => {
                    let unit = match o.get("unit") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(u)) => Some(u.clone()),
                        Some(_) => {
                            return Err(PayloadError::new(
                                "wrong_type",
                                Some(&format!("{field}.unit")),
                                "must be a string",
                            ));
                        }
                    };
                    let time = match o.get("time") {
                        None | Some(Value::Null) => time,
                        Some(t) => parse_time(t, &format!("{field}.time"))?,
                    };
                    let value = o.get("value").ok_or_else(|| {
                        PayloadError::new(
                            "missing_field",
                            Some(&format!("{field}.value")),
                            "is required",
                        )
                    })?;
                    (value, unit, time)
                }
                other => (other, None, time),
            };
            Ok(Measurement {
                metric: name.clone(),
                value: numeric(raw_value, &field)?,
                unit,
                time,
            })
        })
        .collect();
    Ok(ParsedMessage {
        id,
        device,
        measurements,
    })
}

fn string_field(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, PayloadError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(PayloadError::new(
            "wrong_type",
            Some(field),
            "must be a non-empty string",
        )),
    }
}

/// A finite number, or the reason it is not one.
fn numeric(v: &Value, field: &str) -> Result<f64, PayloadError> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(f),
            _ => Err(PayloadError::new(
                "non_finite_value",
                Some(field),
                format!("{n} is not a finite number"),
            )),
        },
        Value::String(s) if is_non_finite_word(s) => Err(PayloadError::new(
            "non_finite_value",
            Some(field),
            format!("\"{s}\" is not a finite number"),
        )),
        other => Err(PayloadError::new(
            "non_numeric_value",
            Some(field),
            format!("expected a number, found {}", json_kind(other)),
        )),
    }
}

fn is_non_finite_word(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "nan" | "inf" | "+inf" | "-inf" | "infinity" | "+infinity" | "-infinity"
    )
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string \"{}\"", s.chars().take(40).collect::<String>()),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn parse_time(v: &Value, field: &str) -> Result<Micros, PayloadError> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_micros())
            .map_err(|e| {
                PayloadError::new(
                    "bad_time",
                    Some(field),
                    format!("\"{s}\" is not RFC 3339: {e}"),
                )
            }),
        Value::Number(n) => n
            .as_i64()
            .and_then(|ms| ms.checked_mul(1000))
            .ok_or_else(|| {
                PayloadError::new(
                    "bad_time",
                    Some(field),
                    format!("{n} is not integer epoch milliseconds"),
                )
            }),
        other => Err(PayloadError::new(
            "bad_time",
            Some(field),
            format!(
                "expected RFC 3339 or epoch milliseconds, found {}",
                json_kind(other)
            ),
        )),
    }
}

fn parse_senml(bytes: &[u8], received_at: Micros) -> Result<ParsedMessage, PayloadError> {
    let pack: Vec<Map<String, Value>> = serde_json::from_slice(bytes).map_err(|e| {
        PayloadError::new(
            "malformed_json",
            None,
            format!("a SenML pack must be a JSON array of records: {e}"),
        )
    })?;
    let mut base_name = String::new();
    let mut base_time = 0.0f64;
    let mut base_unit: Option<String> = None;
    let mut base_value = 0.0f64;
    let mut measurements = Vec::with_capacity(pack.len());
    for (i, rec) in pack.iter().enumerate() {
        let field = |f: &str| format!("[{i}].{f}");
        if let Some(Value::String(bn)) = rec.get("bn") {
            base_name = bn.clone();
        }
        if let Some(bt) = rec.get("bt") {
            base_time = bt.as_f64().ok_or_else(|| {
                PayloadError::new("wrong_type", Some(&field("bt")), "must be a number")
            })?;
        }
        if let Some(bu) = rec.get("bu") {
            base_unit = bu.as_str().map(str::to_owned);
        }
        if let Some(bv) = rec.get("bv") {
            base_value = bv.as_f64().ok_or_else(|| {
                PayloadError::new("wrong_type", Some(&field("bv")), "must be a number")
            })?;
        }
        let has_value = ["v", "vs", "vb", "vd", "s"]
            .iter()
            .any(|k| rec.contains_key(*k));
        if !has_value {
            // A record with only base fields carries no measurement.
            if rec.keys().all(|k| k.starts_with('b')) {
                continue;
            }
            measurements.push(Err(PayloadError::new(
                "missing_field",
                Some(&field("v")),
                "record has no value",
            )));
            continue;
        }
        let name = match rec.get("n") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            Some(Value::String(_)) | None if !base_name.is_empty() => base_name.clone(),
            _ => {
                measurements.push(Err(PayloadError::new(
                    "missing_field",
                    Some(&field("n")),
                    "record has no name",
                )));
                continue;
            }
        };
        let t = match rec.get("t") {
            None => 0.0,
            Some(t) => match t.as_f64() {
                Some(t) => t,
                None => {
                    measurements.push(Err(PayloadError::new(
                        "bad_time",
                        Some(&field("t")),
                        "must be a number",
                    )));
                    continue;
                }
            },
        };
        let seconds = base_time + t;
        let time = if seconds.abs() < 268_435_456.0 {
            received_at + (seconds * 1e6) as i64
        } else {
            (seconds * 1e6) as i64
        };
        let value_field = if rec.contains_key("v") {
            "v"
        } else if rec.contains_key("s") {
            "s"
        } else {
            "vs"
        };
        let measurement = match rec.get("v").or_else(|| rec.get("s")) {
            Some(v) => numeric(v, &field(value_field)).map(|v| v + base_value),
            None => {
                let key = ["vs", "vb", "vd"]
                    .into_iter()
                    .find(|k| rec.contains_key(*k))
                    .unwrap_or("vs");
                Err(PayloadError::new(
                    "non_numeric_value",
                    Some(&field(key)),
                    format!("`{key}` is a non-numeric SenML value"),
                ))
            }
        }
        .map(|value| Measurement {
            metric: name,
            value,
            unit: rec
                .get("u")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| base_unit.clone()),
            time,
        });
        measurements.push(measurement);
    }
    if measurements.is_empty() {
        return Err(PayloadError::new(
            "empty",
            None,
            "the SenML pack has no records with a value",
        ));
    }
    Ok(ParsedMessage {
        id: None,
        device: None,
        measurements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Micros = 1_763_780_000_000_000;

    #[test]
    fn splits_array_and_ndjson_keeping_bytes() {
        let body = br#"[{"id":"a","metrics":{"t":1}}, {"metrics":{"t":2}}]"#;
        let msgs = split_body(BodyFormat::Json, body).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].bytes, br#"{"id":"a","metrics":{"t":1}}"#);
        assert_eq!(msgs[0].id.as_deref(), Some("a"));
        assert_eq!(msgs[1].id, None);

        let nd = b"{\"id\":\"x\",\"metrics\":{\"t\":1}}\n\n{\"metrics\":{\"t\":2}}\n";
        let msgs = split_body(BodyFormat::NdJson, nd).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].bytes, b"{\"metrics\":{\"t\":2}}");
    }

    #[test]
    fn split_errors_name_line_and_field() {
        let nd = b"{\"metrics\":{\"t\":1}}\n{\"id\":5,\"metrics\":{}}\n";
        let e = split_body(BodyFormat::NdJson, nd).unwrap_err();
        assert_eq!(e.to_string(), "line 2: field `id`: must be a string");
        let e = split_body(BodyFormat::Json, br#"[{"metrics":{}}, {"nope":1}]"#).unwrap_err();
        assert_eq!(e.to_string(), "message 1: field `metrics`: is required");
        let e = split_body(BodyFormat::Json, b"{not json").unwrap_err();
        assert_eq!(e.rule, "malformed_json");
        let e = split_body(BodyFormat::SenmlJson, br#"{"n":"x"}"#).unwrap_err();
        assert_eq!(e.rule, "malformed_json");
    }

    #[test]
    fn parses_our_json_with_units_times_and_bad_values() {
        let m = parse_message(
            JSON,
            br#"{"id":"m1","time":"2025-11-22T03:00:00Z","metrics":{"temperature":21.5,"battery_voltage":{"value":3.7,"unit":"V","time":1763780400000},"door":"open","x":"NaN"}}"#,
            T0,
        )
        .unwrap();
        assert_eq!(m.id.as_deref(), Some("m1"));
        let by_name = |n: &str| {
            m.measurements
                .iter()
                .find(|r| match r {
                    Ok(x) => x.metric == n,
                    Err(e) => e.field.as_deref() == Some(&format!("metrics.{n}")),
                })
                .unwrap()
                .clone()
        };
        let t = by_name("temperature").unwrap();
        assert_eq!(t.value, 21.5);
        assert_eq!(t.time, 1_763_780_400_000_000);
        let v = by_name("battery_voltage").unwrap();
        assert_eq!(
            (v.unit.as_deref(), v.time),
            (Some("V"), 1_763_780_400_000_000)
        );
        assert_eq!(by_name("door").unwrap_err().rule, "non_numeric_value");
        assert_eq!(by_name("x").unwrap_err().rule, "non_finite_value");
    }

    #[test]
    fn whole_message_errors() {
        assert_eq!(
            parse_message(JSON, b"{\"metrics\":", T0).unwrap_err().rule,
            "malformed_json"
        );
        assert_eq!(
            parse_message(JSON, b"[1]", T0).unwrap_err().rule,
            "not_an_object"
        );
        let e = parse_message(JSON, br#"{"time":"yesterday","metrics":{"t":1}}"#, T0).unwrap_err();
        assert_eq!((e.rule, e.field.as_deref()), ("bad_time", Some("time")));
        assert_eq!(
            parse_message("text/plain", b"1", T0).unwrap_err().rule,
            "unsupported_content_type"
        );
        // Time defaults to the time of receipt.
        let m = parse_message(JSON, br#"{"metrics":{"t":1}}"#, T0).unwrap();
        assert_eq!(m.measurements[0].as_ref().unwrap().time, T0);
    }

    #[test]
    fn senml_resolves_base_fields_per_rfc8428() {
        let pack = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.763780e9,"bu":"Cel","n":"temperature","v":23.1},
                        {"n":"humidity","u":"%RH","v":40,"t":10},
                        {"n":"label","vs":"kitchen"},
                        {"n":"relative","v":1,"bt":0,"t":-5}]"#;
        let m = parse_message(SENML_JSON, pack, T0).unwrap();
        let ok: Vec<_> = m
            .measurements
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        assert_eq!(ok[0].metric, "temperature");
        assert_eq!(ok[0].unit.as_deref(), Some("Cel"));
        assert_eq!(ok[0].time, 1_763_780_000_000_000);
        assert_eq!(ok[1].unit.as_deref(), Some("%RH"));
        assert_eq!(ok[1].time, 1_763_780_010_000_000);
        // bt=0 and t=-5: relative to the time of receipt.
        assert_eq!(ok[2].time, T0 - 5_000_000);
        let bad = m
            .measurements
            .iter()
            .find_map(|r| r.as_ref().err())
            .unwrap();
        assert_eq!(
            (bad.rule, bad.field.as_deref()),
            ("non_numeric_value", Some("[2].vs"))
        );
    }
}

/// The event id of a message that carries none: a hash of the device and the exact bytes, so a
/// redelivery of the same message (an MQTT retransmission, an HTTP retry) gets the same id and is
/// deduplicated. Identical id-less payloads from one device within the dedup horizon count as one.
pub fn content_event_id(device: &str, bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(device.as_bytes());
    h.update([0u8]);
    h.update(bytes);
    let digest = h.finalize();
    let mut id = String::with_capacity(34);
    id.push_str("h-");
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

#[cfg(test)]
mod content_id_tests {
    use super::content_event_id;

    #[test]
    fn content_ids_are_stable_and_device_scoped() {
        let a = content_event_id("d1", b"{\"metrics\":");
        assert_eq!(a, content_event_id("d1", b"{\"metrics\":"));
        assert_ne!(a, content_event_id("d2", b"{\"metrics\":"));
        assert_ne!(a, content_event_id("d1", b"{\"metrics\":}"));
        assert!(a.starts_with("h-") && a.len() == 34);
    }
}
