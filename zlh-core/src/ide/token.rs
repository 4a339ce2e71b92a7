//! IDE tokens and IDE session cookies, both signed with [`crate::token`].
//!
//! - An IDE token (purpose [`IDE_PURPOSE`]) is what the portal gets from the API: bound to one
//!   user and one vmid, valid for about a minute, accepted once by this process (it travels in a
//!   URL, so a copy from a history or a log is worthless after the first use).
//! - An IDE session (purpose [`SESSION_PURPOSE`]) is the value of the cookie the dev host sets in
//!   exchange. It is a signed token rather than a database row so every API replica can verify it.
//!   Its `jti` is the session id; [`Revocations`] refuses revoked ids until they would have
//!   expired anyway. Used tokens and revoked sessions live in this process only; an embedder with
//!   several replicas shares them itself (zlh-apid keeps both in its database as well).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use super::{IdeError, IdeGrant};
use crate::token::{self, Claims, TokenError, TokenKey};
use crate::types::Vmid;

/// Purpose (`aud`) of the short-lived token that opens an IDE.
pub const IDE_PURPOSE: &str = "zlh-ide";
/// Purpose (`aud`) of the IDE session cookie's value.
pub const SESSION_PURPOSE: &str = "zlh-ide-session";
/// How long an IDE token lives by default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long an IDE session lasts by default.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// A signed token of `purpose` for `user_id` and `vmid`, with its claims.
pub fn issue(
    key: &TokenKey,
    purpose: &str,
    user_id: &str,
    vmid: Vmid,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<(String, Claims), IdeError> {
    let signed = token::issue(key, purpose, user_id, vmid.0, ttl, now).map_err(|e| IdeError::Signing(e.to_string()))?;
    let claims = token::verify(key, &signed, purpose, vmid.0, now).map_err(|e| IdeError::Signing(e.to_string()))?;
    Ok((signed, claims))
}

/// Checks `value` is a token of `purpose` for `vmid`, signed with `key`, unexpired at `now`.
pub fn verify(key: &TokenKey, value: &str, purpose: &str, vmid: Vmid, now: DateTime<Utc>) -> Result<Claims, IdeError> {
    token::verify(key, value, purpose, vmid.0, now).map_err(|e| {
        IdeError::BadToken(match e {
            TokenError::Expired => "expired",
            TokenError::WrongTarget => "issued for another IDE",
            TokenError::WrongPurpose => "not an IDE credential",
            _ => "invalid",
        })
    })
}

/// What verified claims grant.
pub fn grant(claims: &Claims) -> IdeGrant {
    IdeGrant {
        user_id: claims.sub.clone(),
        vmid: Vmid(claims.vmid),
        session_id: claims.jti.clone(),
        expires_at: claims.expires_at().unwrap_or(DateTime::<Utc>::MIN_UTC),
    }
}

/// Ids (`jti`) refused until a time: revoked sessions, and IDE tokens already used. Entries go
/// once their token would have expired anyway, so the set stays as small as the live tokens.
/// Every change is announced so open connections of a revoked session can close.
#[derive(Debug)]
pub struct Revocations {
    until: Mutex<HashMap<String, i64>>,
    changed: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self { until: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl Revocations {
    /// Refuses `id` until `until` (unix seconds) plus the clock leeway tokens get.
    pub fn revoke(&self, id: &str, until: i64, now: DateTime<Utc>) {
        {
            let mut map = self.until.lock().expect("revocations lock");
            map.retain(|_, t| *t > now.timestamp());
            map.insert(id.to_owned(), until.saturating_add(token::LEEWAY_SECS));
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Adds `id` unless it is there already; false when it was (a token used a second time).
    pub fn insert_new(&self, id: &str, until: i64, now: DateTime<Utc>) -> bool {
        let mut map = self.until.lock().expect("revocations lock");
        map.retain(|_, t| *t > now.timestamp());
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.to_owned(), until.saturating_add(token::LEEWAY_SECS));
        true
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.until.lock().expect("revocations lock").contains_key(id)
    }

    /// Resolves once `id` is revoked (at once if it already is).
    pub fn revoked(self: &std::sync::Arc<Self>, id: &str) -> BoxFuture<'static, ()> {
        let mut rx = self.changed.subscribe();
        let (this, id) = (self.clone(), id.to_owned());
        async move {
            loop {
                if this.is_revoked(&id) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
        .boxed()
    }

    pub fn len(&self) -> usize {
        self.until.lock().expect("revocations lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
