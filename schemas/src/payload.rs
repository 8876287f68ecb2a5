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
//! message. Base fields are resolved as RFC 8428 §4.5 says: the name is base name + name (kept on
//! the reading), `v` is offset by `bv` and `s` by `bs`, the unit defaults to `bu`, and times below
//! 2^28 s are relative to the time of receipt. The metric is the resolved name without the part
//! that names the sending device ([`senml_metric`]); a record with a must-understand field (ending
//! in `_`) refuses the pack.
//!
//! Event times must lie in [`EARLIEST_EVENT_TIME`]..=[`LATEST_EVENT_TIME`] (`bad_time` otherwise),
//! values must be finite, names at most [`MAX_NAME_BYTES`]: whatever a device sends, parsing never
//! panics and every refusal names the field as the device sent it (`metrics.x.unit`, `[2].u`).
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

    /// The same error, said of one message of a body (`message 2`, `line 3`).
    pub fn at(mut self, position: String) -> Self {
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

/// The earliest event time a message may carry: 1970-01-01T00:00:00Z. Earlier is `bad_time`.
pub const EARLIEST_EVENT_TIME: Micros = 0;
/// The latest event time a message may carry: 9999-12-31T23:59:59.999999Z (the end of RFC 3339).
/// Later is `bad_time`. Inside these bounds every difference of two times fits in an `i64`.
pub const LATEST_EVENT_TIME: Micros = 253_402_300_799_999_999;

/// The longest metric name (our JSON) or resolved SenML name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The largest device message, in bytes (AWS IoT takes 128 KB, Azure IoT Hub 256 KB): its raw
/// envelope must fit Kafka's default record limit of 1 MB with room to spare. HTTP refuses a larger
/// message with 413; the local Mosquitto refuses a larger publish (`max_packet_size`), and the MQTT
/// bridge accepts packets up to [`MAX_MQTT_PACKET_BYTES`] so that no message the broker takes can
/// break its connection.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// The largest MQTT packet the bridge takes (rumqttc's own default is 10 KiB: a larger publish
/// used to break the bridge's connection, and the broker redelivered it to it forever).
pub const MAX_MQTT_PACKET_BYTES: u32 = 1024 * 1024;

/// The most measurements one message may carry (`too_many_measurements` beyond): every output of
/// a raw record is numbered in its source position, which has room for 65 536.
pub const MAX_MEASUREMENTS: usize = 10_000;

fn too_many(n: usize, field: Option<&str>) -> PayloadError {
    PayloadError::new(
        "too_many_measurements",
        field,
        format!("{n} measurements in one message; at most {MAX_MEASUREMENTS} are allowed"),
    )
}

/// Where, in the message as the device sent it, a measurement's value, unit and time are: what a
/// dead letter names as its field (`metrics.energy.unit`, or `[2].u` for a SenML record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub value: String,
    pub unit: String,
    pub time: String,
}

/// One measurement of a message, as the cleanse stage reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The metric: our JSON's key; for SenML, derived from the resolved name ([`senml_metric`]).
    /// The catalog may alias it to another metric.
    pub metric: String,
    /// SenML: the resolved name (base name + name, RFC 8428 §4.5.1) as sent; `None` for our JSON.
    pub name: Option<String>,
    pub value: f64,
    pub unit: Option<String>,
    pub time: Micros,
    /// Whether the device said the time (else it is the time ingest received the message).
    pub device_time: bool,
    pub fields: Fields,
}

/// A message read by the cleanse stage: its id and every measurement or the reason it was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedMessage {
    pub id: Option<String>,
    pub device: Option<String>,
    pub measurements: Vec<Result<Measurement, PayloadError>>,
}

/// Reads one message (as split by [`split_body`] or received over MQTT) sent by `device`. An error
/// here refuses the whole message; a bad value refuses only its measurement. Never panics, whatever
/// the bytes (property-tested).
pub fn parse_message(
    content_type: &str,
    bytes: &[u8],
    device: &str,
    received_at: Micros,
) -> Result<ParsedMessage, PayloadError> {
    match BodyFormat::from_content_type(content_type) {
        Some(BodyFormat::SenmlJson) => parse_senml(bytes, device, received_at),
        Some(BodyFormat::Json) | Some(BodyFormat::NdJson) => parse_json(bytes, received_at),
        None => Err(PayloadError::new(
            "unsupported_content_type",
            Some("content_type"),
            format!("`{content_type}` is not one of {JSON}, {NDJSON}, {SENML_JSON}"),
        )),
    }
}

