//! Alert delivery: `incidents` → the tools on-call teams run (stage `alerts`, group
//! `<prefix>-alerts`).
//!
//! - **Alertmanager** (`[alerts] alertmanager_url`): every incident not resolved is posted to
//!   `/api/v2/alerts` with labels (alertname = rule, incident_id, tenant, severity, the site levels,
//!   group, detector, …; fixed at the first post, but for severity, so Alertmanager sees one alert)
//!   and annotations (the message, the SQL that shows the members), re-posted every
//!   `repost_secs` with `endsAt` four periods ahead (an Alertmanager that stops hearing from
//!   Tributary resolves nothing for a while, then ends the alerts); a resolved incident is posted
//!   once more with `endsAt` now. An acknowledged incident is silenced (`/api/v2/silences`,
//!   matcher `incident_id`, by its actor) until it resolves, a snoozed one until `snoozed_until`,
//!   so Alertmanager stops notifying and wakes up by itself; a reopen expires the silence.
//! - **Webhooks** per tenant (`[alerts.webhooks.<name>]`): one POST per lifecycle change (open,
//!   reopen, acknowledge, snooze, resolve; updates while the incident is open and not
//!   acknowledged; `snooze_ended` when a snooze runs out), JSON with the incident's whole record,
//!   signed `X-Tributary-Signature: sha256=<HMAC-SHA256 of the body, hex>` and identified by
//!   `X-Tributary-Delivery` (`<incident>:<seq>`), the same on every retry, so receivers drop
//!   repeats. Retried with exponential backoff while the receiver fails (5xx, 408, 429, no
//!   answer); dead-lettered (`deadletter`, stage `alerts`) when it refuses for good (other 4xx) or
//!   after `give_up_after_secs`.
//!
//! Delivery never blocks detection: this stage is its own consumer group, reading `incidents`
//! after the incident stage wrote them; HTTP runs on tasks of its own (a receiver that hangs holds
//! only its own deliveries), and what is not delivered yet is state, not a held offset. The state
//! ([`AlertState`] per incident: its latest record, the webhook outbox, what Alertmanager was told
//! and its silence) lives in a [`KeyedState`] with the compacted `alert-state` changelog, restored
//! as soon as a partition is assigned: a new owner after a crash re-sends what was not confirmed
//! (same delivery ids) and re-posts the open alerts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tributary_schemas::avro::{self, DeadLetter, Incident, IncidentChange, IncidentStatus};
use tributary_schemas::incidents::severity_of;
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::{Micros, micros_of_secs};

use crate::StreamError;
use crate::runtime::{self, Batching, Emit, KeyedState, Position, Restarts, Stage};

/// The stage's name (consumer group suffix, `stage` of its dead letters).
pub const STAGE: &str = "alerts";
/// Deliveries in flight at most (over every receiver).
const MAX_IN_FLIGHT: usize = 64;
/// Alerts per Alertmanager post at most.
const ALERTS_PER_POST: usize = 500;
/// How long an acknowledgement silences an incident that does not resolve.
const ACK_SILENCE: Micros = 365 * 24 * 3600 * 1_000_000;

/// `[alerts]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Alertmanager's base URL (`http://host:9093`); empty: none.
    pub alertmanager_url: String,
    /// How often open incidents are posted to Alertmanager again.
    pub repost_secs: u64,
    /// Where people reach the query HTTP server (the alerts' link to the incident); empty: none.
    pub query_url: String,
    /// Webhook receivers by name.
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// One delivery's timeout.
    pub timeout_secs: u64,
    /// The longest pause between retries (the backoff doubles from 1 s up to it).
    pub retry_max_secs: u64,
    /// A delivery failing this long is dead-lettered.
    pub give_up_after_secs: u64,
    pub batch_size: usize,
    pub batch_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            alertmanager_url: String::new(),
            repost_secs: 60,
            query_url: String::new(),
            webhooks: BTreeMap::new(),
            timeout_secs: 10,
            retry_max_secs: 300,
            give_up_after_secs: 24 * 3600,
            batch_size: 1000,
            batch_ms: 100,
        }
    }
}

/// One webhook receiver: `[alerts.webhooks.<name>]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The tenant whose incidents it gets.
    pub tenant: String,
    /// `http://` or `https://`.
    pub url: String,
    /// The HMAC-SHA256 key of the signature header.
    pub secret: String,
    /// Incidents below this severity are not sent (info, warning, critical); all by default.
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// Never prints the secret.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("tenant", &self.tenant)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("min_severity", &self.min_severity)
            .finish()
    }
}

/// A config key that cannot work, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {reason}")]
pub struct AlertsConfigError {
    pub key: String,
    pub reason: String,
}

fn http_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" if url.host_str().is_some() => Ok(url),
        "http" | "https" => Err(format!("`{text}` has no host")),
        other => Err(format!(
            "`{text}`: scheme `{other}` is not allowed, only http or https"
        )),
    }
}

impl AlertsConfig {
    /// Whether there is anywhere to deliver to.
    pub fn enabled(&self) -> bool {
        !self.alertmanager_url.is_empty() || !self.webhooks.is_empty()
    }

