//! Login rate limiting, shared by every API replica through the `login_attempts` table.
//!
//! An attempt is counted under two keys: the account (`id:<identifier>`) and the client address
//! (`ip:<address>`). It first reserves a row under each key, then counts the rows in the window:
//! if either key has more than the allowed failures, the attempt is refused without checking the
//! password and its reservation is taken back. Reserving before counting means a burst of parallel
//! guesses cannot all slip in before the first failure is written. A wrong password leaves the
//! reservation in place as the recorded failure; a right one takes it back and clears the
//! account's failures (not the address's: signing in to one's own account must not reset the
//! counter for guessing others').
//!
//! Registrations are limited per client address the same way ([`begin_registration`]), under a
//! key of their own (`reg:<address>`), and every one counts, accepted or not.
//!
//! Core functions take `now` in unix milliseconds so tests control time.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::config::ApiConfig;
use crate::db::{self, Db};
use crate::state::AppState;

/// How many failures a key may collect in how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_failures: u32,
    pub window: Duration,
}

impl Limits {
    pub fn from_config(config: &ApiConfig) -> Self {
        Self { max_failures: config.login_attempts, window: config.login_window }
    }

    /// Registrations per client address.
    pub fn registrations(config: &ApiConfig) -> Self {
        Self { max_failures: config.register_attempts, window: config.register_window }
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }
}

/// The keys one login attempt is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginKeys {
    account: String,
    address: Option<String>,
}

impl LoginKeys {
    /// `identifier` is what names the account (lowercased here); `ip` the client's address, if
    /// known. IPv6 clients are keyed by their /64, which one client can fill with addresses.
    pub fn new(identifier: &str, ip: Option<IpAddr>) -> Self {
        let address = ip.map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => format!("ip:{v4}"),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("ip:{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        });
        Self { account: format!("id:{}", identifier.trim().to_lowercase()), address }
    }

    /// The one key registrations from `ip` are counted under.
    fn registration(ip: IpAddr) -> Self {
        let address = Self::new("", Some(ip)).address.expect("an address was given");
        Self { account: format!("reg:{address}"), address: None }
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.account.as_str()).chain(self.address.as_deref())
    }
}

/// An admitted attempt holding its reservation rows until the password is checked.
#[must_use = "call `succeeded` on a right password; dropping the attempt records a failure"]
#[derive(Debug)]
pub struct Attempt {
    keys: LoginKeys,
    row_ids: Vec<String>,
}

#[derive(Debug)]
pub enum Admission {
    /// Go on and check the password.
    Allowed(Attempt),
    /// Too many failures: refuse now; the earliest a retry can pass.
    Limited { retry_after: Duration },
}

