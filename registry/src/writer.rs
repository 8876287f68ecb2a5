//! Records registry changes on the `registry` topic (key = device id), then applies them to this
//! process's view, so a caller reads its own writes at once.

use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use tributary_schemas::avro;
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::registry::{DeviceRegistry, RegistryEvent};

use crate::RegistryError;

/// The only writer of the `registry` topic.
pub struct RegistryWriter {
    producer: FutureProducer,
    topic: String,
    view: Arc<DeviceRegistry>,
    /// Serialises read-modify-write of devices within this process.
    lock: tokio::sync::Mutex<()>,
}

impl RegistryWriter {
    pub fn new(kafka: &KafkaConfig, view: Arc<DeviceRegistry>) -> Result<Self, RegistryError> {
        Ok(Self {
            producer: kafka.producer("tributary-registry").create()?,
            topic: kafka.topics.registry.clone(),
            view,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn view(&self) -> &Arc<DeviceRegistry> {
        &self.view
    }

    /// Held while a caller reads a device, decides the change and records it.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Records events (all in flight at once), waits until Kafka acknowledged every one, then
    /// applies them to the view. On an error some may be recorded: each is a whole device state,
    /// so recording them again is harmless.
    pub async fn record(&self, events: &[RegistryEvent]) -> Result<(), RegistryError> {
        let mut pending = Vec::with_capacity(events.len());
        for e in events {
            let bytes = avro::encode(e)?;
            pending
                .push(kafka::enqueue(&self.producer, &self.topic, None, &e.device, &bytes).await?);
        }
        for result in futures::future::join_all(pending.into_iter().map(kafka::delivered)).await {
            result?;
        }
        for e in events {
            self.view.apply(e);
        }
        Ok(())
    }
}
