//! Mosquitto's password file, kept in step with the device registry.
//!
//! A device gets one token, usable over HTTP (bearer) and MQTT (password). The registry keeps, beside
//! the token's SHA-256, its Mosquitto hash (`$7$`, PBKDF2-SHA512); this task writes the broker's
//! password file from the registry view (static users first: the bridge, …; then every enabled device
//! with a token) whenever the view changes or the file is not what it wrote (e.g. Mosquitto restarted
//! with its initial file), atomically, and sends Mosquitto SIGHUP so it reloads. Disabled and deleted
//! devices drop out of the file, so the broker refuses them as the HTTP endpoint does.
//!
//! The broker's ACL (pattern `devices/%u/…`) still decides which topics a device may publish to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tributary_schemas::registry::{Device, DeviceRegistry};

use crate::IngestError;
use crate::mqtt::MqttConfig;

/// Keeps one Mosquitto password file equal to the static users plus the registry's devices.
pub struct BrokerCredentials {
    password_file: PathBuf,
    static_file: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    registry: Arc<DeviceRegistry>,
}

/// What the last sync wrote: the registry generation and the file's metadata right after.
#[derive(Debug, Default, Clone, PartialEq)]
struct Written {
    generation: u64,
    file: Option<(u64, SystemTime)>,
    static_file: Option<(u64, SystemTime)>,
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl BrokerCredentials {
    /// `None` when `mqtt.password_file` is not set (the broker's users are managed elsewhere).
    pub fn new(config: &MqttConfig, registry: Arc<DeviceRegistry>) -> Option<Self> {
        Some(Self {
            password_file: config.password_file.clone()?,
            static_file: config.static_password_file.clone(),
            pid_file: config.broker_pid_file.clone(),
            registry,
        })
    }

    fn error(&self, path: &Path, source: std::io::Error) -> IngestError {
        IngestError::PasswordFile {
            path: path.display().to_string(),
            source,
        }
    }

    /// The file as the registry says it should be, and how many devices it lists.
    fn render(&self) -> Result<(String, usize), IngestError> {
        let statics = match &self.static_file {
            Some(p) => std::fs::read_to_string(p).map_err(|e| self.error(p, e))?,
            None => String::new(),
        };
        Ok(render(&statics, &self.registry.list(|_| true)))
    }

    /// Writes the file now and signals the broker; returns how many devices it lists.
    pub fn write(&self) -> Result<usize, IngestError> {
        let (content, listed) = self.render()?;
        self.replace(&content, listed)?;
        Ok(listed)
    }

    /// Writes the file if it differs from what the registry says (another instance may have
    /// written the same already); returns whether it wrote.
    fn write_if_changed(&self) -> Result<bool, IngestError> {
        let (content, listed) = self.render()?;
        if std::fs::read_to_string(&self.password_file).is_ok_and(|now| now == content) {
            return Ok(false);
        }
        self.replace(&content, listed)?;
        Ok(true)
    }

    /// Replaces the file atomically (a temporary file of this process, then a rename) and signals
    /// the broker.
    fn replace(&self, content: &str, listed: usize) -> Result<(), IngestError> {
        let tmp = self
            .password_file
            .with_extension(format!("tributary-{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, content.as_bytes()).map_err(|e| self.error(&tmp, e))?;
        std::fs::rename(&tmp, &self.password_file)
            .map_err(|e| self.error(&self.password_file, e))?;
        self.reload_broker();
        tracing::info!(file = %self.password_file.display(), devices = listed, "broker password file written");
        Ok(())
    }

    /// SIGHUP to Mosquitto (it reloads its password file); a missing pid file is not an error (the
    /// broker is not started yet and will read the file when it starts).
    fn reload_broker(&self) {
        let Some(pid_file) = &self.pid_file else {
            return;
        };
        let Ok(pid) = std::fs::read_to_string(pid_file) else {
            return;
        };
        let pid = pid.trim();
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            tracing::warn!(file = %pid_file.display(), "broker pid file does not hold a pid");
            return;
        }
        match std::process::Command::new("kill")
            .args(["-HUP", pid])
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!(pid, status = %s, "could not signal the broker"),
            Err(e) => tracing::warn!(pid, error = %e, "could not signal the broker"),
        }
    }

    fn current(&self, generation: u64) -> Written {
        Written {
            generation,
            file: stamp(&self.password_file),
            static_file: self.static_file.as_deref().and_then(stamp),
        }
    }

    /// Rewrites the file whenever the registry, the static users or the file itself changed; checks
    /// every `every`. Runs until cancelled; write failures are logged and retried.
    pub async fn run(self, every: Duration) -> Result<(), IngestError> {
        let mut last = Written::default();
        loop {
            let generation = self.registry.generation();
            if self.current(generation) != last {
                let this = &self;
                match tokio::task::block_in_place(|| this.write_if_changed()) {
                    Ok(_) => last = self.current(generation),
                    Err(e) => tracing::error!(error = %e, "broker password file not written"),
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// The password file: static lines (except users the registry now owns), then one line per enabled
/// device with a Mosquitto hash, by id. Returns the content and how many devices it lists.
fn render(statics: &str, devices: &[Arc<Device>]) -> (String, usize) {
    let mut out = String::new();
    let owned: std::collections::HashSet<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    for line in statics.lines() {
        let user = line.split(':').next().unwrap_or_default();
        if line.trim().is_empty() || owned.contains(user) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let mut listed = 0;
    for d in devices {
        if let (true, Some(hash)) = (d.enabled, &d.mqtt_password_hash) {
            out.push_str(&d.id);
            out.push(':');
            out.push_str(hash);
            out.push('\n');
            listed += 1;
        }
    }
    (out, listed)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, enabled: bool, hash: Option<&str>) -> Arc<Device> {
        let mut d = Device::new(id, "t1", 0);
        d.enabled = enabled;
        d.mqtt_password_hash = hash.map(str::to_owned);
        Arc::new(d)
    }

    #[test]
    fn lists_static_users_then_enabled_devices_with_a_token() {
        let statics = "tributary-bridge:$7$101$a$b\nold-name:$7$101$c$d\n\n";
        let devices = [
            device("d1", true, Some("$7$101$x$y")),
            device("d2", false, Some("$7$101$z$w")),
            device("jwt-only", true, None),
            device("old-name", true, Some("$7$101$new$new")),
        ];
        let (content, listed) = render(statics, &devices);
        assert_eq!(
            content,
            "tributary-bridge:$7$101$a$b\nd1:$7$101$x$y\nold-name:$7$101$new$new\n"
        );
        assert_eq!(listed, 2);
    }

    #[test]
    fn writes_the_file_private_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(DeviceRegistry::new());
        registry.put((*device("d1", true, Some("h1"))).clone());
        std::fs::write(dir.path().join("static"), "bridge:hb\n").unwrap();
        let config = MqttConfig {
            password_file: Some(dir.path().join("passwd")),
            static_password_file: Some(dir.path().join("static")),
            broker_pid_file: Some(dir.path().join("no-such.pid")),
            ..MqttConfig::default()
        };
        let creds = BrokerCredentials::new(&config, registry).unwrap();
        assert_eq!(creds.write().unwrap(), 1);
        let path = dir.path().join("passwd");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "bridge:hb\nd1:h1\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
