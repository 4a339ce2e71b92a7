//! `POST /api/billing/webhook`: the payment provider tells us what happened to a subscription.
//! No session: the call is authenticated by a Stripe-compatible signature over the raw body
//! (`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`), refused outside a
//! 5-minute window against replays. Each event id is handled once: it is recorded in
//! `billing_events` before anything changes, and a redelivery is acknowledged without effect.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::db::{is_unique_violation, now_ms, Db};
use crate::http::ApiError;
use crate::state::AppState;

use super::plans::{plan_for_price, PlanId};
use super::subscriptions::{self, Status, Subscription};
use super::suspension::{activate_and_resume, past_due_cutoff, suspend_if_due, ActivateError};
use super::BillingState;

/// How far the signed timestamp may be from our clock, either way.
pub const TOLERANCE_SECS: i64 = 300;

pub const SIGNATURE_HEADER: &str = "stripe-signature";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header")]
    Malformed,
    #[error("invalid signature")]
    Invalid,
    #[error("timestamp outside tolerance")]
    Stale,
}

/// Checks a `Stripe-Signature` header value against the raw `payload`: accepted if any `v1`
/// entry is the HMAC-SHA256 of `"<t>.<payload>"` under `secret` (compared in constant time) and
/// `t` is within [`TOLERANCE_SECS`] of `now_secs`. Other schemes (`v0`, …) are ignored.
pub fn verify_signature(header: &str, payload: &[u8], secret: &[u8], now_secs: i64) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for item in header.split(',') {
        let (key, value) = item.trim().split_once('=').ok_or(SignatureError::Malformed)?;
        match key {
            "t" => timestamp = Some((value, value.parse::<i64>().map_err(|_| SignatureError::Malformed)?)),
            // An entry that is not hex cannot match; it does not make the others invalid.
            "v1" => candidates.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    // The MAC covers the timestamp as sent, not as we would print it.
    let (signed_timestamp, timestamp) = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Invalid);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(signed_timestamp.as_bytes());
    mac.update(b".");
    mac.update(payload);
    // Every candidate is checked, so the time taken does not tell which one matched.
    let matched = candidates.iter().fold(false, |ok, c| mac.clone().verify_slice(c).is_ok() | ok);
    if !matched {
        return Err(SignatureError::Invalid);
    }
    if (now_secs - timestamp).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// What became of a verified event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Handled,
    /// Already handled once: nothing was done.
    Duplicate,
    /// A type we do not act on, or about nobody we know.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("malformed event: {0}")]
    Malformed(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

const HANDLED: [&str; 5] = [
    "checkout.session.completed",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
];

/// Applies one verified event (the raw body) at `now` (unix ms). If applying fails, the event is
/// forgotten again so the provider's retry applies it.
pub async fn handle_event(db: &Db, billing: &BillingState, payload: &[u8], now: i64) -> Result<Outcome, WebhookError> {
    let event: Value = serde_json::from_slice(payload).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    let id = event["id"].as_str().ok_or_else(|| WebhookError::Malformed("no id".into()))?;
    let kind = event["type"].as_str().ok_or_else(|| WebhookError::Malformed("no type".into()))?;
    if !HANDLED.contains(&kind) {
        tracing::debug!(event = id, kind, "billing event type not acted on");
        return Ok(Outcome::Ignored);
    }
    let object = &event["data"]["object"];
    if !object.is_object() {
        return Err(WebhookError::Malformed("no data.object".into()));
    }
    let recorded = sqlx::query("INSERT INTO billing_events (id, kind, received_at) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(kind)
        .bind(now)
        .execute(db.pool())
        .await;
    match recorded {
        Err(e) if is_unique_violation(&e) => {
            tracing::info!(event = id, kind, "billing event already handled");
            return Ok(Outcome::Duplicate);
        }
        other => other?,
    };
    let applied = apply(db, billing, kind, object, now).await;
    if let Err(e) = &applied {
        tracing::warn!(event = id, kind, error = %e, "billing event failed; the provider will retry it");
        if let Err(e) = sqlx::query("DELETE FROM billing_events WHERE id = $1").bind(id).execute(db.pool()).await {
            tracing::error!(event = id, error = %e, "could not forget a failed billing event; its retry will be skipped");
        }
    }
    applied
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// An id field that Stripe sends either as a string or, when expanded, as an object with an id.
fn id_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    let field = v.pointer(pointer)?;
    field.as_str().or_else(|| field["id"].as_str()).filter(|s| !s.is_empty())
}

/// The plan an object stands for: its price (the truth after a plan change in the portal),
/// then the plan we put in its metadata at checkout.
fn plan_of(billing: &BillingState, object: &Value) -> Option<PlanId> {
    let by_price = ["/items/data/0/price/id", "/line_items/data/0/price/id", "/plan/id"]
        .iter()
        .find_map(|p| str_at(object, p))
        .and_then(|price| plan_for_price(&billing.prices, price));
    by_price.or_else(|| str_at(object, "/metadata/plan").and_then(|p| PlanId::parse(p).ok()))
}

/// The user a provider subscription belongs to, with their row. Events about a subscription
/// other than the user's current one (an old, replaced one) resolve to nobody.
async fn resolve(
    db: &Db,
    subscription_id: Option<&str>,
    customer_id: Option<&str>,
    metadata_user: Option<&str>,
) -> Result<Option<(String, Option<Subscription>)>, sqlx::Error> {
    if let Some(sub) = subscription_id {
        if let Some(row) = subscriptions::find_by_subscription(db, sub).await? {
            return Ok(Some((row.user_id.clone(), Some(row))));
        }
    }
    let current = |row: &Subscription| match (&row.subscription_id, subscription_id) {
        (Some(stored), Some(event)) => stored == event,
        _ => true,
    };
    if let Some(customer) = customer_id {
        if let Some(row) = subscriptions::find_by_customer(db, customer).await? {
            return Ok(current(&row).then(|| (row.user_id.clone(), Some(row))));
        }
    }
    if let Some(user) = metadata_user {
        if let Some(row) = subscriptions::get(db, user).await? {
            return Ok(current(&row).then(|| (row.user_id.clone(), Some(row))));
        }
        if subscriptions::user_exists(db, user).await? {
            return Ok(Some((user.to_string(), None)));
        }
    }
    Ok(None)
}

async fn apply(db: &Db, billing: &BillingState, kind: &str, object: &Value, now: i64) -> Result<Outcome, WebhookError> {
    let actions = &*billing.actions;
    match kind {
        "checkout.session.completed" => {
            if object["mode"].as_str().is_some_and(|m| m != "subscription") {
                return Ok(Outcome::Ignored);
            }
            let Some(user) = str_at(object, "/client_reference_id").or_else(|| str_at(object, "/metadata/user_id"))
            else {
                tracing::warn!("checkout completed without a user reference; ignored");
                return Ok(Outcome::Ignored);
            };
            if !subscriptions::user_exists(db, user).await? {
                tracing::warn!(user, "checkout completed for an unknown user; ignored");
                return Ok(Outcome::Ignored);
            }
            let customer = id_at(object, "/customer");
            let subscription = id_at(object, "/subscription");
            let existing = subscriptions::get(db, user).await?;
            let Some(plan) = plan_of(billing, object).or(existing.as_ref().map(|s| s.plan)) else {
                tracing::warn!(user, "checkout completed without a known plan; ignored");
                return Ok(Outcome::Ignored);
            };
            if object["payment_status"].as_str() == Some("unpaid") {
                // Paid later (bank debits): `invoice.paid` activates it.
                subscriptions::record_pending(db, user, plan, customer, subscription, now).await?;
            } else {
                activate_and_resume(db, actions, user, Some(plan), customer, subscription, now).await?;
            }
            Ok(Outcome::Handled)
        }
        "customer.subscription.updated" | "customer.subscription.deleted" => {
            let subscription = str_at(object, "/id");
            let customer = id_at(object, "/customer");
            let Some((user, row)) = resolve(db, subscription, customer, str_at(object, "/metadata/user_id")).await?
            else {
                tracing::warn!(subscription, "subscription event for nobody we know; ignored");
                return Ok(Outcome::Ignored);
            };
            let plan = plan_of(billing, object);
            let status = if kind == "customer.subscription.deleted" {
                Some(Status::Canceled)
            } else {
                map_status(object["status"].as_str().unwrap_or_default())
            };
            let Some(status) = status else {
                tracing::warn!(user, status = ?object["status"], "unknown subscription status; ignored");
                return Ok(Outcome::Ignored);
            };
            if row.is_none() {
                // Before its checkout event: start the row from what this event says.
                let Some(plan) = plan else {
                    tracing::warn!(user, "subscription event without a known plan; ignored");
                    return Ok(Outcome::Ignored);
                };
                subscriptions::record_pending(db, &user, plan, customer, subscription, now).await?;
            } else if let Some(plan) = plan.filter(|p| row.as_ref().is_some_and(|r| r.plan != *p)) {
                subscriptions::set_plan(db, &user, plan, now).await?;
            }
            if status == Status::Active {
                activate_and_resume(db, actions, &user, None, customer, subscription, now).await?;
            } else {
                subscriptions::set_status(db, &user, status, now).await?;
                if matches!(status, Status::Canceled | Status::Inactive) {
                    // Nobody pays for the servers any more: they stop now. If that fails the
                    // status change stands and the suspension sweep stops them later.
                    let cutoff = past_due_cutoff(now, billing.past_due_grace);
                    if let Err(e) = suspend_if_due(db, actions, &user, cutoff, now).await {
                        tracing::warn!(user, error = %e, "subscription ended; stopping its servers is left to the sweep");
                    }
                }
            }
            Ok(Outcome::Handled)
        }
        "invoice.paid" | "invoice.payment_failed" => {
            let subscription =
                id_at(object, "/subscription").or_else(|| str_at(object, "/parent/subscription_details/subscription"));
            let customer = id_at(object, "/customer");
            let Some((user, Some(_))) = resolve(db, subscription, customer, None).await? else {
                tracing::info!(subscription, "invoice for no subscription we hold; ignored");
                return Ok(Outcome::Ignored);
            };
            if kind == "invoice.paid" {
                activate_and_resume(db, actions, &user, None, customer, subscription, now).await?;
            } else {
                subscriptions::set_status(db, &user, Status::PastDue, now).await?;
            }
            Ok(Outcome::Handled)
        }
        _ => Ok(Outcome::Ignored),
    }
}

/// Stripe's subscription statuses in ours; `None` for one we do not know.
pub fn map_status(stripe: &str) -> Option<Status> {
    Some(match stripe {
        "active" | "trialing" => Status::Active,
        "past_due" | "unpaid" => Status::PastDue,
        "canceled" => Status::Canceled,
        "incomplete" | "incomplete_expired" | "paused" => Status::Inactive,
        _ => return None,
    })
}

/// The answer while no webhook secret is set.
pub const WEBHOOK_OFF: &str =
    "billing webhooks are not configured: set stripe_webhook_secret (ZLH_STRIPE_WEBHOOK_SECRET) to receive them";

/// The route: verify, then handle. 400 for a bad signature or a malformed event (the provider
/// shows it to the operator), 500 when applying failed (the provider retries), 404 when no
/// webhook secret is configured: then there is no webhook here (the provider retries until
/// there is), which is a setting to make, not a failure of the server.
pub async fn webhook_route(
    State(app): State<Arc<AppState>>,
    Extension(billing): Extension<Arc<BillingState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &billing.webhook_secret else {
        return Err(ApiError::not_found(WEBHOOK_OFF));
    };
    let header = headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().map_err(|_| SignatureError::Malformed))
        .transpose()
        .and_then(|h| h.ok_or(SignatureError::Missing))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    verify_signature(header, &body, secret.expose().as_bytes(), chrono::Utc::now().timestamp())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    match handle_event(&app.db, &billing, &body, now_ms()).await {
        Ok(Outcome::Handled) => Ok(Json(json!({ "ok": true }))),
        Ok(Outcome::Duplicate) => Ok(Json(json!({ "ok": true, "duplicate": true }))),
        Ok(Outcome::Ignored) => Ok(Json(json!({ "ok": true, "ignored": true }))),
        Err(WebhookError::Malformed(m)) => Err(ApiError::bad_request(format!("malformed event: {m}"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}