/// What ingest refuses of a message (split by [`split_body`]) before it reaches `raw` (HTTP 400):
/// a time outside the accepted range (`bad_time`) or too many measurements. Other faults of a
/// measurement are the cleanse stage's to dead-letter.
pub fn refusal_at_ingest(
    format: BodyFormat,
    bytes: &[u8],
    device: &str,
    received_at: Micros,
) -> Result<(), PayloadError> {
    let content_type = format.message_content_type();
    match parse_message(content_type, bytes, device, received_at) {
        Err(e) if e.rule == "bad_time" || e.rule == "too_many_measurements" => Err(e),
        Ok(m) => match m
            .measurements
            .into_iter()
            .find_map(|r| r.err().filter(|e| e.rule == "bad_time"))
        {
            Some(e) => Err(e),
            None => Ok(()),
        },
        Err(_) => Ok(()),
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
    let message_time = !matches!(obj.get("time"), None | Some(Value::Null));
    let (time, time_field) = match obj.get("time") {
        None | Some(Value::Null) => (
            in_range(received_at, "time", || {
                format!("the receipt time {received_at} µs")
            })?,
            "time".to_owned(),
        ),
        Some(t) => (parse_time(t, "time")?, "time".to_owned()),
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
    if metrics.len() > MAX_MEASUREMENTS {
        return Err(too_many(metrics.len(), Some("metrics")));
    }
    let measurements = metrics
        .iter()
        .map(|(name, v)| {
            let field = format!("metrics.{}", shown_name(name));
            check_name(name, &field)?;
            let mut fields = Fields {
                value: field.clone(),
                unit: format!("{field}.unit"),
                time: time_field.clone(),
            };
            let mut device_time = message_time;
            let (raw_value, unit, time) = match v {
                Value::Object(o) => {
                    let unit = match o.get("unit") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(u)) => Some(u.clone()),
                        Some(_) => {
                            return Err(PayloadError::new(
                                "wrong_type",
                                Some(&fields.unit),
                                "must be a string",
                            ));
                        }
                    };
                    let time = match o.get("time") {
                        None | Some(Value::Null) => time,
                        Some(t) => {
                            fields.time = format!("{field}.time");
                            device_time = true;
                            parse_time(t, &fields.time)?
                        }
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
                name: None,
                value: numeric(raw_value, &field)?,
                unit,
                time,
                device_time,
                fields,
            })
        })
        .collect();
    Ok(ParsedMessage {
        id,
        device,
        measurements,
    })
}

/// A name as a field path shows it: at most 64 characters.
fn shown_name(name: &str) -> String {
    if name.chars().count() <= 64 {
        name.to_owned()
    } else {
        let mut s: String = name.chars().take(64).collect();
        s.push('…');
        s
    }
}

/// A metric name of our JSON: not empty, at most [`MAX_NAME_BYTES`], no control characters.
fn check_name(name: &str, field: &str) -> Result<(), PayloadError> {
    let reason = if name.is_empty() {
        "a metric name must not be empty".to_owned()
    } else if name.len() > MAX_NAME_BYTES {
        format!(
            "a metric name is {} bytes, more than the {MAX_NAME_BYTES} allowed",
            name.len()
        )
    } else if name.chars().any(char::is_control) {
        "a metric name must not contain control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(PayloadError::new("bad_name", Some(field), reason))
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
                format!("{} is not a finite number", shown_number(n)),
            )),
        },
        Value::String(s) if is_non_finite_word(s) => Err(PayloadError::new(
            "non_finite_value",
            Some(field),
            format!("\"{}\" is not a finite number", shown_name(s)),
        )),
        other => Err(PayloadError::new(
            "non_numeric_value",
            Some(field),
            format!("expected a number, found {}", json_kind(other)),
        )),
    }
}

