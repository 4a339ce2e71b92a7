//! Billing: plans and their limits, subscriptions and their status, checkout and the billing
//! portal through a payment provider (Stripe, or the local one that charges nothing), the
//! provider's webhook, and suspending the servers of subscriptions left unpaid.
//!
//! Wiring: build a [`BillingState`] with [`BillingState::from_config`], mount
//! [`routes::router`] with the auth extractor, and start [`spawn_enforcer`].

pub mod local;
pub mod plans;
pub mod provider;
pub mod routes;
pub mod stripe;
pub mod subscriptions;
pub mod suspension;
pub mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;

use crate::config::ApiConfig;
use crate::db::Db;
use crate::http::ApiError;

pub use plans::{
    check_limits, check_totals, limits_for_user, provisioning_plan, LimitError, Plan, PlanId, ProvisionRefusal, Usage,
};
pub use provider::{BillingCustomer, PaymentProvider, ProviderError};
pub use routes::{router, AuthenticatedUser};
pub use subscriptions::{Status, Subscription};
pub use suspension::{
    enforce_unpaid, spawn_enforcer, suspend_if_due, NoServerActions, ServerActions, SuspendError, Suspension,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingProviderKind {
    /// Nothing is charged: checkout activates the plan at once.
    #[default]
    Local,
    Stripe,
}

/// A credential from the config: readable on purpose with [`Secret::expose`], never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Everything the billing routes and the suspension sweep need beyond the database.
pub struct BillingState {
    pub provider_kind: BillingProviderKind,
    pub provider: Arc<dyn PaymentProvider>,
    pub actions: Arc<dyn ServerActions>,
    /// Verifies webhook calls; without it the webhook answers 503.
    pub webhook_secret: Option<Secret>,
    /// Price id per plan at the provider, to read plan changes out of subscription events.
    pub prices: BTreeMap<PlanId, String>,
    /// The page checkout and the portal send the browser back to.
    pub return_url: String,
    pub require_subscription: bool,
    pub past_due_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingConfigError {
    #[error("billing_provider = \"stripe\" needs stripe_secret_key")]
    NoStripeKey,
    #[error("billing_provider = \"stripe\" needs an absolute http(s) billing_return_url, not {0:?}")]
    RelativeReturnUrl(String),
}

impl BillingState {
    /// The provider named in the config. `actions` stops and resumes servers for non-payment.
    pub fn from_config(
        config: &ApiConfig,
        db: Db,
        actions: Arc<dyn ServerActions>,
    ) -> Result<Self, BillingConfigError> {
        let provider: Arc<dyn PaymentProvider> = match config.billing_provider {
            BillingProviderKind::Local => Arc::new(local::LocalProvider::new(db, actions.clone())),
            BillingProviderKind::Stripe => {
                let key = config.stripe_secret_key.clone().ok_or(BillingConfigError::NoStripeKey)?;
                let url = &config.billing_return_url;
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(BillingConfigError::RelativeReturnUrl(url.clone()));
                }
                Arc::new(stripe::StripeProvider::new(&config.stripe_api_base, key, config.stripe_prices.clone()))
            }
        };
        if config.billing_provider == BillingProviderKind::Stripe && config.stripe_webhook_secret.is_none() {
            tracing::warn!("stripe_webhook_secret is not set: payments will never activate a subscription");
        }
        Ok(Self {
            provider_kind: config.billing_provider,
            provider,
            actions,
            webhook_secret: config.stripe_webhook_secret.clone(),
            prices: config.stripe_prices.clone(),
            return_url: config.billing_return_url.clone(),
            require_subscription: config
                .billing_require_subscription
                .unwrap_or(config.billing_provider == BillingProviderKind::Stripe),
            past_due_grace: config.past_due_grace,
        })
    }
}

/// Why a billing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    UnknownPlan(#[from] plans::UnknownPlan),
    #[error("already subscribed to the {0} plan: change the plan or the payment method at the page POST /api/billing/portal answers with")]
    AlreadySubscribed(PlanId),
    #[error("no billing account yet: subscribe to a plan first")]
    NoCustomer,
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::UnknownPlan(e) => ApiError::bad_request(e.to_string()),
            BillingError::AlreadySubscribed(_) | BillingError::NoCustomer => ApiError::conflict(e.to_string()),
            BillingError::Provider(ProviderError::Refused(m)) => {
                ApiError::bad_gateway(format!("payment provider refused: {m}"))
            }
            BillingError::Provider(ProviderError::Unreachable(detail)) => {
                tracing::warn!(%detail, "payment provider unreachable");
                ApiError::bad_gateway("payment provider unreachable, try again later")
            }
            BillingError::Provider(ProviderError::NotConfigured(m)) => {
                tracing::error!(problem = %m, "billing is not configured");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("billing is not configured: {m}"))
            }
            BillingError::Provider(ProviderError::Db(e)) | BillingError::Db(e) => ApiError::internal(e),
            BillingError::Provider(ProviderError::Internal(e)) => ApiError::internal(e),
        }
    }
}

/// 402 Payment Required: the way to fix it is under billing.
impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        ApiError::new(StatusCode::PAYMENT_REQUIRED, e.to_string())
    }
}

impl From<ProvisionRefusal> for ApiError {
    fn from(e: ProvisionRefusal) -> Self {
        ApiError::new(StatusCode::PAYMENT_REQUIRED, e.to_string())
    }
}

/// What the servers module calls before provisioning: the plan whose limits apply to this user,
/// checked against what the new server asks for. 402 with a clear message when the user may
/// not provision (no active subscription, past due, suspended) or asks for more than the plan.
pub async fn admit_new_server(
    db: &Db,
    billing: &BillingState,
    user_id: &str,
    memory_mb: u32,
    disk_gb: u32,
) -> Result<&'static Plan, ApiError> {
    let plan = provisioning_plan(db, billing.require_subscription, user_id).await??;
    check_limits(plan, memory_mb, disk_gb)?;
    Ok(plan)
}
