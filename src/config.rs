//! The one configuration: a TOML file plus `TRIBUTARY_<SECTION>__<KEY>` environment overrides.
//! Every key is defined once, in the config struct of the component that uses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use tributary_ingest::http::HttpConfig;
use tributary_ingest::mqtt::MqttConfig;
use tributary_lake::LakeConfig;
use tributary_lake::timeseries_sink::TimeSeriesConfig;
use tributary_query::QueryConfig;
use tributary_registry::RegistryConfig;
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::shadows::ShadowConfig;
use tributary_streams::alerts::AlertsConfig;
use tributary_streams::anomaly::AnomalyConfig;
use tributary_streams::cleanse::CleanseConfig;
use tributary_streams::incidents::IncidentConfig;

/// `[simulator]`: where the device simulator and the `tributary devices` CLI find the HTTP API,
/// and where the simulator finds its devices' secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Base URL of the HTTP API (ingest and admin).
    pub http_url: String,
    /// Device ids, tenants and tokens written by `tributary devices seed` (secret: mode 0600).
    pub tokens_path: PathBuf,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            http_url: "http://127.0.0.1:8080".into(),
            tokens_path: "./data/device-tokens.json".into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub registry: RegistryConfig,
    pub cleanse: CleanseConfig,
    pub anomalies: AnomalyConfig,
    pub incidents: IncidentConfig,
    pub alerts: AlertsConfig,
    pub lake: LakeConfig,
    pub timeseries: TimeSeriesConfig,
    pub query: QueryConfig,
    pub shadows: ShadowConfig,
    pub simulator: SimulatorConfig,
}

/// An invalid configuration, naming the key and what is allowed.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Environment variables that are not config keys.
const NOT_KEYS: [&str; 5] = [
    "config",
    "log",
    "sql_server",
    "sql_token",
    // `TRIBUTARY_FAULT_INJECT_PANIC`: streams::containment::FaultInjection, for tests.
    "fault_inject_panic",
];

