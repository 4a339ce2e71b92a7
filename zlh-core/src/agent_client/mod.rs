//! The control plane's side of the agent contract: one pooled HTTP client for every agent, each
//! call with its agent's own bearer token and a bounded time, and errors that say whose fault a
//! failure was (the network, the token, or the agent refusing the request).
//!
//! Tokens travel only in the `Authorization` header: they are never part of a URL, an error or a
//! log line. [`poller::StatusPoller`] builds on this to keep every agent's status fresh.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::container::AgentEndpoint;

pub mod poller;

pub use poller::{PollResult, PollTarget, PollerConfig, RoundStats, StatusPoller, TargetSource};

/// Domain separation for [`agent_token_for`]: the master key may derive other secrets later.
const AGENT_TOKEN_CONTEXT: &str = "zlh agent token v1:";

/// The bearer token of agent `vmid`: HMAC-SHA256 of `"zlh agent token v1:<vmid>"` keyed by a
/// fleet master secret, as 64 lowercase hex characters.
///
/// Why derived: a Proxmox LXC container is cloned from a template and the Proxmox REST API has no
/// way to put a file into it (no `pct push` over REST; the description and tags are readable by
/// anyone who can audit the container, so they are no place for a secret). Instead the template's
/// boot step derives the token from the master secret (kept root-only in the template) and the
/// vmid, and the control plane derives the same token for its calls: no token is stored or sent
/// anywhere, every agent's token differs, and one leaked agent token opens no other agent. The
/// cost: whoever gains root inside a container learns the master secret and with it every token
/// of the fleet, so agents must only be reachable from the control plane's network. The local
/// container host needs none of this: it writes each agent a random token file directly.
///
/// The same derivation in a shell (for a template's boot step), with `$VMID` from the hostname
/// suffix (see [`crate::container::proxmox`]):
/// `printf 'zlh agent token v1:%s' "$VMID" | openssl dgst -sha256 -mac HMAC -macopt hexkey:"$MASTER_HEX"`.
pub fn agent_token_for(master: &[u8], vmid: u32) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes keys of any length");
    mac.update(AGENT_TOKEN_CONTEXT.as_bytes());
    mac.update(vmid.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Timeouts of every agent call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentClientConfig {
    pub connect_timeout: Duration,
    /// Whole request, headers to last body byte.
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection to an agent is kept. Longer than the poll interval
    /// saves a TCP handshake per poll, at the cost of one open file per agent: at 10,000 agents
    /// the process needs a `RLIMIT_NOFILE` above 10,000 (or a timeout below the interval).
    pub pool_idle_timeout: Duration,
}

impl Default for AgentClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No connection (refused, no route, DNS, reset before an answer).
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent refused the token (401).
    #[error("agent refused the token")]
    Unauthorized,
    /// The agent answered with an error status; `message` is its `{"error": …}` text.
    #[error("agent refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The agent answered something that is not its contract.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// The caller asked for something that cannot be sent (a bad path).
    #[error("bad agent request: {0}")]
    BadRequest(String),
}

impl AgentError {
    /// Whether the failure says the agent is not reachable at all (for online/offline).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentError::Unreachable(_) | AgentError::Timeout(_))
    }
}

/// `GET /status`, as the agent sends it (camelCase). Every field has a default and unknown fields
/// are ignored, so an older or newer agent still parses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentStatus {
    /// `idle` | `installing` | `verifying` | `starting` | `running` | `stopping` | `stopped` |
    /// `crashed` | `error`
    pub state: String,
    pub vmid: Option<u32>,
    pub container_type: Option<String>,
    pub provisioning_complete: bool,
    pub install_step: Option<String>,
    pub progress: Option<u8>,
    pub error: Option<String>,
    pub crash_count: u32,
    pub last_crash: Option<CrashInfo>,
    pub runtime: Option<RuntimeInfo>,
    pub code_server: Option<CodeServerInfo>,
    pub game: Option<GameInfo>,
    /// A dev container's workspace path as its code-server sees it.
    pub workspace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CrashInfo {
    pub time: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub uptime_secs: u64,
    pub log_tail: Vec<String>,
    pub classification: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RuntimeInfo {
    pub id: String,
    pub version: String,
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CodeServerInfo {
    pub state: String,
    pub pid: Option<u32>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GameInfo {
    pub id: String,
    pub version: String,
    pub process: String,
    pub pid: Option<u32>,
    pub power_action: Option<String>,
}

/// What `POST /config` did.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigureOutcome {
    /// 202: provisioning started; the status as it began.
    Started(AgentStatus),
    /// 200: this payload is already in force or being provisioned.
    AlreadyApplied(AgentStatus),
}

impl ConfigureOutcome {
    pub fn status(&self) -> &AgentStatus {
        match self {
            ConfigureOutcome::Started(s) | ConfigureOutcome::AlreadyApplied(s) => s,
        }
    }
}

/// The game server's power actions (`POST /start|stop|restart|kill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Start,
    Stop,
    Restart,
    Kill,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Start => "start",
            PowerAction::Stop => "stop",
            PowerAction::Restart => "restart",
            PowerAction::Kill => "kill",
        }
    }
}

