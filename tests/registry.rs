//! The device registry end to end: the admin API and the CLI over it, tokens shown once and
//! rotated, owner history, disabled and deleted devices refused, self-registration with
//! tenant-signed JWTs (and the impersonations it must refuse), 10 000 devices from a recipe
//! publishing at once, and a restarted pipeline rebuilding the registry from its topic.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Stack, kill, try_mqtt_publish};

/// Whether `check` holds within 15 s (the broker reloads its users within a couple of seconds).
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

struct Api {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(stack: &Stack) -> Self {
        Self {
            rt: tokio::runtime::Runtime::new().unwrap(),
            client: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{}", stack.http_port),
        }
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        self.rt.block_on(async {
            let mut req = self
                .client
                .request(method.parse().unwrap(), format!("{}{path}", self.base))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        })
    }

    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, ADMIN_TOKEN, body)
    }

    /// Posts one reading as a device; returns the status.
    fn send(&self, token: &str, id: &str) -> u16 {
        self.call(
            "POST",
            "/v1/telemetry",
            token,
            Some(json!({"id": id, "metrics": {"level": {"value": 1.0, "unit": "m"}}})),
        )
        .0
    }
}

/// An Ed25519 key pair made by openssl: (private PEM, public PEM).
fn ed25519(dir: &Path, name: &str) -> (String, String) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            private.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let status = Command::new("openssl").args(&args).status().unwrap();
        assert!(status.success(), "openssl {args:?}");
    }
    (
        std::fs::read_to_string(private).unwrap(),
        std::fs::read_to_string(public).unwrap(),
    )
}

