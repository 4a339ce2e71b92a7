//! The `subscriptions` table: one row per user. Every status change is a single conditional
//! UPDATE, so two API replicas (or a webhook racing the suspension sweep) cannot both act on
//! one transition — the one whose UPDATE matched is the one that stops or resumes servers.

use std::fmt;

use serde::Serialize;
use sqlx::Row;

use crate::db::Db;

use super::plans::PlanId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Inactive,
    PastDue,
    Canceled,
    Suspended,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Status::Active, Status::Inactive, Status::PastDue, Status::Canceled, Status::Suspended]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub user_id: String,
    pub plan: PlanId,
    pub status: Status,
    /// The payment provider's customer (`cus_…`, or `local_<user>` for the local provider).
    pub customer_id: Option<String>,
    /// The payment provider's subscription (`sub_…`); none for the local provider.
    pub subscription_id: Option<String>,
    /// Unix ms when the subscription last entered `past_due`; kept through `suspended`.
    pub past_due_since: Option<i64>,
    /// Unix ms when billing stopped the user's servers (past due beyond the grace period, or the
    /// subscription ended); cleared by a payment.
    pub servers_suspended_at: Option<i64>,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "user_id, plan, status, customer_id, subscription_id, past_due_since, servers_suspended_at, updated_at";

fn from_row(row: &sqlx::any::AnyRow) -> Result<Subscription, sqlx::Error> {
    let plan: String = row.try_get("plan")?;
    let status: String = row.try_get("status")?;
    let bad = |what: &str, v: &str| sqlx::Error::Decode(format!("subscriptions: unknown {what} {v:?}").into());
    Ok(Subscription {
        user_id: row.try_get("user_id")?,
        plan: PlanId::parse(&plan).map_err(|_| bad("plan", &plan))?,
        status: Status::parse(&status).ok_or_else(|| bad("status", &status))?,
        customer_id: row.try_get("customer_id")?,
        subscription_id: row.try_get("subscription_id")?,
        past_due_since: row.try_get("past_due_since")?,
        servers_suspended_at: row.try_get("servers_suspended_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn fetch_by(db: &Db, column: &str, value: &str) -> Result<Option<Subscription>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM subscriptions WHERE {column} = $1");
    sqlx::query(&sql).bind(value).fetch_optional(db.pool()).await?.as_ref().map(from_row).transpose()
}

pub async fn get(db: &Db, user_id: &str) -> Result<Option<Subscription>, sqlx::Error> {
    fetch_by(db, "user_id", user_id).await
}

pub async fn find_by_customer(db: &Db, customer_id: &str) -> Result<Option<Subscription>, sqlx::Error> {
    fetch_by(db, "customer_id", customer_id).await
}

pub async fn find_by_subscription(db: &Db, subscription_id: &str) -> Result<Option<Subscription>, sqlx::Error> {
    fetch_by(db, "subscription_id", subscription_id).await
}

pub async fn user_exists(db: &Db, user_id: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("SELECT 1 FROM users WHERE id = $1").bind(user_id).fetch_optional(db.pool()).await?.is_some())
}

/// What a payment did to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activated {
    /// The user's servers were stopped for non-payment: they must be resumed now.
    ResumeServers,
    /// Active now (or already was); no server was stopped for non-payment.
    Yes,
    /// The user has no subscription row (and none was to be created).
    NoSubscription,
}

