//! The topology in one place: which stages run, on what, wired how.
//!
//! ```text
//! devices ─HTTP─▶ http ─┐
//!                       ├─▶ raw ─▶ cleanse ─▶ telemetry ─▶ lake (Delta table `telemetry`)
//! devices ─MQTT─▶ mqtt ─┘                 └─▶ deadletter ─▶ lake (Delta table `deadletter`)
//! ```

use std::sync::Arc;

use anyhow::Context;
use clap::ValueEnum;
use tokio::task::JoinSet;
use tributary_ingest::http::HttpIngest;
use tributary_ingest::mqtt::MqttBridge;
use tributary_ingest::producer::RawProducer;
use tributary_lake::delta_sink::DeltaSink;
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::{DeadLetter, Reading};
use tributary_streams::cleanse::CleanseStage;

use crate::config::Config;

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// Every stage below, in one process.
    All,
    /// HTTP ingest (`POST /v1/telemetry`) → raw.
    Http,
    /// MQTT bridge (shared subscription) → raw.
    Mqtt,
    /// Cleanse: raw → telemetry + deadletter.
    Cleanse,
    /// Delta sinks: telemetry and deadletter → Delta tables.
    Lake,
}

impl Stage {
    fn includes(self, other: Stage) -> bool {
        self == Stage::All || self == other
    }
}

pub async fn run(config: Config, stage: Stage) -> anyhow::Result<()> {
    let registry = Arc::new(
        DeviceRegistry::load(&config.registry.path)
            .context("loading the device registry (create one with `tributary devices seed`)")?,
    );
    tracing::info!(devices = registry.len(), ?stage, "starting");
    let mut tasks: JoinSet<anyhow::Result<&'static str>> = JoinSet::new();
    if stage.includes(Stage::Http) || stage.includes(Stage::Mqtt) {
        let producer = Arc::new(RawProducer::new(&config.kafka, "tributary-ingest")?);
        if stage.includes(Stage::Http) {
            let http = HttpIngest::new(config.http.clone(), registry.clone(), producer.clone());
            tasks.spawn(async move {
                http.serve(std::future::pending()).await?;
                Ok("http")
            });
        }
        if stage.includes(Stage::Mqtt) {
            let bridge = MqttBridge::new(config.mqtt.clone(), registry.clone(), producer);
            tasks.spawn(async move {
                bridge.run().await?;
                Ok("mqtt")
            });
        }
    }
    if stage.includes(Stage::Cleanse) {
        let cleanse = CleanseStage::new(
            config.kafka.clone(),
            config.cleanse.clone(),
            registry.clone(),
        );
        tasks.spawn(async move {
            cleanse.run().await?;
            Ok("cleanse")
        });
    }
    if stage.includes(Stage::Lake) {
        let telemetry = DeltaSink::<Reading>::new(
            config.kafka.clone(),
            config.lake.clone(),
            config.kafka.topics.telemetry.clone(),
        );
        tasks.spawn(async move {
            telemetry.run().await?;
            Ok("lake-telemetry")
        });
        let deadletter = DeltaSink::<DeadLetter>::new(
            config.kafka.clone(),
            config.lake.clone(),
            config.kafka.topics.deadletter.clone(),
        );
        tasks.spawn(async move {
            deadletter.run().await?;
            Ok("lake-deadletter")
        });
    }
    tokio::select! {
        done = tasks.join_next() => {
            match done {
                Some(Ok(Ok(name))) => anyhow::bail!("stage {name} stopped"),
                Some(Ok(Err(e))) => Err(e.context("a stage failed")),
                Some(Err(e)) => Err(anyhow::anyhow!("a stage panicked: {e}")),
                None => Ok(()),
            }
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; stopping");
            tasks.abort_all();
            Ok(())
        }
    }
}
