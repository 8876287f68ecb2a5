//! The producer of the `raw` topic: idempotent, compressed, keyed by device.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tributary_schemas::RawEnvelope;
use tributary_schemas::avro;
use tributary_schemas::kafka::KafkaConfig;

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
        match self.delivery.await {
            Ok(Ok(d)) => Ok(Stored {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((e, _))) => Err(IngestError::Kafka(e)),
            Err(_) => Err(IngestError::Kafka(KafkaError::Canceled)),
        }
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
        loop {
            let record = FutureRecord::to(&self.topic).key(device).payload(payload);
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(Pending { delivery }),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(IngestError::Kafka(e)),
            }
        }
    }

    /// Encodes, sends and waits for Kafka's acknowledgement.
    pub async fn send(&self, envelope: &RawEnvelope) -> Result<Stored, IngestError> {
        self.enqueue(envelope).await?.acked().await
    }
}
