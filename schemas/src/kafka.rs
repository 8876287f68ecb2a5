//! Kafka client settings shared by every stage, so producers and consumers agree on them.

use std::sync::{Arc, Mutex};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use serde::{Deserialize, Serialize};

use crate::Topics;

/// `[kafka]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Partitions of every topic created by `tributary topics create`.
    pub partitions: i32,
    /// Prefix of every consumer group id (`<prefix>-cleanse`, `<prefix>-lake-telemetry`, …).
    pub group_prefix: String,
    /// This instance's name within each consumer group (static membership, `group.instance.id`):
    /// a restarted instance takes its partitions back at once instead of waiting for the session
    /// of its dead predecessor to expire. Give every instance of a stage its own.
    pub instance_id: String,
    pub topics: Topics,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            partitions: 3,
            group_prefix: "tributary".into(),
            instance_id: "1".into(),
            topics: Topics::default(),
        }
    }
}

impl KafkaConfig {
    /// Consumer group id of a stage.
    pub fn group_id(&self, stage: &str) -> String {
        format!("{}-{stage}", self.group_prefix)
    }

    /// An idempotent, compressed producer: acks=all, per-key order kept across retries.
    pub fn producer(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.timeout.ms", "30000");
        c
    }

    /// A group consumer with manual offset commits, starting at the earliest offset when the group has
    /// none.
    pub fn consumer(&self, stage: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", self.group_id(stage))
            .set(
                "group.instance.id",
                format!("{}-{}", self.group_id(stage), self.instance_id),
            )
            .set("client.id", format!("tributary-{stage}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range");
        c
    }

    /// A consumer outside any group, for reading a partition range by hand (state warm-up, checks).
    pub fn reader(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set(
                "group.id",
                format!("{}-reader-{client_id}", self.group_prefix),
            )
            .set("client.id", client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        c
    }

    /// An admin client.
    pub fn admin(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }
}

// A consumer context that records partition assignments and revocations, so a stage's loop can
// reset per-partition state between two `recv` calls.

/// A change of a consumer's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionChange {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// Records [`PartitionChange`]s for the stage loop to drain.
#[derive(Clone, Default)]
pub struct RecordingContext {
    changes: Arc<Mutex<Vec<PartitionChange>>>,
}

impl RecordingContext {
    /// The changes since the last call.
    pub fn drain(&self) -> Vec<PartitionChange> {
        match self.changes.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push(&self, change: PartitionChange) {
        match self.changes.lock() {
            Ok(mut c) => c.push(change),
            Err(poisoned) => poisoned.into_inner().push(change),
        }
    }
}

impl ClientContext for RecordingContext {}

impl ConsumerContext for RecordingContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(?parts, "partitions revoked");
            self.push(PartitionChange::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(?parts, "partitions assigned");
            self.push(PartitionChange::Assigned(parts));
        }
    }
}
