//! API configuration: defaults that run the whole platform on one machine, then a TOML file,
//! then environment variables (`ZLH_API_LISTEN`, `ZLH_DATA_DIR`, `ZLH_DATABASE_URL`, …).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://…` (default: `<data_dir>/zlh.db`) or `postgres://…`.
    pub database_url: Option<String>,
    /// How long a login session lasts.
    #[serde(with = "secs")]
    pub session_ttl: Duration,
    /// Failed logins allowed per identifier and per client address in `login_window`.
    pub login_attempts: u32,
    #[serde(with = "secs")]
    pub login_window: Duration,

    // --- auth ---
    /// Emails (any case) whose users become admins when they register or sign in. The first user
    /// is not an admin by default: operators are named here.
    pub admin_emails: Vec<String>,
    /// Take the client address for login rate limits from `X-Forwarded-For` (its last entry, the
    /// one the nearest proxy saw). Only behind a proxy that sets it: otherwise clients choose
    /// their own address and escape the per-address limit.
    pub trust_forwarded_for: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            login_attempts: 10,
            login_window: Duration::from_secs(15 * 60),

            // --- auth ---
            admin_emails: Vec::new(),
            trust_forwarded_for: false,
        }
    }
}

impl ApiConfig {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("zlh.db").display()))
    }
}

/// Durations in TOML as whole seconds.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}
