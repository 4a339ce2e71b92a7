//! Login rate limiting, shared by every API replica through the `login_attempts` table.
//!
//! Guessing must stay slow without letting a stranger lock an owner out. An attempt is counted
//! under three keys: the client address with the account (`pair:<address>|<account>`), the
//! address alone (`ip:<address>`) and the account alone (`id:<account>`).
//!
//! - A pair may fail [`LoginLimits::max_failures`] times in the window, and after
//!   [`FREE_FAILURES`] each further try waits [`LoginLimits::base_delay`] doubled per failure
//!   since the pair's last one: one address guessing one password is slowed exponentially.
//! - An address may fail `max_failures` times in the window over all accounts (one address
//!   trying many accounts).
//! - An account is never closed. Past [`LoginLimits::account_ceiling`] failures in the window
//!   (many addresses at once) a pair gets no free failures: an address that already failed waits
//!   from its first failure on, while an address that has not failed against the account — its
//!   owner's, say — still gets to try at once.
//!
//! An attempt first reserves a row under each key, then counts the other rows in the window and
//! refuses (taking its reservation back) if a limit is reached. Reserving before counting means a
//! burst of parallel guesses cannot all slip in before the first failure is written. A wrong
//! password leaves the reservation in place as the recorded failure; a right one takes it back
//! and clears the pair's failures (not the address's, nor the account's: signing in to one's own
//! account must not reset the counters of someone guessing).
//!
//! Registrations are limited per client address by count alone ([`begin_registration`]), under a
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

/// Failures of one (address, account) pair before each further try has to wait.
pub const FREE_FAILURES: u32 = 3;

/// How many registrations one address may make in how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_failures: u32,
    pub window: Duration,
}

impl Limits {
    /// Registrations per client address.
    pub fn registrations(config: &ApiConfig) -> Self {
        Self { max_failures: config.register_attempts, window: config.register_window }
    }
}

/// What slows sign-in guesses (see the module's description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures per (address, account) pair, and per address, in `window`.
    pub max_failures: u32,
    /// Failures of one account from all addresses in `window` beyond which addresses that
    /// already failed against it get no free failures.
    pub account_ceiling: u32,
    pub window: Duration,
    /// The wait after a pair's free failures, doubled with each further one (at most `window`).
    pub base_delay: Duration,
}

impl LoginLimits {
    pub fn from_config(config: &ApiConfig) -> Self {
        Self {
            max_failures: config.login_attempts,
            account_ceiling: config.login_account_ceiling,
            window: config.login_window,
            base_delay: Duration::from_secs(1),
        }
    }

    /// The wait after a pair's `failures`, given how many are free.
    fn delay_ms(&self, failures: i64, free: i64) -> i64 {
        if failures < free.max(1) {
            return 0;
        }
        let doublings = u32::try_from(failures - free).unwrap_or(u32::MAX).min(40);
        let delay = ms(self.base_delay).saturating_mul(1i64 << doublings);
        delay.min(ms(self.window))
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The keys one login attempt is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginKeys {
    account: String,
    address: Option<String>,
    /// The address with the account; without a known address, the account stands in.
    pair: String,
}

impl LoginKeys {
    /// `identifier` is what names the account (lowercased here); `ip` the client's address, if
    /// known. IPv6 clients are keyed by their /64, which one client can fill with addresses.
    pub fn new(identifier: &str, ip: Option<IpAddr>) -> Self {
        let identifier = identifier.trim().to_lowercase();
        let address = ip.map(|ip| format!("ip:{}", address_key(ip)));
        let pair = match ip {
            Some(ip) => format!("pair:{}|{identifier}", address_key(ip)),
            // Nothing tells the owner from a stranger: the account is slowed as one pair.
            None => format!("pair:?|{identifier}"),
        };
        Self { account: format!("id:{identifier}"), address, pair }
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        [Some(self.pair.as_str()), self.address.as_deref(), Some(self.account.as_str())].into_iter().flatten()
    }
}

fn address_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// An admitted attempt holding its reservation rows until the password is checked.
#[must_use = "call `succeeded` on a right password; dropping the attempt records a failure"]
#[derive(Debug)]
pub struct Attempt {
    /// The pair key a success clears (none for a registration).
    pair: Option<String>,
    row_ids: Vec<String>,
}

#[derive(Debug)]
pub enum Admission {
    /// Go on and check the password.
    Allowed(Attempt),
    /// Too many failures: refuse now; the earliest a retry can pass.
    Limited { retry_after: Duration },
}

/// Rows of `key` in the window that are not this attempt's own reservations (at most three).
const OTHERS: &str = "key = $1 AND at > $2 AND (id IS NULL OR id NOT IN ($3, $4, $5))";

fn bind_others<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    key: &'q str,
    window_start: i64,
    own: &'q [String],
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    // Unused places repeat the first id: a NULL in NOT IN would match nothing at all.
    let id = |i: usize| own.get(i).or(own.first()).map(String::as_str).unwrap_or_default();
    q.bind(key).bind(window_start).bind(id(0)).bind(id(1)).bind(id(2))
}

/// The other rows of `key` in the window: how many, and the newest one's time.
async fn others(db: &Db, key: &str, window_start: i64, own: &[String]) -> Result<(i64, Option<i64>), sqlx::Error> {
    let sql = format!("SELECT COUNT(*), MAX(at) FROM login_attempts WHERE {OTHERS}");
    bind_others(sqlx::query_as(&sql), key, window_start, own).fetch_one(db.pool()).await
}

/// When a key with `allowed` or more other rows in the window lets an attempt through again:
/// once the `allowed`-th newest of them leaves the window.
async fn count_frees_at(
    db: &Db,
    key: &str,
    window_start: i64,
    own: &[String],
    allowed: i64,
    window_ms: i64,
) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT at FROM login_attempts WHERE {OTHERS} ORDER BY at DESC LIMIT 1 OFFSET $6");
    let nth: Option<(i64,)> =
        bind_others(sqlx::query_as(&sql), key, window_start, own).bind(allowed - 1).fetch_optional(db.pool()).await?;
    Ok(nth.map_or(window_start + window_ms, |(at,)| at).saturating_add(window_ms))
}

