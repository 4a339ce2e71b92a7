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

    // ---- billing (src/billing) ----
    /// Payment provider: `local` (the embedded default: checkout activates the chosen plan at
    /// once and nothing is charged) or `stripe`.
    pub billing_provider: crate::billing::BillingProviderKind,
    /// Whether provisioning needs an active subscription. Unset: yes with `stripe`; no with
    /// `local`, where a user without one provisions within the basic plan.
    pub billing_require_subscription: Option<bool>,
    /// Stripe API secret key (`sk_…`); never logged.
    pub stripe_secret_key: Option<crate::billing::Secret>,
    /// Stripe webhook signing secret (`whsec_…`); without it the webhook refuses every call.
    pub stripe_webhook_secret: Option<crate::billing::Secret>,
    /// Where the Stripe REST API lives (a stand-in in tests).
    pub stripe_api_base: String,
    /// Stripe price id per plan (`[stripe_prices] basic = "price_…"`).
    pub stripe_prices: std::collections::BTreeMap<crate::billing::PlanId, String>,
    /// The portal page checkout and the billing portal return to. Stripe needs it absolute.
    pub billing_return_url: String,
    /// How long a subscription may stay past due before its servers are stopped and suspended.
    #[serde(with = "secs")]
    pub past_due_grace: Duration,
    /// How often past-due subscriptions are checked against `past_due_grace`.
    #[serde(with = "secs")]
    pub billing_enforce_every: Duration,
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

            // ---- billing (src/billing) ----
            billing_provider: crate::billing::BillingProviderKind::Local,
            billing_require_subscription: None,
            stripe_secret_key: None,
            stripe_webhook_secret: None,
            stripe_api_base: "https://api.stripe.com".into(),
            stripe_prices: Default::default(),
            billing_return_url: "/billing".into(),
            past_due_grace: Duration::from_secs(7 * 24 * 3600),
            billing_enforce_every: Duration::from_secs(10 * 60),
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
