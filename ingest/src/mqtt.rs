//! The MQTT bridge: subscribes with an MQTT 5 shared subscription to the device telemetry topics and
//! acknowledges each QoS 1 message, in arrival order, only after Kafka acknowledged its envelope.
//!
//! The session is persistent (`clean_start = false` and a session expiry), so messages published
//! while the bridge is down are delivered when it returns, and unacknowledged ones are redelivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tributary_schemas::avro::{ShadowOrigin, ShadowResponse, ShadowResponseKind, ShadowUpdate};
use tributary_schemas::payload::{self, BodyFormat};
use tributary_schemas::registry::DeviceRegistry;
use tributary_schemas::shadows::{self, Limits, MqttRequest, ShadowLog};
use tributary_schemas::{RawEnvelope, Source, now_micros};

use crate::IngestError;
use crate::producer::{Pending, RawProducer};

/// How often, at most, the bridge logs how many messages it has acknowledged while busy.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `[mqtt]` in the config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Client id of this bridge instance; each instance needs its own.
    #[serde(deserialize_with = "tributary_schemas::config_value::text")]
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Device topics; `{device}` marks the segment holding the device id.
    pub topic_pattern: String,
    /// Shared subscription group: instances in one group split the load.
    pub share_group: String,
    /// How long the broker keeps the bridge's session (and queues its messages) while it is away.
    pub session_expiry_secs: u32,
    /// Most unacknowledged messages the broker sends at once.
    pub receive_maximum: u16,
    /// Mosquitto's password file, kept equal to `static_password_file` plus every enabled device of
    /// the registry that has a token (see [`crate::broker_credentials`]). Unset: not managed.
    pub password_file: Option<std::path::PathBuf>,
    /// Users the broker always knows (the bridge itself, …), in password-file format.
    pub static_password_file: Option<std::path::PathBuf>,
    /// Mosquitto's pid file: it gets SIGHUP after each rewrite, which makes it reload the file.
    pub broker_pid_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_pattern", &self.topic_pattern)
            .field("share_group", &self.share_group)
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "tributary-bridge-1".into(),
            username: Some("tributary-bridge".into()),
            password: None,
            topic_pattern: "devices/{device}/telemetry".into(),
            share_group: "tributary".into(),
            session_expiry_secs: 3600,
            receive_maximum: 1000,
            password_file: None,
            static_password_file: None,
            broker_pid_file: None,
        }
    }
}

impl MqttConfig {
    /// The subscription filter: the pattern with `+` for the device, shared by `share_group`.
    pub fn shared_filter(&self) -> String {
        format!(
            "$share/{}/{}",
            self.share_group,
            self.topic_pattern.replace("{device}", "+")
        )
    }

    /// The topic a device publishes to.
    pub fn device_topic(&self, device: &str) -> String {
        self.topic_pattern.replace("{device}", device)
    }

    /// The device id in a topic, if the topic matches the pattern.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let pattern: Vec<&str> = self.topic_pattern.split('/').collect();
        let parts: Vec<&str> = topic.split('/').collect();
        if pattern.len() != parts.len() {
            return None;
        }
        let mut device = None;
        for (p, t) in pattern.iter().zip(&parts) {
            match *p {
                "{device}" if !t.is_empty() => device = Some(*t),
                "+" => {}
                lit if lit == *t => {}
                _ => return None,
            }
        }
        device
    }
}

/// The bridge from the MQTT broker to the `raw` topic (and, with shadows, the devices' shadow
/// requests to the shadow log and the shadow stage's answers back to the devices).
#[derive(Clone)]
pub struct MqttBridge {
    config: MqttConfig,
    registry: Arc<DeviceRegistry>,
    producer: Arc<RawProducer>,
    shadows: Option<(Arc<dyn ShadowLog>, Limits)>,
}

/// A received message waiting for Kafka's acknowledgement before its PUBACK.
struct InFlight {
    publish: Publish,
    device: String,
    encoded: Vec<u8>,
    pending: Pending,
}

impl MqttBridge {
    pub fn new(
        config: MqttConfig,
        registry: Arc<DeviceRegistry>,
        producer: Arc<RawProducer>,
    ) -> Self {
        Self {
            config,
            registry,
            producer,
            shadows: None,
        }
    }

