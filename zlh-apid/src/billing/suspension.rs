//! Non-payment: a subscription past due for longer than the grace period has its servers
//! stopped and is marked `suspended`; a subscription that ended (canceled, or lapsed to
//! `inactive`) has its servers stopped at once. A payment (of the open invoice, or of a new
//! subscription) resumes them; nothing is deleted. Stopping and starting servers is the servers
//! module's business, reached through [`ServerActions`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::db::{now_ms, Db};

use super::plans::PlanId;
use super::subscriptions::{self, Activated};
use super::BillingState;

/// Why billing stops a user's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension {
    /// Past due for longer than the grace period; paying the open invoice lifts it.
    PastDue,
    /// The subscription ended (canceled, or lapsed to `inactive`); a new one lifts it.
    Ended,
}

impl Suspension {
    /// What the server's status says about it.
    pub fn reason(self) -> &'static str {
        match self {
            Suspension::PastDue => "suspended: the subscription is past due",
            Suspension::Ended => "suspended: the subscription has ended",
        }
    }
}

/// What billing asks of the servers module. Both must be idempotent (a retried webhook or a
/// second sweep may ask again) and act only on the given user's servers.
#[async_trait]
pub trait ServerActions: Send + Sync {
    /// Stop every server of the user and mark it `suspended`, saying `why`.
    async fn suspend_user_servers(&self, user_id: &str, why: Suspension) -> anyhow::Result<()>;
    /// Start again every server of the user that is `suspended`.
    async fn resume_user_servers(&self, user_id: &str) -> anyhow::Result<()>;
}

/// For wiring billing before there are servers to act on.
pub struct NoServerActions;

#[async_trait]
impl ServerActions for NoServerActions {
    async fn suspend_user_servers(&self, _user_id: &str, _why: Suspension) -> anyhow::Result<()> {
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

#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("could not stop the servers of {user_id}: {cause:#}")]
    Servers { user_id: String, cause: anyhow::Error },
}

/// Stops `user_id`'s servers if billing says so at `now` (unix ms): past due since before
/// `cutoff` (the subscription becomes `suspended`), or the subscription ended (it keeps its
/// status). Returns why, or `None` when there is nothing to do: not due, already done, paid
/// meanwhile, or another replica got there first. If stopping fails the row goes back as it
/// was, so the next sweep tries again.
pub async fn suspend_if_due(
    db: &Db,
    actions: &dyn ServerActions,
    user_id: &str,
    cutoff: i64,
    now: i64,
) -> Result<Option<Suspension>, SuspendError> {
    let Some(before) = subscriptions::get(db, user_id).await? else { return Ok(None) };
    // Whoever's UPDATE matches owns stopping the servers.
    let why = if subscriptions::suspend_if_past_due(db, user_id, cutoff, now).await? {
        Suspension::PastDue
    } else if subscriptions::suspend_if_ended(db, user_id, now).await? {
        Suspension::Ended
    } else {
        return Ok(None);
    };
    if let Err(cause) = actions.suspend_user_servers(user_id, why).await {
        subscriptions::restore(db, &before, now).await?;
        return Err(SuspendError::Servers { user_id: user_id.to_string(), cause });
    }
    tracing::info!(user = %user_id, reason = why.reason(), "servers suspended");
    Ok(Some(why))
}

/// Stops the servers of every user due for it at `now` (unix ms): past due for longer than
/// `grace`, or with a subscription that ended. Returns the users whose servers this call
/// stopped. A user whose servers could not be stopped is left as before and tried again on
/// the next call.
pub async fn enforce_unpaid(
    db: &Db,
    now: i64,
    grace: Duration,
    actions: &dyn ServerActions,
) -> Result<Vec<String>, sqlx::Error> {
    let cutoff = past_due_cutoff(now, grace);
    let mut suspended = Vec::new();
    for user_id in subscriptions::due_for_suspension(db, cutoff).await? {
        match suspend_if_due(db, actions, &user_id, cutoff, now).await {
            Ok(Some(_)) => suspended.push(user_id),
            Ok(None) => {}
            Err(SuspendError::Db(e)) => return Err(e),
            Err(e @ SuspendError::Servers { .. }) => tracing::warn!(error = %e, "retrying on the next sweep"),
        }
    }
    Ok(suspended)
}

/// Past due since before this (unix ms) at `now`: beyond the grace period.
pub fn past_due_cutoff(now: i64, grace: Duration) -> i64 {
    now.saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX))
}

/// Runs [`enforce_unpaid`] now and then every `every`, for the life of the process.
pub fn spawn_enforcer(db: Db, billing: Arc<BillingState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = enforce_unpaid(&db, now_ms(), billing.past_due_grace, &*billing.actions).await {
                tracing::warn!(error = %e, "billing suspension sweep failed; retrying on the next tick");
            }
        }
    })
}
