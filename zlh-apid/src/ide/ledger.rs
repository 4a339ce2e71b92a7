//! The IDE facts every API replica must share, in the database: which IDE tokens were already
//! exchanged for a session, and which IDE sessions were ended by logout.
//!
//! Each process also keeps both in memory (zlh-core's `LocalIdeRouter`): that copy answers at
//! once and closes this replica's open WebSockets; this one makes a token single-use and a logout
//! final on every replica. Rows go once they would have expired anyway (swept on each write).

use chrono::{DateTime, Utc};

use crate::db::{is_unique_violation, now_ms, Db};

/// Records the first use of IDE token `token_id`; `false` if it was used before, here or on
/// another replica.
pub async fn use_token(db: &Db, token_id: &str, expires_at: DateTime<Utc>) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM ide_used_tokens WHERE expires_at < $1").bind(now_ms()).execute(db.pool()).await?;
    let inserted = sqlx::query("INSERT INTO ide_used_tokens (token_id, expires_at) VALUES ($1, $2)")
        .bind(token_id)
        .bind(expires_at.timestamp_millis())
        .execute(db.pool())
        .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Ends IDE session `session_id` on every replica (it would expire at `expires_at`).
pub async fn revoke_session(db: &Db, session_id: &str, expires_at: DateTime<Utc>) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM ide_revoked_sessions WHERE expires_at < $1").bind(now_ms()).execute(db.pool()).await?;
    sqlx::query("INSERT INTO ide_revoked_sessions (session_id, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(session_id)
        .bind(expires_at.timestamp_millis())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Whether IDE session `session_id` was ended, on any replica.
pub async fn session_revoked(db: &Db, session_id: &str) -> sqlx::Result<bool> {
    let row = sqlx::query("SELECT 1 FROM ide_revoked_sessions WHERE session_id = $1")
        .bind(session_id)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.is_some())
}
