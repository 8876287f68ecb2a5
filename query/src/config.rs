//! `[query]`: where the SQL endpoints listen, who may use them, and the limits of one query.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_schemas::registry::token_hash;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its tenant's rows.
    Engineer,
    /// Reads its tenant's rows (erasure jobs are theirs too).
    Compliance,
    /// Reads every tenant's rows and may run DDL, DML and `SET` (trusted operators only).
    Admin,
}

/// One user of the SQL endpoints: `[query.users.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryUser {
    /// SHA-256 (hex) of the user's password or token (`echo -n "$TOKEN" | sha256sum`).
    pub password_sha256: String,
    /// The tenant whose rows the user sees; required unless `role = "admin"`.
    #[serde(default)]
    pub tenant: Option<String>,
    pub role: Role,
}

/// `[query]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// `POST /v1/sql` listens here ("" disables it).
    pub http_listen: String,
    /// The Postgres wire protocol listens here ("" disables it).
    pub pg_listen: String,
    /// Users by name. Nobody can connect until one is configured.
    pub users: BTreeMap<String, QueryUser>,
    /// Memory one query may hold (DataFusion memory pool), in MiB.
    pub max_memory_mb: usize,
    /// Wall-clock limit of one query, from planning to its last row.
    pub timeout_secs: u64,
    /// Most rows one result may have.
    pub max_rows: usize,
    /// Queries running at once in this process; more are refused (clients retry).
    pub max_concurrent: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            http_listen: "127.0.0.1:8081".into(),
            pg_listen: "127.0.0.1:5433".into(),
            users: BTreeMap::new(),
            max_memory_mb: 1024,
            timeout_secs: 300,
            max_rows: 1_000_000,
            max_concurrent: 8,
        }
    }
}

impl QueryConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("query.max_memory_mb", self.max_memory_mb),
            ("query.timeout_secs", self.timeout_secs as usize),
            ("query.max_rows", self.max_rows),
            ("query.max_concurrent", self.max_concurrent),
        ] {
            if value == 0 {
                return Err(format!("`{key}` = 0: must be at least 1"));
            }
        }
        for (name, user) in &self.users {
            let hash = &user.password_sha256;
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "`query.users.{name}.password_sha256`: must be 64 hex digits (sha256sum of the password)"
                ));
            }
            if user.role != Role::Admin && user.tenant.as_deref().is_none_or(str::is_empty) {
                return Err(format!(
                    "`query.users.{name}.tenant`: required for role {:?}",
                    user.role
                ));
            }
        }
        Ok(())
    }

    /// The limits of one query.
    pub fn limits(&self) -> QueryLimits {
        QueryLimits {
            max_memory_bytes: self.max_memory_mb.saturating_mul(1 << 20),
            timeout: Duration::from_secs(self.timeout_secs),
            max_rows: self.max_rows,
            max_concurrent: self.max_concurrent,
        }
    }

    /// The user `name` when `password` is theirs.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<Principal> {
        let user = self.users.get(name)?;
        (token_hash(password) == user.password_sha256.to_ascii_lowercase())
            .then(|| Principal::of(name, user))
    }

    /// The user whose password is `token` (bearer tokens carry no user name).
    pub fn authenticate_token(&self, token: &str) -> Option<Principal> {
        let hash = token_hash(token);
        self.users
            .iter()
            .find(|(_, u)| hash == u.password_sha256.to_ascii_lowercase())
            .map(|(name, user)| Principal::of(name, user))
    }

    /// A copy with the password hashes masked, for printing.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        for user in c.users.values_mut() {
            user.password_sha256 = "<redacted>".into();
        }
        c
    }
}

/// The limits of one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    pub max_memory_bytes: usize,
    pub timeout: Duration,
    pub max_rows: usize,
    pub max_concurrent: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryConfig::default().limits()
    }
}

/// Who runs a query: what they see and may do follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub tenant: Option<String>,
    pub role: Role,
}

impl Principal {
    fn of(name: &str, user: &QueryUser) -> Self {
        Self {
            user: name.to_owned(),
            tenant: user.tenant.clone(),
            role: user.role,
        }
    }

    /// The local operator (`tributary sql` on the lake itself): every tenant, every statement.
    pub fn local_admin() -> Self {
        Self {
            user: "local".into(),
            tenant: None,
            role: Role::Admin,
        }
    }

    /// The tenant whose rows alone this principal sees; `None`: every row (admins).
    pub fn tenant_scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            // Validation makes sure non-admins have a tenant; an empty one sees nothing.
            Role::Engineer | Role::Compliance => Some(self.tenant.as_deref().unwrap_or("")),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QueryConfig {
        let mut c = QueryConfig::default();
        c.users.insert(
            "alice".into(),
            QueryUser {
                password_sha256: token_hash("alice-secret"),
                tenant: Some("acme".into()),
                role: Role::Engineer,
            },
        );
        c.users.insert(
            "root".into(),
            QueryUser {
                password_sha256: token_hash("root-secret"),
                tenant: None,
                role: Role::Admin,
            },
        );
        c
    }

    #[test]
    fn authenticates_by_password_and_token() {
        let c = config();
        let alice = c.authenticate("alice", "alice-secret").unwrap();
        assert_eq!(alice.tenant_scope(), Some("acme"));
        assert!(c.authenticate("alice", "root-secret").is_none());
        assert!(c.authenticate("nobody", "alice-secret").is_none());
        assert_eq!(c.authenticate_token("root-secret").unwrap().user, "root");
        assert_eq!(
            c.authenticate_token("root-secret").unwrap().tenant_scope(),
            None
        );
        assert!(c.authenticate_token("guess").is_none());
        assert!(!format!("{:?}", c.redacted()).contains(&token_hash("alice-secret")));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = config();
        assert_eq!(c.validate(), Ok(()));
        c.users.get_mut("alice").unwrap().tenant = None;
        assert!(
            c.validate()
                .unwrap_err()
                .contains("query.users.alice.tenant")
        );
        c.users.get_mut("alice").unwrap().password_sha256 = "plain".into();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("query.users.alice.password_sha256")
        );
        let c = QueryConfig {
            max_rows: 0,
            ..QueryConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("query.max_rows"));
    }
}
