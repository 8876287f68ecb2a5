//! The topology in one place: which stages run, on what, wired how.
//!
//! ```text
//! devices ─HTTP─▶ http ─┐
//!                       ├─▶ raw ─▶ cleanse ─▶ telemetry ─▶ lake (Delta table `telemetry`)
//! devices ─MQTT─▶ mqtt ─┘  │              └─▶ deadletter ─▶ lake (Delta table `deadletter`)
//!                          └─▶ lake (Delta table `usage`: events and bytes per device and hour)
//!
//! admins ─HTTP─▶ http (/v1/devices…) ─▶ registry ─┬─▶ the registry view of http and mqtt (and
//!                                                 │   Mosquitto's password file)
//!                                                 └─▶ lake (Delta table `devices`)
//! admins ─HTTP─▶ http (/v1/tenants/{t}/catalog) ─▶ catalog ─▶ the metric catalog of cleanse
//! admins ─HTTP─▶ http (/v1/tenants/{t}/detectors) ─▶ detector-catalog ─▶ the detectors of anomalies
//! admins ─HTTP─▶ http (/v1/tenants/{t}/incident-rules) ─▶ incident-rules ─▶ the rules of incident-routing and incidents
//!
//! telemetry ─▶ anomalies ─▶ anomalies (topic: alerting consumers) ─▶ lake (Delta table `anomalies`)
//!                                  │
//!                                  └─▶ incidents: routing ─▶ incident-inputs (re-keyed by rule and
//!                                      site level / group / device) ─▶ correlation ─▶ incidents
//!                                      (topic: alerting consumers) ─▶ lake (Delta table `incidents`)
//!                                                                     └─▶ alerts ─▶ Alertmanager,
//!                                                                         webhooks per tenant
//! people ─HTTP─▶ query (/v1/incidents/{id}/acknowledge|snooze|resolve) ─▶ incident-inputs
//!
//! devices ─MQTT devices/{id}/shadow/…/update, HTTP /v1/devices/{id}/shadow─┐
//! apps ─HTTP─▶ query (/v1/devices/{id}/shadow, desired state) ─────────────┴─▶ shadow-updates
//!   ─▶ shadows stage ─┬─▶ shadows (compacted: each current document) ─┬─▶ the shadow view of
//!                     │   http, mqtt and query (GET /v1/devices/{id}/shadow)
//!                     │                                                └─▶ lake (Delta tables
//!                     │                                                    `shadows`, `shadow_history`)
//!                     └─▶ shadow-responses ─▶ the waiting HTTP request; mqtt ─▶ devices/{id}/
//!                         shadow/…/update/accepted|rejected|delta (delta retained)
//!
//! telemetry ─▶ timeseries ─line protocol─▶ InfluxDB 2/3 or VictoriaMetrics (tags from registry)
//!
//! data engineers ─psql / HTTP─▶ query (Postgres wire protocol, POST /v1/sql) ─▶ every lake table
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use futures::FutureExt;
use tokio::task::JoinSet;
use tributary_ingest::broker_credentials::BrokerCredentials;
use tributary_ingest::http::HttpIngest;
use tributary_ingest::mqtt::MqttBridge;
use tributary_ingest::producer::RawProducer;
use tributary_lake::delta_sink::DeltaSink;
use tributary_lake::tables::LakeRow;
use tributary_lake::tables::devices::DeviceState;
use tributary_lake::tables::shadows::{ShadowRow, ShadowVersion};
use tributary_lake::tables::usage::UsageEvent;
use tributary_lake::timeseries_sink::TimeSeriesSink;
use tributary_query::QueryService;
use tributary_query::http::SqlHttp;
use tributary_query::pg::PgServer;
use tributary_registry::api::RegistryApi;
use tributary_registry::catalog::CatalogWriter;
use tributary_registry::detectors::DetectorWriter;
use tributary_registry::follower;
use tributary_registry::incident_rules::IncidentRuleWriter;
use tributary_registry::self_registration::SelfRegistration;
use tributary_registry::writer::RegistryWriter;
use tributary_schemas::avro::{Anomaly, Incident};
use tributary_schemas::catalog::CatalogOverrides;
use tributary_schemas::detectors::DetectorOverrides;
use tributary_schemas::incidents::IncidentRuleOverrides;
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::shadows::ShadowLogHandle;
use tributary_schemas::{DeadLetter, Reading};
use tributary_streams::StreamError;
use tributary_streams::alerts::AlertDelivery;
use tributary_streams::anomaly::AnomalyStage;
use tributary_streams::cleanse::CleanseStage;
use tributary_streams::incidents::{IncidentRouting, IncidentStage};
use tributary_streams::shadows::ShadowStage;

