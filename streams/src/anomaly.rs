//! The anomaly stage: `telemetry` → `anomalies`, the tenants' detector catalogs applied to every
//! reading.
//!
//! State: one [`Series`] per (tenant, device, metric, detector), which lives as long as the series
//! (months): kept in a [`KeyedState`] restored from the compacted changelog `anomaly-state`
//! (replaying a bounded horizon of `telemetry` could not rebuild a baseline that forgets over
//! weeks, nor an anomaly open since last month). Outputs of telemetry partition *p* go to
//! partition *p* of `anomalies` (key = device, so per device in order).
//!
//! The clock. Missing heartbeats and quiet periods need time to pass without readings: each
//! partition's event-time clock ([`PartitionClocks`], `clock.rs`) decides when every series of
//! the partition is advanced ([`Series::advance`]). That decides only *when* an anomaly is
//! published: its id and start time are functions of the readings alone (a heartbeat's start is
//! the last reading plus the interval), so a rebuild or a replay after a crash gives the same ids.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tributary_schemas::avro::{self, Anomaly};
use tributary_schemas::detectors::{
    Detector, DetectorBase, DetectorCatalog, DetectorError, DetectorOverrides, DetectorSpec,
    TenantDetectors,
};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::{Micros, Reading, micros_of_secs};

use crate::StreamError;
use crate::clock::PartitionClocks;
use crate::detectors::{self, Change, Identity, Series};
use crate::runtime::{self, Batching, Emit, KeyedState, Position, Restarts, Stage};

/// The name of this stage (consumer group suffix, `stage` of its dead letters).
pub const STAGE: &str = "anomalies";

/// `[anomalies]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Detectors of every tenant, by name.
    pub detectors: BTreeMap<String, DetectorSpec>,
    /// A tenant's own detectors (a name there replaces the global one for that tenant).
    pub tenants: BTreeMap<String, TenantDetectors>,
    /// How far behind the newest reading (or the wall clock) the clock stands: readings of other
    /// devices may be this late without a silence being seen.
    pub clock_grace_secs: u64,
    /// How often (clock time) heartbeats and quiet periods are checked.
    pub sweep_secs: u64,
    pub batch_size: usize,
    pub batch_ms: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            detectors: BTreeMap::new(),
            tenants: BTreeMap::new(),
            clock_grace_secs: 30,
            sweep_secs: 5,
            batch_size: 2000,
            batch_ms: 100,
        }
    }
}

impl AnomalyConfig {
    /// The config file's detectors; `metrics`: the metric names detectors may watch.
    pub fn base(&self, metrics: Option<std::collections::BTreeSet<String>>) -> DetectorBase {
        DetectorBase {
            global: self.detectors.clone(),
            tenants: self.tenants.clone(),
            metrics,
        }
    }

    /// The checked catalog of the config file alone.
    pub fn catalog(
        &self,
        metrics: Option<&std::collections::BTreeSet<String>>,
    ) -> Result<DetectorCatalog, DetectorError> {
        self.base(metrics.cloned()).compile(&BTreeMap::new())
    }
}

/// What the stage keeps per (tenant, device, metric, detector).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub series: Series,
    /// The device's group and site as its latest reading carried them (for clock-made records).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub site: Vec<String>,
}

/// The state key of a series under a detector.
pub fn state_key(tenant: &str, device: &str, metric: &str, detector: &str) -> String {
    format!("{tenant}\u{1f}{device}\u{1f}{metric}\u{1f}{detector}")
}

fn parse_key(key: &str) -> Option<(&str, &str, &str, &str)> {
    let mut parts = key.split('\u{1f}');
    Some((parts.next()?, parts.next()?, parts.next()?, parts.next()?))
}

/// The anomaly record of a lifecycle change.
pub fn anomaly_record(
    who: Identity<'_>,
    detector: &Detector,
    watch: &Watch,
    change: &Change,
    source: (&str, i32, i64),
) -> Anomaly {
    let e = &change.evidence;
    Anomaly {
        anomaly_id: change.id.clone(),
        seq: change.seq,
        state: change.state,
        tenant: who.tenant.to_owned(),
        device: who.device.to_owned(),
        metric: who.metric.to_owned(),
        detector: detector.name.clone(),
        kind: detector.rule.kind().as_str().to_owned(),
        severity: detector.severity.as_str().to_owned(),
        device_group: watch.group.clone(),
        site: watch.site.clone(),
        start_time: change.start,
        end_time: change.end,
        event_time: change.event_time,
        value: e.value,
        baseline: e.baseline,
        threshold: e.threshold,
        score: e.score,
        window_secs: e.window_secs,
        predicted_time: e.predicted_time,
        readings: change.readings,
        flaps: change.flaps,
        suppressed: change.suppressed,
        message: detectors::message(detector, who.metric, change),
        source_topic: source.0.to_owned(),
        source_partition: source.1,
        source_offset: source.2,
    }
}

