//! Who may talk to the agent: the holder of its bearer token, and, on the console WebSocket only,
//! the holder of a short-lived ticket the API signed for this agent and this container. A ticket
//! lives at most [`token::MAX_CONSOLE_TICKET_SECS`] whatever it claims, and opens one console.
//!
//! Tokens are compared as SHA-256 digests with `subtle`, so neither their bytes nor their length
//! show in timing. Neither the token nor a ticket is ever logged or shown in `Debug`.

use std::fmt;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zlh_core::token::{self, Claims, TokenError, TokenKey};

use super::used_tickets::{Refused, UsedTickets};
use super::ApiError;

/// Shortest agent token accepted.
pub const MIN_TOKEN_BYTES: usize = 32;

const BEARER_REFUSED: &str = "missing or invalid bearer token";

/// The agent's bearer token. Never printed: `Debug` and `Display` show a placeholder.
#[derive(Clone)]
pub struct AgentToken(String);

impl AgentToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

impl fmt::Display for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The agent's credentials: the digest of its bearer token and the key its console tickets are
/// signed with (derived from the token, see [`token::console_ticket_key`]), and the tickets
/// already used.
pub struct AgentAuth {
    token: AgentToken,
    digest: [u8; 32],
    ticket_key: TokenKey,
    used_tickets: Mutex<UsedTickets>,
}

impl fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentAuth").field("token", &self.token).finish_non_exhaustive()
    }
}

impl AgentAuth {
    /// Refuses tokens shorter than [`MIN_TOKEN_BYTES`]: the token is the only thing between the
    /// network and a root shell in the container.
    pub fn new(token: AgentToken) -> anyhow::Result<Self> {
        let len = token.0.len();
        anyhow::ensure!(len >= MIN_TOKEN_BYTES, "agent token too short: {len} bytes, need at least {MIN_TOKEN_BYTES}");
        let digest = sha256(token.0.as_bytes());
        let ticket_key = token::console_ticket_key(&token.0);
        Ok(Self { token, digest, ticket_key, used_tickets: Mutex::default() })
    }

    #[cfg(test)]
    pub fn token(&self) -> &AgentToken {
        &self.token
    }

    /// The key console tickets for this agent are signed with.
    #[cfg(test)]
    pub fn ticket_key(&self) -> &TokenKey {
        &self.ticket_key
    }

    /// Whether `candidate` is the agent token, in constant time.
    pub fn is_token(&self, candidate: &str) -> bool {
        bool::from(sha256(candidate.as_bytes()).ct_eq(&self.digest))
    }

    /// Accepts exactly one `Authorization: Bearer <token>` header carrying the agent token.
    pub fn check_bearer(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match bearer(headers) {
            Some(candidate) if self.is_token(candidate) => Ok(()),
            _ => Err(ApiError::unauthorized(BEARER_REFUSED)),
        }
    }

    /// Verifies a console ticket for container `vmid` at time `now` and uses it up: the same
    /// ticket is refused from then on. The claims are safe to log (`sub`, `jti`), the ticket is not.
    pub fn check_console_ticket(&self, ticket: &str, vmid: u32, now: DateTime<Utc>) -> Result<Claims, ApiError> {
        let max = token::MAX_CONSOLE_TICKET_SECS;
        let claims =
            token::verify_ticket(&self.ticket_key, ticket, token::CONSOLE_PURPOSE, vmid, max, now).map_err(|e| {
                let why = match e {
                    TokenError::Expired => "console ticket expired",
                    TokenError::WrongTarget => "console ticket is for another container",
                    TokenError::WrongPurpose => "ticket is not a console ticket",
                    TokenError::TooLong { .. } => "console ticket lives too long",
                    TokenError::IssuedInFuture => "console ticket is issued in the future",
                    _ => "invalid console ticket",
                };
                ApiError::unauthorized(why)
            })?;
        // Only a ticket that verified is remembered: nobody without the key can fill the memory.
        let used = self.used_tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).use_once(
            &claims.jti,
            claims.exp,
            now.timestamp(),
        );
        match used {
            Ok(()) => Ok(claims),
            Err(Refused::Replayed) => {
                tracing::warn!(sub = %claims.sub, jti = %claims.jti, "console ticket replayed");
                Err(ApiError::unauthorized("console ticket already used"))
            }
            Err(Refused::Full) => {
                Err(ApiError::new(axum::http::StatusCode::TOO_MANY_REQUESTS, "too many console tickets in flight"))
            }
        }
    }
}

/// The token of a single `Authorization: Bearer …` header; `None` when absent, repeated, not
/// UTF-8 or of another scheme.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A 401 with the challenge header bearer clients expect, and the usual JSON error body.
pub fn unauthorized(error: ApiError) -> Response {
    ([(WWW_AUTHENTICATE, "Bearer")], error).into_response()
}