/// A number as a reason shows it: at most 40 characters (a device may send a 1 MB exponent).
fn shown_number(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if s.len() <= 40 {
        s
    } else {
        format!("{}…", s.chars().take(40).collect::<String>())
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
        Value::Number(n) => format!("number {}", shown_number(n)),
        Value::String(s) => format!("string \"{}\"", s.chars().take(40).collect::<String>()),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A number for a reason: as written when short, else in scientific notation (`-1e300`).
/// (Used by the cleanse stage's reasons too.)
pub fn shown_f64(v: f64) -> String {
    let plain = v.to_string();
    if plain.len() <= 24 {
        plain
    } else {
        format!("{v:e}")
    }
}

/// An event time in range, or `bad_time` naming `field`.
fn in_range(
    t: Micros,
    field: &str,
    shown: impl FnOnce() -> String,
) -> Result<Micros, PayloadError> {
    if (EARLIEST_EVENT_TIME..=LATEST_EVENT_TIME).contains(&t) {
        Ok(t)
    } else {
        Err(out_of_range_time(field, shown()))
    }
}

fn out_of_range_time(field: &str, shown: String) -> PayloadError {
    PayloadError::new(
        "bad_time",
        Some(field),
        format!("{shown} is outside 1970-01-01T00:00:00Z..9999-12-31T23:59:59.999999Z"),
    )
}

fn parse_time(v: &Value, field: &str) -> Result<Micros, PayloadError> {
    match v {
        Value::String(s) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
                PayloadError::new(
                    "bad_time",
                    Some(field),
                    format!("\"{}\" is not RFC 3339: {e}", shown_name(s)),
                )
            })?;
            in_range(t.timestamp_micros(), field, || format!("\"{s}\""))
        }
        Value::Number(n) => {
            let micros = n
                .as_i64()
                .and_then(|ms| ms.checked_mul(1000))
                .ok_or_else(|| match n.as_i64() {
                    Some(_) => out_of_range_time(field, format!("{n} ms")),
                    None => PayloadError::new(
                        "bad_time",
                        Some(field),
                        format!("{} is not integer epoch milliseconds", shown_number(n)),
                    ),
                })?;
            in_range(micros, field, || format!("{n} ms"))
        }
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

/// SenML times below this many seconds (2²⁸) are relative to the time of receipt (RFC 8428 §4.5.3).
const SENML_RELATIVE_BELOW: f64 = 268_435_456.0;

/// A SenML time (base time + time, seconds) in microseconds, or why it cannot be one.
fn senml_time(seconds: f64, received_at: Micros, field: &str) -> Result<Micros, PayloadError> {
    if !seconds.is_finite() {
        return Err(out_of_range_time(
            field,
            format!("{} s", shown_f64(seconds)),
        ));
    }
    if seconds.abs() < SENML_RELATIVE_BELOW {
        // |seconds × 10⁶| < 2.7 × 10¹⁴: the cast is exact enough and cannot saturate.
        let t = received_at.checked_add((seconds * 1e6).round() as i64);
        let t = t.ok_or_else(|| {
            out_of_range_time(field, format!("{} s after receipt", shown_f64(seconds)))
        })?;
        in_range(t, field, || {
            format!("{} s after receipt", shown_f64(seconds))
        })
    } else {
        let micros = seconds * 1e6;
        // Compare as floats first: an `as` cast would saturate a huge value into range's edge.
        if !(EARLIEST_EVENT_TIME as f64..=LATEST_EVENT_TIME as f64).contains(&micros) {
            return Err(out_of_range_time(
                field,
                format!("{} s", shown_f64(seconds)),
            ));
        }
        // The bounds are not exact as floats: check again after the (now unsaturated) cast.
        in_range(micros.round() as i64, field, || {
            format!("{} s", shown_f64(seconds))
        })
    }
}

/// The RFC 8428 §4.5.1 alphabet of names: `A-Z a-z 0-9 - : . / _`.
fn senml_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_')
}

/// The metric of a resolved SenML name sent by `device`: the name without a leading part that
/// names the sending device itself (up to and including `device` as a whole segment and the
/// separator after it, `:`, `/` or `.`), else the whole name. So `urn:dev:mac:th-1:temperature`
/// sent by `th-1` is `temperature`, while a gateway `gw`'s `gw:sensor1:temp` and
/// `gw:sensor2:temp` are `sensor1:temp` and `sensor2:temp`: names that differ in anything but
/// how they name the sender never become one metric. The catalog may alias a metric to another.
pub fn senml_metric<'a>(name: &'a str, device: &str) -> &'a str {
    let is_sep = |c: u8| matches!(c, b':' | b'/' | b'.');
    if device.is_empty() {
        return name;
    }
    let bytes = name.as_bytes();
    let mut from = 0;
    while let Some(i) = name[from..].find(device).map(|i| i + from) {
        let end = i + device.len();
        let starts_segment = i == 0 || is_sep(bytes[i - 1]);
        if starts_segment && end < bytes.len() && is_sep(bytes[end]) && end + 1 < bytes.len() {
            return &name[end + 1..];
        }
        // Devices ids are not empty, so this moves on.
        from = i + 1;
        while !name.is_char_boundary(from) {
            from += 1;
        }
    }
    name
}

/// The pack's base fields as resolved so far, with the record that set each (for field paths).
#[derive(Default)]
struct SenmlBase {
    name: String,
    name_at: usize,
    time: f64,
    time_at: Option<usize>,
    unit: Option<(String, usize)>,
    value: f64,
    sum: f64,
}