/// Detection without Kafka: what the live stage does to one partition, for tests and
/// `tributary anomalies backtest` (the same code as the live stage).
pub struct Detection {
    catalog: Arc<DetectorCatalog>,
    state: KeyedState<Watch>,
    clocks: PartitionClocks,
    pub readings: u64,
    pub anomalies: u64,
}

impl Detection {
    pub fn new(catalog: Arc<DetectorCatalog>, config: &AnomalyConfig, changelog: &str) -> Self {
        Self {
            catalog,
            state: KeyedState::new(changelog),
            clocks: PartitionClocks::new(
                micros_of_secs(config.clock_grace_secs),
                micros_of_secs(config.sweep_secs),
            ),
            readings: 0,
            anomalies: 0,
        }
    }

    /// One reading at `offset` of `partition`, written to its topic at `written_at`: its anomaly
    /// records.
    pub fn reading(
        &mut self,
        partition: i32,
        offset: i64,
        written_at: Micros,
        r: &Reading,
        topic: &str,
    ) -> Vec<Anomaly> {
        self.readings += 1;
        let mut out = Vec::new();
        let who = Identity {
            tenant: &r.tenant,
            device: &r.device,
            metric: &r.metric,
        };
        let catalog = self.catalog.clone();
        for d in catalog.of(&r.tenant) {
            if d.metric != r.metric
                || !d.scope.covers(
                    r.device_group.as_deref(),
                    r.device_model.as_deref(),
                    &r.site,
                )
            {
                continue;
            }
            let key = state_key(&r.tenant, &r.device, &r.metric, &d.name);
            let Some(watch) = self.state.for_record(partition, &key, offset) else {
                continue;
            };
            if watch.group != r.device_group {
                watch.group = r.device_group.clone();
            }
            if watch.site != r.site {
                watch.site = r.site.clone();
            }
            for change in watch.series.observe(who, d, r.event_time, r.value) {
                out.push(anomaly_record(
                    who,
                    d,
                    watch,
                    &change,
                    (topic, partition, offset),
                ));
            }
        }
        // The partition's clock: swept at each multiple of the interval it crosses.
        if let Some(now) = self.clocks.observe(partition, r.event_time, written_at) {
            out.extend(self.sweep_partition(partition, now, topic));
        }
        self.anomalies += out.len() as u64;
        out
    }

    /// Advances every series of `partition` to `now`.
    fn sweep_partition(&mut self, partition: i32, now: Micros, topic: &str) -> Vec<Anomaly> {
        let catalog = &self.catalog;
        let mut out = Vec::new();
        self.state.for_each(partition, |key, watch| {
            let Some((tenant, device, metric, name)) = parse_key(key) else {
                return false;
            };
            let Some(d) = catalog.find(tenant, name) else {
                return false;
            };
            if !watch.series.has_timer(d) {
                return false;
            }
            let who = Identity {
                tenant,
                device,
                metric,
            };
            let changes = watch.series.advance(who, d, now);
            for change in &changes {
                out.push(anomaly_record(
                    who,
                    d,
                    watch,
                    change,
                    (topic, partition, -1),
                ));
            }
            !changes.is_empty()
        });
        out
    }

    /// The input is quiet and the wall clock stands at `wall`: each partition's clock goes on by
    /// the wall time since its newest record was written, and its series are advanced (at most
    /// once per sweep interval).
    pub fn idle(&mut self, wall: Micros, topic: &str) -> Vec<(i32, Anomaly)> {
        let mut out = Vec::new();
        for (partition, now) in self.clocks.idle(wall) {
            for a in self.sweep_partition(partition, now, topic) {
                out.push((partition, a));
            }
        }
        self.anomalies += out.len() as u64;
        out
    }