    /// Refuses what cannot work, naming the key.
    pub fn check(&self) -> Result<(), AlertsConfigError> {
        let bad = |key: String, reason: String| Err(AlertsConfigError { key, reason });
        if !self.alertmanager_url.is_empty()
            && let Err(reason) = http_url(&self.alertmanager_url)
        {
            return bad("alerts.alertmanager_url".into(), reason);
        }
        if !self.query_url.is_empty()
            && let Err(reason) = http_url(&self.query_url)
        {
            return bad("alerts.query_url".into(), reason);
        }
        for (key, value) in [
            ("repost_secs", self.repost_secs),
            ("timeout_secs", self.timeout_secs),
            ("retry_max_secs", self.retry_max_secs),
            ("give_up_after_secs", self.give_up_after_secs),
            ("batch_size", self.batch_size as u64),
        ] {
            if value == 0 {
                return bad(format!("alerts.{key}"), "must be at least 1".into());
            }
        }
        for (name, w) in &self.webhooks {
            let key = |field: &str| format!("alerts.webhooks.{name}.{field}");
            if w.tenant.is_empty() {
                return bad(
                    key("tenant"),
                    "must name the tenant whose incidents it gets".into(),
                );
            }
            if let Err(reason) = http_url(&w.url) {
                return bad(key("url"), reason);
            }
            if w.secret.len() < 16 {
                return bad(
                    key("secret"),
                    "must be at least 16 bytes (the HMAC-SHA256 key receivers check signatures with)"
                        .into(),
                );
            }
            if let Some(s) = &w.min_severity
                && !["info", "warning", "critical"].contains(&s.as_str())
            {
                return bad(
                    key("min_severity"),
                    format!("`{s}`: info, warning or critical"),
                );
            }
        }
        Ok(())
    }
}

/// The signature header's value for `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook notification not confirmed yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub webhook: String,
    pub delivery_id: String,
    pub body: String,
    pub attempts: u32,
    /// When to try next (wall µs).
    pub next_at: Micros,
    /// When it was first due.
    pub since: Micros,
}

/// An Alertmanager silence holding an acknowledged or snoozed incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    /// The status (acknowledged or snoozed, and until when) it was made for.
    pub status: IncidentStatus,
    pub snoozed_until: Option<Micros>,
}

/// What delivery keeps per incident.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub latest: Option<Incident>,
    /// Webhook notifications not confirmed, oldest first.
    pub outbox: Vec<Pending>,
    /// The seq Alertmanager was last told, and when (wall µs).
    pub posted_seq: Option<i32>,
    pub posted_at: Micros,
    /// The labels of its Alertmanager alert (fixed at the first post, but for severity).
    pub labels: BTreeMap<String, String>,
    /// The severity label posted before a change of severity: that alert is ended.
    pub ended_severity: Option<String>,
    pub silence: Option<Silence>,
    /// The `snoozed_until` a `snooze_ended` notification was made for.
    pub woke: Option<Micros>,
}

/// Whether a record is worth telling people about: every lifecycle change, and an update while
/// the incident is open (not acknowledged nor snoozed).
pub fn notifies(i: &Incident) -> bool {
    i.change != IncidentChange::Update || i.status == IncidentStatus::Open
}

/// The body a webhook gets.
pub fn webhook_body(
    i: &Incident,
    notification: &str,
    delivery_id: &str,
    query_url: &str,
) -> String {
    let mut body = json!({
        "delivery_id": delivery_id,
        "notification": notification,
        "incident": i,
        "sql": incident_sql(i),
    });
    if !query_url.is_empty() {
        body["link"] = json!(format!(
            "{}/v1/incidents/{}",
            query_url.trim_end_matches('/'),
            i.incident_id
        ));
    }
    body.to_string()
}

/// The SQL that shows an incident's members (table `anomalies`).
pub fn incident_sql(i: &Incident) -> String {
    let ids: Vec<String> = i.members.iter().map(|m| format!("'{m}'")).collect();
    format!(
        "SELECT * FROM anomalies WHERE anomaly_id IN ({}) ORDER BY event_time",
        ids.join(", ")
    )
}

fn rfc3339(t: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(t)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The labels of an incident's first Alertmanager post.
pub fn labels_of(i: &Incident) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("alertname".to_owned(), i.rule.clone());
    l.insert("incident_id".to_owned(), i.incident_id.clone());
    l.insert("tenant".to_owned(), i.tenant.clone());
    l.insert("rule".to_owned(), i.rule.clone());
    l.insert("correlate".to_owned(), i.correlate.clone());
    l.insert("severity".to_owned(), i.severity.clone());
    if !i.site.is_empty() {
        l.insert("site".to_owned(), i.site.join("/"));
        for (n, level) in i.site.iter().enumerate() {
            l.insert(format!("site_{}", n + 1), level.clone());
        }
    }
    if let Some(g) = &i.device_group {
        l.insert("device_group".to_owned(), g.clone());
    }
    if !i.detectors.is_empty() {
        l.insert("detector".to_owned(), i.detectors.join(","));
    }
    if let [device] = i.devices.as_slice() {
        l.insert("device".to_owned(), device.clone());
    }
    if let [metric] = i.metrics.as_slice() {
        l.insert("metric".to_owned(), metric.clone());
    }
    l
}

