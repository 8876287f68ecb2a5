//! Stream processors: Kafka consumer groups that turn topics into topics.
//!
//! This crate owns the runtime every consuming stage runs on ([`runtime`]: the consume loop,
//! containment, commits after outputs and state changelogs, keyed state restored consistently with
//! the committed offsets), and the processing stages on it: cleanse ([`cleanse::CleanseStage`]:
//! `raw` → `telemetry` + `deadletter`) and anomaly detection ([`anomaly::AnomalyStage`]:
//! `telemetry` → `anomalies`), incidents ([`incidents`]: `anomalies` → `incidents`) and their
//! delivery ([`alerts::AlertDelivery`]: `incidents` → Alertmanager and webhooks). Their logic is pure and testable without servers
//! ([`cleanse::Cleanser`], [`dedup::DedupWindow`], [`detectors::Series`]); [`labelled`] is the
//! ground truth detection is scored against (labelled anomalies the simulator sends), [`failures`]
//! the one correlation is (correlated failures in zones and sections). The catalogs they apply
//! are contracts (`tributary_schemas::catalog`, `tributary_schemas::detectors`). Each stage is one
//! consumer group and scales out by adding instances.
//!
//! It must not touch: the lake, the device-facing endpoints, or the bytes of the raw topic (read
//! only). Alert delivery is the one stage that speaks HTTP, and only to the receivers configured.

pub mod alerts;
pub mod anomaly;
pub mod cleanse;
pub mod clock;
pub mod containment;
pub mod dedup;
pub mod detectors;
pub mod failures;
pub mod incidents;
pub mod labelled;
pub mod runtime;
pub mod shadows;

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
    #[error("stage state: {0}")]
    State(String),
    #[error(transparent)]
    RecordFailed(#[from] containment::Failure),
}
