//! `tributary devices …`: the device registry from the command line. Every command but `seed` is a
//! call of the admin API (`/v1/devices…`), so the CLI can do nothing the API cannot. `seed` is the
//! local bootstrap: it records simulated devices straight on the `registry` topic (before any API
//! runs) and writes their tokens for the simulator and for Mosquitto.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tributary_registry::issue_token;
use tributary_registry::writer::RegistryWriter;
use tributary_schemas::now_micros;
use tributary_schemas::registry::{Device, DeviceRegistry, RegistryChange, RegistryEvent};

use crate::config::Config;

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Record simulated devices on the `registry` topic and write their tokens to
    /// `simulator.tokens_path` (mode 0600), for the simulator and Mosquitto's password file.
    Seed(SeedArgs),
    /// Create one device; prints it and its token (shown only this once).
    Create(CreateArgs),
    /// Create many devices from a recipe (a JSON file of attributes and an optional site layout).
    Bulk(BulkArgs),
    /// List devices (every page), optionally of one tenant or group.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    /// Show one device with its owner history.
    Get { id: String },
    /// Change a device; `--rotate-token` prints its new token.
    Update(UpdateArgs),
    /// Delete a device.
    Delete { id: String },
    /// Groups per tenant with their device counts.
    Groups {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Args)]
pub struct SeedArgs {
    /// How many devices.
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    /// Spread over this many tenants (tenant-1 … tenant-N).
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// `key=value`, repeatable.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// A metric the device sends, repeatable.
    #[arg(long = "metric")]
    metrics: Vec<String>,
    /// Site path, outermost first: `zone/section/spot`.
    #[arg(long)]
    site: Option<String>,
    /// The data subject (person id) owning the device.
    #[arg(long)]
    subject: Option<String>,
}

#[derive(Args)]
pub struct BulkArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    count: usize,
    /// Ids are `<prefix><n>` with n zero-padded to 5 digits.
    #[arg(long)]
    id_prefix: String,
    /// First n.
    #[arg(long, default_value_t = 1)]
    first: usize,
    /// The recipe, a JSON file: {"model", "group", "tags", "metrics", "layout": {"zones": […],
    /// "sections_per_zone", "spots_per_section"}}. An empty recipe when omitted.
    #[arg(long)]
    recipe: Option<std::path::PathBuf>,
    /// Write the created ids and tokens here (mode 0600) instead of printing them.
    #[arg(long)]
    tokens_out: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct UpdateArgs {
    id: String,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    enabled: Option<bool>,
    /// New owner; `--subject ''` means nobody.
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    rotate_token: bool,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

/// One device's secret, as the simulator reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSecret {
    pub device: String,
    pub tenant: String,
    pub token: String,
}

