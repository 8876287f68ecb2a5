//! The producer of the `raw` topic: idempotent, compressed, keyed by device.

use rdkafka::producer::{DeliveryFuture, FutureProducer};
use tributary_schemas::RawEnvelope;
use tributary_schemas::avro;
use tributary_schemas::kafka::{self, KafkaConfig};

use crate::IngestError;

/// Writes raw envelopes to the `raw` topic, key = device, so each device's events stay in order.
pub struct RawProducer {
    producer: FutureProducer,
    topic: String,
}

/// Where Kafka stored an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub partition: i32,
    pub offset: i64,
}

/// An event handed to the producer, not yet acknowledged.
pub struct Pending {
    delivery: DeliveryFuture,
}

impl Pending {
    /// Waits for Kafka's acknowledgement.
    pub async fn acked(self) -> Result<Stored, IngestError> {
        let (partition, offset) = kafka::delivered(self.delivery).await?;
        Ok(Stored { partition, offset })
    }
}

impl RawProducer {
    pub fn new(kafka: &KafkaConfig, client_id: &str) -> Result<Self, IngestError> {
        Ok(Self {
            producer: kafka.producer(client_id).create()?,
            topic: kafka.topics.raw.clone(),
        })
    }

    /// Hands one envelope to the producer. Waits (backpressure) while the producer's bounded queue is
    /// full; never drops.
    pub async fn enqueue(&self, envelope: &RawEnvelope) -> Result<Pending, IngestError> {
        let payload = avro::encode(envelope)?;
        self.enqueue_encoded(&envelope.device, &payload).await
    }

    /// Like [`enqueue`](Self::enqueue) for an already encoded envelope (retries keep the bytes).
    pub async fn enqueue_encoded(
        &self,
        device: &str,
        payload: &[u8],
    ) -> Result<Pending, IngestError> {
        let delivery = kafka::enqueue(&self.producer, &self.topic, None, device, payload).await?;
        Ok(Pending { delivery })
    }

    /// Encodes, sends and waits for Kafka's acknowledgement.
    pub async fn send(&self, envelope: &RawEnvelope) -> Result<Stored, IngestError> {
        self.enqueue(envelope).await?.acked().await
    }
}
