//! Non-payment: a subscription past due for longer than the grace period has its servers
//! stopped and is marked `suspended`; a payment resumes them. Stopping and starting servers is
//! the servers module's business, reached through [`ServerActions`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::db::{now_ms, Db};

use super::plans::PlanId;
use super::subscriptions::{self, Activated};
use super::BillingState;

/// What billing asks of the servers module. Both must be idempotent (a retried webhook or a
/// second sweep may ask again) and act only on the given user's servers.
#[async_trait]
pub trait ServerActions: Send + Sync {
    /// Stop every server of the user and mark it `suspended`.
    async fn suspend_user_servers(&self, user_id: &str) -> anyhow::Result<()>;
    /// Start again every server of the user that is `suspended`.
    async fn resume_user_servers(&self, user_id: &str) -> anyhow::Result<()>;
}

/// For wiring billing before there are servers to act on.
pub struct NoServerActions;

#[async_trait]
impl ServerActions for NoServerActions {
    async fn suspend_user_servers(&self, _user_id: &str) -> anyhow::Result<()> {
        Ok(())
    }
    async fn resume_user_servers(&self, _user_id: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("could not resume the servers of {user_id}: {cause:#}")]
    Resume { user_id: String, cause: anyhow::Error },
}

/// [`subscriptions::activate`], then resumes the user's servers if they were stopped for
/// non-payment. If resuming fails the row goes back as it was, so a retry resumes again.
pub async fn activate_and_resume(
    db: &Db,
    actions: &dyn ServerActions,
    user_id: &str,
    plan: Option<PlanId>,
    customer_id: Option<&str>,
    subscription_id: Option<&str>,
    now: i64,
) -> Result<Activated, ActivateError> {
    let before = subscriptions::get(db, user_id).await?;
    let activated = subscriptions::activate(db, user_id, plan, customer_id, subscription_id, now).await?;
    if activated == Activated::ResumeServers {
        if let Err(cause) = actions.resume_user_servers(user_id).await {
            if let Some(before) = &before {
                subscriptions::restore(db, before, now).await?;
            }
            return Err(ActivateError::Resume { user_id: user_id.to_string(), cause });
        }
        tracing::info!(user = %user_id, "payment received: servers resumed");
    }
    Ok(activated)
}

/// Suspends every subscription past due for longer than `grace` at `now` (unix ms) and stops
/// its servers. Returns the users suspended by this call. A user whose servers could not be
/// stopped is put back to `past_due` and tried again on the next call.
pub async fn enforce_past_due(
    db: &Db,
    now: i64,
    grace: Duration,
    actions: &dyn ServerActions,
) -> Result<Vec<String>, sqlx::Error> {
    let cutoff = now.saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
    let mut suspended = Vec::new();
    for user_id in subscriptions::past_due_before(db, cutoff).await? {
        let Some(before) = subscriptions::get(db, &user_id).await? else { continue };
        // Another replica, or a payment, may have got there first.
        if !subscriptions::suspend_if_past_due(db, &user_id, cutoff, now).await? {
            continue;
        }
        match actions.suspend_user_servers(&user_id).await {
            Ok(()) => {
                tracing::info!(user = %user_id, "past due beyond the grace period: servers suspended");
                suspended.push(user_id);
            }
            Err(e) => {
                tracing::warn!(user = %user_id, error = %format!("{e:#}"), "could not suspend servers; retrying later");
                subscriptions::restore(db, &before, now).await?;
            }
        }
    }
    Ok(suspended)
}

/// Runs [`enforce_past_due`] now and then every `every`, for the life of the process.
pub fn spawn_enforcer(db: Db, billing: Arc<BillingState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = enforce_past_due(&db, now_ms(), billing.past_due_grace, &*billing.actions).await {
                tracing::warn!(error = %e, "past-due sweep failed; retrying on the next tick");
            }
        }
    })
}
