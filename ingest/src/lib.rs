//! Ingestors: the only way events enter Tributary.
//!
//! This crate owns the HTTP endpoint ([`http::HttpIngest`]), the MQTT bridge ([`mqtt::MqttBridge`])
//! and the producer that writes raw envelopes to the `raw` topic ([`producer::RawProducer`]). A device
//! is acknowledged only after Kafka acknowledged its event. Payloads are split into messages and
//! enveloped, never changed or interpreted (that is the cleanse stage's job).
//!
//! It also keeps the MQTT broker's password file in step with the registry
//! ([`broker_credentials::BrokerCredentials`]), so a device created by the API can publish at once.
//!
//! It must not touch: any topic other than `raw`, the lake, or the meaning of a payload's values.

pub mod broker_credentials;
pub mod http;
pub mod mqtt;
pub mod producer;
pub mod rate_limit;

/// Errors of the ingest stages.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding raw envelope: {0}")]
    Encode(#[from] tributary_schemas::avro::AvroError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(std::io::Error),
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error("broker password file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
}
