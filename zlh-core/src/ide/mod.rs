//! Who may reach which browser IDE, and how requests get there.
//!
//! - [`token`]: short-lived IDE tokens (portal → dev host) and the signed session cookie the dev
//!   host sets in exchange, with in-process revocation.
//! - [`host`]: the strict `dev-<vmid>.<domain>[:port]` parser.
//! - [`routes`]: the route table `vmid → code-server address`, the only source of proxy targets.
//! - [`proxy`]: the HTTP/1.1 + WebSocket reverse proxy itself, on hyper; [`h1`]: its lean path
//!   for plain HTTP/1.1 requests; [`forwarding`]: the header rules both apply.
//!
//! [`LocalIdeRouter`] puts the first three together behind the [`IdeRouter`] seam; the API
//! authorises each request (session, ownership, state) and hands it to [`proxy::Proxy`].

pub mod forwarding;
pub mod h1;
pub mod host;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::token::TokenKey;
use crate::types::Vmid;

/// Where code-server opens the user's project in a real container, where the workspace is
/// [`DEFAULT_WORKSPACE`].
pub const WORKSPACE_QUERY: &str = "/?folder=/home/dev/workspace";
/// The dev user's workspace in a container of its own (OCI, Proxmox).
pub const DEFAULT_WORKSPACE: &str = "/home/dev/workspace";

/// What a `?folder=` value keeps as it is: path separators and unreserved characters.
const FOLDER: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `/?folder=<workspace>`: where code-server opens the project, `workspace` being the path the
/// container's own code-server sees (its agent reports it; local containers keep it under the
/// data dir). The agent runs in the tenant's container, so a value that is not a plain absolute
/// path falls back to [`DEFAULT_WORKSPACE`]; what is kept is percent-encoded, never raw.
pub fn workspace_query(workspace: Option<&str>) -> String {
    let plain = |w: &&str| w.starts_with('/') && w.len() <= 1024 && !w.chars().any(char::is_control);
    let folder = workspace.filter(plain).unwrap_or(DEFAULT_WORKSPACE);
    format!("/?folder={}", percent_encoding::utf8_percent_encode(folder, FOLDER))
}

/// A signed, expiring IDE token bound to one user and one vmid; `url` is the hosted IDE, `id` the
/// token's id (its jti, safe to log; the grant's `session_id` when it is exchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeToken {
    pub id: String,
    pub token: String,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// An IDE session: the cookie value (a signed token), its id and its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeSession {
    pub value: String,
    pub id: String,
    pub expires_at: DateTime<Utc>,
}

/// What a verified token or session grants. `session_id` is the credential's id (`jti`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeGrant {
    pub user_id: String,
    pub vmid: Vmid,
    pub session_id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdeError {
    #[error("malformed host {0:?}")]
    BadHost(String),
    #[error("token refused: {0}")]
    BadToken(&'static str),
    #[error("no IDE registered for vmid {0}")]
    NoRoute(Vmid),
    #[error("IDE configuration: {0}")]
    Config(String),
    #[error("cannot sign IDE token: {0}")]
    Signing(String),
}

#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait IdeRouter: Send + Sync {
    /// A short-lived token that opens `vmid`'s IDE for `user_id` once.
    fn issue_token(&self, user_id: &str, vmid: Vmid) -> Result<IdeToken, IdeError>;
    /// Accepts an IDE token for `vmid`, at most once.
    fn verify_token(&self, token: &str, vmid: Vmid) -> Result<IdeGrant, IdeError>;
    /// A session for the cookie the dev host sets once a token was accepted.
    fn issue_session(&self, user_id: &str, vmid: Vmid) -> Result<IdeSession, IdeError>;
    /// Checks a session cookie's value for `vmid` (signature, expiry, revocation).
    fn verify_session(&self, value: &str, vmid: Vmid) -> Result<IdeGrant, IdeError>;
    /// Refuses session `session_id` from now on; its open connections close.
    fn revoke_session(&self, session_id: &str, expires_at: DateTime<Utc>);
    /// Resolves once `session_id` is revoked.
    fn session_revoked(&self, session_id: &str) -> BoxFuture<'static, ()>;
    /// Strictly parses a Host header into the vmid it names.
    fn parse_host(&self, host: &str) -> Result<Vmid, IdeError>;
    /// `{scheme}://dev-<vmid>.<domain>[:port]`.
    fn hosted_origin(&self, vmid: Vmid) -> String;
    /// The hosted origin opening the workspace folder.
    fn hosted_url(&self, vmid: Vmid) -> String;
    async fn register(&self, vmid: Vmid, target: SocketAddr);
    async fn unregister(&self, vmid: Vmid);
    async fn resolve(&self, vmid: Vmid) -> Result<SocketAddr, IdeError>;
    /// Resolves once `vmid` no longer routes to `target` (removed or moved).
    fn route_closed(&self, vmid: Vmid, target: SocketAddr) -> BoxFuture<'static, ()>;
}

