//! Users and sessions: accounts with argon2id passwords, revocable signed session tokens, a login
//! rate limit shared by all replicas, and the extractors every other route authenticates with.
//!
//! A handler that takes [`CurrentUser`] only runs for a signed-in user; one that takes
//! [`AdminUser`] only for an operator. The user is read fresh from the database on each request,
//! so a role change or a deleted account applies at once.

pub mod admins;
pub mod password;
pub mod ratelimit;
pub mod routes;
pub mod session;
pub mod users;

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::http::ApiError;
use crate::state::AppState;
pub use users::Role;

/// The signed-in user making the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentUser {
    pub id: String,
    pub email: String,
    pub username: String,
    pub role: Role,
    /// The session the request's token stands for (what sign-out revokes).
    pub session_id: String,
}

impl CurrentUser {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Tenancy: whether this user may act on something owned by `owner_id` (their own, or any
    /// for an admin). Routes answer 404 otherwise, so others' servers are not revealed.
    pub fn may_access(&self, owner_id: &str) -> bool {
        self.is_admin() || self.id == owner_id
    }
}

fn not_signed_in() -> ApiError {
    ApiError::unauthorized("not signed in")
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// 401 `{"error":"not signed in"}` without a valid, unrevoked session of an existing user.
impl FromRequestParts<Arc<AppState>> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if let Some(user) = parts.extensions.get::<CurrentUser>() {
            return Ok(user.clone());
        }
        let token = bearer_token(&parts.headers).ok_or_else(not_signed_in)?;
        let current = user_from_token(state, token).await?;
        parts.extensions.insert(current.clone());
        Ok(current)
    }
}

/// The user a session token stands for, checked fully (signature, expiry, revocation, account).
pub async fn user_from_token(state: &AppState, token: &str) -> Result<CurrentUser, ApiError> {
    let session = match session::verify(state, token, chrono::Utc::now()).await {
        Ok(s) => s,
        Err(session::SessionError::Db(e)) => return Err(e.into()),
        Err(e) => {
            tracing::debug!(reason = %e, "session refused");
            return Err(not_signed_in());
        }
    };
    let user = users::find_by_id(&state.db, &session.user_id).await?.ok_or_else(not_signed_in)?;
    Ok(CurrentUser { id: user.id, email: user.email, username: user.username, role: user.role, session_id: session.id })
}

/// Subprotocol that carries a session token on a WebSocket: browsers cannot set headers there.
pub const SESSION_PROTOCOL_PREFIX: &str = "zlh-auth.";

/// For WebSocket routes: the bearer header, or a `zlh-auth.<token>` entry in
/// `Sec-WebSocket-Protocol` (never a query parameter: URLs end up in logs).
pub async fn user_from_headers_or_protocol(state: &AppState, headers: &HeaderMap) -> Result<CurrentUser, ApiError> {
    if let Some(token) = bearer_token(headers) {
        return user_from_token(state, token).await;
    }
    let offered = headers.get_all("sec-websocket-protocol").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let token = offered
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(SESSION_PROTOCOL_PREFIX))
        .ok_or_else(not_signed_in)?;
    user_from_token(state, token).await
}

impl crate::billing::AuthenticatedUser for CurrentUser {
    fn id(&self) -> &str {
        &self.id
    }
    fn email(&self) -> &str {
        &self.email
    }
}

/// A signed-in operator: 401 when not signed in, 403 `{"error":"admins only"}` for other users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUser(pub CurrentUser);

impl Deref for AdminUser {
    type Target = CurrentUser;
    fn deref(&self) -> &CurrentUser {
        &self.0
    }
}

impl FromRequestParts<Arc<AppState>> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let user = CurrentUser::from_request_parts(parts, state).await?;
        if user.is_admin() {
            Ok(AdminUser(user))
        } else {
            Err(ApiError::forbidden("admins only"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer_token(&with("Bearer abc.def.ghi")), Some("abc.def.ghi"));
        assert_eq!(bearer_token(&with("bearer   abc ")), Some("abc"));
        assert_eq!(bearer_token(&with("Basic abc")), None);
        assert_eq!(bearer_token(&with("Bearer ")), None);
        assert_eq!(bearer_token(&with("abc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