/// Marks a subscription paid: `active`, `past_due_since` cleared; creates the row when `plan` is
/// given (a completed checkout). `customer_id`/`subscription_id` replace the stored ones when given.
pub async fn activate(
    db: &Db,
    user_id: &str,
    plan: Option<PlanId>,
    customer_id: Option<&str>,
    subscription_id: Option<&str>,
    now: i64,
) -> Result<Activated, sqlx::Error> {
    let plan = plan.map(PlanId::as_str);
    // A row suspended between the two statements is retried: the first one then matches it.
    for _ in 0..3 {
        // Servers stopped → active first: whoever matches this UPDATE owns the resume.
        let resumed = sqlx::query(
            "UPDATE subscriptions SET status = 'active', past_due_since = NULL, servers_suspended_at = NULL, \
             plan = COALESCE($2, plan), customer_id = COALESCE($3, customer_id), \
             subscription_id = COALESCE($4, subscription_id), updated_at = $5 \
             WHERE user_id = $1 AND servers_suspended_at IS NOT NULL",
        )
        .bind(user_id)
        .bind(plan)
        .bind(customer_id)
        .bind(subscription_id)
        .bind(now)
        .execute(db.pool())
        .await?;
        if resumed.rows_affected() == 1 {
            return Ok(Activated::ResumeServers);
        }
        let q = match plan {
            Some(plan) => sqlx::query(
                "INSERT INTO subscriptions \
                 (user_id, plan, status, customer_id, subscription_id, past_due_since, updated_at) \
                 VALUES ($1, $2, 'active', $3, $4, NULL, $5) \
                 ON CONFLICT (user_id) DO UPDATE SET status = 'active', past_due_since = NULL, plan = excluded.plan, \
                 customer_id = COALESCE(excluded.customer_id, subscriptions.customer_id), \
                 subscription_id = COALESCE(excluded.subscription_id, subscriptions.subscription_id), \
                 updated_at = excluded.updated_at \
                 WHERE subscriptions.servers_suspended_at IS NULL",
            )
            .bind(user_id)
            .bind(plan),
            None => sqlx::query(
                "UPDATE subscriptions SET status = 'active', past_due_since = NULL, \
                 customer_id = COALESCE($2, customer_id), subscription_id = COALESCE($3, subscription_id), \
                 updated_at = $4 WHERE user_id = $1 AND servers_suspended_at IS NULL",
            )
            .bind(user_id),
        };
        let done = q.bind(customer_id).bind(subscription_id).bind(now).execute(db.pool()).await?;
        if done.rows_affected() == 1 {
            return Ok(Activated::Yes);
        }
        if get(db, user_id).await?.is_none() {
            return Ok(Activated::NoSubscription);
        }
    }
    Err(sqlx::Error::Protocol(format!("subscription of {user_id} kept changing while being activated")))
}

/// A subscription taken out but not paid yet (or known from an event that came before its
/// checkout): the row with its ids and plan; a new row is `inactive`, an existing one keeps its status.
pub async fn record_pending(
    db: &Db,
    user_id: &str,
    plan: PlanId,
    customer_id: Option<&str>,
    subscription_id: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO subscriptions (user_id, plan, status, customer_id, subscription_id, past_due_since, updated_at) \
         VALUES ($1, $2, 'inactive', $3, $4, NULL, $5) \
         ON CONFLICT (user_id) DO UPDATE SET plan = excluded.plan, \
         customer_id = COALESCE(excluded.customer_id, subscriptions.customer_id), \
         subscription_id = COALESCE(excluded.subscription_id, subscriptions.subscription_id), \
         updated_at = excluded.updated_at",
    )
    .bind(user_id)
    .bind(plan.as_str())
    .bind(customer_id)
    .bind(subscription_id)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Sets a status; payments go through [`activate`] (via `suspension::activate_and_resume`)