    /// Also bridges device shadows: requests on `devices/{id}/shadow[/name/{n}]/update|get` to
    /// `log`, answers to `…/update/accepted|rejected|delta` (the delta retained, so a device that
    /// was offline gets the current one when it subscribes) and `…/get/accepted|rejected`.
    pub fn with_shadows(mut self, log: Arc<dyn ShadowLog>, limits: Limits) -> Self {
        self.shadows = Some((log, limits));
        self
    }

    fn envelope(&self, publish: &Publish, device: &str) -> RawEnvelope {
        let known = self.registry.get(device);
        let content_type = publish
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref())
            .and_then(BodyFormat::from_content_type)
            .unwrap_or(BodyFormat::Json);
        let id = match content_type {
            BodyFormat::SenmlJson => None,
            _ => payload::split_body(BodyFormat::Json, &publish.payload)
                .ok()
                .and_then(|mut m| {
                    if m.len() == 1 {
                        m.pop().and_then(|m| m.id)
                    } else {
                        None
                    }
                }),
        };
        RawEnvelope {
            event_id: id.unwrap_or_else(|| payload::content_event_id(device, &publish.payload)),
            tenant: known.as_ref().map(|d| d.tenant.clone()).unwrap_or_default(),
            device: device.to_owned(),
            source: Source::Mqtt,
            received_at: now_micros(),
            content_type: content_type.message_content_type().to_owned(),
            payload: publish.payload.to_vec(),
            subject: known.as_ref().and_then(|d| d.subject.clone()),
            encryption_key_id: None,
            replayed_at: None,
            replay_measurements: None,
            device_group: known.as_ref().and_then(|d| d.group.clone()),
            device_model: known.as_ref().and_then(|d| d.model.clone()),
            site: known.as_ref().map(|d| d.site.clone()).unwrap_or_default(),
        }
    }

    /// Runs until the task is cancelled. Reconnects on its own.
    ///
    /// Three tasks joined by FIFOs, so the MQTT event loop never waits for Kafka: the event loop
    /// (this function) only reads the connection, answers pings and hands each publish on; the
    /// producer task envelopes and enqueues (and may wait for room in the producer's queue); the
    /// acknowledgement task waits for Kafka's ack of each message in arrival order, then queues its
    /// PUBACK. The FIFOs are unbounded in type but bounded in fact: the broker sends at most
    /// `mqtt.receive_maximum` unacknowledged messages. (An event loop that waited on Kafka went
    /// silent during a broker stall, was dropped by Mosquitto for missing keep-alives and then never
    /// polled again once its PUBACK queue filled.)
    pub async fn run(&self) -> Result<(), IngestError> {
        let mut options =
            MqttOptions::new(&self.config.client_id, &self.config.host, self.config.port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(self.config.session_expiry_secs))
            .set_receive_maximum(Some(self.config.receive_maximum))
            .set_manual_acks(true)
            .set_max_packet_size(Some(payload::MAX_MQTT_PACKET_BYTES))
            .set_keep_alive(Duration::from_secs(15));
        if let Some(user) = &self.config.username {
            options.set_credentials(
                user.clone(),
                self.config.password.clone().unwrap_or_default(),
            );
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let filter = self.config.shared_filter();
        let (received_tx, mut received) = mpsc::unbounded_channel::<Publish>();
        let (inflight_tx, mut inflight) = mpsc::unbounded_channel::<InFlight>();

        let acker = {
            let client = client.clone();
            let producer = self.producer.clone();
            tokio::spawn(async move {
                // Progress for operators (and for telling instances of a shared subscription apart).
                let (mut acked, mut last_report) = (0u64, Instant::now());
                while let Some(f) = inflight.recv().await {
                    let InFlight {
                        publish,
                        device,
                        encoded,
                        pending,
                    } = f;
                    let mut pending = Some(pending);
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        let result = match pending.take() {
                            Some(p) => p.acked().await,
                            None => match producer.enqueue_encoded(&device, &encoded).await {
                                Ok(p) => p.acked().await,
                                Err(e) => Err(e),
                            },
                        };
                        match result {
                            Ok(_) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, device = %device, "raw produce failed; holding PUBACK and retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                    if let Err(e) = client.ack(&publish).await {
                        tracing::warn!(error = %e, "cannot queue PUBACK");
                    }
                    acked += 1;
                    let since = last_report.elapsed();
                    if since >= PROGRESS_EVERY
                        || (inflight.is_empty() && since >= Duration::from_secs(1))
                    {
                        tracing::info!(acked, "mqtt bridge: messages in raw and acknowledged");
                        last_report = Instant::now();
                    }
                }
            })
        };

        // Shadow requests, in arrival order, on their own task: each is logged, then acknowledged.
        let (shadow_tx, shadow_rx) = match &self.shadows {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel::<Publish>();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let shadow_tasks = match (&self.shadows, shadow_rx) {
            (Some((log, limits)), Some(rx)) => {
                let requests = tokio::spawn(shadow_requests(
                    client.clone(),
                    self.registry.clone(),
                    log.clone(),
                    *limits,
                    rx,
                ));
                let deliveries = log
                    .deliveries()
                    .map_err(|e| IngestError::Mqtt(e.to_string()))?;
                let answers = tokio::spawn(shadow_answers(client.clone(), deliveries));
                vec![requests.abort_handle(), answers.abort_handle()]
            }
            _ => Vec::new(),
        };
        let _shadow_tasks = AbortAll(shadow_tasks);
        let enqueuer = {
            let bridge = self.clone();
            tokio::spawn(async move {
                while let Some(publish) = received.recv().await {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if let Some(requests) = &shadow_tx
                        && shadows::parse_mqtt_topic(&topic).is_some()
                    {
                        if requests.send(publish).is_err() {
                            break;
                        }
                        continue;
                    }
                    let device = bridge
                        .config
                        .device_of(&topic)
                        .unwrap_or_default()
                        .to_owned();
                    if device.is_empty() {
                        tracing::warn!(%topic, "topic does not match mqtt.topic_pattern; recorded with no device");
                    }
                    let envelope = bridge.envelope(&publish, &device);
                    let encoded = tributary_schemas::avro::encode(&envelope)?;
                    let pending = loop {
                        match bridge.producer.enqueue_encoded(&device, &encoded).await {
                            Ok(p) => break p,
                            Err(e) => {
                                tracing::warn!(error = %e, "raw produce refused; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    };
                    if publish.qos == QoS::AtMostOnce {
                        continue;
                    }
                    let f = InFlight {
                        publish,
                        device,
                        encoded,
                        pending,
                    };
                    if inflight_tx.send(f).is_err() {
                        break;
                    }
                }
                Ok::<(), IngestError>(())
            })
        };

        // The tasks go with this function (a restarted bridge starts its own; the broker redelivers
        // what was not acknowledged).
        let _tasks = AbortOnDrop([acker.abort_handle(), enqueuer.abort_handle()]);
        tracing::info!(filter = %filter, host = %self.config.host, port = self.config.port, "mqtt bridge starting");
        loop {
            if acker.is_finished() || enqueuer.is_finished() {
                return Err(IngestError::Mqtt(
                    "a task of the bridge ended; restarting the bridge".into(),
                ));
            }
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(
                        session_present = ack.session_present,
                        "mqtt bridge connected"
                    );
                    // Subscribe on every connection, also when the broker kept the session:
                    // Mosquitto 2.0.11 restarted from its persistence file answers
                    // session_present but delivers nothing to the restored shared subscription.
                    // Subscribing again to the same filter is harmless.
                    {
                        // Queued from a task: the request queue drains only while this loop polls.
                        let (client, filter) = (client.clone(), filter.clone());
                        let shadow_filters: Vec<String> = if self.shadows.is_some() {
                            shadows::MQTT_REQUEST_FILTERS
                                .iter()
                                .map(|f| format!("$share/{}/{f}", self.config.share_group))
                                .collect()
                        } else {
                            Vec::new()
                        };
                        tokio::spawn(async move {
                            for f in std::iter::once(filter).chain(shadow_filters) {
                                if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                                    tracing::error!(error = %e, "cannot queue the subscription");
                                }
                            }
                        });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if received_tx.send(publish).is_err() {
                        return Err(IngestError::Mqtt("the producer task ended".into()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Logs each shadow request of a device (refused ones answered on `…/update/rejected` at once),
/// answers `…/get` from the view, then acknowledges it.
async fn shadow_requests(
    client: AsyncClient,
    registry: Arc<DeviceRegistry>,
    log: Arc<dyn ShadowLog>,
    limits: Limits,
    mut requests: mpsc::UnboundedReceiver<Publish>,
) {
    while let Some(publish) = requests.recv().await {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let Some((device, name, request)) = shadows::parse_mqtt_topic(&topic) else {
            continue;
        };
        // Mosquitto's ACL lets a device publish only under its own id: the topic names it.
        let known = registry.get(device);
        let now = now_micros();
        let refusal = match &known {
            None => Some(shadows::ShadowError::Invalid {
                field: "device".into(),
                reason: format!("device `{device}` is not registered"),
            }),
            Some(_) => shadows::check_name(name).err().or_else(|| {
                (request == MqttRequest::Update)
                    .then(|| {
                        shadows::check_request(&publish.payload, ShadowOrigin::Device, &limits)
                    })
                    .and_then(Result::err)
            }),
        };
        match (known, refusal, request) {
            (_, Some(e), op) => {
                let suffix = match op {
                    MqttRequest::Update => "update/rejected",
                    MqttRequest::Get => "get/rejected",
                };
                let token = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                    .ok()
                    .and_then(|v| v.get("clientToken")?.as_str().map(str::to_owned));
                let body = shadows::rejection(&e, token.as_deref(), now).to_string();
                publish_to(
                    &client,
                    shadows::mqtt_topic(device, name, suffix),
                    false,
                    body,
                )
                .await;
            }
            (Some(d), None, MqttRequest::Get) => {
                let answer = shadows::get_endpoint(log.view(), &d.tenant, device, name);
                let suffix = if answer.status == 200 {
                    "get/accepted"
                } else {
                    "get/rejected"
                };
                let topic = shadows::mqtt_topic(device, name, suffix);
                publish_to(&client, topic, false, answer.body.to_string()).await;
            }
            (Some(d), None, MqttRequest::Update) => {
                let update = ShadowUpdate {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    tenant: d.tenant.clone(),
                    device: device.to_owned(),
                    name: name.to_owned(),
                    origin: ShadowOrigin::Device,
                    actor: device.to_owned(),
                    received_at: now,
                    body: publish.payload.to_vec(),
                };
                let mut backoff = Duration::from_millis(100);
                while let Err(e) = log.record(update.clone()).await {
                    tracing::warn!(error = %e, device, "shadow update not logged; holding PUBACK and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            (None, None, _) => {}
        }
        if publish.qos != QoS::AtMostOnce
            && let Err(e) = client.ack(&publish).await
        {
            tracing::warn!(error = %e, "cannot queue PUBACK");
        }
    }
}

/// Publishes the shadow stage's answers to the devices: `…/update/accepted|rejected`, and
/// `…/update/delta` retained (an empty message clears it once the device has what was desired).
async fn shadow_answers(client: AsyncClient, mut answers: mpsc::Receiver<ShadowResponse>) {
    while let Some(a) = answers.recv().await {
        let retain = a.kind == ShadowResponseKind::Delta;
        let suffix = format!("update/{}", a.kind.as_str());
        let topic = shadows::mqtt_topic(&a.device, &a.name, &suffix);
        publish_to(&client, topic, retain, a.body).await;
    }
}

async fn publish_to(client: &AsyncClient, topic: String, retain: bool, body: String) {
    if let Err(e) = client
        .publish(topic.clone(), QoS::AtLeastOnce, retain, body.into_bytes())
        .await
    {
        tracing::warn!(error = %e, %topic, "cannot queue a shadow message");
    }
}

/// Aborts any number of tasks when dropped.
struct AbortAll(Vec<tokio::task::AbortHandle>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Aborts tasks when dropped.
struct AbortOnDrop<const N: usize>([tokio::task::AbortHandle; N]);

impl<const N: usize> Drop for AbortOnDrop<N> {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_pattern_maps_devices() {
        let c = MqttConfig::default();
        assert_eq!(c.shared_filter(), "$share/tributary/devices/+/telemetry");
        assert_eq!(c.device_of("devices/d-7/telemetry"), Some("d-7"));
        assert_eq!(c.device_of("devices/d-7/other"), None);
        assert_eq!(c.device_of("devices//telemetry"), None);
        assert_eq!(c.device_topic("x"), "devices/x/telemetry");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = MqttConfig {
            password: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
