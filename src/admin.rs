//! `tributary topics create`: every topic, explicitly, with its partition count.

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tributary_schemas::kafka::KafkaConfig;

pub async fn create_topics(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        kafka.admin().create().context("kafka admin client")?;
    let specs = kafka.topics.specs(kafka.partitions);
    let topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            let t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(1));
            let t = if s.compacted {
                t.set("cleanup.policy", "compact")
            } else {
                t
            };
            if s.keep_forever {
                t.set("retention.ms", "-1")
            } else {
                t
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .with_context(|| format!("creating topics on {}", kafka.brokers))?;
    for r in results {
        match r {
            Ok(name) => println!("created topic {name}"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                println!("topic {name} already exists")
            }
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}
