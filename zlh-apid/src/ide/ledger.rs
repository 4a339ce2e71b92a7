//! The IDE facts every API replica must share, in the database: which IDE tokens were already
//! exchanged for a session, which IDE sessions were ended by logout, and which API session each
//! IDE token and session was opened from (an IDE session ends with its API session).
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

/// Whether IDE session `session_id` was ended, on any replica: logged out of the IDE, or the API
/// session it was opened from is signed out, expired or gone. A session with no recorded origin
/// counts as ended: every session this API opens has one.
pub async fn session_revoked(db: &Db, session_id: &str) -> sqlx::Result<bool> {
    Ok(live_origin(db, session_id).await?.is_none())
}

/// Records that IDE token or session `id` (its jti) was opened from API session `api_session_id`.
pub async fn record_origin(db: &Db, id: &str, api_session_id: &str, expires_at: DateTime<Utc>) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM ide_session_origins WHERE expires_at < $1").bind(now_ms()).execute(db.pool()).await?;
    sqlx::query("INSERT INTO ide_session_origins (id, api_session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(api_session_id)
        .bind(expires_at.timestamp_millis())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// The API session IDE token or session `id` was opened from, while that API session is signed
/// in and `id` was not logged out of. One query: it runs on every IDE request the access memo
/// does not answer.
pub async fn live_origin(db: &Db, id: &str) -> sqlx::Result<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT o.api_session_id FROM ide_session_origins o JOIN sessions s ON s.id = o.api_session_id \
         WHERE o.id = $1 AND s.revoked_at IS NULL AND s.expires_at > $2 \
         AND NOT EXISTS (SELECT 1 FROM ide_revoked_sessions r WHERE r.session_id = o.id)",
    )
    .bind(id)
    .bind(now_ms())
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(api_session_id,)| api_session_id))
}

/// The IDE tokens and sessions opened from API session `api_session_id`: (id, expiry).
pub async fn opened_from(db: &Db, api_session_id: &str) -> sqlx::Result<Vec<(String, DateTime<Utc>)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, expires_at FROM ide_session_origins WHERE api_session_id = $1")
            .bind(api_session_id)
            .fetch_all(db.pool())
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, ms)| (id, DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)))
        .collect())
}
