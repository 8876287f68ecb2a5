//! Topic names (configurable, defaults here) and how each topic is created.

use serde::{Deserialize, Serialize};

/// The names of Tributary's Kafka topics. Configured under `[topics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    /// Raw envelopes as received (source of truth), key = device.
    pub raw: String,
    /// Clean readings, key = device.
    pub telemetry: String,
    /// Rejected inputs with reason and provenance.
    pub deadletter: String,
    /// Device registry changes, compacted, key = device (the latest record is the device).
    pub registry: String,
    /// Tenants' metric catalogs set through the admin API, compacted, key = tenant.
    pub catalog: String,
    /// Tenants' anomaly detectors set through the admin API, compacted, key = tenant.
    pub detector_catalog: String,
    /// Tenants' incident rules set through the admin API, compacted, key = tenant.
    pub incident_rules: String,
    /// Anomaly lifecycle records (open, update, resolved), key = device: what alerting consumers
    /// subscribe to.
    pub anomalies: String,
    /// The anomaly stage's state changelog, compacted, key = series and detector (internal to
    /// the stage, not a contract).
    pub anomaly_state: String,
    /// Internal: anomalies re-keyed by incident rule and correlation key, and people's actions on
    /// incidents (the incident stage's input).
    pub incident_inputs: String,
    /// Incident lifecycle records, key = incident id: what alerting consumers subscribe to.
    pub incidents: String,
    /// The incident stage's state changelog, compacted, key = tenant, rule and correlation key.
    pub incident_state: String,
    /// The alert delivery stage's state changelog, compacted, key = incident id: what each
    /// receiver has been told (internal to the stage).
    pub alert_state: String,
    /// Every device shadow update request as received (device or app), before it is applied,
    /// key = tenant/device/name, kept forever: with `raw`, the source of truth of shadows.
    pub shadow_updates: String,
    /// The shadow stage's answers (accepted, rejected, delta), key = tenant/device/name: published
    /// to devices over MQTT and handed to the HTTP requests waiting for them.
    pub shadow_responses: String,
    /// The current document of each shadow, compacted, key = tenant/device/name.
    pub shadows: String,
    /// The shadow stage's state changelog, compacted (internal to the stage).
    pub shadow_state: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            raw: "raw".into(),
            telemetry: "telemetry".into(),
            deadletter: "deadletter".into(),
            registry: "registry".into(),
            catalog: "catalog".into(),
            detector_catalog: "detector-catalog".into(),
            incident_rules: "incident-rules".into(),
            anomalies: "anomalies".into(),
            anomaly_state: "anomaly-state".into(),
            incident_inputs: "incident-inputs".into(),
            incidents: "incidents".into(),
            incident_state: "incident-state".into(),
            alert_state: "alert-state".into(),
            shadow_updates: "shadow-updates".into(),
            shadow_responses: "shadow-responses".into(),
            shadows: "shadows".into(),
            shadow_state: "shadow-state".into(),
        }
    }
}

/// How one topic is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `cleanup.policy=compact` (latest value per key) rather than delete.
    pub compacted: bool,
    /// `retention.ms=-1`: a source of truth (`raw`, `shadow-updates`), never expired.
    pub keep_forever: bool,
}

impl Topics {
    /// Every topic Tributary needs, each with `partitions` partitions.
    ///
    /// Derived topics have as many partitions as `raw`: the cleanse stage writes the outputs of raw
    /// partition *p* to partition *p* of each derived topic, which keeps per-device order and lets the
    /// lake sink drop re-emitted outputs by their source position (see ARCHITECTURE.md).
    /// The registry topic is compacted: its latest record per device is the device; the catalog
    /// and detector catalog topics too (latest per tenant), with one partition.
    pub fn specs(&self, partitions: i32) -> Vec<TopicSpec> {
        let mut specs: Vec<TopicSpec> = [
            &self.raw,
            &self.telemetry,
            &self.deadletter,
            &self.anomalies,
            &self.incident_inputs,
            &self.incidents,
            &self.shadow_updates,
            &self.shadow_responses,
        ]
        .into_iter()
        .map(|name| TopicSpec {
            name: name.clone(),
            partitions,
            compacted: false,
            keep_forever: *name == self.raw || *name == self.shadow_updates,
        })
        .collect();
        // Compacted, key = device / series: the latest record per key is the state. The
        // anomaly stage's changelog has a partition per `telemetry` partition.
        for name in [
            &self.registry,
            &self.anomaly_state,
            &self.incident_state,
            &self.alert_state,
            &self.shadows,
            &self.shadow_state,
        ] {
            specs.push(TopicSpec {
                name: name.clone(),
                partitions,
                compacted: true,
                keep_forever: false,
            });
        }
        // Few records (one per tenant), read whole by every cleanse, anomaly, incident and API
        // process.
        for name in [&self.catalog, &self.detector_catalog, &self.incident_rules] {
            specs.push(TopicSpec {
                name: name.clone(),
                partitions: 1,
                compacted: true,
                keep_forever: false,
            });
        }
        specs
    }
}