/// How hosted IDEs are named and how long credentials last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdeConfig {
    /// IDEs live at `dev-<vmid>.<domain>`. Browsers resolve `*.localhost` to loopback, so the
    /// default works on one machine with no DNS.
    pub domain: String,
    /// `https` behind the edge; `http` for local use.
    pub scheme: String,
    /// The port in hosted URLs, when not the scheme's default (local: the API's own port).
    pub public_port: Option<u16>,
    pub session_ttl: Duration,
    pub token_ttl: Duration,
}

impl Default for IdeConfig {
    fn default() -> Self {
        Self {
            domain: "localhost".into(),
            scheme: "https".into(),
            public_port: None,
            session_ttl: token::DEFAULT_SESSION_TTL,
            token_ttl: token::DEFAULT_TOKEN_TTL,
        }
    }
}

/// The IDE router of one API process: signed tokens and sessions, the strict host parser and an
/// in-memory route table. Revocations are per process (see [`token`]).
#[derive(Debug)]
pub struct LocalIdeRouter {
    config: IdeConfig,
    key: TokenKey,
    routes: routes::RouteTable,
    revoked: Arc<token::Revocations>,
    used_tokens: token::Revocations,
    /// Session cookie values whose signature already verified, with what they grant: a page
    /// load sends the same cookie a hundred times. Expiry and revocation are still checked on
    /// every use.
    verified: std::sync::RwLock<std::collections::HashMap<Box<str>, IdeGrant>>,
}

/// Bounds [`LocalIdeRouter`]'s memo of verified session cookies.
const MAX_VERIFIED_SESSIONS: usize = 8192;

impl LocalIdeRouter {
    /// Checks the config (domain, scheme, ttls) and keeps `key` for signing.
    pub fn new(mut config: IdeConfig, key: TokenKey) -> Result<Self, IdeError> {
        config.domain = host::normalize_domain(&config.domain)?;
        config.scheme = config.scheme.to_ascii_lowercase();
        if config.scheme != "http" && config.scheme != "https" {
            return Err(IdeError::Config(format!("scheme must be http or https, not {:?}", config.scheme)));
        }
        if config.token_ttl.is_zero() || config.session_ttl.is_zero() {
            return Err(IdeError::Config("token and session lifetimes must be positive".into()));
        }
        Ok(Self {
            config,
            key,
            routes: Default::default(),
            revoked: Default::default(),
            used_tokens: Default::default(),
            verified: Default::default(),
        })
    }

    pub fn config(&self) -> &IdeConfig {
        &self.config
    }

    pub fn routes(&self) -> &routes::RouteTable {
        &self.routes
    }

    pub fn issue_token_at(&self, user_id: &str, vmid: Vmid, now: DateTime<Utc>) -> Result<IdeToken, IdeError> {
        let (value, claims) = token::issue(&self.key, token::IDE_PURPOSE, user_id, vmid, self.config.token_ttl, now)?;
        let grant = token::grant(&claims);
        Ok(IdeToken { id: grant.session_id, token: value, url: self.hosted_url(vmid), expires_at: grant.expires_at })
    }