/// An incident as an Alertmanager alert, ending at `ends_at`.
pub fn alert_of(
    i: &Incident,
    labels: &BTreeMap<String, String>,
    ends_at: Micros,
    query_url: &str,
) -> Value {
    let mut annotations = json!({
        "summary": i.message,
        "status": i.status.as_str(),
        "scope": i.scope,
        "members": i.member_count.to_string(),
        "open_members": i.open_members.to_string(),
        "devices": i.devices.join(", "),
        "metrics": i.metrics.join(", "),
        "anomaly_records": i.anomaly_records.to_string(),
        "sql": incident_sql(i),
        "incident_sql": format!("SELECT * FROM incidents WHERE incident_id = '{}' ORDER BY seq", i.incident_id),
    });
    if let Some(actor) = &i.actor {
        annotations["actor"] = json!(actor);
    }
    if let Some(comment) = &i.comment {
        annotations["comment"] = json!(comment);
    }
    let mut alert = json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(i.first_time),
        "endsAt": rfc3339(ends_at),
    });
    if !query_url.is_empty() {
        alert["generatorURL"] = json!(format!(
            "{}/v1/incidents/{}",
            query_url.trim_end_matches('/'),
            i.incident_id
        ));
    }
    alert
}

/// The pause before attempt `attempts + 1`: 1 s doubling, at most `max`.
pub fn backoff(attempts: u32, max: Micros) -> Micros {
    let exp = attempts.saturating_sub(1).min(30);
    (1_000_000i64 << exp).min(max)
}

impl AlertState {
    /// A record of the incident: kept as its latest (older or repeated records are ignored), and
    /// queued for each webhook of its tenant when it notifies.
    pub fn apply(
        &mut self,
        i: &Incident,
        webhooks: &BTreeMap<String, WebhookConfig>,
        query_url: &str,
        now: Micros,
    ) -> bool {
        if self.latest.as_ref().is_some_and(|l| l.seq >= i.seq) {
            return false;
        }
        if notifies(i) {
            let id = format!("{}:{}", i.incident_id, i.seq);
            self.queue(i, i.change.as_str(), &id, webhooks, query_url, now);
        }
        self.latest = Some(i.clone());
        true
    }

    fn queue(
        &mut self,
        i: &Incident,
        notification: &str,
        delivery_id: &str,
        webhooks: &BTreeMap<String, WebhookConfig>,
        query_url: &str,
        now: Micros,
    ) {
        for (name, w) in webhooks {
            let wanted = w
                .min_severity
                .as_deref()
                .is_none_or(|min| severity_of(&i.severity) >= severity_of(min));
            if w.tenant == i.tenant && wanted {
                self.outbox.push(Pending {
                    webhook: name.clone(),
                    delivery_id: delivery_id.to_owned(),
                    body: webhook_body(i, notification, delivery_id, query_url),
                    attempts: 0,
                    next_at: now,
                    since: now,
                });
            }
        }
    }

    /// The clock passed a snooze: `snooze_ended` is queued once.
    pub fn wake(
        &mut self,
        webhooks: &BTreeMap<String, WebhookConfig>,
        query_url: &str,
        now: Micros,
    ) -> bool {
        let Some(i) = self.latest.clone() else {
            return false;
        };
        let Some(until) = i
            .snoozed_until
            .filter(|_| i.status == IncidentStatus::Snoozed)
        else {
            return false;
        };
        if now < until || self.woke == Some(until) {
            return false;
        }
        self.woke = Some(until);
        let id = format!("{}:{}:snooze_ended", i.incident_id, i.seq);
        self.queue(&i, "snooze_ended", &id, webhooks, query_url, now);
        true
    }

