//! Stripe over its REST API: form-encoded POSTs with the secret key as a bearer token. Only the
//! two calls the portal needs — a Checkout Session in subscription mode and a Billing Portal
//! session; everything else arrives through the webhook.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::plans::{Plan, PlanId};
use super::provider::{with_query, BillingCustomer, PaymentProvider, ProviderError};
use super::Secret;

pub struct StripeProvider {
    http: reqwest::Client,
    api_base: String,
    secret_key: Secret,
    prices: BTreeMap<PlanId, String>,
}

#[derive(Deserialize)]
struct Session {
    url: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl StripeProvider {
    /// `api_base` is `https://api.stripe.com` in production.
    pub fn new(api_base: &str, secret_key: Secret, prices: BTreeMap<PlanId, String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client with default TLS settings builds");
        Self { http, api_base: api_base.trim_end_matches('/').to_string(), secret_key, prices }
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<String, ProviderError> {
        let url = format!("{}{path}", self.api_base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(self.secret_key.expose())
            .form(form)
            .send()
            .await
            .map_err(|e| ProviderError::Unreachable(format!("POST {path}: {}", e.without_url())))?;
        let status = resp.status();
        let body =
            resp.bytes().await.map_err(|e| ProviderError::Unreachable(format!("POST {path}: {}", e.without_url())))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .ok()
                .and_then(|b| b.error.message.or(b.error.kind))
                .unwrap_or_else(|| format!("HTTP {status}"));
            tracing::warn!(path, status = status.as_u16(), %message, "Stripe refused a request");
            return Err(ProviderError::Refused(message));
        }
        let session: Session = serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Unreachable(format!("POST {path}: unexpected answer: {e}")))?;
        Ok(session.url)
    }
}

#[async_trait]
impl PaymentProvider for StripeProvider {
    async fn checkout(
        &self,
        customer: &BillingCustomer,
        plan: &Plan,
        return_url: &str,
    ) -> Result<String, ProviderError> {
        let price = self
            .prices
            .get(&plan.id)
            .ok_or_else(|| ProviderError::NotConfigured(format!("no Stripe price for the {} plan", plan.id)))?;
        // Stripe fills in the literal {CHECKOUT_SESSION_ID}; it must not be percent-encoded.
        let success_url = with_query(return_url, "checkout=success&session_id={CHECKOUT_SESSION_ID}");
        let cancel_url = with_query(return_url, "checkout=canceled");
        let plan_id = plan.id.as_str();
        let mut form = vec![
            ("mode", "subscription"),
            ("line_items[0][price]", price.as_str()),
            ("line_items[0][quantity]", "1"),
            ("success_url", success_url.as_str()),
            ("cancel_url", cancel_url.as_str()),
            ("client_reference_id", customer.user_id.as_str()),
            // Carried on the session and on the subscription, so every later event names both.
            ("metadata[user_id]", customer.user_id.as_str()),
            ("metadata[plan]", plan_id),
            ("subscription_data[metadata][user_id]", customer.user_id.as_str()),
            ("subscription_data[metadata][plan]", plan_id),
        ];
        match &customer.customer_id {
            Some(id) => form.push(("customer", id.as_str())),
            None => form.push(("customer_email", customer.email.as_str())),
        }
        self.post("/v1/checkout/sessions", &form).await
    }

    async fn portal(&self, customer_id: &str, return_url: &str) -> Result<String, ProviderError> {
        self.post("/v1/billing_portal/sessions", &[("customer", customer_id), ("return_url", return_url)]).await
    }
}