/// code-server's lifecycle actions (`POST /dev/codeserver/start|stop|restart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeServerAction {
    Start,
    Stop,
    Restart,
}

impl CodeServerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeServerAction::Start => "start",
            CodeServerAction::Stop => "stop",
            CodeServerAction::Restart => "restart",
        }
    }
}

/// One client for all agents: cloning it is cheap and shares the connection pool.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    config: AgentClientConfig,
}

impl AgentClient {
    pub fn new(config: AgentClientConfig) -> Result<Self, AgentError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(config.pool_idle_timeout)
            .build()
            .map_err(|e| AgentError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Self { http, config })
    }

    pub fn config(&self) -> AgentClientConfig {
        self.config
    }

    /// The same pool with another whole-request timeout (the poller's per-poll bound).
    pub fn with_request_timeout(&self, timeout: Duration) -> Self {
        Self { http: self.http.clone(), config: AgentClientConfig { request_timeout: timeout, ..self.config } }
    }

    /// `GET /health` (no token): Ok when the agent answers 2xx.
    pub async fn health(&self, endpoint: &AgentEndpoint) -> Result<(), AgentError> {
        let req = self.http.get(route(endpoint, "/health")?).timeout(self.config.request_timeout);
        let resp = self.send(req).await?;
        check(resp).await.map(drop)
    }

    /// `GET /status`.
    pub async fn status(&self, endpoint: &AgentEndpoint, token: &str) -> Result<AgentStatus, AgentError> {
        let resp = self.send(self.builder(endpoint, token, Method::GET, "/status")?).await?;
        json_body(check(resp).await?).await
    }

    /// `POST /config` with a provisioning payload.
    pub async fn configure(
        &self,
        endpoint: &AgentEndpoint,
        token: &str,
        payload: &serde_json::Value,
    ) -> Result<ConfigureOutcome, AgentError> {
        let req = self.builder(endpoint, token, Method::POST, "/config")?.json(payload);
        let resp = check(self.send(req).await?).await?;
        match resp.status() {
            StatusCode::ACCEPTED => Ok(ConfigureOutcome::Started(json_body(resp).await?)),
            StatusCode::OK => Ok(ConfigureOutcome::AlreadyApplied(json_body(resp).await?)),
            other => Err(AgentError::Protocol(format!("unexpected status {other} from /config"))),
        }
    }

    /// `POST /start|stop|restart|kill`: accepted (202) means the action is under way.
    pub async fn power(&self, endpoint: &AgentEndpoint, token: &str, action: PowerAction) -> Result<(), AgentError> {
        let req = self.builder(endpoint, token, Method::POST, &format!("/{}", action.as_str()))?;
        check(self.send(req).await?).await.map(drop)
    }

    /// `POST /dev/codeserver/start|stop|restart`; returns the agent's answer (`codeServer` report).
    pub async fn code_server(
        &self,
        endpoint: &AgentEndpoint,
        token: &str,
        action: CodeServerAction,
    ) -> Result<serde_json::Value, AgentError> {
        let req = self.builder(endpoint, token, Method::POST, &format!("/dev/codeserver/{}", action.as_str()))?;
        json_body(check(self.send(req).await?).await?).await
    }

    /// Any route with an optional JSON body, for relaying. Returns the agent's response whatever
    /// its status (the caller relays it); only transport failures are errors.
    pub async fn request(
        &self,
        endpoint: &AgentEndpoint,
        token: &str,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, AgentError> {
        let mut req = self.builder(endpoint, token, method, path_and_query)?;
        if let Some(body) = body {
            req = req.json(body);
        }
        self.send(req).await
    }

    /// An authenticated request to `path_and_query` with this client's timeout, for callers that
    /// need more than [`Self::request`] (streamed bodies, headers); send it with [`Self::send`].
    /// The path is put under the endpoint's base path and can never change the host.
    pub fn builder(
        &self,
        endpoint: &AgentEndpoint,
        token: &str,
        method: Method,
        path_and_query: &str,
    ) -> Result<RequestBuilder, AgentError> {
        Ok(self
            .http
            .request(method, route(endpoint, path_and_query)?)
            .bearer_auth(token)
            .timeout(self.config.request_timeout))
    }

    /// Sends `req`, mapping transport failures. Non-2xx answers are returned as they are.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, AgentError> {
        req.send().await.map_err(|e| self.transport_error(e))
    }

    fn transport_error(&self, e: reqwest::Error) -> AgentError {
        if e.is_timeout() {
            return AgentError::Timeout(self.config.request_timeout);
        }
        if e.is_connect() {
            // reqwest reports a connect timeout as a connect error whose source is a timeout.
            let text = error_chain(&e);
            if text.contains("timed out") {
                return AgentError::Timeout(self.config.connect_timeout);
            }
            return AgentError::Unreachable(text);
        }
        if e.is_builder() {
            return AgentError::BadRequest(error_chain(&e));
        }
        AgentError::Unreachable(error_chain(&e))
    }
}