    /// The silence the incident should have: (until, by, comment) for an acknowledged or
    /// snoozed one.
    pub fn wanted_silence(&self, now: Micros) -> Option<(Micros, String, String)> {
        let i = self.latest.as_ref()?;
        let until = match i.status {
            IncidentStatus::Acknowledged => now.saturating_add(ACK_SILENCE),
            IncidentStatus::Snoozed => i.snoozed_until.filter(|u| *u > now)?,
            _ => return None,
        };
        let by = i.actor.clone().unwrap_or_else(|| "tributary".to_owned());
        let comment = format!(
            "{} in Tributary{}",
            i.status.as_str(),
            i.comment
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
        Some((until, by, comment))
    }

    /// Nothing left to do for a resolved incident: its state can go.
    pub fn finished(&self, alertmanager: bool) -> bool {
        let Some(i) = &self.latest else {
            return self.outbox.is_empty();
        };
        i.status == IncidentStatus::Resolved
            && self.outbox.is_empty()
            && self.silence.is_none()
            && (!alertmanager || self.posted_seq == Some(i.seq))
    }
}

/// A delivery for the dispatcher's tasks.
enum Job {
    Webhook {
        partition: i32,
        incident: String,
        delivery_id: String,
        url: String,
        secret: String,
        body: String,
    },
    Alerts {
        /// (partition, incident, seq posted).
        items: Vec<(i32, String, i32)>,
        body: String,
    },
    Silence {
        partition: i32,
        incident: String,
        status: IncidentStatus,
        snoozed_until: Option<Micros>,
        body: String,
    },
    Unsilence {
        partition: i32,
        incident: String,
        id: String,
    },
}

/// How a delivery went.
enum Done {
    Webhook {
        partition: i32,
        incident: String,
        delivery_id: String,
        outcome: Outcome,
    },
    Alerts {
        items: Vec<(i32, String, i32)>,
        ok: Result<(), String>,
    },
    Silenced {
        partition: i32,
        incident: String,
        status: IncidentStatus,
        snoozed_until: Option<Micros>,
        id: Result<String, String>,
    },
    Unsilenced {
        partition: i32,
        incident: String,
        ok: Result<(), String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Try again later.
    Failed(String),
    /// Refused for good.
    Refused(String),
}

/// What an answer means for a webhook delivery.
pub fn outcome_of(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 425 | 429 | 500..=599 => Outcome::Failed(format!("answered {status}")),
        _ => Outcome::Refused(format!("answered {status}")),
    }
}

/// Runs jobs, each on a task of its own, and reports back.
async fn dispatch(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    done: mpsc::UnboundedSender<Done>,
    client: reqwest::Client,
    alertmanager: String,
) {
    while let Some(job) = jobs.recv().await {
        let (client, done, am) = (client.clone(), done.clone(), alertmanager.clone());
        tokio::spawn(async move {
            let report = run_job(&client, &am, job).await;
            let _ = done.send(report);
        });
    }
}

fn answer(r: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, String> {
    match r {
        Ok(resp) if resp.status().is_success() => Ok(resp),
        Ok(resp) => Err(format!("answered {}", resp.status().as_u16())),
        Err(e) => Err(e.without_url().to_string()),
    }
}

async fn run_job(client: &reqwest::Client, am: &str, job: Job) -> Done {
    match job {
        Job::Webhook {
            partition,
            incident,
            delivery_id,
            url,
            secret,
            body,
        } => {
            let event = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["notification"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-tributary-delivery", &delivery_id)
                .header("x-tributary-event", format!("incident.{event}"))
                .header("x-tributary-signature", signature(&secret, body.as_bytes()))
                .body(body)
                .send()
                .await;
            let outcome = match sent {
                Ok(resp) => outcome_of(resp.status().as_u16()),
                Err(e) => Outcome::Failed(e.without_url().to_string()),
            };
            Done::Webhook {
                partition,
                incident,
                delivery_id,
                outcome,
            }
        }
        Job::Alerts { items, body } => {
            let sent = client
                .post(format!("{am}/api/v2/alerts"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            Done::Alerts {
                items,
                ok: answer(sent).map(|_| ()),
            }
        }
        Job::Silence {
            partition,
            incident,
            status,
            snoozed_until,
            body,
        } => {
            let sent = client
                .post(format!("{am}/api/v2/silences"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let id = match answer(sent) {
                Ok(resp) => resp
                    .json::<Value>()
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        v["silenceID"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| "no silenceID in the answer".to_owned())
                    }),
                Err(e) => Err(e),
            };
            Done::Silenced {
                partition,
                incident,
                status,
                snoozed_until,
                id,
            }
        }
        Job::Unsilence {
            partition,
            incident,
            id,
        } => {
            let sent = client
                .delete(format!("{am}/api/v2/silence/{id}"))
                .send()
                .await;
            // Already gone (expired, or deleted by a person) is done too.
            let ok = match sent {
                Ok(resp) if resp.status().as_u16() == 404 => Ok(()),
                other => answer(other).map(|_| ()),
            };
            Done::Unsilenced {
                partition,
                incident,
                ok,
            }
        }
    }
}

/// `incidents` → Alertmanager and webhooks: one member of the `<prefix>-alerts` group.
pub struct AlertDelivery {
    kafka: KafkaConfig,
    config: AlertsConfig,
    restarts: Restarts,
}

impl AlertDelivery {
    pub fn new(kafka: KafkaConfig, config: AlertsConfig) -> Self {
        Self {
            kafka,
            config,
            restarts: Restarts::new(),
        }
    }

    pub async fn run(&self) -> Result<(), StreamError> {
        let topics = &self.kafka.topics;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(self.config.timeout_secs.max(1)))
            .user_agent(concat!("tributary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StreamError::State(format!("http client: {e}")))?;
        let run = DeliveryRun {
            state: KeyedState::new(&topics.alert_state),
            config: self.config.clone(),
            alertmanager: self
                .config
                .alertmanager_url
                .trim_end_matches('/')
                .to_owned(),
            input: topics.incidents.clone(),
            deadletter: Arc::from(topics.deadletter.as_str()),
            deadletter_parts: 1,
            client,
            jobs: None,
            done: None,
            in_flight: HashSet::new(),
            alerts_in_flight: false,
            alerts_retry_at: 0,
            alerts_failures: 0,
            last_scan: None,
            fresh: false,
            counts: Counts::default(),
        };
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

#[derive(Debug, Default)]
struct Counts {
    records: u64,
    delivered: u64,
    failed: u64,
    dead: u64,
    posts: u64,
}

/// One run of the delivery stage.
struct DeliveryRun {
    state: KeyedState<AlertState>,
    config: AlertsConfig,
    alertmanager: String,
    input: String,
    deadletter: Arc<str>,
    deadletter_parts: i32,
    client: reqwest::Client,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    done: Option<mpsc::UnboundedReceiver<Done>>,
    /// Webhook deliveries and silence changes in flight (by delivery id, or `silence:<incident>`).
    in_flight: HashSet<String>,
    alerts_in_flight: bool,
    alerts_retry_at: Micros,
    alerts_failures: u32,
    last_scan: Option<Instant>,
    /// Incident records arrived since the last scan: scanned for as soon as no post is in
    /// flight, not at the next periodic scan.
    fresh: bool,
    counts: Counts,
}

impl DeliveryRun {
    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    fn dead_letter(
        &mut self,
        partition: i32,
        i: Option<&Incident>,
        p: &Pending,
        reason: String,
    ) -> Option<Emit> {
        self.counts.dead += 1;
        tracing::warn!(webhook = %p.webhook, delivery = %p.delivery_id, %reason, "webhook delivery dead-lettered");
        let dead = DeadLetter {
            tenant: i.map(|i| i.tenant.clone()).unwrap_or_default(),
            device: String::new(),
            event_id: Some(p.delivery_id.clone()),
            stage: STAGE.into(),
            rule: "webhook_refused".into(),
            field: Some(format!("alerts.webhooks.{}.url", p.webhook)),
            reason,
            source_topic: self.input.clone(),
            source_partition: partition,
            source_offset: -1,
            source_index: 0,
            received_at: tributary_schemas::now_micros(),
            original: p.body.clone().into_bytes(),
            measurement: None,
        };
        let partition = runtime::dead_letter_partition(partition, self.deadletter_parts);
        Emit::record(&self.deadletter, partition, &p.delivery_id, &dead).ok()
    }

    /// Results of finished deliveries.
    fn collect(&mut self, now: Micros) -> Vec<Emit> {
        let mut finished = Vec::new();
        if let Some(done) = self.done.as_mut() {
            while let Ok(d) = done.try_recv() {
                finished.push(d);
            }
        }
        let mut out = Vec::new();
        let give_up = micros_of_secs(self.config.give_up_after_secs);
        let max_pause = micros_of_secs(self.config.retry_max_secs);
        for d in finished {
            match d {
                Done::Webhook {
                    partition,
                    incident,
                    delivery_id,
                    outcome,
                } => {
                    self.in_flight.remove(&delivery_id);
                    let Some(s) = self.state.get_mut(partition, &incident) else {
                        continue;
                    };
                    let Some(at) = s.outbox.iter().position(|p| p.delivery_id == delivery_id)
                    else {
                        continue;
                    };
                    let dead = match outcome {
                        Outcome::Delivered => {
                            s.outbox.remove(at);
                            self.counts.delivered += 1;
                            None
                        }
                        Outcome::Failed(reason) => {
                            let p = &mut s.outbox[at];
                            p.attempts += 1;
                            p.next_at = now.saturating_add(backoff(p.attempts, max_pause));
                            self.counts.failed += 1;
                            tracing::info!(webhook = %p.webhook, delivery = %delivery_id, attempts = p.attempts, %reason, "webhook delivery failed; retrying");
                            (now.saturating_sub(p.since) >= give_up).then(|| {
                                (
                                    format!(
                                        "gave up after {} attempts over {} s: {reason}",
                                        p.attempts, self.config.give_up_after_secs
                                    ),
                                    at,
                                )
                            })
                        }
                        Outcome::Refused(reason) => {
                            Some((format!("the receiver refused it for good: {reason}"), at))
                        }
                    };
                    if let Some((reason, at)) = dead {
                        let p = s.outbox.remove(at);
                        let latest = s.latest.clone();
                        out.extend(self.dead_letter(partition, latest.as_ref(), &p, reason));
                    }
                }
                Done::Alerts { items, ok } => {
                    self.alerts_in_flight = false;
                    match ok {
                        Ok(()) => {
                            self.alerts_failures = 0;
                            self.counts.posts += 1;
                            for (partition, incident, seq) in items {
                                if let Some(s) = self.state.get_mut(partition, &incident) {
                                    s.posted_seq = Some(seq);
                                    s.posted_at = now;
                                    s.ended_severity = None;
                                }
                            }
                        }
                        Err(e) => {
                            self.alerts_failures += 1;
                            self.alerts_retry_at =
                                now.saturating_add(backoff(self.alerts_failures, max_pause));
                            tracing::warn!(error = %e, failures = self.alerts_failures, "posting alerts to Alertmanager failed; retrying");
                        }
                    }
                }
                Done::Silenced {
                    partition,
                    incident,
                    status,
                    snoozed_until,
                    id,
                } => {
                    self.in_flight.remove(&format!("silence:{incident}"));
                    match id {
                        Ok(id) => {
                            if let Some(s) = self.state.get_mut(partition, &incident) {
                                s.silence = Some(Silence {
                                    id,
                                    status,
                                    snoozed_until,
                                });
                            }
                        }
                        Err(e) => {
                            tracing::warn!(incident = %incident, error = %e, "silencing in Alertmanager failed; retrying")
                        }
                    }
                }
                Done::Unsilenced {
                    partition,
                    incident,
                    ok,
                } => {
                    self.in_flight.remove(&format!("silence:{incident}"));
                    match ok {
                        Ok(()) => {
                            if let Some(s) = self.state.get_mut(partition, &incident) {
                                s.silence = None;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(incident = %incident, error = %e, "expiring a silence in Alertmanager failed; retrying")
                        }
                    }
                }
            }
        }
        out
    }

    /// Starts what is due: webhook deliveries, wake-ups, Alertmanager posts and silences.
    fn start_due(&mut self, now: Micros) {
        let am = !self.alertmanager.is_empty();
        let repost = micros_of_secs(self.config.repost_secs);
        let mut jobs = Vec::new();
        let mut alerts = Vec::new();
        let mut items = Vec::new();
        let mut finished = Vec::new();
        let (webhooks, query_url) = (&self.config.webhooks, self.config.query_url.as_str());
        let in_flight = &mut self.in_flight;
        let post_alerts = am && !self.alerts_in_flight && now >= self.alerts_retry_at;
        for partition in self.state.partitions() {
            self.state.for_each(partition, |key, s| {
                let mut changed = s.wake(webhooks, query_url, now);
                // Webhooks: the oldest pending of each receiver, in order.
                let mut busy: HashSet<&str> = HashSet::new();
                for p in &s.outbox {
                    if !busy.insert(p.webhook.as_str()) || in_flight.contains(&p.delivery_id) {
                        continue;
                    }
                    if p.next_at > now || in_flight.len() + jobs.len() >= MAX_IN_FLIGHT {
                        continue;
                    }
                    let Some(w) = webhooks.get(&p.webhook) else {
                        continue;
                    };
                    jobs.push((
                        p.delivery_id.clone(),
                        Job::Webhook {
                            partition,
                            incident: key.to_owned(),
                            delivery_id: p.delivery_id.clone(),
                            url: w.url.clone(),
                            secret: w.secret.clone(),
                            body: p.body.clone(),
                        },
                    ));
                }
                let Some(i) = s.latest.clone() else {
                    return changed;
                };
                if am {
                    // Silences follow acknowledge and snooze.
                    let silence_key = format!("silence:{key}");
                    if !in_flight.contains(&silence_key) {
                        let wanted = s.wanted_silence(now);
                        match (&s.silence, wanted) {
                            (Some(have), Some(_))
                                if have.status == i.status
                                    && have.snoozed_until == i.snoozed_until => {}
                            // A snooze that ran out: Alertmanager expired it.
                            (Some(have), None)
                                if have.status == IncidentStatus::Snoozed
                                    && i.status == IncidentStatus::Snoozed =>
                            {
                                s.silence = None;
                                changed = true;
                            }
                            (Some(have), _) => {
                                jobs.push((silence_key, Job::Unsilence {
                                    partition,
                                    incident: key.to_owned(),
                                    id: have.id.clone(),
                                }));
                            }
                            (None, Some((until, by, comment))) => {
                                let body = json!({
                                    "matchers": [{"name": "incident_id", "value": i.incident_id, "isRegex": false, "isEqual": true}],
                                    "startsAt": rfc3339(now),
                                    "endsAt": rfc3339(until),
                                    "createdBy": by,
                                    "comment": comment,
                                });
                                jobs.push((silence_key, Job::Silence {
                                    partition,
                                    incident: key.to_owned(),
                                    status: i.status,
                                    snoozed_until: i.snoozed_until,
                                    body: body.to_string(),
                                }));
                            }
                            (None, None) => {}
                        }
                    }
                    // Alerts: new records at once, open ones again every repost period.
                    let resolved = i.status == IncidentStatus::Resolved;
                    let due = s.posted_seq != Some(i.seq)
                        || (!resolved && now.saturating_sub(s.posted_at) >= repost);
                    if post_alerts && due && alerts.len() < ALERTS_PER_POST {
                        if s.labels.is_empty() {
                            s.labels = labels_of(&i);
                            changed = true;
                        }
                        if s.labels.get("severity") != Some(&i.severity) {
                            // Alertmanager tells alerts apart by labels: end the one of the old
                            // severity.
                            let old = s.labels.insert("severity".to_owned(), i.severity.clone());
                            s.ended_severity = old;
                            changed = true;
                        }
                        if let Some(old) = &s.ended_severity {
                            let mut labels = s.labels.clone();
                            labels.insert("severity".to_owned(), old.clone());
                            alerts.push(alert_of(&i, &labels, now, query_url));
                        }
                        let ends = if resolved {
                            now
                        } else {
                            now.saturating_add(repost.saturating_mul(4))
                        };
                        alerts.push(alert_of(&i, &s.labels, ends, query_url));
                        items.push((partition, key.to_owned(), i.seq));
                    }
                }
                if s.finished(am) {
                    finished.push((partition, key.to_owned()));
                }
                changed
            });
        }
        for (partition, key) in finished {
            self.state.remove(partition, &key);
        }
        for (id, job) in jobs {
            self.in_flight.insert(id);
            self.send(job);
        }
        if !alerts.is_empty() {
            self.alerts_in_flight = true;
            self.send(Job::Alerts {
                items,
                body: Value::Array(alerts).to_string(),
            });
        }
    }

    /// What the timers do: results in, due work out, the changelog of what changed.
    fn pump(&mut self, now: Micros) -> Result<Vec<Emit>, StreamError> {
        let mut out = self.collect(now);
        let since = |ms: u64| {
            self.last_scan
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(ms))
        };
        // Every 500 ms (re-posts, retries, snoozes ending), and at most every 20 ms while new
        // records wait and no post is in flight.
        if since(500) || (self.fresh && !self.alerts_in_flight && since(20)) {
            self.last_scan = Some(Instant::now());
            self.fresh = false;
            self.start_due(now);
        }
        out.extend(self.state.changelog()?);
        Ok(out)
    }
}

impl Stage for DeliveryRun {
    const NAME: &'static str = STAGE;
    const RESTORE_ON_ASSIGN: bool = true;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.state.topic().to_string(), self.deadletter.to_string()]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.deadletter_parts = partitions[&*self.deadletter];
        self.state.check_partitions(partitions, &self.input)?;
        let (jobs, job_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(
            job_rx,
            done_tx,
            self.client.clone(),
            self.alertmanager.clone(),
        ));
        self.jobs = Some(jobs);
        self.done = Some(done);
        Ok(())
    }

    fn restore(&mut self, kafka: &KafkaConfig, partition: i32, _: i64) -> Result<(), StreamError> {
        self.state.restore(kafka, partition).map(|_| ())
    }

    fn revoke(&mut self, partition: i32) {
        self.state.forget(partition);
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let Ok(i) = avro::decode::<Incident>(record) else {
            tracing::warn!(
                partition = at.partition,
                offset = at.offset,
                "undecodable incident record skipped"
            );
            return Ok(Vec::new());
        };
        self.counts.records += 1;
        self.fresh = true;
        let now = tributary_schemas::now_micros();
        let (webhooks, query_url) = (&self.config.webhooks, self.config.query_url.as_str());
        if let Some(s) = self
            .state
            .for_record(at.partition, &i.incident_id, at.offset)
        {
            s.apply(&i, webhooks, query_url, now);
        }
        Ok(Vec::new())
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let subject = avro::decode::<Incident>(record)
            .map(|i| runtime::Subject {
                tenant: i.tenant,
                device: String::new(),
                event_id: Some(i.incident_id),
            })
            .unwrap_or_default();
        runtime::stage_failure(
            STAGE,
            at,
            record,
            subject,
            error,
            &self.deadletter,
            self.deadletter_parts,
        )
    }

    fn idle(&mut self, now: Micros) -> Result<Vec<Emit>, StreamError> {
        self.pump(now)
    }

    fn after_batch(&mut self, now: Micros) -> Result<Vec<Emit>, StreamError> {
        // Under a steady stream of incident records the input never goes quiet: the records
        // just read are posted now, not at the next commit.
        self.pump(now)
    }

    fn checkpoint(&mut self) -> Result<Vec<Emit>, StreamError> {
        self.pump(tributary_schemas::now_micros())
    }

    fn summary(&self) -> String {
        let c = &self.counts;
        format!(
            "records={} delivered={} failed={} dead_lettered={} alertmanager_posts={}",
            c.records, c.delivered, c.failed, c.dead, c.posts
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_schemas::avro::IncidentChange as C;
    use tributary_schemas::avro::IncidentStatus as St;

    fn incident(seq: i32, change: C, status: St) -> Incident {
        Incident {
            incident_id: "0123456789abcdef0123456789abcdef".into(),
            seq,
            change,
            status,
            tenant: "acme".into(),
            rule: "section".into(),
            correlate: "site".into(),
            scope: "north / hall-3".into(),
            site: vec!["north".into(), "hall-3".into()],
            device_group: Some("pumps".into()),
            severity: "warning".into(),
            first_time: 1_000_000,
            last_time: 2_000_000,
            end_time: None,
            event_time: 2_000_000,
            members: vec!["a1".into(), "a2".into()],
            devices: vec!["d1".into(), "d2".into()],
            metrics: vec!["temperature".into()],
            detectors: vec!["hot".into()],
            correlation_key: "north\u{1f}hall-3".into(),
            member_count: 2,
            open_members: 2,
            device_count: 2,
            anomaly_records: 2,
            actor: None,
            acted_at: None,
            comment: None,
            snoozed_until: None,
            message: "2 devices overheat".into(),
            source_topic: "incident-inputs".into(),
            source_partition: 0,
            source_offset: 1,
        }
    }

    fn hooks() -> BTreeMap<String, WebhookConfig> {
        let hook = |tenant: &str, min: Option<&str>| WebhookConfig {
            tenant: tenant.into(),
            url: "http://127.0.0.1:1/hook".into(),
            secret: "0123456789abcdef".into(),
            min_severity: min.map(str::to_owned),
        };
        BTreeMap::from([
            ("ops".to_owned(), hook("acme", None)),
            ("pager".to_owned(), hook("acme", Some("critical"))),
            ("other".to_owned(), hook("globex", None)),
        ])
    }

    #[test]
    fn each_lifecycle_change_is_queued_once_per_receiver_of_the_tenant() {
        let mut s = AlertState::default();
        let w = hooks();
        assert!(s.apply(&incident(0, C::Open, St::Open), &w, "", 10));
        // Only `ops`: `pager` wants critical ones, `other` is another tenant's.
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].webhook, "ops");
        assert_eq!(
            s.outbox[0].delivery_id,
            "0123456789abcdef0123456789abcdef:0"
        );
        // The same record again (a replay) is not queued again.
        assert!(!s.apply(&incident(0, C::Open, St::Open), &w, "", 11));
        assert_eq!(s.outbox.len(), 1);
        let mut critical = incident(1, C::Update, St::Open);
        critical.severity = "critical".into();
        s.apply(&critical, &w, "", 12);
        assert_eq!(s.outbox.len(), 3, "ops and now pager");
        // Acknowledged: the acknowledge is told, later updates are not.
        s.apply(&incident(2, C::Acknowledge, St::Acknowledged), &w, "", 13);
        assert_eq!(s.outbox.len(), 4);
        s.apply(&incident(3, C::Update, St::Acknowledged), &w, "", 14);
        assert_eq!(s.outbox.len(), 4);
        s.apply(&incident(4, C::Resolve, St::Resolved), &w, "", 15);
        assert_eq!(s.outbox.len(), 5);
        let body: Value = serde_json::from_str(&s.outbox[4].body).unwrap();
        assert_eq!(body["notification"], "resolve");
        assert_eq!(body["incident"]["seq"], 4);
        assert!(!s.finished(false), "the outbox is not empty");
        s.outbox.clear();
        assert!(s.finished(false));
        assert!(!s.finished(true), "Alertmanager has not been told");
    }

    #[test]
    fn a_snooze_wakes_once_at_its_time_and_is_silenced_until_then() {
        let mut s = AlertState::default();
        let w = hooks();
        let mut snoozed = incident(1, C::Snooze, St::Snoozed);
        snoozed.snoozed_until = Some(100);
        snoozed.actor = Some("alice".into());
        s.apply(&snoozed, &w, "", 10);
        s.outbox.clear();
        let (until, by, _) = s.wanted_silence(50).unwrap();
        assert_eq!((until, by.as_str()), (100, "alice"));
        assert!(!s.wake(&w, "", 99));
        assert!(s.wake(&w, "", 100));
        assert!(!s.wake(&w, "", 101), "once");
        assert_eq!(s.outbox.len(), 1);
        assert!(s.outbox[0].delivery_id.ends_with(":1:snooze_ended"));
        assert_eq!(s.wanted_silence(101), None, "the snooze is over");
        // Acknowledged: silenced (for a year), whoever did it.
        s.apply(&incident(2, C::Acknowledge, St::Acknowledged), &w, "", 102);
        assert!(
            s.wanted_silence(103)
                .is_some_and(|(u, by, _)| u > 103 && by == "tributary")
        );
        s.apply(&incident(3, C::Reopen, St::Open), &w, "", 104);
        assert_eq!(s.wanted_silence(105), None);
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn receivers_that_fail_are_retried_and_those_that_refuse_are_not() {
        assert_eq!(outcome_of(204), Outcome::Delivered);
        for retried in [408, 429, 500, 502, 503] {
            assert!(
                matches!(outcome_of(retried), Outcome::Failed(_)),
                "{retried}"
            );
        }
        for refused in [301, 400, 401, 403, 404, 410, 413] {
            assert!(
                matches!(outcome_of(refused), Outcome::Refused(_)),
                "{refused}"
            );
        }
        let max = 300_000_000;
        assert_eq!(backoff(1, max), 1_000_000);
        assert_eq!(backoff(2, max), 2_000_000);
        assert_eq!(backoff(9, max), 256_000_000);
        assert_eq!(backoff(10, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn alerts_carry_stable_labels_and_the_sql_of_their_members() {
        let i = incident(0, C::Open, St::Open);
        let labels = labels_of(&i);
        assert_eq!(labels["alertname"], "section");
        assert_eq!(labels["site"], "north/hall-3");
        assert_eq!(labels["site_2"], "hall-3");
        assert_eq!(labels["detector"], "hot");
        assert_eq!(labels["metric"], "temperature");
        assert!(!labels.contains_key("device"), "two devices");
        let alert = alert_of(&i, &labels, 5_000_000, "http://q:8088/");
        assert_eq!(alert["endsAt"], "1970-01-01T00:00:05.000Z");
        assert_eq!(
            alert["generatorURL"],
            "http://q:8088/v1/incidents/0123456789abcdef0123456789abcdef"
        );
        assert!(
            alert["annotations"]["sql"]
                .as_str()
                .unwrap()
                .contains("'a1', 'a2'")
        );
    }

    #[test]
    fn webhook_urls_must_be_http_and_secrets_long_enough() {
        let mut c = AlertsConfig::default();
        assert!(!c.enabled());
        c.webhooks = hooks();
        assert_eq!(c.check(), Ok(()));
        let mut bad = c.clone();
        bad.webhooks.get_mut("ops").unwrap().url = "ftp://example.com/x".into();
        let e = bad.check().unwrap_err();
        assert_eq!(e.key, "alerts.webhooks.ops.url");
        assert!(e.reason.contains("only http or https"), "{e}");
        let mut bad = c.clone();
        bad.webhooks.get_mut("ops").unwrap().url = "file:///etc/passwd".into();
        assert!(bad.check().is_err());
        let mut bad = c.clone();
        bad.webhooks.get_mut("ops").unwrap().secret = "short".into();
        assert_eq!(bad.check().unwrap_err().key, "alerts.webhooks.ops.secret");
        let mut bad = c;
        bad.alertmanager_url = "localhost:9093".into();
        assert_eq!(bad.check().unwrap_err().key, "alerts.alertmanager_url");
        assert!(
            !format!("{:?}", hooks()).contains("0123456789abcdef"),
            "no secret in Debug"
        );
    }
}