use crate::config::Config;
use crate::incident_actions::KafkaIncidentActions;
use crate::shadow_log::KafkaShadowLog;

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// Every stage below, in one process.
    All,
    /// HTTP API: ingest (`POST /v1/telemetry`) → raw, and the device admin API → registry.
    Http,
    /// MQTT bridge (shared subscription) → raw.
    Mqtt,
    /// Cleanse: raw → telemetry + deadletter.
    Cleanse,
    /// Anomaly detection: telemetry → anomalies (the `[anomalies]` detector catalog).
    Anomalies,
    /// Incidents: anomalies → incident-inputs (routing by rule) → incidents (the `[incidents]`
    /// rules).
    Incidents,
    /// Alert delivery: incidents → Alertmanager and webhooks (`[alerts]`).
    Alerts,
    /// Device shadows: shadow-updates → shadows + shadow-responses (`[shadows]`), the single
    /// writer of every shadow.
    Shadows,
    /// Delta sinks: telemetry, deadletter, anomalies, incidents, registry (→ `devices`), raw (→ `usage`)
    /// and shadows (→ `shadows`, `shadow_history`) → Delta tables.
    Lake,
    /// Time-series sink: telemetry → an InfluxDB-2-compatible write API (`[timeseries]`).
    Timeseries,
    /// SQL over the lake for `[query.users]`: Postgres wire protocol and `POST /v1/sql`.
    Query,
}

/// The stages one process runs.
struct Selection(Vec<Stage>);

impl Selection {
    fn includes(&self, other: Stage) -> bool {
        self.0.iter().any(|s| *s == Stage::All || *s == other)
    }
}