async fn reserve(db: &Db, keys: impl Iterator<Item = &str>, now_ms: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut row_ids = Vec::new();
    for key in keys {
        let id = db::new_id();
        sqlx::query("INSERT INTO login_attempts (id, key, at) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(key)
            .bind(now_ms)
            .execute(db.pool())
            .await?;
        row_ids.push(id);
    }
    Ok(row_ids)
}

fn limited(retry_at: i64, now_ms: i64) -> Admission {
    let secs = (retry_at.saturating_sub(now_ms).max(1) as u64).div_ceil(1000);
    Admission::Limited { retry_after: Duration::from_secs(secs) }
}

/// Reserves a row per key and decides whether the sign-in attempt may check a password at
/// `now_ms`. Rows older than the window are pruned on the way.
pub async fn begin(db: &Db, keys: &LoginKeys, limits: LoginLimits, now_ms: i64) -> Result<Admission, sqlx::Error> {
    let window_ms = ms(limits.window);
    let window_start = now_ms.saturating_sub(window_ms);
    sqlx::query("DELETE FROM login_attempts WHERE at <= $1").bind(window_start).execute(db.pool()).await?;
    let row_ids = reserve(db, keys.all(), now_ms).await?;
    // A configured 0 would lock everyone out for good; one attempt per window is the floor.
    let allowed = i64::from(limits.max_failures.max(1));
    let mut retry_at = None::<i64>;
    let mut refuse = |at: i64| retry_at = Some(retry_at.map_or(at, |r: i64| r.max(at)));

    let (pair_failures, pair_last) = others(db, &keys.pair, window_start, &row_ids).await?;
    if pair_failures >= allowed {
        refuse(count_frees_at(db, &keys.pair, window_start, &row_ids, allowed, window_ms).await?);
    }
    if let Some(address) = &keys.address {
        if others(db, address, window_start, &row_ids).await?.0 >= allowed {
            refuse(count_frees_at(db, address, window_start, &row_ids, allowed, window_ms).await?);
        }
    }
    let (account_failures, _) = others(db, &keys.account, window_start, &row_ids).await?;
    let free = if account_failures >= i64::from(limits.account_ceiling) { 0 } else { i64::from(FREE_FAILURES) };
    let delay = limits.delay_ms(pair_failures, free);
    if let Some(last) = pair_last {
        let until = last.saturating_add(delay);
        if delay > 0 && now_ms < until {
            refuse(until);
        }
    }
    Ok(match retry_at {
        None => Admission::Allowed(Attempt { pair: Some(keys.pair.clone()), row_ids }),
        Some(at) => {
            release(db, &row_ids).await?;
            limited(at, now_ms)
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
    let Some(ip) = ip else { return Ok(Admission::Allowed(Attempt { pair: None, row_ids: Vec::new() })) };
    let key = format!("reg:ip:{}", address_key(ip));
    let window_ms = ms(limits.window);
    let window_start = now_ms.saturating_sub(window_ms);
    sqlx::query("DELETE FROM login_attempts WHERE at <= $1").bind(window_start).execute(db.pool()).await?;
    let row_ids = reserve(db, std::iter::once(key.as_str()), now_ms).await?;
    let allowed = i64::from(limits.max_failures.max(1));
    if others(db, &key, window_start, &row_ids).await?.0 >= allowed {
        let at = count_frees_at(db, &key, window_start, &row_ids, allowed, window_ms).await?;
        release(db, &row_ids).await?;
        return Ok(limited(at, now_ms));
    }
    Ok(Admission::Allowed(Attempt { pair: None, row_ids }))
}

/// The password was right: takes back this attempt's reservation and clears the pair's failures.
/// The address and the account keep their counts.
pub async fn succeeded(db: &Db, attempt: Attempt) -> Result<(), sqlx::Error> {
    release(db, &attempt.row_ids).await?;
    if let Some(pair) = &attempt.pair {
        sqlx::query("DELETE FROM login_attempts WHERE key = $1").bind(pair).execute(db.pool()).await?;
    }
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
        assert_eq!(k.pair, "pair:2001:db8:1:2::/64|alice@example.com");
        let mapped = LoginKeys::new("bob", Some("::ffff:1.2.3.4".parse().unwrap()));
        assert_eq!(mapped.address.as_deref(), Some("ip:1.2.3.4"));
        assert_eq!(LoginKeys::new("bob", None).all().collect::<Vec<_>>(), ["pair:?|bob", "id:bob"]);
    }
}
