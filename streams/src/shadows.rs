//! The shadow stage: `shadow-updates` → `shadows` + `shadow-responses`, the single writer of every
//! device shadow.
//!
//! Every update request (a device's report, an app's desired state) is on `shadow-updates` before
//! it is applied; this stage applies them in log order with the document algebra of
//! `tributary_schemas::shadows`, so versions are total per shadow and a conditional update
//! (`version`) is exact. Per update it emits the shadow's new document to `shadows` (compacted,
//! same partition), its answer (`accepted` or `rejected`) to `shadow-responses`, and, when the
//! delta changed, the new `delta` there too (an empty body: the delta became empty).
//!
//! State: a [`KeyedState`] of [`Shadow`] per tenant/device/name, restored from the compacted
//! changelog `shadow-state`: shadows live for years, far beyond any horizon of the input that could
//! be replayed. The changelog records with each shadow the last update offset applied to it, so an
//! update read again after a crash is not applied twice: versions have no gaps and no repeats.
//! Outputs are at least once (identical when emitted again); the `shadows` topic is compacted and
//! the tables take each version once, so a repeated record changes nothing.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tributary_schemas::avro::{
    self, ShadowDocument, ShadowResponse, ShadowResponseKind, ShadowUpdate,
};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::shadows::{
    self, Limits, Shadow, ShadowConfig, Update, acceptance, delta_message, rejection,
};

use crate::StreamError;
use crate::runtime::{self, Batching, Emit, KeyedState, Position, Restarts, Stage};

/// The stage's name: consumer group `<prefix>-shadows`, `stage` of its dead letters.
pub const STAGE: &str = "shadows";

/// What one update makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The shadow's new document, when the update changed it.
    pub document: Option<ShadowDocument>,
    /// The answer, then the delta when it changed.
    pub responses: Vec<ShadowResponse>,
}

/// Applies `update` to `shadow`: the pure function of the stage.
pub fn apply(shadow: &mut Shadow, update: &ShadowUpdate, limits: &Limits) -> Outcome {
    let at = update.received_at;
    let respond = |kind, status: u16, version: u64, body: Option<Value>| ShadowResponse {
        request_id: update.request_id.clone(),
        tenant: update.tenant.clone(),
        device: update.device.clone(),
        name: update.name.clone(),
        kind,
        status: i32::from(status),
        version: i64::try_from(version).unwrap_or(i64::MAX),
        at,
        body: body.map(|b| b.to_string()).unwrap_or_default(),
    };
    let parsed = Update::parse(&update.body, limits);
    let applied = parsed.and_then(|u| shadow.apply(&u, at, limits).map(|a| (u, a)));
    let (request, applied) = match applied {
        Ok(ok) => ok,
        Err(e) => {
            let token = client_token(&update.body);
            let body = rejection(&e, token.as_deref(), at);
            return Outcome {
                document: None,
                responses: vec![respond(
                    ShadowResponseKind::Rejected,
                    e.status(),
                    shadow.version,
                    Some(body),
                )],
            };
        }
    };
    let mut responses = vec![respond(
        ShadowResponseKind::Accepted,
        200,
        applied.version,
        Some(acceptance(&request, applied.version, at)),
    )];
    if applied.delta_changed {
        let delta = delta_message(shadow, request.client_token.as_deref(), at);
        responses.push(respond(
            ShadowResponseKind::Delta,
            200,
            applied.version,
            delta,
        ));
    }
    let document = applied.changed.then(|| ShadowDocument {
        tenant: update.tenant.clone(),
        device: update.device.clone(),
        name: update.name.clone(),
        version: i64::try_from(shadow.version).unwrap_or(i64::MAX),
        updated: at,
        request_id: update.request_id.clone(),
        origin: update.origin,
        document: shadow.document(None, shadow.updated).to_string(),
    });
    Outcome {
        document,
        responses,
    }
}

/// The `clientToken` of a body that could not be applied, when it has one (echoed in the
/// rejection).
fn client_token(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("clientToken")?
        .as_str()
        .filter(|t| t.len() <= shadows::MAX_CLIENT_TOKEN)
        .map(str::to_owned)
}

/// `shadow-updates` → `shadows` + `shadow-responses`: one member of the `<prefix>-shadows` group.
pub struct ShadowStage {
    kafka: KafkaConfig,
    config: ShadowConfig,
    restarts: Restarts,
}

impl ShadowStage {
    pub fn new(kafka: KafkaConfig, config: ShadowConfig) -> Self {
        Self {
            kafka,
            config,
            restarts: Restarts::new(),
        }
    }