impl Config {
    /// Defaults, then the file (if given, or `./tributary.toml` if present), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                figment = figment.merge(Toml::file(path));
            }
            None if Path::new("tributary.toml").exists() => {
                figment = figment.merge(Toml::file("tributary.toml"))
            }
            None => {}
        }
        figment = figment.merge(Env::prefixed("TRIBUTARY_").split("__").ignore(&NOT_KEYS));
        let config: Config = figment.extract().map_err(|e| {
            let first = e.into_iter().next();
            match first {
                Some(e) => {
                    let key = e.path.join(".");
                    let kind = e.kind.to_string();
                    if key.is_empty() {
                        ConfigError(kind)
                    } else {
                        ConfigError(format!("`{key}`: {kind}"))
                    }
                }
                None => ConfigError("unreadable configuration".into()),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: ranges, addresses, URLs, patterns.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: &dyn std::fmt::Display, allowed: &str| {
            Err(ConfigError(format!("`{key}` = {value}: {allowed}")))
        };
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers", &"\"\"", "must list at least one host:port");
        }
        if !(1..=1024).contains(&self.kafka.partitions) {
            return bad(
                "kafka.partitions",
                &self.kafka.partitions,
                "must be between 1 and 1024",
            );
        }
        for (key, name) in [
            ("kafka.topics.raw", &self.kafka.topics.raw),
            ("kafka.topics.telemetry", &self.kafka.topics.telemetry),
            ("kafka.topics.deadletter", &self.kafka.topics.deadletter),
            ("kafka.topics.registry", &self.kafka.topics.registry),
            ("kafka.topics.catalog", &self.kafka.topics.catalog),
            ("kafka.topics.anomalies", &self.kafka.topics.anomalies),
            (
                "kafka.topics.anomaly_state",
                &self.kafka.topics.anomaly_state,
            ),
            (
                "kafka.topics.detector_catalog",
                &self.kafka.topics.detector_catalog,
            ),
            (
                "kafka.topics.incident_inputs",
                &self.kafka.topics.incident_inputs,
            ),
            ("kafka.topics.incidents", &self.kafka.topics.incidents),
            (
                "kafka.topics.incident_state",
                &self.kafka.topics.incident_state,
            ),
            ("kafka.topics.alert_state", &self.kafka.topics.alert_state),
            (
                "kafka.topics.incident_rules",
                &self.kafka.topics.incident_rules,
            ),
            (
                "kafka.topics.shadow_updates",
                &self.kafka.topics.shadow_updates,
            ),
            (
                "kafka.topics.shadow_responses",
                &self.kafka.topics.shadow_responses,
            ),
            ("kafka.topics.shadows", &self.kafka.topics.shadows),
            ("kafka.topics.shadow_state", &self.kafka.topics.shadow_state),
        ] {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return bad(
                    key,
                    &format!("{name:?}"),
                    "must be a non-empty Kafka topic name of [a-zA-Z0-9._-]",
                );
            }
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "http.listen",
                &format!("{:?}", self.http.listen),
                "must be an address like 127.0.0.1:8080",
            );
        }
        for (key, value) in [
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            ("http.max_messages", self.http.max_messages as u64),
            ("http.tenant_burst", u64::from(self.http.tenant_burst)),
            ("http.ack_timeout_ms", self.http.ack_timeout_ms),
            ("shadows.max_bytes", self.shadows.max_bytes as u64),
            ("shadows.max_depth", self.shadows.max_depth as u64),
            ("shadows.answer_timeout_ms", self.shadows.answer_timeout_ms),
            ("shadows.batch_size", self.shadows.batch_size as u64),
        ] {
            if value == 0 {
                return bad(key, &0, "must be at least 1");
            }
        }
        let devices = self
            .mqtt
            .topic_pattern
            .split('/')
            .filter(|s| *s == "{device}")
            .count();
        if devices != 1 || self.mqtt.topic_pattern.contains('#') {
            return bad(
                "mqtt.topic_pattern",
                &format!("{:?}", self.mqtt.topic_pattern),
                "must contain exactly one `{device}` segment and no `#`, e.g. devices/{device}/telemetry",
            );
        }
        if self.mqtt.share_group.is_empty() || self.mqtt.share_group.contains(['/', '+', '#']) {
            return bad(
                "mqtt.share_group",
                &format!("{:?}", self.mqtt.share_group),
                "must be a non-empty name without / + #",
            );
        }
        if self.mqtt.receive_maximum == 0 {
            return bad("mqtt.receive_maximum", &0, "must be between 1 and 65535");
        }
        if let Err(e) =
            tributary_registry::self_registration::tenant_keys(&self.registry.tenant_keys)
        {
            return Err(ConfigError(e.to_string()));
        }
        if self.cleanse.batch_size == 0 {
            return bad("cleanse.batch_size", &0, "must be at least 1");
        }
        if let Err(e) = self.cleanse.catalog() {
            return Err(ConfigError(format!(
                "`{}`: {}",
                format_args!("cleanse.{}", e.key),
                e.reason
            )));
        }
        if let Err(e) = self.anomalies.catalog(self.cleanse.metric_names().as_ref()) {
            return Err(ConfigError(format!(
                "`anomalies.detectors.{}.{}`: {}",
                e.detector, e.field, e.reason
            )));
        }
        if self.anomalies.batch_size == 0 {
            return bad("anomalies.batch_size", &0, "must be at least 1");
        }
        if let Err(e) = self.incidents.compile() {
            return Err(ConfigError(format!(
                "`incidents.rules.{}.{}`: {}",
                e.rule, e.field, e.reason
            )));
        }
        if self.incidents.batch_size == 0 {
            return bad("incidents.batch_size", &0, "must be at least 1");
        }
        if let Err(e) = self.alerts.check() {
            return Err(ConfigError(e.to_string()));
        }
        if self.lake.flush_rows == 0 {
            return bad("lake.flush_rows", &0, "must be at least 1");
        }
        if let Err(e) = self.lake.root_url() {
            return Err(ConfigError(format!("`lake.url`: {e}")));
        }
        if self.timeseries.enabled()
            && let Err(e) = self.timeseries.write_url()
        {
            return Err(ConfigError(e.to_string()));
        }
        if self.timeseries.batch_points == 0 {
            return bad("timeseries.batch_points", &0, "must be at least 1");
        }
        if self.timeseries.flush_interval_ms == 0 {
            return bad("timeseries.flush_interval_ms", &0, "must be at least 1");
        }
        self.query.validate().map_err(ConfigError)?;
        for (key, addr) in [
            ("query.http_listen", &self.query.http_listen),
            ("query.pg_listen", &self.query.pg_listen),
        ] {
            if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
                return bad(
                    key,
                    &format!("{addr:?}"),
                    "must be host:port (or \"\" to disable)",
                );
            }
        }
        if !self.simulator.http_url.starts_with("http://")
            && !self.simulator.http_url.starts_with("https://")
        {
            return bad(
                "simulator.http_url",
                &format!("{:?}", self.simulator.http_url),
                "must start with http:// or https://",
            );
        }
        Ok(())
    }

    /// The configuration as TOML with secrets masked.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        if c.mqtt.password.is_some() {
            c.mqtt.password = Some("<redacted>".into());
        }
        if c.registry.admin_token.is_some() {
            c.registry.admin_token = Some("<redacted>".into());
        }
        for v in c.lake.storage_options.values_mut() {
            *v = "<redacted>".into();
        }
        for secret in [&mut c.timeseries.token, &mut c.timeseries.password] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        c.query = c.query.redacted();
        for w in c.alerts.webhooks.values_mut() {
            w.secret = "<redacted>".into();
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.lake.url = dir.path().join("lake").display().to_string();
        c.validate().unwrap();
    }

    #[test]
    fn invalid_values_name_the_key_and_what_is_allowed() {
        let mut c = Config::default();
        c.kafka.partitions = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid configuration: `kafka.partitions` = 0: must be between 1 and 1024"
        );
        let mut c = Config::default();
        c.mqtt.topic_pattern = "devices/+/telemetry".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`mqtt.topic_pattern`")
        );
        let mut c = Config::default();
        c.timeseries.url = "influx:8086".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("timeseries.url `influx:8086` is not usable"),
        );
        let mut c = Config::default();
        c.lake.url = "ftp://host/x".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`lake.url`") && e.contains("allowed: a local path, file:// or s3://"),
            "{e}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn file_and_environment_are_merged_and_type_errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[kafka]\nbrokers = \"10.0.0.1:9092\"\n[lake]\nurl = \"lake\"\n",
            )?;
            jail.set_env("TRIBUTARY_HTTP__LISTEN", "127.0.0.1:9999");
            let c = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
            assert_eq!(c.http.listen, "127.0.0.1:9999");
            // Ids of digits arrive as numbers from the environment and are still ids.
            jail.set_env("TRIBUTARY_KAFKA__INSTANCE_ID", "2");
            jail.set_env("TRIBUTARY_MQTT__CLIENT_ID", "7");
            let c = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                (c.kafka.instance_id.as_str(), c.mqtt.client_id.as_str()),
                ("2", "7")
            );
            jail.set_env("TRIBUTARY_KAFKA__PARTITIONS", "many");
            let e = Config::load(Some(Path::new("t.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`kafka.partitions`"), "{e}");
            jail.set_env("TRIBUTARY_KAFKA__PARTITIONS", "3");
            jail.set_env("TRIBUTARY_KAFKA__BROKERZ", "x");
            let e = Config::load(Some(Path::new("t.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("brokerz"), "{e}");
            Ok(())
        });
    }
}
