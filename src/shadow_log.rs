//! The shadow endpoints' link to the shadow stage ([`ShadowLog`]): updates written to
//! `shadow-updates`, the stage's answers read back from `shadow-responses`, and every current
//! document followed from the compacted `shadows` topic into a [`ShadowView`].
//!
//! Each process that serves shadow endpoints reads every partition of `shadow-responses` from the
//! end it had at start (outside any consumer group: the answer to a request this process logged
//! may be in any partition), and hands each answer to the request waiting for it by request id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tributary_registry::follower;
use tributary_schemas::avro::{
    self, ShadowDocument, ShadowResponse, ShadowResponseKind, ShadowUpdate,
};
use tributary_schemas::kafka::{self, KafkaConfig};
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::shadows::{self, ShadowLog, ShadowLogError, ShadowView};

/// How long an accepted writer waits for its version to reach the view (read your writes).
const READ_YOUR_WRITE: Duration = Duration::from_secs(2);

type Waiting = Mutex<HashMap<String, oneshot::Sender<ShadowResponse>>>;

/// [`ShadowLog`] over Kafka.
pub struct KafkaShadowLog {
    producer: FutureProducer,
    topic: String,
    answer_timeout: Duration,
    waiting: Arc<Waiting>,
    view: Arc<ShadowView>,
    registry: Arc<DeviceRegistry>,
    kafka: KafkaConfig,
}

impl KafkaShadowLog {
    /// Loads every shadow into the view, starts following `shadows` and `shadow-responses`, and
    /// returns the log with the tasks that follow.
    pub async fn start(
        kafka: &KafkaConfig,
        answer_timeout: Duration,
        registry: Arc<DeviceRegistry>,
    ) -> anyhow::Result<(Arc<Self>, Vec<tokio::task::JoinHandle<()>>)> {
        let topics = &kafka.topics;
        let view = Arc::new(ShadowView::default());
        let waiting: Arc<Waiting> = Arc::default();
        let answers = tail_answers(kafka, &topics.shadow_responses, waiting.clone())
            .await
            .context("following the shadow stage's answers")?;
        let followed = view.clone();
        let (documents, n) = follower::follow_topic(kafka, &topics.shadows, move |m| {
            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                return;
            };
            match m.payload().map(avro::decode::<ShadowDocument>) {
                Some(Ok(doc)) => followed.apply(key, Some(doc)),
                Some(Err(e)) => {
                    tracing::error!(error = %e, offset = m.offset(), "unreadable shadow document skipped")
                }
                None => followed.apply(key, None),
            }
        })
        .await
        .context("loading the shadows from their topic")?;
        tracing::info!(records = n, shadows = view.len(), "shadows loaded");
        let log = Arc::new(Self {
            producer: kafka.producer("tributary-shadow-log").create()?,
            topic: topics.shadow_updates.clone(),
            answer_timeout,
            waiting,
            view,
            registry,
            kafka: kafka.clone(),
        });
        Ok((log, vec![answers, documents]))
    }

    async fn write(&self, update: &ShadowUpdate) -> Result<(), ShadowLogError> {
        let unavailable = |e: String| ShadowLogError::Unavailable(e);
        let value = avro::encode(update).map_err(|e| unavailable(e.to_string()))?;
        let key = shadows::key(&update.tenant, &update.device, &update.name);
        let delivery = kafka::enqueue(&self.producer, &self.topic, None, &key, &value)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        kafka::delivered(delivery)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(e.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<ShadowResponse>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ShadowLog for KafkaShadowLog {
    async fn submit(&self, update: ShadowUpdate) -> Result<ShadowResponse, ShadowLogError> {
        let (tx, rx) = oneshot::channel();
        // Waiting before it is written: the answer cannot come first.
        self.lock().insert(update.request_id.clone(), tx);
        if let Err(e) = self.write(&update).await {
            self.lock().remove(&update.request_id);
            return Err(e);
        }
        let answer = match tokio::time::timeout(self.answer_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                self.lock().remove(&update.request_id);
                return Err(ShadowLogError::NoAnswer(self.answer_timeout));
            }
        };
        if answer.kind == ShadowResponseKind::Accepted {
            let seen = self
                .view
                .wait_for(
                    &update.tenant,
                    &update.device,
                    &update.name,
                    answer.version,
                    READ_YOUR_WRITE,
                )
                .await;
            if !seen {
                tracing::warn!(device = %update.device, version = answer.version, "accepted shadow version not in the view yet");
            }
        }
        Ok(answer)
    }

    async fn record(&self, update: ShadowUpdate) -> Result<(), ShadowLogError> {
        self.write(&update).await
    }

    fn view(&self) -> &ShadowView {
        &self.view
    }

    fn deliveries(&self) -> Result<mpsc::Receiver<ShadowResponse>, ShadowLogError> {
        let consumer: StreamConsumer = self
            .kafka
            .consumer("shadow-delivery")
            // At most once per answer: a publisher that dies between reading an answer and
            // publishing it loses that one message (the delta stays retained on the broker from
            // its previous publication, and `…/get` always has the document).
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "true")
            // The group's first start reads the topic from its beginning: an answer written while
            // the group was still forming is published late, not lost, and the deltas of each
            // shadow come in order, so the one left retained is the latest.
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| ShadowLogError::Unavailable(e.to_string()))?;
        consumer
            .subscribe(&[&self.kafka.topics.shadow_responses])
            .map_err(|e| ShadowLogError::Unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        let Some(Ok(answer)) = m.payload().map(avro::decode::<ShadowResponse>)
                        else {
                            continue;
                        };
                        if tx.send(answer).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "shadow deliveries: kafka error; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(rx)
    }

    fn owner(&self, device: &str) -> Option<String> {
        self.registry.get(device).map(|d| d.tenant.clone())
    }
}

/// Reads every partition of `topic` from its current end, handing each answer to the request
/// waiting for it.
async fn tail_answers(
    kafka: &KafkaConfig,
    topic: &str,
    waiting: Arc<Waiting>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: StreamConsumer = kafka
        .reader(&format!("{topic}-answers-{}", std::process::id()))
        .create()?;
    let md = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
    })?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic `{topic}` does not exist; create it with `tributary topics create`"
    );
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        // The end as it is now, resolved here: a request logged after this returns is answered
        // past it.
        let (_, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(topic, p, Duration::from_secs(10))
        })?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    let topic = topic.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    let Some(Ok(answer)) = m.payload().map(avro::decode::<ShadowResponse>) else {
                        continue;
                    };
                    if answer.kind == ShadowResponseKind::Delta {
                        continue;
                    }
                    let waiter = waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&answer.request_id);
                    if let Some(tx) = waiter {
                        let _ = tx.send(answer);
                    }
                }
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "shadow answers: kafka error; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }))
}