    pub async fn run(&self) -> Result<(), StreamError> {
        let run = ShadowRun::new(&self.kafka, &self.config);
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

/// One run of the shadow stage: the [`Stage`] the runtime drives.
pub struct ShadowRun {
    state: KeyedState<Shadow>,
    limits: Limits,
    input: String,
    shadows: Arc<str>,
    responses: Arc<str>,
    deadletter: Arc<str>,
    deadletter_parts: i32,
    updates: u64,
    accepted: u64,
    rejected: u64,
    undecodable: u64,
}

impl ShadowRun {
    pub fn new(kafka: &KafkaConfig, config: &ShadowConfig) -> Self {
        let topics = &kafka.topics;
        Self {
            state: KeyedState::new(&topics.shadow_state),
            limits: config.limits(),
            input: topics.shadow_updates.clone(),
            shadows: Arc::from(topics.shadows.as_str()),
            responses: Arc::from(topics.shadow_responses.as_str()),
            deadletter: Arc::from(topics.deadletter.as_str()),
            deadletter_parts: 1,
            updates: 0,
            accepted: 0,
            rejected: 0,
            undecodable: 0,
        }
    }

    /// The stage's state (tests start partitions empty).
    pub fn state(&mut self) -> &mut KeyedState<Shadow> {
        &mut self.state
    }

    fn undecodable(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        self.undecodable += 1;
        let reason = format!("not a ShadowUpdate record: {error}");
        let dead = runtime::input_dead_letter(
            STAGE,
            "undecodable",
            reason,
            at,
            record,
            runtime::Subject::default(),
        );
        runtime::emit_dead_letter(&dead, at.partition, &self.deadletter, self.deadletter_parts)
    }
}

impl Stage for ShadowRun {
    const NAME: &'static str = STAGE;
    /// Shadows are restored when their partition is assigned, so the first update after a start
    /// or a rebalance is answered without waiting for the changelog to be read.
    const RESTORE_ON_ASSIGN: bool = true;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![
            self.shadows.to_string(),
            self.responses.to_string(),
            self.state.topic().to_string(),
            self.deadletter.to_string(),
        ]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.deadletter_parts = partitions[&*self.deadletter];
        for topic in [&self.shadows, &self.responses] {
            let n = partitions.get(&**topic).copied().unwrap_or(0);
            if n < partitions[&self.input] {
                return Err(StreamError::State(format!(
                    "`{topic}` has {n} partitions, fewer than `{}`: recreate it with as many",
                    self.input
                )));
            }
        }
        self.state.check_partitions(partitions, &self.input)
    }

    fn restore(&mut self, kafka: &KafkaConfig, partition: i32, _: i64) -> Result<(), StreamError> {
        self.state.restore(kafka, partition).map(|_| ())
    }

    fn revoke(&mut self, partition: i32) {
        self.state.forget(partition);
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let update = match avro::decode::<ShadowUpdate>(record) {
            Ok(u) => u,
            Err(e) => return Ok(self.undecodable(at, record, &e.to_string())),
        };
        self.updates += 1;
        let key = shadows::key(&update.tenant, &update.device, &update.name);
        let Some(shadow) = self.state.for_record(at.partition, &key, at.offset) else {
            // Applied before a crash; its outputs went out then.
            return Ok(Vec::new());
        };
        let outcome = apply(shadow, &update, &self.limits);
        let mut out = Vec::with_capacity(3);
        if let Some(doc) = &outcome.document {
            out.push(Emit::record(&self.shadows, at.partition, &key, doc)?);
        }
        for r in &outcome.responses {
            match r.kind {
                ShadowResponseKind::Accepted => self.accepted += 1,
                ShadowResponseKind::Rejected => self.rejected += 1,
                ShadowResponseKind::Delta => {}
            }
            out.push(Emit::record(&self.responses, at.partition, &key, r)?);
        }
        Ok(out)
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let subject = avro::decode::<ShadowUpdate>(record)
            .map(|u| runtime::Subject {
                tenant: u.tenant,
                device: u.device,
                event_id: Some(u.request_id),
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

    fn checkpoint(&mut self) -> Result<Vec<Emit>, StreamError> {
        self.state.changelog()
    }

    fn summary(&self) -> String {
        format!(
            "updates={} accepted={} rejected={} undecodable={}",
            self.updates, self.accepted, self.rejected, self.undecodable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_schemas::Micros;
    use tributary_schemas::avro::ShadowOrigin;

    fn update(id: &str, origin: ShadowOrigin, at: Micros, body: &str) -> ShadowUpdate {
        ShadowUpdate {
            request_id: id.into(),
            tenant: "acme".into(),
            device: "d1".into(),
            name: String::new(),
            origin,
            actor: "x".into(),
            received_at: at,
            body: body.as_bytes().to_vec(),
        }
    }

    fn body(r: &ShadowResponse) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn desired_then_reported_accepts_each_publishes_the_delta_and_clears_it() {
        let limits = Limits::default();
        let mut s = Shadow::default();
        let o = apply(
            &mut s,
            &update(
                "1",
                ShadowOrigin::App,
                1_000_000,
                r#"{"state":{"desired":{"fw":"2.4","led":"on"}},"clientToken":"t1"}"#,
            ),
            &limits,
        );
        let doc = o.document.expect("a changed shadow has a new document");
        assert_eq!(doc.version, 1);
        assert_eq!(o.responses.len(), 2);
        assert_eq!(o.responses[0].kind, ShadowResponseKind::Accepted);
        assert_eq!(body(&o.responses[0])["clientToken"], "t1");
        assert_eq!(o.responses[1].kind, ShadowResponseKind::Delta);
        assert_eq!(
            body(&o.responses[1])["state"],
            serde_json::json!({"fw": "2.4", "led": "on"})
        );
        // The device reports one of the two: the delta shrinks.
        let o = apply(
            &mut s,
            &update(
                "2",
                ShadowOrigin::Device,
                2_000_000,
                r#"{"state":{"reported":{"fw":"2.4"}}}"#,
            ),
            &limits,
        );
        assert_eq!(o.document.as_ref().unwrap().version, 2);
        assert_eq!(
            body(&o.responses[1])["state"],
            serde_json::json!({"led": "on"})
        );
        // And the other: the delta is empty, published as an empty message.
        let o = apply(
            &mut s,
            &update(
                "3",
                ShadowOrigin::Device,
                3_000_000,
                r#"{"state":{"reported":{"led":"on"}}}"#,
            ),
            &limits,
        );
        assert_eq!(o.responses[1].kind, ShadowResponseKind::Delta);
        assert!(o.responses[1].body.is_empty());
        let doc: Value = serde_json::from_str(&o.document.unwrap().document).unwrap();
        assert_eq!(doc["version"], 3);
        assert!(doc["state"].get("delta").is_none());
        assert_eq!(doc["state"]["reported"]["fw"], "2.4");
    }

    #[test]
    fn a_stale_version_is_rejected_with_409_and_changes_nothing() {
        let limits = Limits::default();
        let mut s = Shadow::default();
        apply(
            &mut s,
            &update(
                "1",
                ShadowOrigin::App,
                1,
                r#"{"state":{"desired":{"a":1}}}"#,
            ),
            &limits,
        );
        let before = s.clone();
        let o = apply(
            &mut s,
            &update(
                "2",
                ShadowOrigin::App,
                2,
                r#"{"state":{"desired":{"a":2}},"version":0,"clientToken":"c"}"#,
            ),
            &limits,
        );
        assert_eq!(s, before);
        assert!(o.document.is_none());
        assert_eq!(o.responses.len(), 1);
        let r = &o.responses[0];
        assert_eq!(
            (r.kind, r.status, r.version),
            (ShadowResponseKind::Rejected, 409, 1)
        );
        assert_eq!(body(r)["field"], "version");
        assert_eq!(body(r)["clientToken"], "c");
    }

    #[test]
    fn bad_bodies_are_rejected_naming_the_field_and_never_panic() {
        let limits = Limits {
            max_bytes: 200,
            max_depth: 2,
        };
        let mut s = Shadow::default();
        for (raw, status, field) in [
            ("not json", 400, "body"),
            (
                r#"{"state":{"desired":{"a":{"b":{"c":1}}}}}"#,
                400,
                "state.desired.a.b",
            ),
            (
                &format!(r#"{{"state":{{"desired":{{"a":"{}"}}}}}}"#, "x".repeat(300)),
                413,
                "state",
            ),
        ] {
            let o = apply(&mut s, &update("r", ShadowOrigin::App, 1, raw), &limits);
            let r = &o.responses[0];
            assert_eq!(
                (r.kind, r.status),
                (ShadowResponseKind::Rejected, status),
                "{raw}"
            );
            assert!(
                body(r)["field"].as_str().unwrap().starts_with(field),
                "{raw}: {}",
                r.body
            );
        }
        assert_eq!(s.version, 0);
    }

    #[test]
    fn an_update_read_again_after_a_crash_is_not_applied_twice() {
        let kafka = KafkaConfig::default();
        let mut run = ShadowRun::new(&kafka, &ShadowConfig::default());
        run.state().start_empty(0);
        let at = |offset| Position {
            topic: "shadow-updates",
            partition: 0,
            offset,
            written_at: 0,
        };
        let u = avro::encode(&update(
            "1",
            ShadowOrigin::App,
            1,
            r#"{"state":{"desired":{"a":1}}}"#,
        ))
        .unwrap();
        let first = run.process(at(0), &u).unwrap();
        assert_eq!(first.len(), 3, "document, accepted, delta");
        assert!(run.process(at(0), &u).unwrap().is_empty());
        let second = run.process(at(1), &u).unwrap();
        // The same body again at a later offset is a new update (AWS counts every accepted
        // update): version 2, a new document, and no delta message, since the delta is as it was.
        let kinds: Vec<(&str, i64)> = second
            .iter()
            .map(|e| {
                let v = e.value.as_deref().unwrap();
                if &*e.topic == "shadows" {
                    (
                        "document",
                        avro::decode::<ShadowDocument>(v).unwrap().version,
                    )
                } else {
                    let r: ShadowResponse = avro::decode(v).unwrap();
                    (r.kind.as_str(), r.version)
                }
            })
            .collect();
        assert_eq!(kinds, [("document", 2), ("accepted", 2)]);
        let garbage = run.process(at(2), b"\x00garbage").unwrap();
        assert_eq!(garbage.len(), 1);
        assert_eq!(&*garbage[0].topic, "deadletter");
    }
}
