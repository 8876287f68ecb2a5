//! People's actions on incidents (from the query HTTP server's lifecycle API) written to
//! `incident-inputs`, under the incident's state key and in the partition the routing stage uses
//! for it, so the incident stage applies them in order with the incident's anomalies.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::OnceCell;
use tributary_query::incidents::IncidentActionLog;
use tributary_schemas::avro::{self, IncidentAction, IncidentInput};
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_streams::incidents::{input_partition, state_key};

/// Writes incident actions to the incident stage's input topic.
pub struct KafkaIncidentActions {
    producer: FutureProducer,
    topic: String,
    /// The topic's partition count, read once.
    partitions: OnceCell<i32>,
}

impl KafkaIncidentActions {
    pub fn new(kafka: &KafkaConfig) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            producer: kafka.producer("tributary-incident-actions").create()?,
            topic: kafka.topics.incident_inputs.clone(),
            partitions: OnceCell::new(),
        }))
    }

    async fn partitions(&self) -> Result<i32, String> {
        self.partitions
            .get_or_try_init(|| async {
                let md = tokio::task::block_in_place(|| {
                    self.producer
                        .client()
                        .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
                })
                .map_err(|e| format!("metadata of {}: {e}", self.topic))?;
                md.topics()
                    .iter()
                    .find(|t| t.name() == self.topic)
                    .map(|t| t.partitions().len() as i32)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("topic {} does not exist", self.topic))
            })
            .await
            .copied()
    }
}

#[async_trait]
impl IncidentActionLog for KafkaIncidentActions {
    async fn record(
        &self,
        tenant: &str,
        rule: &str,
        correlation_key: &str,
        action: IncidentAction,
    ) -> Result<(), String> {
        let key = state_key(tenant, rule, correlation_key);
        let partition = input_partition(&key, self.partitions().await?);
        let input = IncidentInput {
            tenant: tenant.to_owned(),
            rule: rule.to_owned(),
            key: correlation_key.to_owned(),
            anomaly: None,
            action: Some(action),
        };
        let value = avro::encode(&input).map_err(|e| e.to_string())?;
        let delivery = kafka::enqueue(&self.producer, &self.topic, Some(partition), &key, &value)
            .await
            .map_err(|e| e.to_string())?;
        kafka::delivered(delivery)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