pub async fn run(config: &Config, command: DevicesCommand) -> anyhow::Result<()> {
    let api = AdminClient::new(config)?;
    let out = match command {
        DevicesCommand::Seed(args) => return seed(config, args).await,
        DevicesCommand::Create(a) => {
            let mut body = json!({"id": a.id, "tenant": a.tenant,
                "tags": a.tags.into_iter().collect::<BTreeMap<_, _>>(), "metrics": a.metrics});
            for (k, v) in [
                ("group", a.group),
                ("model", a.model),
                ("subject", a.subject),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(site) = a.site {
                body["site"] = json!(site.split('/').collect::<Vec<_>>());
            }
            api.call(reqwest::Method::POST, "/v1/devices", Some(body))
                .await?
        }
        DevicesCommand::Bulk(a) => {
            let recipe: Value = match &a.recipe {
                Some(path) => serde_json::from_slice(
                    &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("{} is not JSON", path.display()))?,
                None => json!({}),
            };
            let body = json!({"tenant": a.tenant, "count": a.count, "id_prefix": a.id_prefix,
                "first": a.first, "recipe": recipe});
            let created = api
                .call(reqwest::Method::POST, "/v1/devices/bulk", Some(body))
                .await?;
            match a.tokens_out {
                Some(path) => {
                    write_private(&path, &serde_json::to_vec_pretty(&created["devices"])?)?;
                    json!({"created": created["created"], "tokens": path.display().to_string()})
                }
                None => created,
            }
        }
        DevicesCommand::List { tenant, group } => {
            let mut devices = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut query = vec![("limit", "10000".to_owned())];
                query.extend(tenant.clone().map(|t| ("tenant", t)));
                query.extend(group.clone().map(|g| ("group", g)));
                query.extend(after.clone().map(|a| ("after", a)));
                let page = api.list(&query).await?;
                if let Some(d) = page["devices"].as_array() {
                    devices.extend(d.iter().cloned());
                }
                match page["next"].as_str() {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            json!(devices)
        }
        DevicesCommand::Get { id } => {
            api.call(reqwest::Method::GET, &format!("/v1/devices/{id}"), None)
                .await?
        }
        DevicesCommand::Update(a) => {
            let mut body = json!({});
            for (k, v) in [("group", a.group), ("model", a.model)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(s) = a.subject {
                body["subject"] = if s.is_empty() { Value::Null } else { json!(s) };
            }
            if let Some(e) = a.enabled {
                body["enabled"] = json!(e);
            }
            if a.rotate_token {
                body["rotate_token"] = json!(true);
            }
            api.call(
                reqwest::Method::PATCH,
                &format!("/v1/devices/{}", a.id),
                Some(body),
            )
            .await?
        }
        DevicesCommand::Delete { id } => {
            api.call(reqwest::Method::DELETE, &format!("/v1/devices/{id}"), None)
                .await?;
            json!({"deleted": id})
        }
        DevicesCommand::Groups { tenant } => {
            let path = match tenant {
                Some(t) => format!("/v1/groups?tenant={t}"),
                None => "/v1/groups".into(),
            };
            api.call(reqwest::Method::GET, &path, None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The admin API, as the CLI calls it.
pub(crate) struct AdminClient {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl AdminClient {
    pub(crate) fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()?,
            base: config.simulator.http_url.trim_end_matches('/').to_owned(),
            token: config.registry.admin_token.clone(),
        })
    }

    async fn list(&self, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let req = self
            .client
            .get(format!("{}/v1/devices", self.base))
            .query(query);
        self.send(req).await
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let token = self.token.as_deref().context(
            "registry.admin_token is not set (TRIBUTARY_REGISTRY__ADMIN_TOKEN): the admin API needs it",
        )?;
        let resp = req
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = body["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            match body["field"].as_str() {
                Some(f) => anyhow::bail!("{status}: field `{f}`: {msg}"),
                None => anyhow::bail!("{status}: {msg}"),
            }
        }
        Ok(body)
    }
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

/// Records `count` simulated devices (`dev-00001`…) on the registry topic, spread over tenants.
pub async fn seed(config: &Config, args: SeedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.count >= 1 && args.tenants >= 1,
        "--count and --tenants must be at least 1"
    );
    let at = now_micros();
    let mut secrets = Vec::with_capacity(args.count);
    let mut events = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let device = format!("dev-{:05}", i + 1);
        let tenant = format!("tenant-{}", i % args.tenants + 1);
        let mut d = Device::new(device.clone(), tenant.clone(), at);
        let token = issue_token(&mut d);
        d.model = Some("sim-th-1".into());
        d.metrics = vec![
            "temperature".into(),
            "humidity".into(),
            "battery_voltage".into(),
        ];
        events.push(RegistryEvent {
            device: device.clone(),
            tenant: tenant.clone(),
            change: RegistryChange::Created,
            at,
            actor: "seed".into(),
            state: Some(d),
        });
        secrets.push(DeviceSecret {
            device,
            tenant,
            token,
        });
    }
    let writer = RegistryWriter::new(&config.kafka, Arc::new(DeviceRegistry::new()))?;
    writer.record(&events).await.context(
        "recording the devices on the registry topic (is Kafka up, and the topics created?)",
    )?;
    write_private(
        &config.simulator.tokens_path,
        &serde_json::to_vec_pretty(&secrets)?,
    )?;
    println!(
        "seeded {} devices over {} tenants on topic `{}`; tokens in {}",
        args.count,
        args.tenants,
        config.kafka.topics.registry,
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