fn parse_senml(
    bytes: &[u8],
    device: &str,
    received_at: Micros,
) -> Result<ParsedMessage, PayloadError> {
    let pack: Vec<Map<String, Value>> = serde_json::from_slice(bytes).map_err(|e| {
        PayloadError::new(
            "malformed_json",
            None,
            format!("a SenML pack must be a JSON array of records: {e}"),
        )
    })?;
    if pack.len() > MAX_MEASUREMENTS {
        return Err(too_many(pack.len(), None));
    }
    let mut base = SenmlBase::default();
    let mut measurements = Vec::with_capacity(pack.len());
    for (i, rec) in pack.iter().enumerate() {
        let field = |f: &str| format!("[{i}].{f}");
        // Base fields apply to this record and every later one: a bad one refuses the pack.
        let base_number = |key: &str| -> Result<Option<f64>, PayloadError> {
            match rec.get(key) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x)),
                    Some(_) => Err(PayloadError::new(
                        "non_finite_value",
                        Some(&field(key)),
                        "must be a finite number",
                    )),
                    None => Err(PayloadError::new(
                        "wrong_type",
                        Some(&field(key)),
                        "must be a number",
                    )),
                },
            }
        };
        if let Some(key) = rec.keys().find(|k| k.ends_with('_')) {
            // RFC 8428 §4.4: a field ending in `_` must be understood, and none is here.
            return Err(PayloadError::new(
                "unsupported_field",
                Some(&field(key)),
                "a must-understand field this receiver does not know (RFC 8428 §4.4)",
            ));
        }
        match rec.get("bn") {
            None => {}
            Some(Value::String(bn)) => {
                if let Some(c) = bn.chars().find(|c| !senml_name_char(*c)) {
                    return Err(PayloadError::new(
                        "bad_name",
                        Some(&field("bn")),
                        format!("{c:?} is not allowed in a SenML name (A-Z a-z 0-9 - : . / _)"),
                    ));
                }
                base.name = bn.clone();
                base.name_at = i;
            }
            Some(_) => {
                return Err(PayloadError::new(
                    "wrong_type",
                    Some(&field("bn")),
                    "must be a string",
                ));
            }
        }
        if let Some(bt) = base_number("bt")? {
            base.time = bt;
            base.time_at = Some(i);
        }
        match rec.get("bu") {
            None => {}
            Some(Value::String(bu)) => base.unit = Some((bu.clone(), i)),
            Some(_) => {
                return Err(PayloadError::new(
                    "wrong_type",
                    Some(&field("bu")),
                    "must be a string",
                ));
            }
        }
        if let Some(bv) = base_number("bv")? {
            base.value = bv;
        }
        if let Some(bs) = base_number("bs")? {
            base.sum = bs;
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
        measurements.push(senml_measurement(rec, i, &base, device, received_at));
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

/// Record `i` of a pack, with the base fields in force.
fn senml_measurement(
    rec: &Map<String, Value>,
    i: usize,
    base: &SenmlBase,
    device: &str,
    received_at: Micros,
) -> Result<Measurement, PayloadError> {
    let field = |f: &str| format!("[{i}].{f}");
    let n = match rec.get("n") {
        None => "",
        Some(Value::String(n)) => n.as_str(),
        Some(_) => {
            return Err(PayloadError::new(
                "wrong_type",
                Some(&field("n")),
                "must be a string",
            ));
        }
    };
    let name = format!("{}{n}", base.name);
    let name_field = if n.is_empty() {
        format!("[{}].bn", base.name_at)
    } else {
        field("n")
    };
    if name.is_empty() {
        return Err(PayloadError::new(
            "missing_field",
            Some(&field("n")),
            "record has no name (neither `n` nor a base name `bn`)",
        ));
    }
    if let Some(c) = n.chars().find(|c| !senml_name_char(*c)) {
        return Err(PayloadError::new(
            "bad_name",
            Some(&name_field),
            format!("{c:?} is not allowed in a SenML name (A-Z a-z 0-9 - : . / _)"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(PayloadError::new(
            "bad_name",
            Some(&name_field),
            format!(
                "the resolved name `{}` must start with a letter or digit",
                shown_name(&name)
            ),
        ));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(PayloadError::new(
            "bad_name",
            Some(&name_field),
            format!(
                "the resolved name is {} bytes, more than the {MAX_NAME_BYTES} allowed",
                name.len()
            ),
        ));
    }
    let (time_field, t) = match rec.get("t") {
        Some(t) => match t.as_f64() {
            Some(t) => (field("t"), t),
            None => {
                return Err(PayloadError::new(
                    "bad_time",
                    Some(&field("t")),
                    "must be a number",
                ));
            }
        },
        None => (
            base.time_at
                .map_or_else(|| field("t"), |at| format!("[{at}].bt")),
            0.0,
        ),
    };
    let time = senml_time(base.time + t, received_at, &time_field)?;
    // `v` is offset by the base value, `s` by the base sum (RFC 8428 §4.5.2).
    let (value_field, value) = if let Some(v) = rec.get("v") {
        let f = field("v");
        let v = numeric(v, &f)? + base.value;
        (f, v)
    } else if let Some(s) = rec.get("s") {
        let f = field("s");
        let s = numeric(s, &f)? + base.sum;
        (f, s)
    } else {
        let key = ["vs", "vb", "vd"]
            .into_iter()
            .find(|k| rec.contains_key(*k))
            .unwrap_or("vs");
        return Err(PayloadError::new(
            "non_numeric_value",
            Some(&field(key)),
            format!("`{key}` is a non-numeric SenML value"),
        ));
    };
    if !value.is_finite() {
        return Err(PayloadError::new(
            "non_finite_value",
            Some(&value_field),
            "the value plus its base value is not a finite number",
        ));
    }
    let (unit, unit_field) = match rec.get("u") {
        Some(Value::String(u)) => (Some(u.clone()), field("u")),
        Some(_) => {
            return Err(PayloadError::new(
                "wrong_type",
                Some(&field("u")),
                "must be a string",
            ));
        }
        None => match &base.unit {
            Some((u, at)) => (Some(u.clone()), format!("[{at}].bu")),
            None => (None, field("u")),
        },
    };
    Ok(Measurement {
        metric: senml_metric(&name, device).to_owned(),
        value,
        unit,
        time,
        device_time: rec.contains_key("t") || base.time_at.is_some(),
        fields: Fields {
            value: value_field,
            unit: unit_field,
            time: time_field,
        },
        name: Some(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Micros = 1_763_780_000_000_000;

    fn parse(content_type: &str, bytes: &[u8], at: Micros) -> Result<ParsedMessage, PayloadError> {
        parse_message(content_type, bytes, "dev-1", at)
    }

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
        let m = parse(
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
            parse(JSON, b"{\"metrics\":", T0).unwrap_err().rule,
            "malformed_json"
        );
        assert_eq!(parse(JSON, b"[1]", T0).unwrap_err().rule, "not_an_object");
        let e = parse(JSON, br#"{"time":"yesterday","metrics":{"t":1}}"#, T0).unwrap_err();
        assert_eq!((e.rule, e.field.as_deref()), ("bad_time", Some("time")));
        assert_eq!(
            parse("text/plain", b"1", T0).unwrap_err().rule,
            "unsupported_content_type"
        );
        // Time defaults to the time of receipt.
        let m = parse(JSON, br#"{"metrics":{"t":1}}"#, T0).unwrap();
        assert_eq!(m.measurements[0].as_ref().unwrap().time, T0);
    }

    #[test]
    fn senml_resolves_base_fields_per_rfc8428() {
        let pack = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.763780e9,"bu":"Cel","n":"temperature","v":23.1},
                        {"n":"humidity","u":"%RH","v":40,"t":10},
                        {"n":"label","vs":"kitchen"},
                        {"n":"relative","v":1,"bt":0,"t":-5}]"#;
        let m = parse_message(SENML_JSON, pack, "10e2073a01080063", T0).unwrap();
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

    fn ok(m: &ParsedMessage) -> Vec<&Measurement> {
        m.measurements
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .collect()
    }

    fn errs(m: &ParsedMessage) -> Vec<(&'static str, String)> {
        m.measurements
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| (e.rule, e.field.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn senml_names_are_base_name_plus_name_and_never_collapse() {
        // A gateway's pack: two sensors, each with `n: temp`.
        let pack = br#"[{"bn":"gw-1:sensor1:","bt":1763780000,"n":"temp","u":"Cel","v":20},
                        {"bn":"gw-1:sensor2:","n":"temp","u":"Cel","v":30}]"#;
        let m = parse_message(SENML_JSON, pack, "gw-1", T0).unwrap();
        let got: Vec<(&str, Option<&str>, f64)> = ok(&m)
            .iter()
            .map(|r| (r.metric.as_str(), r.name.as_deref(), r.value))
            .collect();
        assert_eq!(
            got,
            [
                ("sensor1:temp", Some("gw-1:sensor1:temp"), 20.0),
                ("sensor2:temp", Some("gw-1:sensor2:temp"), 30.0)
            ]
        );
        // A base name naming the sender itself is not part of the metric.
        assert_eq!(
            senml_metric("urn:dev:mac:th-1:temperature", "th-1"),
            "temperature"
        );
        assert_eq!(senml_metric("th-1/temperature", "th-1"), "temperature");
        assert_eq!(senml_metric("temperature", "th-1"), "temperature");
        // Only as a whole segment, and never leaving an empty metric.
        assert_eq!(senml_metric("xth-1:temp", "th-1"), "xth-1:temp");
        assert_eq!(senml_metric("th-10:temp", "th-1"), "th-10:temp");
        assert_eq!(senml_metric("urn:dev:th-1:", "th-1"), "urn:dev:th-1:");
        assert_eq!(senml_metric("a:th-1:b:th-1:c", "th-1"), "b:th-1:c");
        assert_eq!(senml_metric("ü:é:temp", "é"), "temp");
        // No `n`: the base name alone is the name.
        let m = parse_message(
            SENML_JSON,
            br#"[{"bn":"th-1:humidity","v":40}]"#,
            "th-1",
            T0,
        )
        .unwrap();
        assert_eq!(ok(&m)[0].metric, "humidity");
        assert_eq!(ok(&m)[0].name.as_deref(), Some("th-1:humidity"));
        // Our JSON has no SenML name.
        let m = parse(JSON, br#"{"metrics":{"t":1}}"#, T0).unwrap();
        assert_eq!(ok(&m)[0].name, None);
    }

    #[test]
    fn senml_base_value_applies_to_v_and_base_sum_to_s() {
        let pack = br#"[{"bn":"m:","bv":100,"bs":1000,"n":"level","v":5},
                        {"n":"energy","s":7},
                        {"n":"both","v":1,"s":2}]"#;
        let m = parse(SENML_JSON, pack, T0).unwrap();
        let values: Vec<f64> = ok(&m).iter().map(|r| r.value).collect();
        assert_eq!(values, [105.0, 1007.0, 101.0]);
        assert_eq!(ok(&m)[1].fields.value, "[1].s");
    }

    #[test]
    fn fields_name_the_record_as_sent() {
        let pack = br#"[{"bn":"d:","bt":1763780000,"bu":"Cel","n":"a","v":1},
                        {"n":"b","v":2,"t":5,"u":"K"},
                        {"n":"c","v":3,"u":7},
                        {"n":"d","v":"x"}]"#;
        let m = parse(SENML_JSON, pack, T0).unwrap();
        let r = ok(&m);
        assert_eq!(
            (
                r[0].fields.unit.as_str(),
                r[0].fields.time.as_str(),
                r[0].fields.value.as_str()
            ),
            ("[0].bu", "[0].bt", "[0].v")
        );
        assert_eq!(
            (r[1].fields.unit.as_str(), r[1].fields.time.as_str()),
            ("[1].u", "[1].t")
        );
        assert_eq!(
            errs(&m),
            [
                ("wrong_type", "[2].u".into()),
                ("non_numeric_value", "[3].v".into())
            ]
        );
        let m = parse(JSON, br#"{"time":1763780000000,"metrics":{"e":{"value":1,"unit":"J"},"f":{"value":1,"time":1763780000001}}}"#, T0).unwrap();
        let r = ok(&m);
        assert_eq!(
            (r[0].fields.unit.as_str(), r[0].fields.time.as_str()),
            ("metrics.e.unit", "time")
        );
        assert_eq!(r[1].fields.time, "metrics.f.time");
    }

    /// The shapes of issue 14 that stopped the pipeline, and their class.
    #[test]
    fn times_outside_the_range_are_bad_time_naming_the_field() {
        let refused = |ct: &str, body: &str| -> (String, String) {
            let e = match parse(ct, body.as_bytes(), T0) {
                Err(e) => e,
                Ok(m) => m
                    .measurements
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_else(|| panic!("{body} is refused")),
            };
            assert!(
                refusal_at_ingest(
                    BodyFormat::from_content_type(ct).unwrap(),
                    body.as_bytes(),
                    "dev-1",
                    T0
                )
                .is_err(),
                "ingest refuses {body}"
            );
            (e.rule.to_owned(), e.field.unwrap_or_default())
        };
        let bad = |f: &str| ("bad_time".to_owned(), f.to_owned());
        assert_eq!(
            refused(
                SENML_JSON,
                r#"[{"bn":"x:","bt":-1e300,"n":"temperature","v":1}]"#
            ),
            bad("[0].bt")
        );
        assert_eq!(
            refused(SENML_JSON, r#"[{"n":"temperature","v":1,"t":1e300}]"#),
            bad("[0].t")
        );
        assert_eq!(
            refused(SENML_JSON, r#"[{"n":"temperature","v":1,"t":-1e9}]"#),
            bad("[0].t")
        );
        assert_eq!(
            refused(
                SENML_JSON,
                r#"[{"bt":1e308,"n":"a","v":1},{"n":"b","v":1,"t":1e308}]"#
            ),
            bad("[0].bt")
        );
        assert_eq!(
            refused(JSON, r#"{"time":-9223372036854775,"metrics":{"t":1}}"#),
            bad("time")
        );
        assert_eq!(
            refused(JSON, r#"{"time":9223372036854775807,"metrics":{"t":1}}"#),
            bad("time")
        );
        assert_eq!(
            refused(JSON, r#"{"time":"1969-12-31T23:59:59Z","metrics":{"t":1}}"#),
            bad("time")
        );
        assert_eq!(
            refused(JSON, r#"{"metrics":{"t":{"value":1,"time":-1}}}"#),
            bad("metrics.t.time")
        );
        // Relative to a receipt time near the end of the range: past it.
        let e = parse(
            SENML_JSON,
            br#"[{"n":"a","v":1,"t":100}]"#,
            LATEST_EVENT_TIME,
        )
        .unwrap();
        assert_eq!(errs(&e), [("bad_time", "[0].t".into())]);
        let e = parse(SENML_JSON, br#"[{"n":"a","v":1,"t":-100}]"#, i64::MIN).unwrap();
        assert_eq!(errs(&e), [("bad_time", "[0].t".into())]);
        // The edges themselves are accepted.
        let m = parse(
            JSON,
            br#"{"time":"9999-12-31T23:59:59.999999Z","metrics":{"t":1}}"#,
            T0,
        )
        .unwrap();
        assert_eq!(ok(&m)[0].time, LATEST_EVENT_TIME);
        let m = parse(JSON, br#"{"time":0,"metrics":{"t":1}}"#, T0).unwrap();
        assert_eq!(ok(&m)[0].time, EARLIEST_EVENT_TIME);
        assert!(
            refusal_at_ingest(BodyFormat::Json, br#"{"metrics":{"t":"hot"}}"#, "d", T0).is_ok()
        );
    }

    #[test]
    fn extreme_values_names_and_fields() {
        let m = parse(
            SENML_JSON,
            br#"[{"bv":1e308,"n":"a","v":1e308},{"n":"b","v":-1e308}]"#,
            T0,
        )
        .unwrap();
        assert_eq!(errs(&m), [("non_finite_value", "[0].v".into())]);
        assert_eq!(ok(&m)[0].value, 0.0, "-1e308 plus the base value 1e308");
        let e = parse(SENML_JSON, br#"[{"n":"a","v":1,"x_":1}]"#, T0).unwrap_err();
        assert_eq!(
            (e.rule, e.field.as_deref()),
            ("unsupported_field", Some("[0].x_"))
        );
        let e = parse(SENML_JSON, br#"[{"bn":"bad name","v":1}]"#, T0).unwrap_err();
        assert_eq!((e.rule, e.field.as_deref()), ("bad_name", Some("[0].bn")));
        let m = parse(
            SENML_JSON,
            br#"[{"n":"-x","v":1},{"n":"a\u0000","v":1},{"v":1}]"#,
            T0,
        )
        .unwrap();
        assert_eq!(
            errs(&m),
            [
                ("bad_name", "[0].n".into()),
                ("bad_name", "[1].n".into()),
                ("missing_field", "[2].n".into())
            ]
        );
        let long = "x".repeat(300);
        let m = parse(
            JSON,
            format!(r#"{{"metrics":{{"{long}":1,"":2,"ok":3}}}}"#).as_bytes(),
            T0,
        )
        .unwrap();
        let e = errs(&m);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|(rule, _)| *rule == "bad_name"));
        assert!(
            e.iter().any(|(_, f)| f.ends_with('…') && f.len() < 80),
            "{e:?}"
        );
        // Integers beyond f64's exact range are still numbers; a 1 MB exponent is malformed JSON.
        let m = parse(
            JSON,
            br#"{"metrics":{"a":-9223372036854775808,"b":18446744073709551615}}"#,
            T0,
        )
        .unwrap();
        assert_eq!(ok(&m).len(), 2);
        let body = format!(r#"{{"metrics":{{"a":1e{}}}}}"#, "9".repeat(1_000_000));
        assert_eq!(
            parse(JSON, body.as_bytes(), T0).unwrap_err().rule,
            "malformed_json"
        );
        // Too many measurements for one message: refused whole, at ingest too.
        let pack = format!(
            "[{}]",
            vec![r#"{"n":"a","v":1}"#; MAX_MEASUREMENTS + 1].join(",")
        );
        let e = parse(SENML_JSON, pack.as_bytes(), T0).unwrap_err();
        assert_eq!(e.rule, "too_many_measurements");
        assert!(refusal_at_ingest(BodyFormat::SenmlJson, pack.as_bytes(), "d", T0).is_err());
        let many: Vec<String> = (0..=MAX_MEASUREMENTS)
            .map(|i| format!(r#""m{i}":1"#))
            .collect();
        let msg = format!(r#"{{"metrics":{{{}}}}}"#, many.join(","));
        assert_eq!(
            parse(JSON, msg.as_bytes(), T0).unwrap_err().rule,
            "too_many_measurements"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON tokens where a number, a time, a unit or a name may stand, extremes first.
        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "0",
                    "-0",
                    "-0.0",
                    "5e-324",
                    "2.2250738585072014e-308",
                    "1e308",
                    "-1e308",
                    "1.7976931348623157e308",
                    "-1.7976931348623157e308",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "18446744073709551615",
                    "1e400",
                    "-1e-400",
                    "268435455.9",
                    "268435456",
                    "-268435456",
                    "253402300800",
                    "\"NaN\"",
                    "\"-Infinity\"",
                    "\"12\"",
                    "\"\"",
                    "null",
                    "true",
                    "[]",
                    "{}",
                    "\"Cel\"",
                    "\"degF\"",
                    "\"J\"",
                    "\"1970-01-01T00:00:00Z\"",
                    "\"0000-01-01T00:00:00Z\"",
                    "\"9999-12-31T23:59:59.999999Z\"",
                    "\"2026-11-22T03:00:00+14:00\"",
                ])
                .prop_map(str::to_owned),
                any::<f64>()
                    .prop_filter("JSON numbers are finite", |f| f.is_finite())
                    .prop_map(|f| format!("{f:?}")),
                any::<i64>().prop_map(|i| i.to_string()),
                "[a-z:/._ -]{0,12}".prop_map(|s| format!("{s:?}")),
            ]
        }

        fn object(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
            prop::collection::vec((prop::sample::select(keys), token()), 0..6).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", fields.join(","))
            })
        }

        fn senml_pack() -> impl Strategy<Value = String> {
            prop::collection::vec(
                object(&[
                    "bn", "bt", "bu", "bv", "bs", "n", "u", "v", "s", "t", "vs", "vb", "ut",
                ]),
                0..5,
            )
            .prop_map(|records| format!("[{}]", records.join(",")))
        }

        fn json_message() -> impl Strategy<Value = String> {
            (
                prop::option::of(token()),
                prop::collection::vec(
                    (
                        "[a-z]{1,3}",
                        prop_oneof![token(), object(&["value", "unit", "time"])],
                    ),
                    0..4,
                ),
            )
                .prop_map(|(time, metrics)| {
                    let metrics: Vec<String> =
                        metrics.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                    match time {
                        Some(t) => format!(r#"{{"time":{t},"metrics":{{{}}}}}"#, metrics.join(",")),
                        None => format!(r#"{{"metrics":{{{}}}}}"#, metrics.join(",")),
                    }
                })
        }

        fn receipt() -> impl Strategy<Value = Micros> {
            prop_oneof![
                Just(T0),
                Just(0),
                Just(i64::MIN),
                Just(i64::MAX),
                Just(LATEST_EVENT_TIME),
                any::<i64>()
            ]
        }

        /// What a user checks of any parse: readings are finite and in time; refusals name a rule,
        /// and a refused measurement its field.
        fn well_formed(parsed: Result<ParsedMessage, PayloadError>) -> Result<(), TestCaseError> {
            match parsed {
                Err(e) => prop_assert!(!e.rule.is_empty() && !e.reason.is_empty()),
                Ok(m) => {
                    for r in m.measurements {
                        match r {
                            Ok(x) => {
                                prop_assert!(x.value.is_finite(), "{x:?}");
                                prop_assert!(
                                    (EARLIEST_EVENT_TIME..=LATEST_EVENT_TIME).contains(&x.time),
                                    "{x:?}"
                                );
                                prop_assert!(
                                    !x.metric.is_empty() && x.metric.len() <= MAX_NAME_BYTES
                                );
                            }
                            Err(e) => prop_assert!(
                                e.field.as_deref().is_some_and(|f| !f.is_empty()),
                                "{e:?}"
                            ),
                        }
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn senml_never_panics_and_names_fields(pack in senml_pack(), at in receipt(), device in "[a-z:-]{0,4}") {
                let _ = split_body(BodyFormat::SenmlJson, pack.as_bytes());
                let _ = refusal_at_ingest(BodyFormat::SenmlJson, pack.as_bytes(), &device, at);
                well_formed(parse_message(SENML_JSON, pack.as_bytes(), &device, at))?;
            }

            #[test]
            fn our_json_never_panics_and_names_fields(msg in json_message(), at in receipt()) {
                let _ = split_body(BodyFormat::Json, msg.as_bytes());
                let _ = split_body(BodyFormat::NdJson, format!("{msg}\n{msg}").as_bytes());
                let _ = refusal_at_ingest(BodyFormat::Json, msg.as_bytes(), "d", at);
                well_formed(parse_message(JSON, msg.as_bytes(), "d", at))?;
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), at in receipt()) {
                for format in [BodyFormat::Json, BodyFormat::NdJson, BodyFormat::SenmlJson] {
                    let _ = split_body(format, &bytes);
                    well_formed(parse_message(format.message_content_type(), &bytes, "d", at))?;
                }
            }

            #[test]
            fn senml_metrics_are_suffixes_of_their_names(name in "[a-z0-9:/.]{1,24}", device in "[a-z0-9:]{0,6}") {
                let metric = senml_metric(&name, &device);
                prop_assert!(!metric.is_empty() && name.ends_with(metric));
            }
        }
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
