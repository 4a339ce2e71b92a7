//! Sessions: a signed, expiring token (`zlh_core::token`, purpose [`PURPOSE`]) backed by a row in
//! `sessions` whose id is the token's `jti`.
//!
//! The signature and expiry let every replica reject forged and stale tokens without trusting the
//! client; the row is what makes a session revocable before it expires (sign-out, "sign out
//! everywhere", a deleted account, whose rows go with it).
//!
//! Sessions are not bound to a container: the token's `vmid` is always 0. Which servers a user may
//! reach is decided per request from ownership, never from the session token.

use chrono::{DateTime, Utc};
use zlh_core::token::{self, TokenError, LEEWAY_SECS};

use crate::db::Db;
use crate::state::AppState;

/// The `aud` of session tokens, so no other token signed with the same key passes as a session.
pub const PURPOSE: &str = "zlh-session";
/// Sessions are for a user, not a container.
const NO_CONTAINER: u32 = 0;

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token's `jti`; safe to log.
    pub id: String,
    pub user_id: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session token: {0}")]
    Token(#[from] TokenError),
    #[error("session was signed out or does not exist")]
    Revoked,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Starts a session for `user_id` lasting `config.session_ttl` from `now`; returns the bearer token
/// to hand to the client. The user's expired and revoked session rows are pruned on the way.
pub async fn issue(state: &AppState, user_id: &str, now: DateTime<Utc>) -> Result<(String, Session), SessionError> {
    let token = token::issue(&state.session_key, PURPOSE, user_id, NO_CONTAINER, state.config.session_ttl, now)?;
    // Read back the claims `issue` chose (the random jti and the expiry).
    let claims = token::verify(&state.session_key, &token, PURPOSE, NO_CONTAINER, now)?;
    let now_ms = now.timestamp_millis();
    let session = Session { id: claims.jti, user_id: user_id.to_owned(), expires_at: claims.exp.saturating_mul(1000) };
    sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND (expires_at < $2 OR revoked_at IS NOT NULL)")
        .bind(user_id)
        .bind(now_ms - LEEWAY_SECS * 1000)
        .execute(state.db.pool())
        .await?;
    sqlx::query("INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(&session.id)
        .bind(user_id)
        .bind(now_ms)
        .bind(session.expires_at)
        .execute(state.db.pool())
        .await?;
    Ok((token, session))
}

/// The session a bearer token stands for: the signature, purpose and expiry are checked first
/// (no database work for a forged or stale token), then that its row exists and is not revoked.
pub async fn verify(state: &AppState, token: &str, now: DateTime<Utc>) -> Result<Session, SessionError> {
    let claims = token::verify(&state.session_key, token, PURPOSE, NO_CONTAINER, now)?;
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT user_id, expires_at FROM sessions WHERE id = $1 AND revoked_at IS NULL")
            .bind(&claims.jti)
            .fetch_optional(state.db.pool())
            .await?;
    match row {
        Some((user_id, expires_at)) if user_id == claims.sub => Ok(Session { id: claims.jti, user_id, expires_at }),
        _ => Err(SessionError::Revoked),
    }
}

/// Ends one session (sign-out); false if it was already ended or never existed.
pub async fn revoke(db: &Db, session_id: &str, now_ms: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now_ms)
        .bind(session_id)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Ends every session of a user (password change, "sign out everywhere", suspension); returns
/// how many were live.
pub async fn revoke_all_for_user(db: &Db, user_id: &str, now_ms: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
        .bind(now_ms)
        .bind(user_id)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected())
}