    /// Advances every series of `partition` to the clock time `now` (a backtest's end).
    pub fn advance_to(&mut self, partition: i32, now: Micros, topic: &str) -> Vec<Anomaly> {
        let now = self.clocks.behind(now);
        let out = self.sweep_partition(partition, now, topic);
        self.anomalies += out.len() as u64;
        out
    }

    /// Detectors from now on. A series keeps its state under a detector whose name stays (with
    /// its new parameters); the state of a series whose detector is gone stays idle in the
    /// changelog (a detector added again under that name picks it up).
    pub fn set_catalog(&mut self, catalog: Arc<DetectorCatalog>) {
        self.catalog = catalog;
    }

    /// Starts `partition` with no state (tests, backtests).
    pub fn start_empty(&mut self, partition: i32) {
        self.state.start_empty(partition);
        self.clocks.forget(partition);
    }

    /// Restores `partition` from the changelog; its clock starts at the newest reading the state
    /// holds.
    fn restore(&mut self, kafka: &KafkaConfig, partition: i32) -> Result<(), StreamError> {
        self.state.restore(kafka, partition)?;
        let mut newest: Option<Micros> = None;
        self.state.for_each(partition, |_, w| {
            if let Some((t, _)) = w.series.last {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
            false
        });
        self.clocks.restore(partition, newest);
        Ok(())
    }

    fn forget(&mut self, partition: i32) {
        self.state.forget(partition);
        self.clocks.forget(partition);
    }

    /// The changelog records of the series changed since the last call (the runtime writes them
    /// after each batch's outputs).
    pub fn changelog(&mut self) -> Result<Vec<Emit>, StreamError> {
        self.state.changelog()
    }

    /// Series held in `partition`.
    pub fn series(&self, partition: i32) -> usize {
        self.state.len(partition)
    }
}

/// The anomaly stage: one member of the `<prefix>-anomalies` consumer group.
pub struct AnomalyStage {
    kafka: KafkaConfig,
    config: AnomalyConfig,
    base: DetectorBase,
    /// The tenants' detectors set through the admin API (followed from `detector-catalog`).
    overrides: Arc<DetectorOverrides>,
    restarts: Restarts,
}

impl AnomalyStage {
    pub fn new(
        kafka: KafkaConfig,
        config: AnomalyConfig,
        base: DetectorBase,
        overrides: Arc<DetectorOverrides>,
    ) -> Self {
        Self {
            kafka,
            config,
            base,
            overrides,
            restarts: Restarts::new(),
        }
    }

