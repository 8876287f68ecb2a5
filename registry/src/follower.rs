//! Rebuilds a process's registry view from the `registry` topic and keeps it current (and the same
//! for the tenants' metric catalogs and detectors set through the API, from the `catalog` and
//! `detector-catalog` topics).
//!
//! The follower reads every partition from the beginning, outside any consumer group (every
//! process needs every device), applies each event in order, and reports ready once it reached the
//! end the topic had when it started. Then it keeps applying new events as they arrive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tributary_schemas::avro::{self, TopicRecord};
use tributary_schemas::catalog::{CatalogEvent, CatalogOverrides};
use tributary_schemas::detectors::{DetectorEvent, DetectorOverrides};
use tributary_schemas::incidents::{IncidentRuleOverrides, IncidentRulesEvent};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::registry::{DeviceRegistry, RegistryEvent};

use crate::RegistryError;

/// How long the catch-up waits without any record before it trusts the watermarks it saw (a
/// partition's high watermark can sit past its last readable record).
const IDLE_CATCH_UP: Duration = Duration::from_secs(5);

/// After the watermarks: how long without a record before the view counts as whole.
const TAIL_SETTLE: Duration = Duration::from_millis(300);

/// Loads the whole registry into `view`, then follows the topic in a background task. Returns
/// once the view holds every device the topic held at the start.
pub async fn follow(
    kafka: &KafkaConfig,
    view: Arc<DeviceRegistry>,
) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
    let topic = kafka.topics.registry.clone();
    let (handle, events) = follow_topic(kafka, &topic, move |m| apply(&view, m)).await?;
    tracing::info!(events, "device registry loaded");
    Ok(handle)
}

/// Loads every tenant's catalog set through the API into `overrides`, then follows the `catalog`
/// topic in a background task.
pub async fn follow_catalog(
    kafka: &KafkaConfig,
    overrides: Arc<CatalogOverrides>,
) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
    follow_events::<CatalogEvent>(kafka, &kafka.topics.catalog, "tenant catalogs", move |e| {
        overrides.apply(e)
    })
    .await
}

/// Loads every tenant's detectors set through the API into `overrides`, then follows the
/// `detector-catalog` topic in a background task.
pub async fn follow_detectors(
    kafka: &KafkaConfig,
    overrides: Arc<DetectorOverrides>,
) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
    let topic = &kafka.topics.detector_catalog;
    follow_events::<DetectorEvent>(kafka, topic, "tenant detectors", move |e| {
        overrides.apply(e)
    })
    .await
}

/// Follows the tenants' incident rules on `incident-rules` into `overrides`.
pub async fn follow_incident_rules(
    kafka: &KafkaConfig,
    overrides: Arc<IncidentRuleOverrides>,
) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
    let topic = &kafka.topics.incident_rules;
    follow_events::<IncidentRulesEvent>(kafka, topic, "tenant incident rules", move |e| {
        overrides.apply(e)
    })
    .await
}

/// Follows a compacted topic of Avro records `E` (see [`follow_topic`]); an unreadable record is
/// logged and skipped.
async fn follow_events<E: TopicRecord>(
    kafka: &KafkaConfig,
    topic: &str,
    what: &'static str,
    apply: impl Fn(&E) + Send + Sync + 'static,
) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
    let (handle, events) = follow_topic(kafka, topic, move |m| {
        match m.payload().map(avro::decode::<E>) {
            Some(Ok(event)) => apply(&event),
            Some(Err(e)) => {
                tracing::error!(error = %e, offset = m.offset(), what, "unreadable event skipped")
            }
            None => {}
        }
    })
    .await?;
    tracing::info!(events, "{what} loaded");
    Ok(handle)
}

/// Reads a compacted topic from the start into `apply`, returns once it reached the end the topic
/// had (with how many records it read), and keeps applying new records in a background task.
pub async fn follow_topic(
    kafka: &KafkaConfig,
    topic: &str,
    apply: impl Fn(&BorrowedMessage<'_>) + Send + Sync + 'static,
) -> Result<(tokio::task::JoinHandle<()>, u64), RegistryError> {
    let topic = topic.to_owned();
    let consumer: StreamConsumer = kafka
        .reader(&format!("{topic}-{}", std::process::id()))
        .create()?;
    // Blocking librdkafka calls, off the async workers.
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))
    })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(RegistryError::NoTopic(topic));
    }
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        let (low, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))
        })?;
        if high > low {
            remaining.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    let mut applied = 0u64;
    while !remaining.is_empty() {
        match tokio::time::timeout(IDLE_CATCH_UP, consumer.recv()).await {
            Ok(Ok(m)) => {
                apply(&m);
                applied += 1;
                if remaining
                    .get(&m.partition())
                    .is_some_and(|&high| m.offset() + 1 >= high)
                {
                    remaining.remove(&m.partition());
                }
            }
            Ok(Err(e)) => return Err(RegistryError::Kafka(e)),
            Err(_) => {
                tracing::warn!(%topic, partitions = ?remaining.keys().collect::<Vec<_>>(), "catch-up idle before the high watermark; going on with what was read");
                break;
            }
        }
    }
    // Tansu 0.6 reports a high watermark inside the last record batch; that batch's later records
    // are served all the same. Take what follows at once, so the view is whole before serving.
    while let Ok(Ok(m)) = tokio::time::timeout(TAIL_SETTLE, consumer.recv()).await {
        apply(&m);
        applied += 1;
    }
    let handle = tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(m) => apply(&m),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "follower: kafka error; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok((handle, applied))
}

fn apply(view: &DeviceRegistry, m: &impl Message) {
    match m.payload().map(avro::decode::<RegistryEvent>) {
        Some(Ok(event)) => view.apply(&event),
        Some(Err(e)) => {
            tracing::error!(error = %e, partition = m.partition(), offset = m.offset(), "unreadable registry event skipped");
        }
        // A tombstone: the key's device is gone.
        None => {
            if let Some(Ok(device)) = m.key().map(std::str::from_utf8) {
                view.remove(device);
            }
        }
    }
}
