//! `tributary devices seed`: a registry of simulated devices and their secrets.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tributary_schemas::registry::{Device, RegistryFile, token_hash};

use crate::config::Config;

#[derive(Args)]
pub struct SeedArgs {
    /// How many devices.
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    /// Spread over this many tenants (tenant-1 … tenant-N).
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Also write `device:token` lines here, for `mosquitto_passwd -U` (mode 0600).
    #[arg(long)]
    pub mosquitto_passwd: Option<std::path::PathBuf>,
}

/// One device's secret, as the simulator reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSecret {
    pub device: String,
    pub tenant: String,
    pub token: String,
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

pub fn seed(config: &Config, args: SeedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.count >= 1 && args.tenants >= 1,
        "--count and --tenants must be at least 1"
    );
    let mut rng = rand::rng();
    let mut secrets = Vec::with_capacity(args.count);
    let mut devices = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let mut raw = [0u8; 24];
        rng.fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let device = format!("dev-{:05}", i + 1);
        let tenant = format!("tenant-{}", i % args.tenants + 1);
        devices.push(Device {
            id: device.clone(),
            tenant: tenant.clone(),
            token_sha256: token_hash(&token),
            enabled: true,
            subject: None,
        });
        secrets.push(DeviceSecret {
            device,
            tenant,
            token,
        });
    }
    let registry = serde_json::to_vec_pretty(&RegistryFile { devices })?;
    write_private(&config.registry.path, &registry)?;
    write_private(
        &config.simulator.tokens_path,
        &serde_json::to_vec_pretty(&secrets)?,
    )?;
    if let Some(path) = &args.mosquitto_passwd {
        let lines: String = secrets
            .iter()
            .map(|s| format!("{}:{}\n", s.device, s.token))
            .collect();
        write_private(path, lines.as_bytes())?;
    }
    println!(
        "seeded {} devices over {} tenants: registry {}, tokens {}",
        args.count,
        args.tenants,
        config.registry.path.display(),
        config.simulator.tokens_path.display()
    );
    Ok(())
}

/// The secrets written by [`seed`].
pub fn load_secrets(path: &Path) -> anyhow::Result<Vec<DeviceSecret>> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading device tokens {} (run `tributary devices seed`)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}