    /// Runs until the task is cancelled or Kafka fails for good. While no tenant has a detector
    /// (in the config file or through the API) the stage waits outside its consumer group.
    pub async fn run(&self) -> Result<(), StreamError> {
        let mut waiting_logged = false;
        let (generation, catalog) = loop {
            let generation = self.overrides.generation();
            let catalog = self
                .base
                .compile(&self.overrides.snapshot())
                .map_err(|e| StreamError::State(e.to_string()))?;
            if !catalog.is_empty() {
                break (generation, catalog);
            }
            if !waiting_logged {
                tracing::info!(
                    "no detectors yet (config file or admin API): the anomaly stage waits for one"
                );
                waiting_logged = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let topics = &self.kafka.topics;
        let run = AnomalyRun {
            detection: Detection::new(Arc::new(catalog), &self.config, &topics.anomaly_state),
            base: self.base.clone(),
            overrides: self.overrides.clone(),
            generation,
            input: topics.telemetry.clone(),
            anomalies: Arc::from(topics.anomalies.as_str()),
            deadletter: Arc::from(topics.deadletter.as_str()),
            anomaly_parts: 1,
            deadletter_parts: 1,
            undecodable: 0,
            last_idle: Instant::now(),
            sweep: Duration::from_secs(self.config.sweep_secs.max(1)),
        };
        let batching = Batching::new(self.config.batch_size, self.config.batch_ms);
        self.restarts.run(&self.kafka, run, batching).await
    }
}

/// One run of the anomaly stage: the [`Stage`] the runtime drives.
struct AnomalyRun {
    detection: Detection,
    base: DetectorBase,
    overrides: Arc<DetectorOverrides>,
    /// The overrides' generation the detection's catalog was built from.
    generation: u64,
    input: String,
    anomalies: Arc<str>,
    deadletter: Arc<str>,
    anomaly_parts: i32,
    deadletter_parts: i32,
    undecodable: u64,
    last_idle: Instant,
    sweep: Duration,
}

impl AnomalyRun {
    fn emit(&self, partition: i32, a: &Anomaly) -> Result<Emit, StreamError> {
        Emit::record(
            &self.anomalies,
            partition % self.anomaly_parts,
            &a.device,
            a,
        )
    }
}

impl Stage for AnomalyRun {
    const NAME: &'static str = STAGE;

    fn input(&self) -> &str {
        &self.input
    }

    fn outputs(&self) -> Vec<String> {
        vec![
            self.anomalies.to_string(),
            self.detection.state.topic().to_string(),
            self.deadletter.to_string(),
        ]
    }

    fn open(&mut self, partitions: &HashMap<String, i32>) -> Result<(), StreamError> {
        self.anomaly_parts = partitions[&*self.anomalies];
        self.deadletter_parts = partitions[&*self.deadletter];
        self.detection
            .state
            .check_partitions(partitions, &self.input)
    }

    fn restore(
        &mut self,
        kafka: &KafkaConfig,
        partition: i32,
        _offset: i64,
    ) -> Result<(), StreamError> {
        self.detection.restore(kafka, partition)
    }

    fn revoke(&mut self, partition: i32) {
        self.detection.forget(partition);
    }

    fn process(&mut self, at: Position<'_>, record: &[u8]) -> Result<Vec<Emit>, StreamError> {
        let reading = match avro::decode::<Reading>(record) {
            Ok(r) => r,
            Err(e) => {
                // The telemetry table's sink dead-letters undecodable records (once, for all).
                self.undecodable += 1;
                tracing::debug!(partition = at.partition, offset = at.offset, error = %e, "undecodable telemetry record skipped");
                return Ok(Vec::new());
            }
        };
        self.detection
            .reading(at.partition, at.offset, at.written_at, &reading, at.topic)
            .iter()
            .map(|a| self.emit(at.partition, a))
            .collect()
    }

    fn give_up(&mut self, at: Position<'_>, record: &[u8], error: &str) -> Vec<Emit> {
        let subject = avro::decode::<Reading>(record)
            .map(|r| runtime::Subject {
                tenant: r.tenant,
                device: r.device,
                event_id: Some(r.event_id),
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
        if self.last_idle.elapsed() < self.sweep {
            return Ok(Vec::new());
        }
        self.last_idle = Instant::now();
        let topic = self.input.clone();
        self.detection
            .idle(now, &topic)
            .iter()
            .map(|(p, a)| self.emit(*p, a))
            .collect()
    }

    fn refresh(&mut self) {
        let generation = self.overrides.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        match self.base.compile(&self.overrides.snapshot()) {
            Ok(catalog) => {
                tracing::info!("detector catalog changed; applied from the next reading");
                self.detection.set_catalog(Arc::new(catalog));
            }
            // Checked before it was recorded; only a config file changed since can refuse it.
            Err(e) => {
                tracing::error!(error = %e, "changed detector catalog refused; the previous one stays")
            }
        }
    }

    fn checkpoint(&mut self) -> Result<Vec<Emit>, StreamError> {
        self.detection.changelog()
    }

    fn summary(&self) -> String {
        format!(
            "readings={} anomalies={} undecodable={}",
            self.detection.readings, self.detection.anomalies, self.undecodable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_schemas::avro::AnomalyState;

    const S: Micros = 1_000_000;
    const T0: Micros = 1_700_000_000 * S;

    fn config(detectors: &str) -> AnomalyConfig {
        toml::from_str(detectors).unwrap()
    }

    fn reading(device: &str, metric: &str, t: Micros, value: f64) -> Reading {
        Reading {
            tenant: "acme".into(),
            device: device.into(),
            metric: metric.into(),
            value,
            unit: None,
            original_value: None,
            original_unit: None,
            late: false,
            event_time: t,
            ingest_time: t,
            event_id: format!("{device}-{t}"),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: 0,
            source_index: 0,
            measurement: None,
            name: None,
            conflict: false,
            device_group: Some("pumps".into()),
            device_model: None,
            site: vec!["north".into(), "hall 3".into()],
        }
    }

    fn detection(c: &AnomalyConfig) -> Detection {
        let catalog = Arc::new(c.catalog(None).unwrap());
        let mut d = Detection::new(catalog, c, "anomaly-state");
        d.start_empty(0);
        d
    }

    #[test]
    fn readings_of_other_devices_move_the_clock_that_finds_a_silent_one() {
        let c = config(
            "clock_grace_secs = 10\nsweep_secs = 5\n[detectors.quiet]\nmetric = 'temperature'\nkind = 'heartbeat'\ninterval_secs = 60",
        );
        let mut d = detection(&c);
        let mut out = Vec::new();
        for i in 0..200i64 {
            // d1 stops after 30 s; d2 goes on.
            if i < 30 {
                out.extend(d.reading(
                    0,
                    i * 2,
                    T0 + i * S,
                    &reading("d1", "temperature", T0 + i * S, 1.0),
                    "telemetry",
                ));
            }
            out.extend(d.reading(
                0,
                i * 2 + 1,
                T0 + i * S,
                &reading("d2", "temperature", T0 + i * S, 1.0),
                "telemetry",
            ));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        let a = &out[0];
        assert_eq!(
            (a.device.as_str(), a.state, a.source_offset),
            ("d1", AnomalyState::Open, -1)
        );
        assert_eq!(a.start_time, T0 + 29 * S + 60 * S);
        assert_eq!(a.site, vec!["north".to_owned(), "hall 3".to_owned()]);
        assert_eq!(a.device_group.as_deref(), Some("pumps"));
        assert!(
            a.message.contains("no temperature reading"),
            "{}",
            a.message
        );
    }

    #[test]
    fn a_quiet_input_is_advanced_by_the_wall_clock_and_ids_match_a_replay() {
        let c = config(
            "clock_grace_secs = 10\nsweep_secs = 5\n[detectors.quiet]\nmetric = 'temperature'\nkind = 'heartbeat'\ninterval_secs = 60",
        );
        // Readings an hour old, written to telemetry now (a backfill): the quiet time counts
        // from when they were written, not from their event time.
        let written = T0 + 3600 * S;
        let mut live = detection(&c);
        live.reading(
            0,
            0,
            written,
            &reading("d1", "temperature", T0, 1.0),
            "telemetry",
        );
        assert!(
            live.idle(written + 30 * S, "telemetry").is_empty(),
            "a backfill is not a silence"
        );
        let opened = live.idle(written + 100 * S, "telemetry");
        assert_eq!(opened.len(), 1, "100 s of quiet");
        assert_eq!(opened[0].1.start_time, T0 + 60 * S);
        let back = live.reading(
            0,
            1,
            written + 500 * S,
            &reading("d1", "temperature", T0 + 500 * S, 1.0),
            "telemetry",
        );
        let mut replay = detection(&c);
        replay.reading(
            0,
            0,
            written,
            &reading("d1", "temperature", T0, 1.0),
            "telemetry",
        );
        let found = replay.reading(
            0,
            1,
            written,
            &reading("d1", "temperature", T0 + 500 * S, 1.0),
            "telemetry",
        );
        let ids = |v: &[Anomaly]| {
            v.iter()
                .map(|a| (a.anomaly_id.clone(), a.seq))
                .collect::<Vec<_>>()
        };
        let mut live_ids = ids(&[opened[0].1.clone()]);
        live_ids.extend(ids(&back));
        assert_eq!(live_ids, ids(&found));
    }

    #[test]
    fn scopes_and_metrics_pick_the_detectors() {
        let c = config(
            "[detectors.hot]\nmetric = 'temperature'\nkind = 'threshold'\nabove = 50.0\ngroup = 'fans'\n[detectors.hot_pumps]\nmetric = 'temperature'\nkind = 'threshold'\nabove = 50.0\ngroup = 'pumps'",
        );
        let mut d = detection(&c);
        let out = d.reading(
            0,
            0,
            T0,
            &reading("d1", "temperature", T0, 60.0),
            "telemetry",
        );
        assert_eq!(
            out.iter().map(|a| a.detector.as_str()).collect::<Vec<_>>(),
            vec!["hot_pumps"]
        );
        assert!(
            d.reading(
                0,
                1,
                T0,
                &reading("d1", "humidity", T0 + S, 60.0),
                "telemetry"
            )
            .is_empty()
        );
    }

    #[test]
    fn state_keys_round_trip() {
        let k = state_key("acme", "d:1", "temperature", "hot");
        assert_eq!(parse_key(&k), Some(("acme", "d:1", "temperature", "hot")));
    }
}