/// Middleware for every route but `GET /health`:
/// `router.layer(axum::middleware::from_fn_with_state(auth, require_bearer))`.
pub async fn require_bearer(State(auth): State<Arc<AgentAuth>>, request: Request, next: Next) -> Response {
    match auth.check_bearer(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => unauthorized(e),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use axum::routing::{get, post};
    use axum::Router;
    use reqwest::StatusCode;

    use super::*;

    const TOKEN: &str = "agent-token-0123456789abcdef0123456789abcdef";

    fn auth() -> Arc<AgentAuth> {
        Arc::new(AgentAuth::new(AgentToken::new(TOKEN)).unwrap())
    }

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    #[test]
    fn short_tokens_are_refused_and_nothing_prints_the_token() {
        assert!(AgentAuth::new(AgentToken::new("short")).is_err());
        let a = auth();
        for shown in [format!("{a:?}"), format!("{:?}", a.token()), a.token().to_string()] {
            assert!(!shown.contains(TOKEN), "{shown}");
            assert!(!shown.contains("0123456789"), "{shown}");
        }
    }

    #[test]
    fn bearer_parsing_is_strict() {
        let a = auth();
        let check = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(AUTHORIZATION, v.parse().unwrap());
            }
            a.check_bearer(&h).is_ok()
        };
        assert!(check(&[&format!("Bearer {TOKEN}")]));
        assert!(check(&[&format!("bearer {TOKEN}")]));
        assert!(!check(&[]));
        assert!(!check(&[TOKEN]));
        assert!(!check(&[&format!("Basic {TOKEN}")]));
        assert!(!check(&["Bearer "]));
        assert!(!check(&[&format!("Bearer {TOKEN}x")]));
        assert!(!check(&[&format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])]));
        assert!(!check(&[&format!("Bearer {TOKEN}"), &format!("Bearer {TOKEN}")]));
    }

    #[tokio::test]
    async fn require_bearer_guards_the_routes_it_layers() {
        let a = auth();
        let protected = Router::new()
            .route("/status", get(|| async { "status" }))
            .route("/stop", post(|| async { "stopped" }))
            .layer(axum::middleware::from_fn_with_state(a, require_bearer));
        let base = serve(Router::new().route("/health", get(|| async { "ok" })).merge(protected)).await;
        let client = reqwest::Client::new();

        let health = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);

        for (method, path) in [("GET", "/status"), ("POST", "/stop")] {
            let url = format!("{base}{path}");
            let method: reqwest::Method = method.parse().unwrap();
            for token in [None, Some("wrong-token-0123456789abcdef0123456789abcdef")] {
                let mut req = client.request(method.clone(), &url);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}");
                assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Bearer");
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body, serde_json::json!({ "error": "missing or invalid bearer token" }));
            }
            let ok = client.request(method.clone(), &url).bearer_auth(TOKEN).send().await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK, "{method} {path}");
        }
    }

    #[test]
    fn console_tickets_are_checked_against_the_agent_key_and_vmid() {
        let a = auth();
        let now = Utc::now();
        let ttl = std::time::Duration::from_secs(30);
        let ticket = token::issue(a.ticket_key(), token::CONSOLE_PURPOSE, "u1", 105, ttl, now).unwrap();
        assert_eq!(a.check_console_ticket(&ticket, 105, now).unwrap().sub, "u1");
        let e = a.check_console_ticket(&ticket, 106, now).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::UNAUTHORIZED, "console ticket is for another container")
        );
        let later = now + chrono::Duration::seconds(60);
        assert_eq!(a.check_console_ticket(&ticket, 105, later).unwrap_err().message, "console ticket expired");
        // The bearer token is not a ticket, and a ticket is not a bearer token.
        assert!(a.check_console_ticket(TOKEN, 105, now).is_err());
        assert!(!a.is_token(&ticket));
    }

    #[test]
    fn a_ticket_is_used_once_and_lives_a_minute_at_most() {
        let a = auth();
        let now = Utc::now();
        let issue = |ttl: u64| {
            token::issue(a.ticket_key(), token::CONSOLE_PURPOSE, "u1", 105, std::time::Duration::from_secs(ttl), now)
                .unwrap()
        };
        let ticket = issue(60);
        assert!(a.check_console_ticket(&ticket, 105, now).is_ok());
        let e = a.check_console_ticket(&ticket, 105, now).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (StatusCode::UNAUTHORIZED, "console ticket already used"));
        // A refused ticket is not used up: the right container still takes it once.
        let other = issue(30);
        assert!(a.check_console_ticket(&other, 106, now).is_err());
        assert!(a.check_console_ticket(&other, 105, now).is_ok());
        let ten_years = issue(10 * 365 * 86_400);
        let e = a.check_console_ticket(&ten_years, 105, now).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (StatusCode::UNAUTHORIZED, "console ticket lives too long"));
    }
}