/// Runs `stages` (all of them when empty) until interrupted or one fails for good.
pub async fn run(config: Config, stages: &[Stage]) -> anyhow::Result<()> {
    let stage = Selection(if stages.is_empty() {
        vec![Stage::All]
    } else {
        stages.to_vec()
    });
    tracing::info!(stages = ?stage.0, "starting");
    let mut tasks: JoinSet<anyhow::Result<&'static str>> = JoinSet::new();
    // Tenants' catalogs set through the API: the admin API (http) and cleanse read them.
    let catalogs = Arc::new(CatalogOverrides::default());
    if stage.includes(Stage::Http) || stage.includes(Stage::Cleanse) {
        let follower = follower::follow_catalog(&config.kafka, catalogs.clone())
            .await
            .context("loading the tenants' catalogs from their topic")?;
        tasks.spawn(async move {
            follower.await?;
            Ok("catalog follower")
        });
    }
    // Tenants' detectors set through the API: the admin API (http) and the anomaly stage.
    let detectors = Arc::new(DetectorOverrides::default());
    if stage.includes(Stage::Http) || stage.includes(Stage::Anomalies) {
        let follower = follower::follow_detectors(&config.kafka, detectors.clone())
            .await
            .context("loading the tenants' detectors from their topic")?;
        tasks.spawn(async move {
            follower.await?;
            Ok("detector follower")
        });
    }
    // Tenants' incident rules set through the API: the admin API (http) and the incident stages.
    let incident_rules = Arc::new(IncidentRuleOverrides::default());
    if stage.includes(Stage::Http) || stage.includes(Stage::Incidents) {
        let follower = follower::follow_incident_rules(&config.kafka, incident_rules.clone())
            .await
            .context("loading the tenants' incident rules from their topic")?;
        tasks.spawn(async move {
            follower.await?;
            Ok("incident rule follower")
        });
    }
    // The config file's detectors (checked with the config), under the API's.
    let detector_base = config.anomalies.base(config.cleanse.metric_names());
    let timeseries = stage.includes(Stage::Timeseries) && config.timeseries.enabled();
    if stage.0.contains(&Stage::Timeseries) && !config.timeseries.enabled() {
        anyhow::bail!("stage timeseries needs a store: set `timeseries.url`");
    }
    // Ingest authenticates devices and stamps their tenant, the time-series sink tags points with
    // their site: they need the whole registry first.
    let registry = Arc::new(DeviceRegistry::new());
    // The shadow endpoints (device HTTP, MQTT, the apps' query HTTP) share one link to the shadow
    // stage; apps may only touch their tenant's devices, so they need the registry too. Ingest
    // needs Kafka anyway and links before it serves; a query server alone serves SQL without
    // Kafka and links in the background (its shadow routes answer 503 until then).
    let query_http = stage.includes(Stage::Query)
        && !config.query.users.is_empty()
        && !config.query.http_listen.is_empty();
    let ingest = stage.includes(Stage::Http) || stage.includes(Stage::Mqtt);
    if ingest || timeseries {
        let follower = follower::follow(&config.kafka, registry.clone())
            .await
            .context("loading the device registry from its topic")?;
        tasks.spawn(async move {
            follower.await?;
            Ok("registry follower")
        });
    }
    let shadow_log = ShadowLogHandle::default();
    let answer_wait = Duration::from_millis(config.shadows.answer_timeout_ms);
    if ingest {
        let (log, followers) =
            KafkaShadowLog::start(&config.kafka, answer_wait, registry.clone()).await?;
        shadow_log.set(log);
        for follower in followers {
            tasks.spawn(async move {
                follower.await?;
                Ok("shadow follower")
            });
        }
    } else if query_http {
        let (kafka, registry, handle) =
            (config.kafka.clone(), registry.clone(), shadow_log.clone());
        tasks.spawn(async move {
            let followers = loop {
                let linked = async {
                    let registry_follower = follower::follow(&kafka, registry.clone()).await?;
                    let (log, mut tasks) =
                        KafkaShadowLog::start(&kafka, answer_wait, registry.clone()).await?;
                    tasks.push(registry_follower);
                    anyhow::Ok((log, tasks))
                };
                match linked.await {
                    Ok((log, tasks)) => {
                        handle.set(log);
                        tracing::info!("shadow endpoints linked to the shadow stage");
                        break tasks;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "shadow endpoints not linked yet (Kafka); retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            };
            for f in followers {
                f.await?;
            }
            Ok("shadow follower")
        });
    }
    let shadow_limits = config.shadows.limits();
    if timeseries {
        let sink = Arc::new(TimeSeriesSink::new(
            config.kafka.clone(),
            config.timeseries.clone(),
            config.kafka.topics.telemetry.clone(),
            registry.clone(),
        ));
        supervise(&mut tasks, "timeseries", move || {
            let sink = sink.clone();
            async move { Ok(sink.run().await?) }
        });
    } else if stage.includes(Stage::Timeseries) {
        tracing::info!("no time-series store configured (`timeseries.url` is empty)");
    }
    if stage.includes(Stage::Http) || stage.includes(Stage::Mqtt) {
        if stage.includes(Stage::Mqtt)
            && let Some(credentials) = BrokerCredentials::new(&config.mqtt, registry.clone())
        {
            // Before any endpoint opens: every registered device can log in to the broker.
            credentials
                .write()
                .context("writing the MQTT broker's password file")?;
            tasks.spawn(async move {
                credentials.run(Duration::from_secs(1)).await?;
                Ok("broker credentials")
            });
        }
        let producer = Arc::new(RawProducer::new(&config.kafka, "tributary-ingest")?);
        if stage.includes(Stage::Http) {
            let writer = Arc::new(RegistryWriter::new(&config.kafka, registry.clone())?);
            let catalog = Arc::new(CatalogWriter::new(
                &config.kafka,
                config.cleanse.catalog_base(),
                catalogs.clone(),
            )?);
            let detectors = Arc::new(DetectorWriter::new(
                &config.kafka,
                detector_base.clone(),
                detectors.clone(),
            )?);
            let rules = Arc::new(IncidentRuleWriter::new(
                &config.kafka,
                config.incidents.base(),
                incident_rules.clone(),
            )?);
            let admin = RegistryApi::new(
                writer.clone(),
                catalog,
                detectors,
                rules,
                config.registry.admin_token.as_deref(),
            );
            let mut http = HttpIngest::new(config.http.clone(), registry.clone(), producer.clone())
                .with_admin(&admin);
            if let Some(log) = shadow_log.get() {
                http = http.with_shadows(log, shadow_limits);
            }
            if !config.registry.tenant_keys.is_empty() {
                let sr = SelfRegistration::new(&config.registry.tenant_keys, writer)?;
                http = http.with_self_registration(Arc::new(sr));
            }
            tasks.spawn(async move {
                http.serve(std::future::pending()).await?;
                Ok("http")
            });
        }
        if stage.includes(Stage::Mqtt) {
            let mut bridge = MqttBridge::new(config.mqtt.clone(), registry.clone(), producer);
            if let Some(log) = shadow_log.get() {
                bridge = bridge.with_shadows(log, shadow_limits);
            }
            let bridge = Arc::new(bridge);
            supervise(&mut tasks, "mqtt", move || {
                let bridge = bridge.clone();
                async move { Ok(bridge.run().await?) }
            });
        }
    }
    if stage.includes(Stage::Cleanse) {
        let cleanse = Arc::new(CleanseStage::new(
            config.kafka.clone(),
            config.cleanse.clone(),
            catalogs.clone(),
        ));
        supervise(&mut tasks, "cleanse", move || {
            let cleanse = cleanse.clone();
            async move { Ok(cleanse.run().await?) }
        });
    }
    if stage.includes(Stage::Anomalies) {
        // With no detector anywhere yet it waits, outside its consumer group, for the first.
        let anomalies = Arc::new(AnomalyStage::new(
            config.kafka.clone(),
            config.anomalies.clone(),
            detector_base,
            detectors,
        ));
        supervise(&mut tasks, "anomalies", move || {
            let anomalies = anomalies.clone();
            async move { Ok(anomalies.run().await?) }
        });
    }
    if stage.includes(Stage::Incidents) {
        // With no rule anywhere yet (config file or admin API) both wait for the first.
        let routing = Arc::new(IncidentRouting::new(
            config.kafka.clone(),
            config.incidents.clone(),
            incident_rules.clone(),
        ));
        supervise(&mut tasks, "incident-routing", move || {
            let routing = routing.clone();
            async move { Ok(routing.run().await?) }
        });
        let incidents = Arc::new(IncidentStage::new(
            config.kafka.clone(),
            config.incidents.clone(),
            incident_rules.clone(),
        ));
        supervise(&mut tasks, "incidents", move || {
            let incidents = incidents.clone();
            async move { Ok(incidents.run().await?) }
        });
    }
    if stage.includes(Stage::Alerts) {
        if config.alerts.enabled() {
            let delivery = Arc::new(AlertDelivery::new(
                config.kafka.clone(),
                config.alerts.clone(),
            ));
            supervise(&mut tasks, "alerts", move || {
                let delivery = delivery.clone();
                async move { Ok(delivery.run().await?) }
            });
        } else if stage.0.contains(&Stage::Alerts) {
            anyhow::bail!(
                "stage alerts needs a receiver: set `alerts.alertmanager_url` or `[alerts.webhooks.<name>]`"
            );
        } else {
            tracing::info!("no alert receivers ([alerts]): incidents are delivered to none");
        }
    }
    if stage.includes(Stage::Shadows) {
        let shadows = Arc::new(ShadowStage::new(config.kafka.clone(), config.shadows));
        supervise(&mut tasks, "shadows", move || {
            let shadows = shadows.clone();
            async move { Ok(shadows.run().await?) }
        });
    }
    if stage.includes(Stage::Query) {
        let explicit = stage.0.contains(&Stage::Query);
        spawn_query(
            &mut tasks,
            &config,
            explicit,
            query_http.then(|| shadow_log.clone()),
        )?;
    }
    if stage.includes(Stage::Lake) {
        let topics = &config.kafka.topics;
        spawn_sink::<Reading>(&mut tasks, &config, &topics.telemetry, "lake-telemetry");
        spawn_sink::<DeadLetter>(&mut tasks, &config, &topics.deadletter, "lake-deadletter");
        spawn_sink::<Anomaly>(&mut tasks, &config, &topics.anomalies, "lake-anomalies");
        spawn_sink::<Incident>(&mut tasks, &config, &topics.incidents, "lake-incidents");
        spawn_sink::<DeviceState>(&mut tasks, &config, &topics.registry, "lake-devices");
        spawn_sink::<UsageEvent>(&mut tasks, &config, &topics.raw, "lake-usage");
        spawn_sink::<ShadowRow>(&mut tasks, &config, &topics.shadows, "lake-shadows");
        spawn_sink::<ShadowVersion>(&mut tasks, &config, &topics.shadows, "lake-shadow-history");
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

/// The SQL endpoints; with no `[query.users]` they are not started (an explicit `run query` fails).
fn spawn_query(
    tasks: &mut JoinSet<anyhow::Result<&'static str>>,
    config: &Config,
    explicit: bool,
    shadows: Option<ShadowLogHandle>,
) -> anyhow::Result<()> {
    let query = &config.query;
    if query.users.is_empty() {
        if explicit {
            anyhow::bail!("stage query needs users: configure `[query.users.<name>]`");
        }
        tracing::info!("no `[query.users]`: the SQL endpoints are not started");
        return Ok(());
    }
    let service = Arc::new(QueryService::new(config.lake.clone(), query.limits()));
    if !query.http_listen.is_empty() {
        let mut http = SqlHttp::new(service.clone(), query.clone())
            .with_openapi(tributary_ingest::http::OPENAPI)
            .with_incidents(KafkaIncidentActions::new(&config.kafka)?);
        if let Some(log) = shadows {
            http = http.with_shadows(log, config.shadows.limits());
        }
        let listen = query.http_listen.clone();
        tasks.spawn(async move {
            http.serve(&listen)
                .await
                .with_context(|| format!("sql over http on {listen}"))?;
            Ok("query http")
        });
    }
    if !query.pg_listen.is_empty() {
        let pg = PgServer::new(service, query.clone());
        let listen = query.pg_listen.clone();
        tasks.spawn(async move {
            pg.serve(&listen)
                .await
                .with_context(|| format!("postgres wire protocol on {listen}"))?;
            Ok("query pg")
        });
    }
    Ok(())
}

/// A supervised Delta sink draining `topic` into `R`'s table.
fn spawn_sink<R: LakeRow>(
    tasks: &mut JoinSet<anyhow::Result<&'static str>>,
    config: &Config,
    topic: &str,
    name: &'static str,
) {
    let sink = Arc::new(DeltaSink::<R>::new(
        config.kafka.clone(),
        config.lake.clone(),
        topic.to_owned(),
    ));
    supervise(tasks, name, move || {
        let sink = sink.clone();
        async move { Ok(sink.run().await?) }
    });
}

/// Runs a stage; when it fails (Kafka gone, storage error, a record it failed on, a panic: each an
/// error here) logs why and starts it again after a growing pause. A restarted stage resumes from
/// its committed state (consumer group offsets, the table's `txn` versions), exactly as after a
/// crash, so neither a broker outage nor a bug hit by one device's input takes the process (and
/// with it the ingest endpoints of every tenant) down.
fn supervise<F, Fut>(
    tasks: &mut JoinSet<anyhow::Result<&'static str>>,
    name: &'static str,
    mut start: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tasks.spawn(async move {
        let mut pause = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let run = std::panic::AssertUnwindSafe(start()).catch_unwind().await;
            let outcome = run.unwrap_or_else(|panic| {
                Err(anyhow::anyhow!(
                    "panicked: {}",
                    tributary_streams::containment::panic_message(panic.as_ref())
                ))
            });
            match outcome {
                Ok(()) => return Ok(name),
                // One record failed (not the stage's world): start again at once, so a device
                // sending many poisoned records slows its partition, not everyone's for minutes.
                Err(e)
                    if e.downcast_ref::<StreamError>()
                        .is_some_and(|e| matches!(e, StreamError::RecordFailed(_))) =>
                {
                    tracing::warn!(stage = name, error = format!("{e:#}"), "stage restarting after a record failed it");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(120) {
                        pause = Duration::from_secs(1);
                    }
                    tracing::error!(stage = name, error = format!("{e:#}"), retry_in = ?pause, "stage failed; restarting it");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}