    pub fn verify_token_at(&self, value: &str, vmid: Vmid, now: DateTime<Utc>) -> Result<IdeGrant, IdeError> {
        let claims = token::verify(&self.key, value, token::IDE_PURPOSE, vmid, now)?;
        if !self.used_tokens.insert_new(&claims.jti, claims.exp, now) {
            return Err(IdeError::BadToken("already used"));
        }
        Ok(token::grant(&claims))
    }

    /// Whether `value` would be taken as an IDE token for `vmid` at `now`, without spending it:
    /// for answers that must tell a caller without a valid token nothing about `vmid`.
    pub fn token_valid_at(&self, value: &str, vmid: Vmid, now: DateTime<Utc>) -> bool {
        token::verify(&self.key, value, token::IDE_PURPOSE, vmid, now)
            .is_ok_and(|c| !self.used_tokens.is_revoked(&c.jti))
    }

    pub fn issue_session_at(&self, user_id: &str, vmid: Vmid, now: DateTime<Utc>) -> Result<IdeSession, IdeError> {
        let (value, claims) =
            token::issue(&self.key, token::SESSION_PURPOSE, user_id, vmid, self.config.session_ttl, now)?;
        let grant = token::grant(&claims);
        Ok(IdeSession { value, id: grant.session_id, expires_at: grant.expires_at })
    }

    pub fn verify_session_at(&self, value: &str, vmid: Vmid, now: DateTime<Utc>) -> Result<IdeGrant, IdeError> {
        let known = self.verified.read().expect("verified sessions lock").get(value).cloned();
        let grant = match known {
            // Same bytes, same signature: only the time and the vmid asked for can differ.
            Some(g) if g.vmid == vmid && now < g.expires_at => g,
            _ => {
                let claims = token::verify(&self.key, value, token::SESSION_PURPOSE, vmid, now)?;
                let grant = token::grant(&claims);
                self.remember_verified(value, &grant, now);
                grant
            }
        };
        if self.revoked.is_revoked(&grant.session_id) {
            return Err(IdeError::BadToken("revoked"));
        }
        Ok(grant)
    }

    fn remember_verified(&self, value: &str, grant: &IdeGrant, now: DateTime<Utc>) {
        let mut map = self.verified.write().expect("verified sessions lock");
        if map.len() >= MAX_VERIFIED_SESSIONS {
            map.retain(|_, g| now < g.expires_at);
            if map.len() >= MAX_VERIFIED_SESSIONS {
                map.clear();
            }
        }
        map.insert(value.into(), grant.clone());
    }

    pub fn revoke_session_at(&self, session_id: &str, expires_at: DateTime<Utc>, now: DateTime<Utc>) {
        self.revoked.revoke(session_id, expires_at.timestamp(), now);
    }
}

#[async_trait]
impl IdeRouter for LocalIdeRouter {
    fn issue_token(&self, user_id: &str, vmid: Vmid) -> Result<IdeToken, IdeError> {
        self.issue_token_at(user_id, vmid, Utc::now())
    }

    fn verify_token(&self, token: &str, vmid: Vmid) -> Result<IdeGrant, IdeError> {
        self.verify_token_at(token, vmid, Utc::now())
    }

    fn issue_session(&self, user_id: &str, vmid: Vmid) -> Result<IdeSession, IdeError> {
        self.issue_session_at(user_id, vmid, Utc::now())
    }

    fn verify_session(&self, value: &str, vmid: Vmid) -> Result<IdeGrant, IdeError> {
        self.verify_session_at(value, vmid, Utc::now())
    }

    fn revoke_session(&self, session_id: &str, expires_at: DateTime<Utc>) {
        self.revoke_session_at(session_id, expires_at, Utc::now());
    }

