//! Stream processors: Kafka consumer groups that turn topics into topics.
//!
//! This crate owns the cleanse stage ([`cleanse::CleanseStage`]: `raw` → `telemetry` + `deadletter`)
//! and the pure logic behind it ([`cleanse::Cleanser`], [`dedup::DedupWindow`]), testable without
//! servers. The metric catalog it applies is a contract (`tributary_schemas::catalog`). Each stage is one consumer group and scales out by adding instances.
//!
//! It must not touch: the lake, the device-facing endpoints, or the bytes of the raw topic (read only).

pub mod cleanse;
pub mod containment;
pub mod dedup;

/// Errors of the stream stages.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding: {0}")]
    Encode(#[from] tributary_schemas::avro::AvroError),
    #[error("topic `{0}` does not exist; create it with `tributary topics create`")]
    MissingTopic(String),
    #[error("state warm-up: {0}")]
    WarmUp(String),
    #[error("metric catalog: {0}")]
    Catalog(#[from] tributary_schemas::catalog::CatalogError),
    #[error("the consumer lost its partitions {0:?} ago and got none back")]
    Orphaned(std::time::Duration),
    #[error(transparent)]
    RecordFailed(#[from] containment::Failure),
}
