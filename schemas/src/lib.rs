//! The contracts between Tributary's stages, defined once.
//!
//! This crate owns: topic names and partition counts ([`topics`]), the Avro schemas of every topic and
//! their Rust types ([`avro`], the `.avsc` files under `schemas/avro/`), the Confluent wire framing,
//! the device payload formats devices may send ([`payload`]: our JSON and SenML), the device registry
//! model and its in-memory view ([`registry`]), the metric catalog and its units ([`catalog`],
//! [`units`]), the detector catalog ([`detectors`]), the incident rules ([`incidents`]), the device shadow document and its algebra ([`shadows`]) and
//! the Kafka client settings every stage shares ([`kafka`]).
//!
//! It must not touch: I/O, any stage's logic, or the lake.

pub mod avro;
pub mod catalog;
pub mod config_value;
pub mod detectors;
pub mod incidents;
pub mod kafka;
pub mod payload;
pub mod registry;
pub mod shadows;
pub mod topics;
pub mod units;

pub use avro::{DeadLetter, RawEnvelope, Reading, Source};
pub use topics::Topics;

/// Microseconds since the Unix epoch, UTC: the one timestamp unit of every topic and table.
pub type Micros = i64;

/// Whole seconds (a config value) in [`Micros`], saturating.
pub fn micros_of_secs(secs: u64) -> Micros {
    i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000)
}

/// Now, in [`Micros`].
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}
