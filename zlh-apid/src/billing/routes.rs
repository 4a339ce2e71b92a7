//! The billing routes. Session auth comes from whichever extractor the app uses for a signed-in
//! user, through [`AuthenticatedUser`]; the webhook is authenticated by its signature instead.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::http::{ApiError, ApiResult};
use crate::state::AppState;

use super::plans::{provisioning_plan, Plan, PlanId};
use super::provider::BillingCustomer;
use super::subscriptions::{self, Status};
use super::webhook::webhook_route;
use super::{BillingError, BillingProviderKind, BillingState};

/// A signed-in user, as the billing routes need them.
pub trait AuthenticatedUser {
    fn id(&self) -> &str;
    fn email(&self) -> &str;
}

/// `GET /api/billing/plans`, `GET /api/billing/subscription`, `POST /api/billing/checkout`,
/// `POST /api/billing/portal`, `POST /api/billing/webhook`. `U` is the app's signed-in-user
/// extractor; it refuses anonymous calls to all but the plans and the webhook.
pub fn router<U>(billing: Arc<BillingState>) -> Router<Arc<AppState>>
where
    U: AuthenticatedUser + FromRequestParts<Arc<AppState>> + Send + 'static,
{
    Router::new()
        .route("/api/billing/plans", get(plans_route))
        .route("/api/billing/subscription", get(subscription_route::<U>))
        .route("/api/billing/checkout", post(checkout_route::<U>))
        .route("/api/billing/portal", post(portal_route::<U>))
        .route("/api/billing/webhook", post(webhook_route))
        .layer(Extension(billing))
}

#[derive(Serialize)]
pub struct PlansView {
    pub plans: Vec<&'static Plan>,
}

async fn plans_route() -> Json<PlansView> {
    Json(PlansView { plans: Plan::all().to_vec() })
}

/// The signed-in user's subscription and what it lets them provision.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionView {
    /// The subscribed plan, or `null` without a subscription.
    pub plan: Option<PlanId>,
    pub status: Status,
    /// Unix ms since when a payment is overdue.
    pub past_due_since: Option<i64>,
    /// Whether the billing portal can be opened (the user is a customer at the provider).
    pub has_billing_account: bool,
    /// The limits new servers get, or `null` when the user may not provision now…
    pub limits: Option<&'static Plan>,
    /// …and why.
    pub refusal: Option<String>,
    pub provider: &'static str,
}

pub async fn subscription_view(
    db: &Db,
    billing: &BillingState,
    user_id: &str,
) -> Result<SubscriptionView, sqlx::Error> {
    let sub = subscriptions::get(db, user_id).await?;
    let admission = provisioning_plan(db, billing.require_subscription, user_id).await?;
    Ok(SubscriptionView {
        plan: sub.as_ref().map(|s| s.plan),
        status: sub.as_ref().map_or(Status::Inactive, |s| s.status),
        past_due_since: sub.as_ref().and_then(|s| s.past_due_since),
        has_billing_account: sub.as_ref().is_some_and(|s| s.customer_id.is_some()),
        limits: admission.as_ref().ok().copied(),
        refusal: admission.err().map(|r| r.to_string()),
        provider: match billing.provider_kind {
            BillingProviderKind::Local => "local",
            BillingProviderKind::Stripe => "stripe",
        },
    })
}

/// A checkout page for `plan`. Refused while a provider subscription is live: a second one
/// would charge twice; plan changes go through the portal. (The local provider keeps no
/// provider subscription, so there checkout simply switches plans.)
pub async fn start_checkout(
    db: &Db,
    billing: &BillingState,
    user_id: &str,
    email: &str,
    plan: &str,
) -> Result<String, BillingError> {
    let plan = Plan::parse(plan)?;
    let sub = subscriptions::get(db, user_id).await?;
    if let Some(s) = &sub {
        let live = matches!(s.status, Status::Active | Status::PastDue | Status::Suspended);
        if live && s.subscription_id.is_some() {
            return Err(BillingError::AlreadySubscribed(s.plan));
        }
    }
    let customer = BillingCustomer {
        user_id: user_id.to_string(),
        email: email.to_string(),
        customer_id: sub.and_then(|s| s.customer_id),
    };
    Ok(billing.provider.checkout(&customer, plan, &billing.return_url).await?)
}

/// The provider's billing portal for this user; 409 before they ever checked out.
pub async fn open_portal(db: &Db, billing: &BillingState, user_id: &str) -> Result<String, BillingError> {
    let customer =
        subscriptions::get(db, user_id).await?.and_then(|s| s.customer_id).ok_or(BillingError::NoCustomer)?;
    Ok(billing.provider.portal(&customer, &billing.return_url).await?)
}

async fn subscription_route<U: AuthenticatedUser>(
    user: U,
    State(app): State<Arc<AppState>>,
    Extension(billing): Extension<Arc<BillingState>>,
) -> ApiResult<Json<SubscriptionView>> {
    Ok(Json(subscription_view(&app.db, &billing, user.id()).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    plan: String,
}

#[derive(Serialize)]
struct UrlView {
    url: String,
}

async fn checkout_route<U: AuthenticatedUser>(
    user: U,
    State(app): State<Arc<AppState>>,
    Extension(billing): Extension<Arc<BillingState>>,
    body: Result<Json<CheckoutBody>, JsonRejection>,
) -> ApiResult<Json<UrlView>> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("expected {{\"plan\": \"basic\"}}: {}", e.body_text())))?;
    let url = start_checkout(&app.db, &billing, user.id(), user.email(), &body.plan).await?;
    Ok(Json(UrlView { url }))
}

async fn portal_route<U: AuthenticatedUser>(
    user: U,
    State(app): State<Arc<AppState>>,
    Extension(billing): Extension<Arc<BillingState>>,
) -> ApiResult<Json<UrlView>> {
    let url = open_portal(&app.db, &billing, user.id()).await?;
    Ok(Json(UrlView { url }))
}
