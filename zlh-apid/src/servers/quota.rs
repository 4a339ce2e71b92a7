//! Creating a server within its owner's plan: how many servers, and how much memory and disk all
//! of them hold. Checked and recorded in one transaction that first takes the owner's lock row
//! (their `users` row, written), so two creates racing for the last slot — on one replica or two,
//! SQLite or PostgreSQL — run one after the other and the second sees the first's server.

use serde_json::Value;

use super::jobs::{self, Job};
use super::repo::{self, state, Kind, Server};
use crate::billing::{check_totals, LimitError, Plan, Usage};
use crate::db::Db;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// 402 naming the limit, like the plan's other limits.
impl From<QuotaError> for crate::http::ApiError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Limit(e) => e.into(),
            QuotaError::Db(e) => e.into(),
        }
    }
}

/// Records the server and its provisioning job if the owner's servers leave room for it in
/// `plan`; nothing is recorded otherwise.
pub async fn create_within_plan(
    db: &Db,
    user_id: &str,
    kind: Kind,
    name: &str,
    plan: &Plan,
    spec: &Value,
) -> Result<(Server, Job), QuotaError> {
    let mut tx = db.pool().begin().await?;
    // The lock row: a write, so SQLite takes its write lock here (waiting out the busy timeout)
    // and PostgreSQL locks the row until commit; a racing create waits at this statement.
    sqlx::query("UPDATE users SET role = role WHERE id = $1").bind(user_id).execute(&mut *tx).await?;
    let usage = usage_on(&mut tx, user_id).await?;
    let memory = spec["memory_mb"].as_u64().unwrap_or(0) as u32;
    let disk = spec["disk_gb"].as_u64().unwrap_or(0) as u32;
    check_totals(plan, usage, memory, disk)?;
    let server_id = repo::insert_on(&mut *tx, user_id, kind, name, plan.id.as_str(), spec).await?;
    let job_id = jobs::create_on(&mut *tx, &server_id, jobs::PROVISION).await?;
    tx.commit().await?;
    let server = repo::get(db, &server_id).await?.ok_or(sqlx::Error::RowNotFound)?;
    let job = jobs::get(db, &job_id).await?.ok_or(sqlx::Error::RowNotFound)?;
    Ok((server, job))
}

/// What the user's live servers hold.
async fn usage_on(conn: &mut sqlx::AnyConnection, user_id: &str) -> sqlx::Result<Usage> {
    let specs: Vec<(String,)> =
        sqlx::query_as("SELECT spec FROM servers WHERE user_id = $1 AND deleted_at IS NULL AND state <> $2")
            .bind(user_id)
            .bind(state::FAILED)
            .fetch_all(&mut *conn)
            .await?;
    let mut usage = Usage::default();
    for (spec,) in specs {
        let spec: Value = serde_json::from_str(&spec).unwrap_or(Value::Null);
        usage.servers += 1;
        usage.memory_mb += spec["memory_mb"].as_u64().unwrap_or(0);
        usage.disk_gb += spec["disk_gb"].as_u64().unwrap_or(0);
    }
    Ok(usage)
}