/// and suspension through `suspension::enforce_unpaid`, which also act on the servers. Here
/// `active` leaves a row whose servers were stopped for non-payment alone, and `suspended` only
/// marks a past-due row. Entering `past_due` keeps the time it first became past due, and a
/// `suspended` row stays suspended: only a payment lifts it. `inactive`/`canceled` clear
/// `past_due_since`; servers stopped for non-payment stay stopped until the next payment, and
/// running ones are stopped by `suspension::suspend_if_due`.
/// Returns whether a row was changed.
pub async fn set_status(db: &Db, user_id: &str, status: Status, now: i64) -> Result<bool, sqlx::Error> {
    let q = match status {
        // A row whose servers were stopped is left alone: that takes `activate_and_resume`.
        Status::Active => sqlx::query(
            "UPDATE subscriptions SET status = 'active', past_due_since = NULL, updated_at = $2 \
             WHERE user_id = $1 AND servers_suspended_at IS NULL",
        )
        .bind(user_id)
        .bind(now),
        Status::Suspended => return suspend_if_past_due(db, user_id, i64::MAX, now).await,
        Status::PastDue => sqlx::query(
            "UPDATE subscriptions SET status = 'past_due', past_due_since = COALESCE(past_due_since, $2), \
             updated_at = $2 WHERE user_id = $1 AND status <> 'suspended'",
        )
        .bind(user_id)
        .bind(now),
        Status::Inactive | Status::Canceled => sqlx::query(
            "UPDATE subscriptions SET status = $2, past_due_since = NULL, updated_at = $3 WHERE user_id = $1",
        )
        .bind(user_id)
        .bind(status.as_str())
        .bind(now),
    };
    Ok(q.execute(db.pool()).await?.rows_affected() == 1)
}

pub async fn set_plan(db: &Db, user_id: &str, plan: PlanId, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE subscriptions SET plan = $2, updated_at = $3 WHERE user_id = $1")
        .bind(user_id)
        .bind(plan.as_str())
        .bind(now)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// A subscription that is not paid for (`canceled`, or `inactive`: lapsed, or never paid)
/// while its user has a running server. A pending checkout's row has none, so it is left alone.
const ENDED_WITH_RUNNING_SERVERS: &str = "status IN ('canceled', 'inactive') AND EXISTS \
     (SELECT 1 FROM servers WHERE servers.user_id = subscriptions.user_id AND servers.state = 'running')";

/// Users whose servers billing must stop now: past due since before `cutoff` (unix ms), or
/// whose subscription ended while a server still runs.
pub async fn due_for_suspension(db: &Db, cutoff: i64) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT user_id FROM subscriptions WHERE servers_suspended_at IS NULL \
         AND ((status = 'past_due' AND past_due_since < $1) OR ({ENDED_WITH_RUNNING_SERVERS})) \
         ORDER BY updated_at"
    ))
    .bind(cutoff)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| r.try_get("user_id")).collect()
}

/// `past_due` since before `cutoff` → `suspended` with its servers marked stopped; true if this
/// call made the change (and so owns stopping the servers).
pub async fn suspend_if_past_due(db: &Db, user_id: &str, cutoff: i64, now: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE subscriptions SET status = 'suspended', servers_suspended_at = $3, updated_at = $3 \
         WHERE user_id = $1 AND status = 'past_due' AND past_due_since < $2",
    )
    .bind(user_id)
    .bind(cutoff)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A subscription that ended (`canceled`, or lapsed to `inactive`) while a server of its user
/// still runs: marks the servers stopped, keeping the status; true if this call made the change
/// (and so owns stopping them). A new subscription's payment ([`activate`]) resumes them.
pub async fn suspend_if_ended(db: &Db, user_id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(&format!(
        "UPDATE subscriptions SET servers_suspended_at = $2, updated_at = $2 \
         WHERE user_id = $1 AND servers_suspended_at IS NULL AND {ENDED_WITH_RUNNING_SERVERS}"
    ))
    .bind(user_id)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Puts a row back as it was before a transition whose server actions failed, so the next
/// sweep (or the provider's retry of the event) tries again. Only if nothing changed it since.
pub async fn restore(db: &Db, before: &Subscription, changed_at: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE subscriptions SET status = $2, plan = $3, customer_id = $4, subscription_id = $5, \
         past_due_since = $6, servers_suspended_at = $7, updated_at = $8 WHERE user_id = $1 AND updated_at = $9",
    )
    .bind(&before.user_id)
    .bind(before.status.as_str())
    .bind(before.plan.as_str())
    .bind(&before.customer_id)
    .bind(&before.subscription_id)
    .bind(before.past_due_since)
    .bind(before.servers_suspended_at)
    .bind(before.updated_at)
    .bind(changed_at)
    .execute(db.pool())
    .await?;
    Ok(())
}