    fn session_revoked(&self, session_id: &str) -> BoxFuture<'static, ()> {
        self.revoked.revoked(session_id)
    }

    fn parse_host(&self, host: &str) -> Result<Vmid, IdeError> {
        host::parse_host(host, &self.config.domain)
    }

    fn hosted_origin(&self, vmid: Vmid) -> String {
        let port = self.config.public_port.map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{}{port}", self.config.scheme, host::hosted_host(vmid, &self.config.domain))
    }

    fn hosted_url(&self, vmid: Vmid) -> String {
        format!("{}{WORKSPACE_QUERY}", self.hosted_origin(vmid))
    }

    async fn register(&self, vmid: Vmid, target: SocketAddr) {
        if self.routes.register(vmid, target) {
            tracing::info!(vmid = vmid.0, %target, "IDE route registered");
        }
    }

    async fn unregister(&self, vmid: Vmid) {
        if self.routes.unregister(vmid) {
            tracing::info!(vmid = vmid.0, "IDE route removed");
        }
    }

    async fn resolve(&self, vmid: Vmid) -> Result<SocketAddr, IdeError> {
        self.routes.resolve(vmid).ok_or(IdeError::NoRoute(vmid))
    }

    fn route_closed(&self, vmid: Vmid, target: SocketAddr) -> BoxFuture<'static, ()> {
        self.routes.closed(vmid, target)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_folder_is_the_reported_workspace_when_it_is_a_plain_path() {
        assert_eq!(workspace_query(None), WORKSPACE_QUERY);
        assert_eq!(
            workspace_query(Some("/srv/zlh/containers/6001/root/home/dev/workspace")),
            "/?folder=/srv/zlh/containers/6001/root/home/dev/workspace"
        );
        assert_eq!(workspace_query(Some("/data/my work/ws?x=1&y#z")), "/?folder=/data/my%20work/ws%3Fx%3D1%26y%23z");
        for odd in ["relative/ws", "", "/ws\r\nSet-Cookie: x=1", &format!("/{}", "a".repeat(2000))] {
            assert_eq!(workspace_query(Some(odd)), WORKSPACE_QUERY, "{odd:?}");
        }
    }

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn router(config: IdeConfig) -> LocalIdeRouter {
        LocalIdeRouter::new(config, TokenKey::new(&[3; 32]).unwrap()).unwrap()
    }

    #[test]
    fn hosted_urls_follow_the_config() {
        let r = router(IdeConfig::default());
        assert_eq!(r.hosted_url(Vmid(6001)), "https://dev-6001.localhost/?folder=/home/dev/workspace");
        let local = router(IdeConfig { scheme: "HTTP".into(), public_port: Some(4000), ..Default::default() });
        assert_eq!(local.hosted_origin(Vmid(6001)), "http://dev-6001.localhost:4000");
        let prod = router(IdeConfig { domain: "IDE.Example.com".into(), ..Default::default() });
        assert_eq!(prod.hosted_url(Vmid(7)), "https://dev-7.ide.example.com/?folder=/home/dev/workspace");
        assert_eq!(prod.parse_host("dev-7.ide.example.com").unwrap(), Vmid(7));
        let key = || TokenKey::new(&[3; 32]).unwrap();
        assert!(LocalIdeRouter::new(IdeConfig { scheme: "ftp".into(), ..Default::default() }, key()).is_err());
        assert!(LocalIdeRouter::new(IdeConfig { domain: "localhost.".into(), ..Default::default() }, key()).is_err());
        let zero = IdeConfig { token_ttl: Duration::ZERO, ..Default::default() };
        assert!(LocalIdeRouter::new(zero, key()).is_err());
    }

    #[test]
    fn a_token_opens_its_own_ide_once_and_for_about_a_minute() {
        let r = router(IdeConfig::default());
        let t = r.issue_token_at("u1", Vmid(6001), now()).unwrap();
        assert_eq!(t.expires_at, now() + chrono::Duration::seconds(60));
        assert_eq!(t.url, r.hosted_url(Vmid(6001)));
        assert!(matches!(r.verify_token_at(&t.token, Vmid(6002), now()), Err(IdeError::BadToken(_))));
        let late = now() + chrono::Duration::seconds(120);
        assert!(matches!(r.verify_token_at(&t.token, Vmid(6001), late), Err(IdeError::BadToken("expired"))));
        let g = r.verify_token_at(&t.token, Vmid(6001), now()).unwrap();
        assert_eq!((g.user_id.as_str(), g.vmid), ("u1", Vmid(6001)));
        assert!(matches!(r.verify_token_at(&t.token, Vmid(6001), now()), Err(IdeError::BadToken("already used"))));
    }

    #[test]
    fn tokens_and_sessions_are_not_interchangeable() {
        let r = router(IdeConfig::default());
        let t = r.issue_token_at("u1", Vmid(6001), now()).unwrap();
        let s = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
        assert!(r.verify_session_at(&t.token, Vmid(6001), now()).is_err());
        assert!(r.verify_token_at(&s.value, Vmid(6001), now()).is_err());
        let other_key = LocalIdeRouter::new(IdeConfig::default(), TokenKey::new(&[4; 32]).unwrap()).unwrap();
        assert!(other_key.verify_session_at(&s.value, Vmid(6001), now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_last_their_ttl_and_end_when_revoked() {
        let r = router(IdeConfig { session_ttl: Duration::from_secs(3600), ..Default::default() });
        let s = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
        let other = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
        assert_ne!(s.id, other.id);
        assert_eq!(s.expires_at, now() + chrono::Duration::seconds(3600));
        assert_eq!(r.verify_session_at(&s.value, Vmid(6001), now()).unwrap().session_id, s.id);
        assert!(r.verify_session_at(&s.value, Vmid(6002), now()).is_err());
        assert!(r.verify_session_at(&s.value, Vmid(6001), now() + chrono::Duration::seconds(3700)).is_err());

        let closed = r.session_revoked(&s.id);
        let other_closed = r.session_revoked(&other.id);
        r.revoke_session_at(&s.id, s.expires_at, now());
        assert!(matches!(r.verify_session_at(&s.value, Vmid(6001), now()), Err(IdeError::BadToken("revoked"))));
        assert!(r.verify_session_at(&other.value, Vmid(6001), now()).is_ok());
        tokio::time::timeout(Duration::from_secs(1), closed).await.expect("revocation is announced");
        assert!(tokio::time::timeout(Duration::from_secs(1), other_closed).await.is_err());
    }

    #[test]
    fn a_remembered_cookie_vouches_for_its_exact_bytes_only_and_memory_stays_bounded() {
        let r = router(IdeConfig::default());
        let s = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
        assert!(r.verify_session_at(&s.value, Vmid(6001), now()).is_ok());
        // The same claims under a forged signature, once the real cookie is remembered.
        let (head, _sig) = s.value.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", "A".repeat(43));
        assert!(r.verify_session_at(&forged, Vmid(6001), now()).is_err());
        assert!(r.verify_session_at(&format!("{}x", s.value), Vmid(6001), now()).is_err());
        for _ in 0..(MAX_VERIFIED_SESSIONS + 10) {
            let s = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
            r.verify_session_at(&s.value, Vmid(6001), now()).unwrap();
        }
        assert!(r.verified.read().unwrap().len() <= MAX_VERIFIED_SESSIONS);
        assert!(r.verify_session_at(&s.value, Vmid(6001), now()).is_ok(), "a forgotten cookie verifies afresh");
    }

    #[test]
    fn revocations_are_forgotten_once_the_session_would_have_expired() {
        let r = router(IdeConfig { session_ttl: Duration::from_secs(60), ..Default::default() });
        for _ in 0..100 {
            let s = r.issue_session_at("u1", Vmid(6001), now()).unwrap();
            r.revoke_session_at(&s.id, s.expires_at, now());
        }
        assert_eq!(r.revoked.len(), 100);
        let later = now() + chrono::Duration::seconds(3600);
        let s = r.issue_session_at("u1", Vmid(6001), later).unwrap();
        r.revoke_session_at(&s.id, s.expires_at, later);
        assert_eq!(r.revoked.len(), 1, "expired entries are pruned");
    }

    #[tokio::test]
    async fn the_route_table_is_the_only_target() {
        let r = router(IdeConfig::default());
        assert!(matches!(r.resolve(Vmid(6001)).await, Err(IdeError::NoRoute(Vmid(6001)))));
        let a: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        r.register(Vmid(6001), a).await;
        assert_eq!(r.resolve(Vmid(6001)).await.unwrap(), a);
        let closed = r.route_closed(Vmid(6001), a);
        r.unregister(Vmid(6001)).await;
        closed.await;
        assert!(r.resolve(Vmid(6001)).await.is_err());
    }
}