/// A device JWT: `iss` tenant, `sub` device, expiring `exp_in` seconds from now.
fn jwt(private_pem: &str, tenant: &str, device: &str, exp_in: i64) -> String {
    let claims = json!({"iss": tenant, "sub": device, "group": "self-made",
        "exp": chrono::Utc::now().timestamp() + exp_in});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[test]
fn registry_api_cli_self_registration_and_rebuild_from_the_topic() {
    // Durable broker storage: this test kill -9s the pipeline, and Tansu's memory engine has lost
    // acknowledged records across such a kill (see ARCHITECTURE.md, Tansu notes).
    let mut stack = Stack::start_with_storage(5, &[], "sqlite://tansu.db");
    let (t1_private, t1_public) = ed25519(stack.path(), "tenant-1");
    let (t2_private, t2_public) = ed25519(stack.path(), "tenant-2");
    stack.set_env("TRIBUTARY_REGISTRY__TENANT_KEYS__TENANT-1", &t1_public);
    stack.set_env("TRIBUTARY_REGISTRY__TENANT_KEYS__TENANT-2", &t2_public);
    let mut pipeline = stack.spawn_pipeline(0);
    let api = Api::new(&stack);

    // Self-registration: a device holding a JWT signed by its tenant's key registers on first
    // contact; a wrong key, an expired JWT, a tenant without a key or another tenant's device
    // are refused.
    let self_jwt = jwt(&t1_private, "tenant-1", "self-1", 600);
    assert_eq!(api.send(&self_jwt, "s1-a"), 202);
    assert_eq!(api.send(&self_jwt, "s1-b"), 202, "known now");
    let (_, d) = api.admin("GET", "/v1/devices/self-1", None);
    assert_eq!(
        (
            d["tenant"].as_str(),
            d["credential"].as_str(),
            d["group"].as_str()
        ),
        (Some("tenant-1"), Some("jwt"), Some("self-made")),
        "{d}"
    );
    let forged = jwt(&t2_private, "tenant-1", "self-2", 600);
    assert_eq!(
        api.send(&forged, "forged"),
        401,
        "signed by another tenant's key"
    );
    let expired = jwt(&t1_private, "tenant-1", "self-3", -3600);
    assert_eq!(api.send(&expired, "expired"), 401);
    let keyless = jwt(&t1_private, "tenant-3", "self-4", 600);
    assert_eq!(api.send(&keyless, "keyless"), 401, "tenant-3 has no key");
    let hijack = jwt(&t2_private, "tenant-2", "self-1", 600);
    assert_eq!(
        api.send(&hijack, "hijack"),
        403,
        "self-1 belongs to tenant-1"
    );
    for refused in ["self-2", "self-3", "self-4"] {
        assert_eq!(
            api.admin("GET", &format!("/v1/devices/{refused}"), None).0,
            404
        );
    }

    // Only the admin token opens the admin API.
    assert_eq!(api.call("GET", "/v1/devices", "wrong", None).0, 401);
    let device_token = stack.secrets()[0]["token"].as_str().unwrap().to_owned();
    assert_eq!(
        api.call("GET", "/v1/devices", &device_token, None).0,
        401,
        "a device token is not an admin token"
    );

    // Create one device: its token is answered once and works at once.
    let (s, created) = api.admin(
        "POST",
        "/v1/devices",
        Some(
            json!({"id": "meter-1", "tenant": "tenant-2", "group": "acme-water",
            "model": "wm-3", "tags": {"floor": "2"}, "metrics": ["level"],
            "site": ["north", "hall-1", "spot-4"], "subject": "person-17"}),
        ),
    );
    assert_eq!(s, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["device"]["credential"], "token");
    assert!(created["device"].get("token_sha256").is_none());
    assert_eq!(api.send(&token, "m1-a"), 202);

    // Bad requests name the field; a taken id is a conflict.
    let (s, b) = api.admin(
        "POST",
        "/v1/devices",
        Some(json!({"id": "meter-1", "tenant": "tenant-2"})),
    );
    assert_eq!((s, b["field"].as_str()), (409, Some("id")), "{b}");
    let (s, b) = api.admin(
        "POST",
        "/v1/devices",
        Some(json!({"id": "a/b", "tenant": "t"})),
    );
    assert_eq!((s, b["field"].as_str()), (400, Some("id")), "{b}");
    let (s, b) = api.admin(
        "POST",
        "/v1/devices",
        Some(json!({"id": "x1", "tenant": "t", "colour": "red"})),
    );
    assert_eq!((s, b["field"].as_str()), (400, Some("colour")), "{b}");
    let (s, b) = api.admin("POST", "/v1/devices", Some(json!({"id": "x1"})));
    assert_eq!((s, b["field"].as_str()), (400, Some("tenant")), "{b}");

    // A new owner keeps the old one in the history; a rotated token retires the old one.
    let (s, b) = api.admin(
        "PATCH",
        "/v1/devices/meter-1",
        Some(json!({"subject": "person-18", "rotate_token": true})),
    );
    assert_eq!(s, 200, "{b}");
    let history: Vec<&str> = b["device"]["subject_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["subject"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["person-17", "person-18"]);
    let new_token = b["token"].as_str().unwrap().to_owned();
    assert_eq!(api.send(&token, "m1-b"), 401, "the rotated-out token");
    assert_eq!(api.send(&new_token, "m1-c"), 202);
    let (s, b) = api.admin(
        "PATCH",
        "/v1/devices/meter-1",
        Some(json!({"tenant": "tenant-1"})),
    );
    assert_eq!((s, b["field"].as_str()), (400, Some("tenant")), "{b}");

    // Disabled: refused with 403; enabled again: accepted.
    assert_eq!(
        api.admin(
            "PATCH",
            "/v1/devices/meter-1",
            Some(json!({"enabled": false}))
        )
        .0,
        200
    );
    assert_eq!(api.send(&new_token, "m1-d"), 403);
    // The broker learns it too: MQTT with the same token is refused while disabled.
    let mqtt = |token: &str, id: &str| {
        // Only "m1-mqtt" counts as a flow reading; probes that may slip through meanwhile do not.
        let metric = if id == "m1-mqtt" { "flow" } else { "probe" };
        let payload = json!({"id": id, "metrics": {metric: 2.0}}).to_string();
        try_mqtt_publish(
            stack.mqtt_port,
            "meter-1",
            token,
            "devices/meter-1/telemetry",
            &[payload],
        )
    };
    assert!(
        eventually(|| mqtt(&new_token, "m1-mqtt-off").is_err()),
        "a disabled device cannot log in to the broker"
    );
    api.admin(
        "PATCH",
        "/v1/devices/meter-1",
        Some(json!({"enabled": true})),
    );
    // An API-created device publishes over MQTT with its token (the pipeline keeps Mosquitto's
    // password file in step with the registry); the rotated-out token is refused by the broker.
    assert!(
        eventually(|| mqtt(&new_token, "m1-mqtt") == Ok(vec![PubAckReason::Success])),
        "the API-created device publishes over MQTT"
    );
    assert!(mqtt(&token, "m1-mqtt-old").is_err(), "rotated-out token");

    // 10 000 devices from a recipe, spread over a site layout, all publishing at once.
    let (s, bulk) = api.admin(
        "POST",
        "/v1/devices/bulk",
        Some(json!({"tenant": "tenant-3", "count": 10000, "id_prefix": "fleet-",
            "recipe": {"model": "th-9", "group": "fleet", "metrics": ["level"],
                "layout": {"zones": ["north", "south"], "sections_per_zone": 10, "spots_per_section": 50}}})),
    );
    assert_eq!((s, bulk["created"].as_u64()), (201, Some(10000)));
    let tokens: Vec<(String, String)> = bulk["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                d["token"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let (s, again) = api.admin(
        "POST",
        "/v1/devices/bulk",
        Some(json!({"tenant": "tenant-3", "count": 2, "id_prefix": "fleet-", "first": 10000, "recipe": {}})),
    );
    assert_eq!(s, 409, "fleet-10000 exists: {again}");
    let statuses: Vec<u16> = api.rt.block_on(async {
        futures::stream::iter(tokens.iter().map(|(id, t)| {
            let client = api.client.clone();
            let url = format!("{}/v1/telemetry", api.base);
            async move {
                client
                    .post(url)
                    .bearer_auth(t)
                    .json(&json!({"id": format!("{id}-first"), "metrics": {"level": 3.0}}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        }))
        .buffer_unordered(64)
        .collect()
        .await
    });
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 10000);
    let (_, d) = api.admin("GET", "/v1/devices/fleet-00501", None);
    assert_eq!(d["site"], json!(["south", "section-1", "spot-1"]), "{d}");
    assert_eq!(d["model"], "th-9");

    // Listing pages through every device of a tenant; groups count them.
    let mut listed = 0;
    let mut after = String::new();
    loop {
        let (s, page) = api.admin(
            "GET",
            &format!("/v1/devices?tenant=tenant-3&limit=3000&after={after}"),
            None,
        );
        assert_eq!(s, 200);
        listed += page["devices"].as_array().unwrap().len();
        match page["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    let seeded_in_tenant_3 = stack
        .secrets()
        .iter()
        .filter(|s| s["tenant"] == "tenant-3")
        .count();
    assert_eq!(listed, 10000 + seeded_in_tenant_3);
    let (_, groups) = api.admin("GET", "/v1/groups?tenant=tenant-3", None);
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .contains(&json!({"tenant": "tenant-3", "group": "fleet", "devices": 10000})),
        "{groups}"
    );

    // The CLI is a client of the same API.
    let got: Value = serde_json::from_str(&stack.ok(&["devices", "get", "meter-1"])).unwrap();
    assert_eq!(got["subject"], "person-18");
    let listed: Value =
        serde_json::from_str(&stack.ok(&["devices", "list", "--group", "acme-water"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let out = stack
        .cmd(&["devices", "get", "no-such-device"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    // Deleted: its token is dead.
    assert_eq!(api.admin("DELETE", "/v1/devices/fleet-00002", None).0, 204);
    assert_eq!(api.admin("GET", "/v1/devices/fleet-00002", None).0, 404);
    assert_eq!(api.send(&tokens[1].1, "gone-1"), 401);

    // kill -9 and restart: the new process rebuilds the registry from the topic alone.
    kill(&mut pipeline);
    let mut pipeline = stack.spawn_pipeline(1);
    assert_eq!(api.send(&new_token, "m1-e"), 202, "updated device survives");
    assert_eq!(
        api.send(&token, "m1-f"),
        401,
        "rotated-out token stays dead"
    );
    assert_eq!(
        api.send(&tokens[1].1, "gone-2"),
        401,
        "deleted stays deleted"
    );
    assert_eq!(api.send(&tokens[9999].1, "fleet-last"), 202);
    assert_eq!(api.send(&self_jwt, "s1-c"), 202, "self-registered survives");
    let (_, d) = api.admin("GET", "/v1/devices/meter-1", None);
    assert_eq!(d["subject_history"].as_array().unwrap().len(), 2);

    // What was accepted is in the lake, with the tenant the registry gave.
    // m1-a, m1-c, the fleet, m1-e, fleet-last, s1-a, s1-b, s1-c
    let accepted = 1 + 1 + 10000 + 1 + 1 + 3;
    stack.wait_for_rows(accepted, 0, Duration::from_secs(120));
    let rows = stack.sql(
        "SELECT tenant, count(*) AS n FROM telemetry WHERE metric = 'level' GROUP BY tenant ORDER BY tenant",
    );
    assert_eq!(
        rows,
        vec![
            json!({"tenant": "tenant-1", "n": 3}),
            json!({"tenant": "tenant-2", "n": 3}),
            json!({"tenant": "tenant-3", "n": 10001})
        ]
    );

    // The `devices` table is the registry as it is now: every device once, deleted ones gone,
    // the latest owner, tags, site and group, joinable with telemetry.
    let registered = |tenant: &str| {
        let (_, groups) = api.admin("GET", &format!("/v1/groups?tenant={tenant}"), None);
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["devices"].as_u64().unwrap())
            .sum::<u64>()
    };
    let expected = json!([
        {"tenant": "tenant-1", "n": registered("tenant-1")},
        {"tenant": "tenant-2", "n": registered("tenant-2")},
        {"tenant": "tenant-3", "n": registered("tenant-3")},
    ]);
    let per_tenant = || {
        json!(
            stack.sql("SELECT tenant, count(*) AS n FROM devices GROUP BY tenant ORDER BY tenant")
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while per_tenant() != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(per_tenant(), expected);
    let meter = stack.sql(
        "SELECT device_group, model, subject, array_length(subject_history) AS owners, \
         tags['floor'] AS floor, site[3] AS spot, enabled FROM devices WHERE device = 'meter-1'",
    );
    assert_eq!(
        meter,
        vec![
            json!({"device_group": "acme-water", "model": "wm-3", "subject": "person-18",
            "owners": 2, "floor": "2", "spot": "spot-4", "enabled": true})
        ]
    );
    let flows = stack
        .sql("SELECT count(*) AS n FROM telemetry WHERE device = 'meter-1' AND metric = 'flow'");
    assert_eq!(
        flows[0]["n"], 1,
        "the MQTT reading landed once; the refused ones never"
    );
    let gone = stack.sql("SELECT count(*) AS n FROM devices WHERE device = 'fleet-00002'");
    assert_eq!(gone[0]["n"], 0);
    let joined = stack.sql(
        "SELECT d.device_group, count(*) AS n FROM telemetry t JOIN devices d \
         ON t.tenant = d.tenant AND t.device = d.device \
         WHERE t.metric = 'level' AND d.device_group = 'fleet' GROUP BY 1",
    );
    assert_eq!(
        joined,
        vec![json!({"device_group": "fleet", "n": 10000})],
        "fleet-00002 is gone"
    );
    kill(&mut pipeline);
}
