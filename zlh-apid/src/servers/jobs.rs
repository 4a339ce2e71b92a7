//! Provisioning and deletion as persisted jobs. A job is claimed by one replica through a lease
//! (renewed while it runs); a replica that dies leaves a lease that expires, and another replica
//! takes the job over. Each step is recorded, so `/status` shows where a job is and why it failed.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{new_id, now_ms, Db};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepRecord {
    pub step: String,
    /// `running` | `done` | `failed`
    pub state: String,
    pub at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub server_id: String,
    pub kind: String,
    /// `queued` | `running` | `done` | `failed`
    pub state: String,
    pub step: Option<String>,
    pub steps: Vec<StepRecord>,
    pub error: Option<String>,
    pub attempts: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

pub const PROVISION: &str = "provision";
pub const DELETE: &str = "delete";

const COLUMNS: &str = "id, server_id, kind, state, step, steps, error, attempts, created_at, updated_at";

fn from_row(r: &sqlx::any::AnyRow) -> Job {
    Job {
        id: r.get("id"),
        server_id: r.get("server_id"),
        kind: r.get("kind"),
        state: r.get("state"),
        step: r.get("step"),
        steps: serde_json::from_str(&r.get::<String, _>("steps")).unwrap_or_default(),
        error: r.get("error"),
        attempts: r.get("attempts"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

pub async fn create(db: &Db, server_id: &str, kind: &str) -> sqlx::Result<Job> {
    let id = create_on(db.pool(), server_id, kind).await?;
    Ok(get(db, &id).await?.expect("just inserted"))
}

/// [`create`] on `ex`: a pool, or the transaction that records its server; the job's id.
pub async fn create_on<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    server_id: &str,
    kind: &str,
) -> sqlx::Result<String> {
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, server_id, kind, state, steps, created_at, updated_at) VALUES ($1, $2, $3, 'queued', '[]', $4, $4)",
    )
    .bind(&id)
    .bind(server_id)
    .bind(kind)
    .bind(now)
    .execute(ex)
    .await?;
    Ok(id)
}

pub async fn get(db: &Db, id: &str) -> sqlx::Result<Option<Job>> {
    let row =
        sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(db.pool()).await?;
    Ok(row.as_ref().map(from_row))
}

/// The newest job of a server.
pub async fn latest_for_server(db: &Db, server_id: &str) -> sqlx::Result<Option<Job>> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE server_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1"
    ))
    .bind(server_id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.as_ref().map(from_row))
}

/// Takes the lease of job `id` for `owner` if nobody holds a live one. The condition is checked
/// by the UPDATE itself, so of two replicas only one gets `true`.
pub async fn claim(db: &Db, id: &str, owner: &str, lease_ms: i64) -> sqlx::Result<bool> {
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE jobs SET state = 'running', lease_owner = $1, lease_until = $2, attempts = attempts + 1, updated_at = $3 \
         WHERE id = $4 AND (state = 'queued' OR (state = 'running' AND (lease_until IS NULL OR lease_until < $3)))",
    )
    .bind(owner)
    .bind(now + lease_ms)
    .bind(now)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Jobs that are queued or whose lease expired (their replica died): candidates to claim.
pub async fn claimable(db: &Db, limit: i64) -> sqlx::Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT id FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_until < $1) \
         ORDER BY created_at LIMIT $2",
    )
    .bind(now_ms())
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().map(|r| r.get("id")).collect())
}

pub async fn renew(db: &Db, id: &str, owner: &str, lease_ms: i64) -> sqlx::Result<bool> {
    let now = now_ms();
    let done = sqlx::query("UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'")
        .bind(now + lease_ms)
        .bind(id)
        .bind(owner)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a step's transition; the job's current step is the last one recorded.
pub async fn record_step(db: &Db, id: &str, step: &str, state: &str, error: Option<&str>) -> sqlx::Result<()> {
    let Some(job) = get(db, id).await? else { return Ok(()) };
    let mut steps = job.steps;
    let now = now_ms();
    match steps.iter_mut().rev().find(|s| s.step == step) {
        Some(s) if s.state == "running" => {
            s.state = state.into();
            s.at = now;
            s.error = error.map(Into::into);
        }
        _ => steps.push(StepRecord { step: step.into(), state: state.into(), at: now, error: error.map(Into::into) }),
    }
    sqlx::query("UPDATE jobs SET step = $1, steps = $2, updated_at = $3 WHERE id = $4")
        .bind(step)
        .bind(serde_json::to_string(&steps).unwrap_or_else(|_| "[]".into()))
        .bind(now)
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(())
}

pub async fn finish(db: &Db, id: &str, error: Option<&str>) -> sqlx::Result<()> {
    finish_on(db.pool(), id, error).await
}

/// What a finished job leaves its server as.
#[derive(Debug, Clone, Copy)]
pub enum ServerEnd<'a> {
    /// This state, with this error.
    State(&'a str, Option<&'a str>),
    /// Deleted.
    Deleted,
}

/// Records the job's end and its server's final state in one transaction: nobody sees a server
/// `running`, `failed` or gone while its job still says it is under way.
pub async fn finish_with_server(
    db: &Db,
    id: &str,
    error: Option<&str>,
    server_id: &str,
    end: ServerEnd<'_>,
) -> sqlx::Result<()> {
    let mut tx = db.pool().begin().await?;
    match end {
        ServerEnd::State(state, server_error) => {
            super::repo::set_state_on(&mut *tx, server_id, state, server_error).await?
        }
        ServerEnd::Deleted => super::repo::mark_deleted_on(&mut *tx, server_id).await?,
    }
    finish_on(&mut *tx, id, error).await?;
    tx.commit().await
}

async fn finish_on<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = $1, error = $2, lease_owner = NULL, lease_until = NULL, updated_at = $3 WHERE id = $4",
    )
    .bind(if error.is_some() { "failed" } else { "done" })
    .bind(error)
    .bind(now_ms())
    .bind(id)
    .execute(ex)
    .await?;
    Ok(())
}