/// Reserves a row per key and decides whether the attempt may check a password at `now_ms`.
/// Rows older than the window are pruned on the way.
pub async fn begin(db: &Db, keys: &LoginKeys, limits: Limits, now_ms: i64) -> Result<Admission, sqlx::Error> {
    let window_start = now_ms.saturating_sub(limits.window_ms());
    sqlx::query("DELETE FROM login_attempts WHERE at <= $1").bind(window_start).execute(db.pool()).await?;
    let mut attempt = Attempt { keys: keys.clone(), row_ids: Vec::new() };
    for key in keys.all() {
        let id = db::new_id();
        sqlx::query("INSERT INTO login_attempts (id, key, at) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(key)
            .bind(now_ms)
            .execute(db.pool())
            .await?;
        attempt.row_ids.push(id);
    }
    // A configured 0 would lock everyone out for good; one attempt per window is the floor.
    let allowed = i64::from(limits.max_failures.max(1));
    let mut retry_at = None::<i64>;
    for key in keys.all() {
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_attempts WHERE key = $1 AND at > $2")
            .bind(key)
            .bind(window_start)
            .fetch_one(db.pool())
            .await?;
        if count > allowed {
            // This attempt could pass once the `allowed`-th newest other row leaves the window.
            release(db, &attempt.row_ids).await?;
            attempt.row_ids.clear();
            let nth: Option<(i64,)> = sqlx::query_as(
                "SELECT at FROM login_attempts WHERE key = $1 AND at > $2 ORDER BY at DESC LIMIT 1 OFFSET $3",
            )
            .bind(key)
            .bind(window_start)
            .bind(allowed - 1)
            .fetch_optional(db.pool())
            .await?;
            let at = nth.map_or(now_ms, |(at,)| at).saturating_add(limits.window_ms());
            retry_at = Some(retry_at.map_or(at, |r| r.max(at)));
        }
    }
    Ok(match retry_at {
        None => Admission::Allowed(attempt),
        Some(at) => {
            let secs = (at.saturating_sub(now_ms).max(1) as u64).div_ceil(1000);
            Admission::Limited { retry_after: Duration::from_secs(secs) }
        }
    })
}

/// Counts a registration from `ip` at `now_ms`; `Limited` once the address made more than the
/// allowed number in the window. An unknown address is not limited here (the server is then not
/// serving connection info; [`ClientIp`] warns about it).
pub async fn begin_registration(
    db: &Db,
    ip: Option<IpAddr>,
    limits: Limits,
    now_ms: i64,
) -> Result<Admission, sqlx::Error> {
    match ip {
        Some(ip) => begin(db, &LoginKeys::registration(ip), limits, now_ms).await,
        None => Ok(Admission::Allowed(Attempt { keys: LoginKeys::new("", None), row_ids: Vec::new() })),
    }
}

/// The password was right: takes back this attempt's reservation and clears the account's
/// failures. The address keeps its count.
pub async fn succeeded(db: &Db, attempt: Attempt) -> Result<(), sqlx::Error> {
    release(db, &attempt.row_ids).await?;
    sqlx::query("DELETE FROM login_attempts WHERE key = $1").bind(&attempt.keys.account).execute(db.pool()).await?;
    Ok(())
}

/// The password was wrong: the reservation stays as the recorded failure. (Dropping the attempt
/// does the same; this names it.)
pub fn failed(attempt: Attempt) {
    drop(attempt);
}

async fn release(db: &Db, row_ids: &[String]) -> Result<(), sqlx::Error> {
    for id in row_ids {
        sqlx::query("DELETE FROM login_attempts WHERE id = $1").bind(id).execute(db.pool()).await?;
    }
    Ok(())
}

/// The client's address: the TCP peer (`ConnectInfo<SocketAddr>`, which `http::server::serve`
/// sets), or, when `trust_forwarded_for` is set,
/// the last `X-Forwarded-For` entry, which is the one the nearest proxy saw (entries further left
/// are whatever the client claimed). `None` when neither is known.
pub fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .map(str::trim)
            .and_then(|s| s.parse::<IpAddr>().ok().or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip())));
        if forwarded.is_some() {
            return forwarded;
        }
    }
    peer.map(|p| p.ip())
}

/// Extracts the client's address per [`client_ip`] and the config's `trust_forwarded_for`.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Infallible> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        if peer.is_none() {
            tracing::warn!("client address unknown: serve with http::server::serve, or axum with into_make_service_with_connect_info::<SocketAddr>()");
        }
        Ok(Self(client_ip(&parts.headers, peer, state.config.trust_forwarded_for)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_when_trusted_and_only_its_last_entry() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 1.2.3.4".parse().unwrap());
        assert_eq!(client_ip(&h, Some(peer), false), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(client_ip(&h, Some(peer), true), Some("1.2.3.4".parse().unwrap()));
        h.append("x-forwarded-for", "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(client_ip(&h, Some(peer), true), Some("2001:db8::1".parse().unwrap()));
        let mut junk = HeaderMap::new();
        junk.append("x-forwarded-for", "not-an-address".parse().unwrap());
        assert_eq!(client_ip(&junk, Some(peer), true), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(client_ip(&HeaderMap::new(), None, true), None);
    }

    #[test]
    fn keys_lowercase_the_identifier_and_group_ipv6_by_slash_64() {
        let k = LoginKeys::new(" Alice@Example.com ", Some("2001:db8:1:2:3:4:5:6".parse().unwrap()));
        assert_eq!(k.account, "id:alice@example.com");
        assert_eq!(k.address.as_deref(), Some("ip:2001:db8:1:2::/64"));
        let mapped = LoginKeys::new("bob", Some("::ffff:1.2.3.4".parse().unwrap()));
        assert_eq!(mapped.address.as_deref(), Some("ip:1.2.3.4"));
        assert_eq!(LoginKeys::new("bob", None).all().count(), 1);
    }
}