/// `e` and its sources on one line (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The URL of `path_and_query` under the endpoint's base path. Only the path and query are
/// taken from the caller, so a path such as `//elsewhere/x` cannot redirect the call.
fn route(endpoint: &AgentEndpoint, path_and_query: &str) -> Result<url::Url, AgentError> {
    if !path_and_query.starts_with('/') {
        return Err(AgentError::BadRequest(format!("path {path_and_query:?} must start with '/'")));
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(AgentError::BadRequest(format!("path {path:?} has dot segments")));
    }
    let mut url = endpoint.agent_url.clone();
    let base = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{base}{path}"));
    url.set_query(query);
    url.set_fragment(None);
    Ok(url)
}

/// Maps 401 and other non-2xx answers to errors, keeping the agent's `{"error": …}` message.
async fn check(resp: Response) -> Result<Response, AgentError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(AgentError::Unauthorized);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).trim().to_string();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("no message").to_string()
            } else {
                text
            }
        });
    Err(AgentError::Refused { status: status.as_u16(), message })
}

async fn json_body<T: serde::de::DeserializeOwned>(resp: Response) -> Result<T, AgentError> {
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let bytes = resp.bytes().await.map_err(|e| {
        if e.is_timeout() {
            AgentError::Protocol("body timed out".into())
        } else {
            AgentError::Unreachable(error_chain(&e))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let kind = if is_json { "bad JSON" } else { "not JSON" };
        AgentError::Protocol(format!("{kind} from the agent: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str) -> AgentEndpoint {
        AgentEndpoint { agent_url: url.parse().unwrap(), code_server: None }
    }

    #[test]
    fn derived_tokens_are_per_vmid_hex_and_stable() {
        let master = [7u8; 32];
        let a = agent_token_for(&master, 6001);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(a, agent_token_for(&master, 6001));
        assert_ne!(a, agent_token_for(&master, 6002));
        assert_ne!(a, agent_token_for(&[8u8; 32], 6001));
        // Pinned, so the shell derivation in the templates can be checked against it.
        assert_eq!(agent_token_for(b"0123456789abcdef0123456789abcdef", 105), KNOWN_105);
    }

    /// `printf 'zlh agent token v1:105' | openssl dgst -sha256 -mac HMAC -macopt key:0123456789abcdef0123456789abcdef`
    const KNOWN_105: &str = "a2c63d5439c763b7f09ecd4dda10856346d118fc3ab19bf403d4643dee84d4fb";

    #[test]
    fn routes_stay_under_the_base_and_on_its_host() {
        let e = ep("http://127.0.0.1:18888/");
        assert_eq!(route(&e, "/status").unwrap().as_str(), "http://127.0.0.1:18888/status");
        assert_eq!(
            route(&e, "/files/list?path=a%20b").unwrap().as_str(),
            "http://127.0.0.1:18888/files/list?path=a%20b"
        );
        let prefixed = ep("http://127.0.0.1:9000/agents/6001");
        assert_eq!(route(&prefixed, "/status").unwrap().as_str(), "http://127.0.0.1:9000/agents/6001/status");
        let hostile = route(&e, "//evil.example/x").unwrap();
        assert_eq!(hostile.host_str(), Some("127.0.0.1"));
        assert!(route(&e, "status").is_err());
        assert!(route(&e, "/files/../etc").is_err());
    }

    #[test]
    fn status_parses_missing_and_unknown_fields() {
        let s: AgentStatus = serde_json::from_str(
            r#"{"state":"running","newField":1,"codeServer":{"state":"running","port":6000,"extra":true}}"#,
        )
        .unwrap();
        assert_eq!(s.state, "running");
        assert!(!s.provisioning_complete);
        assert_eq!(s.code_server.unwrap().port, Some(6000));
    }
}
