//! The `servers` table: every server belongs to one user; lookups for a user never return
//! another user's server (admins see all).

use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{new_id, now_ms, Db};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Game,
    Dev,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Game => "game",
            Kind::Dev => "dev",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "dev" {
            Kind::Dev
        } else {
            Kind::Game
        }
    }
}

/// Lifecycle of a server as the API sees it.
pub mod state {
    pub const PROVISIONING: &str = "provisioning";
    pub const RUNNING: &str = "running";
    pub const FAILED: &str = "failed";
    pub const SUSPENDED: &str = "suspended";
    pub const DELETING: &str = "deleting";
    pub const DELETED: &str = "deleted";
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    pub id: String,
    #[serde(skip)]
    pub user_id: String,
    pub kind: Kind,
    pub name: String,
    pub plan: String,
    pub vmid: Option<u32>,
    pub spec: Value,
    pub state: String,
    #[serde(skip)]
    pub agent_url: Option<String>,
    #[serde(skip)]
    pub code_server_addr: Option<String>,
    /// Its code-server was stopped by the owner: the IDE is refused until it is started again.
    pub ide_stopped: bool,
    pub agent_status: String,
    pub agent_last_seen: Option<i64>,
    #[serde(skip)]
    pub last_status: Option<Value>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "id, user_id, kind, name, plan, vmid, spec, state, agent_url, code_server_addr, ide_stopped, agent_status, \
                       agent_last_seen, last_status, error, created_at, updated_at";

fn from_row(r: &AnyRow) -> Server {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Server {
        id: r.get("id"),
        user_id: r.get("user_id"),
        kind: Kind::parse(&r.get::<String, _>("kind")),
        name: r.get("name"),
        plan: r.get("plan"),
        vmid: r.get::<Option<i64>, _>("vmid").map(|v| v as u32),
        spec: json(r.get("spec")).unwrap_or(Value::Null),
        state: r.get("state"),
        agent_url: r.get("agent_url"),
        code_server_addr: r.get("code_server_addr"),
        ide_stopped: r.get::<i64, _>("ide_stopped") != 0,
        agent_status: r.get("agent_status"),
        agent_last_seen: r.get("agent_last_seen"),
        last_status: json(r.get("last_status")),
        error: r.get("error"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

pub async fn insert(db: &Db, user_id: &str, kind: Kind, name: &str, plan: &str, spec: &Value) -> sqlx::Result<Server> {
    let id = insert_on(db.pool(), user_id, kind, name, plan, spec).await?;
    Ok(get(db, &id).await?.expect("just inserted"))
}

/// [`insert`] on `ex`: a pool, or a transaction (the plan's limits are checked in the same one);
/// the new server's id.
pub async fn insert_on<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    user_id: &str,
    kind: Kind,
    name: &str,
    plan: &str,
    spec: &Value,
) -> sqlx::Result<String> {
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO servers (id, user_id, kind, name, plan, spec, state, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(&id)
    .bind(user_id)
    .bind(kind.as_str())
    .bind(name)
    .bind(plan)
    .bind(spec.to_string())
    .bind(state::PROVISIONING)
    .bind(now)
    .execute(ex)
    .await?;
    Ok(id)
}

pub async fn get(db: &Db, id: &str) -> sqlx::Result<Option<Server>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM servers WHERE id = $1 AND deleted_at IS NULL"))
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// The server if `user_id` owns it (or `admin`); another user's server is indistinguishable from
/// a missing one.
pub async fn get_owned(db: &Db, id: &str, user_id: &str, admin: bool) -> sqlx::Result<Option<Server>> {
    Ok(get(db, id).await?.filter(|s| admin || s.user_id == user_id))
}

pub async fn get_by_vmid(db: &Db, vmid: u32) -> sqlx::Result<Option<Server>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM servers WHERE vmid = $1 AND deleted_at IS NULL"))
        .bind(vmid as i64)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.as_ref().map(from_row))
}

pub async fn list_for_user(db: &Db, user_id: &str) -> sqlx::Result<Vec<Server>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM servers WHERE user_id = $1 AND deleted_at IS NULL ORDER BY created_at, id"
    ))
    .bind(user_id)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().map(from_row).collect())
}

pub async fn list_all(db: &Db) -> sqlx::Result<Vec<Server>> {
    let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM servers WHERE deleted_at IS NULL ORDER BY created_at, id"))
        .fetch_all(db.pool())
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Servers with an agent to poll.
pub async fn list_with_agents(db: &Db) -> sqlx::Result<Vec<Server>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM servers WHERE deleted_at IS NULL AND agent_url IS NOT NULL AND vmid IS NOT NULL"
    ))
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().map(from_row).collect())
}

pub async fn set_vmid(db: &Db, id: &str, vmid: u32) -> sqlx::Result<()> {
    sqlx::query("UPDATE servers SET vmid = $1, updated_at = $2 WHERE id = $3")
        .bind(vmid as i64)
        .bind(now_ms())
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(())
}

pub async fn set_state(db: &Db, id: &str, state: &str, error: Option<&str>) -> sqlx::Result<()> {
    set_state_on(db.pool(), id, state, error).await
}

/// [`set_state`] on `ex`: a pool, or a transaction that records more with it.
pub async fn set_state_on<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
    state: &str,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE servers SET state = $1, error = $2, updated_at = $3 WHERE id = $4")
        .bind(state)
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .execute(ex)
        .await?;
    Ok(())
}

/// A (new) container's endpoints; its code-server starts with it, so the IDE is no longer stopped.
pub async fn set_endpoint(db: &Db, id: &str, agent_url: &str, code_server: Option<&str>) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE servers SET agent_url = $1, code_server_addr = $2, ide_stopped = 0, updated_at = $3 WHERE id = $4",
    )
    .bind(agent_url)
    .bind(code_server)
    .bind(now_ms())
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Records that the owner stopped (`true`) or started the server's code-server.
pub async fn set_ide_stopped(db: &Db, id: &str, stopped: bool) -> sqlx::Result<()> {
    sqlx::query("UPDATE servers SET ide_stopped = $1, updated_at = $2 WHERE id = $3")
        .bind(i64::from(stopped))
        .bind(now_ms())
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Records a poll: online with the agent's status and the time, or offline (keeping last seen).
pub async fn record_poll(db: &Db, id: &str, online: bool, status: Option<&Value>, at: i64) -> sqlx::Result<()> {
    if online {
        sqlx::query("UPDATE servers SET agent_status = 'online', agent_last_seen = $1, last_status = $2 WHERE id = $3")
            .bind(at)
            .bind(status.map(Value::to_string))
            .bind(id)
            .execute(db.pool())
            .await?;
    } else {
        sqlx::query("UPDATE servers SET agent_status = 'offline' WHERE id = $1").bind(id).execute(db.pool()).await?;
    }
    Ok(())
}

/// Archives a server: it disappears from every listing; the row stays for billing and audit.
pub async fn mark_deleted(db: &Db, id: &str) -> sqlx::Result<()> {
    mark_deleted_on(db.pool(), id).await
}

/// [`mark_deleted`] on `ex`: a pool, or a transaction that records more with it.
pub async fn mark_deleted_on<'e>(ex: impl sqlx::Executor<'e, Database = sqlx::Any>, id: &str) -> sqlx::Result<()> {
    let now = now_ms();
    sqlx::query("UPDATE servers SET state = $1, deleted_at = $2, updated_at = $2, agent_url = NULL WHERE id = $3")
        .bind(state::DELETED)
        .bind(now)
        .bind(id)
        .execute(ex)
        .await?;
    Ok(())
}
