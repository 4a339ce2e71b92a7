//! LXC containers on Proxmox VE over its REST API (`/api2/json`), authenticated with an API
//! token (`Authorization: PVEAPIToken=<user>@<realm>!<tokenid>=<secret>`).
//!
//! `create` clones the kind's template (`POST …/lxc/{template}/clone`, a full clone on the
//! configured storage), sizes it (`PUT …/config`, `PUT …/resize`), starts it and waits for its
//! DHCP address (`GET …/interfaces`): the agent's address is only known once the container runs,
//! so a created container is left running. Long operations return a task id (UPID) that is
//! polled (`GET /nodes/{node}/tasks/{upid}/status`) until it stops; an exit status other than
//! `OK` is the error. A create that fails after the clone removes the clone again.
//!
//! Proxmox VE reports errors in the HTTP reason phrase (`500 Configuration file … does not
//! exist`) and parameter errors in the body (`{"errors": {field: message}}`); both end up in the
//! error message. 401/403 are [`ContainerError::Auth`]. Connection failures, 502/503/504 and, for
//! reads, 500s and timeouts are retried a few times with exponential backoff.
//!
//! Agent tokens: the REST API cannot put a file into a container, so the template's agent derives
//! its own token with [`crate::agent_client::agent_token_for`] from a master secret baked into the
//! template and its vmid, which the container learns from its hostname: every hostname must end
//! in `-<vmid>` (`dev-6001`). With `agent_token_master` set, `create` also checks that the spec's
//! token is the derived one, so a mismatch fails at once instead of as 401s later.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{AgentEndpoint, Container, ContainerError, ContainerHost, ContainerKind, ContainerSpec, ContainerState};
use crate::agent_client::agent_token_for;

/// Proxmox VE's vmid range.
const VMID_RANGE: std::ops::RangeInclusive<u32> = 100..=999_999_999;

/// The template each kind is cloned from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Templates {
    pub game: u32,
    pub dev: u32,
}

impl Templates {
    pub fn for_kind(&self, kind: ContainerKind) -> u32 {
        match kind {
            ContainerKind::Game => self.game,
            ContainerKind::Dev => self.dev,
        }
    }
}

/// `Debug` never shows the token secret or the master secret.
#[derive(Clone)]
pub struct ProxmoxConfig {
    /// `https://pve.example:8006/` (the `/api2/json` prefix is added).
    pub base_url: url::Url,
    pub node: String,
    /// `<user>@<realm>!<tokenid>`.
    pub token_id: String,
    pub token_secret: String,
    pub templates: Templates,
    /// Storage for full clones.
    pub storage: String,
    /// Bridge of `net0` (DHCP).
    pub bridge: String,
    pub agent_port: u16,
    pub code_server_port: u16,
    pub swap_mb: u32,
    /// Trust exactly the certificate with this SHA-256 fingerprint (Proxmox VE's own
    /// self-signed one): see [`crate::tls`].
    pub tls_fingerprint: Option<crate::tls::Fingerprint>,
    /// Trust any certificate at all. Anyone on the path then sees the API token: prefer
    /// `tls_fingerprint`. Refused together with it.
    pub danger_accept_invalid_certs: bool,
    /// The fleet secret agent tokens derive from (see the module doc); at least 32 bytes.
    pub agent_token_master: Option<Vec<u8>>,
    pub request_timeout: Duration,
    /// Extra attempts of a failed call that is safe to repeat.
    pub retries: u32,
    /// Wait before the first retry (doubled each time).
    pub retry_backoff: Duration,
    /// Time between polls of a task or of the interfaces.
    pub poll_interval: Duration,
    /// Bound on one task (a full clone of a large template takes minutes).
    pub task_timeout: Duration,
    /// How long a clean shutdown may take before a hard stop.
    pub shutdown_timeout: Duration,
    /// How long a started container may take to get an address.
    pub address_timeout: Duration,
}

impl ProxmoxConfig {
    pub fn new(
        base_url: url::Url,
        node: impl Into<String>,
        token_id: impl Into<String>,
        token_secret: impl Into<String>,
        templates: Templates,
        storage: impl Into<String>,
        bridge: impl Into<String>,
    ) -> Self {
        Self {
            base_url,
            node: node.into(),
            token_id: token_id.into(),
            token_secret: token_secret.into(),
            templates,
            storage: storage.into(),
            bridge: bridge.into(),
            agent_port: 18888,
            code_server_port: 6000,
            swap_mb: 512,
            tls_fingerprint: None,
            danger_accept_invalid_certs: false,
            agent_token_master: None,
            request_timeout: Duration::from_secs(30),
            retries: 3,
            retry_backoff: Duration::from_millis(500),
            poll_interval: Duration::from_secs(1),
            task_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(60),
            address_timeout: Duration::from_secs(120),
        }
    }
}

impl fmt::Debug for ProxmoxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxmoxConfig")
            .field("base_url", &self.base_url.as_str())
            .field("node", &self.node)
            .field("token_id", &self.token_id)
            .field("token_secret", &"<redacted>")
            .field("templates", &self.templates)
            .field("storage", &self.storage)
            .field("bridge", &self.bridge)
            .field("agent_port", &self.agent_port)
            .field("agent_token_master", &self.agent_token_master.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A failed API call, before it is given a meaning.
#[derive(Debug)]
enum ApiFail {
    Status { status: StatusCode, message: String },
    Transport(String),
}

impl ApiFail {
    fn is_missing(&self) -> bool {
        match self {
            ApiFail::Status { status, message } => {
                *status == StatusCode::NOT_FOUND || message.contains("does not exist")
            }
            ApiFail::Transport(_) => false,
        }
    }

    fn into_error(self, what: &str) -> ContainerError {
        match self {
            ApiFail::Status { status, message }
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                ContainerError::Auth(format!("{what}: {status}: {message} (check the API token and its permissions)"))
            }
            ApiFail::Status { status, message } => ContainerError::backend(format!("{what}: {status}: {message}")),
            ApiFail::Transport(m) => ContainerError::backend(format!("{what}: {m}")),
        }
    }
}

#[derive(Debug, Deserialize)]
struct TaskStatus {
    status: String,
    #[serde(default)]
    exitstatus: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Interface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    inet: Option<String>,
}

pub struct ProxmoxHost {
    config: ProxmoxConfig,
    http: reqwest::Client,
    auth: HeaderValue,
    /// Last known endpoint per vmid: a stopped container has no address to read.
    endpoints: Mutex<HashMap<u32, AgentEndpoint>>,
}

impl ProxmoxHost {
    pub fn new(config: ProxmoxConfig) -> Result<Self, ContainerError> {
        if config.agent_token_master.as_ref().is_some_and(|m| m.len() < 32) {
            return Err(ContainerError::InvalidSpec("agent_token_master must be at least 32 bytes".into()));
        }
        if !config.token_id.contains('@') || !config.token_id.contains('!') {
            return Err(ContainerError::InvalidSpec(format!(
                "token_id {:?} is not <user>@<realm>!<tokenid>",
                config.token_id
            )));
        }
        let mut auth = HeaderValue::from_str(&format!("PVEAPIToken={}={}", config.token_id, config.token_secret))
            .map_err(|_| {
                ContainerError::InvalidSpec("token_id or token_secret has characters a header cannot hold".into())
            })?;
        auth.set_sensitive(true);
        let mut http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).timeout(config.request_timeout);
        match (config.tls_fingerprint, config.danger_accept_invalid_certs) {
            (Some(_), true) => {
                return Err(ContainerError::InvalidSpec(
                    "tls_fingerprint pins the certificate and danger_accept_invalid_certs trusts any: choose one"
                        .into(),
                ))
            }
            (Some(pin), false) => http = http.use_preconfigured_tls(crate::tls::pinned_client_config(pin)),
            (None, accept_any) => http = http.danger_accept_invalid_certs(accept_any),
        }
        let http = http.build().map_err(|e| ContainerError::backend(format!("HTTP client: {e}")))?;
        Ok(Self { config, http, auth, endpoints: Mutex::default() })
    }

    /// The token agent `vmid` derives, when a master secret is configured.
    pub fn agent_token(&self, vmid: u32) -> Option<String> {
        self.config.agent_token_master.as_deref().map(|m| agent_token_for(m, vmid))
    }

    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.config.base_url.clone();
        {
            let mut path = url.path_segments_mut().expect("an http(s) base URL");
            path.pop_if_empty().extend(["api2", "json"]).extend(segments);
        }
        url
    }

    fn lxc(&self, vmid: u32, rest: &[&str]) -> url::Url {
        let vmid = vmid.to_string();
        let mut segments = vec!["nodes", self.config.node.as_str(), "lxc", vmid.as_str()];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// One API call, retried when that is safe; returns the `data` of the envelope.
    async fn call(&self, method: Method, url: url::Url, form: &[(&str, String)]) -> Result<Value, ApiFail> {
        let read = method == Method::GET;
        let mut attempt = 0;
        loop {
            let mut req = self.http.request(method.clone(), url.clone()).header(AUTHORIZATION, self.auth.clone());
            if !form.is_empty() {
                req = req.form(form);
            }
            let fail = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let body: Value =
                        resp.json().await.map_err(|e| ApiFail::Transport(format!("bad JSON from Proxmox VE: {e}")))?;
                    return Ok(body.get("data").cloned().unwrap_or(Value::Null));
                }
                Ok(resp) => {
                    let status = resp.status();
                    let reason = resp
                        .extensions()
                        .get::<hyper::ext::ReasonPhrase>()
                        .map(|r| String::from_utf8_lossy(r.as_bytes()).trim().to_string());
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let mut message = reason.unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
                    if let Some(m) = body.get("message").and_then(Value::as_str) {
                        message = format!("{message}: {}", m.trim());
                    }
                    if let Some(errors) = body.get("errors").and_then(Value::as_object) {
                        let fields: Vec<String> = errors
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or(&v.to_string()).trim()))
                            .collect();
                        message = format!("{message} ({})", fields.join("; "));
                    }
                    let fail = ApiFail::Status { status, message };
                    let retry = matches!(status.as_u16(), 502..=504)
                        || (read && status.is_server_error() && !fail.is_missing());
                    if !retry {
                        return Err(fail);
                    }
                    fail
                }
                Err(e) => {
                    let retry = e.is_connect() || (read && e.is_timeout());
                    let fail = ApiFail::Transport(error_chain(&e));
                    if !retry {
                        return Err(fail);
                    }
                    fail
                }
            };
            if attempt >= self.config.retries {
                return Err(fail);
            }
            let wait = self.config.retry_backoff * 2u32.saturating_pow(attempt);
            debug!(%url, attempt, ?wait, error = ?fail, "Proxmox VE call failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Waits for task `upid` to stop; an exit status other than `OK` is the error.
    async fn wait_task(&self, upid: &Value, what: &str, timeout: Duration) -> Result<(), ContainerError> {
        let Some(upid) = upid.as_str() else {
            // Some calls finish at once and return no task.
            return Ok(());
        };
        // The task runs on the node named in its id (`UPID:<node>:…`), which may be another one.
        let node = upid.split(':').nth(1).filter(|n| !n.is_empty()).unwrap_or(&self.config.node);
        let url = self.url(&["nodes", node, "tasks", upid, "status"]);
        let deadline = Instant::now() + timeout;
        loop {
            let data = self.call(Method::GET, url.clone(), &[]).await.map_err(|e| e.into_error(what))?;
            let task: TaskStatus = serde_json::from_value(data)
                .map_err(|e| ContainerError::backend(format!("{what}: task status: {e}")))?;
            if task.status == "stopped" {
                return match task.exitstatus.as_deref() {
                    Some("OK") => Ok(()),
                    other => {
                        Err(ContainerError::backend(format!("{what} failed: {}", other.unwrap_or("no exit status"))))
                    }
                };
            }
            if Instant::now() >= deadline {
                return Err(ContainerError::Timeout(format!("{what}: task {upid} still running after {timeout:?}")));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn current(&self, vmid: u32) -> Result<ContainerState, ContainerError> {
        match self.call(Method::GET, self.lxc(vmid, &["status", "current"]), &[]).await {
            Ok(data) => Ok(match data.get("status").and_then(Value::as_str) {
                Some("running") => ContainerState::Running,
                _ => ContainerState::Stopped,
            }),
            Err(e) if e.is_missing() => Ok(ContainerState::Missing),
            Err(e) => Err(e.into_error(&format!("status of {vmid}"))),
        }
    }

    /// The first non-loopback IPv4 address, if the container has one yet.
    async fn address(&self, vmid: u32) -> Result<Option<IpAddr>, ContainerError> {
        let data = self
            .call(Method::GET, self.lxc(vmid, &["interfaces"]), &[])
            .await
            .map_err(|e| e.into_error(&format!("interfaces of {vmid}")))?;
        let interfaces: Vec<Interface> = serde_json::from_value(data).unwrap_or_default();
        Ok(interfaces.iter().filter(|i| i.name != "lo").find_map(|i| {
            let inet = i.inet.as_deref()?;
            let ip: IpAddr = inet.split('/').next()?.parse().ok()?;
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        }))
    }

    /// Waits (bounded) for the running container's address and records its endpoint.
    async fn await_endpoint(&self, vmid: u32, kind: Option<ContainerKind>) -> Result<AgentEndpoint, ContainerError> {
        let deadline = Instant::now() + self.config.address_timeout;
        let ip = loop {
            if let Some(ip) = self.address(vmid).await? {
                break ip;
            }
            if Instant::now() >= deadline {
                return Err(ContainerError::Timeout(format!(
                    "container {vmid} has no address after {:?}",
                    self.config.address_timeout
                )));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        };
        let kind = match kind {
            Some(k) => k,
            None => self.kind_of(vmid).await?,
        };
        let endpoint = AgentEndpoint {
            agent_url: format!("http://{}/", SocketAddr::new(ip, self.config.agent_port))
                .parse()
                .map_err(|e| ContainerError::backend(format!("agent URL: {e}")))?,
            code_server: (kind == ContainerKind::Dev).then_some(SocketAddr::new(ip, self.config.code_server_port)),
        };
        self.endpoints.lock().unwrap().insert(vmid, endpoint.clone());
        Ok(endpoint)
    }

    /// The kind, from the tags `create` set (`zlh;dev`).
    async fn kind_of(&self, vmid: u32) -> Result<ContainerKind, ContainerError> {
        let data = self
            .call(Method::GET, self.lxc(vmid, &["config"]), &[])
            .await
            .map_err(|e| e.into_error(&format!("config of {vmid}")))?;
        let tags = data.get("tags").and_then(Value::as_str).unwrap_or("");
        Ok(if tags.split([';', ',', ' ']).any(|t| t == "dev") { ContainerKind::Dev } else { ContainerKind::Game })
    }

    async fn power(
        &self,
        vmid: u32,
        action: &str,
        form: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(), ContainerError> {
        let what = format!("{action} of {vmid}");
        let upid = self.call(Method::POST, self.lxc(vmid, &["status", action]), form).await.map_err(|e| {
            if e.is_missing() {
                ContainerError::NotFound(vmid)
            } else {
                e.into_error(&what)
            }
        })?;
        self.wait_task(&upid, &what, timeout).await
    }

    async fn start_and_address(&self, vmid: u32, kind: Option<ContainerKind>) -> Result<AgentEndpoint, ContainerError> {
        self.power(vmid, "start", &[], self.config.task_timeout).await?;
        self.await_endpoint(vmid, kind).await
    }

    /// Clone, size, start, address: everything after the clone is undone on failure.
    async fn create_inner(&self, spec: &ContainerSpec) -> Result<AgentEndpoint, ContainerError> {
        let vmid = spec.vmid;
        let template = self.config.templates.for_kind(spec.kind);
        let clone = [
            ("newid", vmid.to_string()),
            ("hostname", spec.hostname.clone()),
            ("full", "1".to_string()),
            ("storage", self.config.storage.clone()),
        ];
        let what = format!("clone of template {template} to {vmid}");
        let upid =
            self.call(Method::POST, self.lxc(template, &["clone"]), &clone).await.map_err(|e| e.into_error(&what))?;
        self.wait_task(&upid, &what, self.config.task_timeout).await?;
        info!(vmid, template, "cloned");
        let result = async {
            let config = [
                ("memory", spec.memory_mb.to_string()),
                ("swap", self.config.swap_mb.to_string()),
                ("cores", spec.cores.to_string()),
                ("net0", format!("name=eth0,bridge={},ip=dhcp", self.config.bridge)),
                ("tags", format!("zlh;{}", spec.kind.as_str())),
            ];
            let what = format!("configuring {vmid}");
            let done =
                self.call(Method::PUT, self.lxc(vmid, &["config"]), &config).await.map_err(|e| e.into_error(&what))?;
            self.wait_task(&done, &what, self.config.task_timeout).await?;
            let resize = [("disk", "rootfs".to_string()), ("size", format!("{}G", spec.disk_gb))];
            let what = format!("resizing {vmid} to {} GB", spec.disk_gb);
            let done =
                self.call(Method::PUT, self.lxc(vmid, &["resize"]), &resize).await.map_err(|e| e.into_error(&what))?;
            self.wait_task(&done, &what, self.config.task_timeout).await?;
            self.start_and_address(vmid, Some(spec.kind)).await
        }
        .await;
        if let Err(e) = &result {
            warn!(vmid, error = %e, "create failed after the clone; removing the clone");
            if let Err(undo) = self.destroy(vmid).await {
                warn!(vmid, error = %undo, "could not remove the failed clone");
            }
        }
        result
    }
}

#[async_trait]
impl ContainerHost for ProxmoxHost {
    async fn create(&self, spec: &ContainerSpec) -> Result<Container, ContainerError> {
        spec.validate()?;
        let vmid = spec.vmid;
        if !VMID_RANGE.contains(&vmid) {
            return Err(ContainerError::InvalidSpec(format!("vmid {vmid} is outside Proxmox VE's 100..=999999999")));
        }
        if !spec.hostname.ends_with(&format!("-{vmid}")) {
            return Err(ContainerError::InvalidSpec(format!(
                "hostname {:?} must end in -{vmid}: the template's agent derives its token from it",
                spec.hostname
            )));
        }
        if let Some(expected) = self.agent_token(vmid) {
            if !bool::from(expected.as_bytes().ct_eq(spec.agent_token.as_bytes())) {
                return Err(ContainerError::InvalidSpec(format!(
                    "agent_token of {vmid} is not the derived one (agent_token_for(master, vmid))"
                )));
            }
        }
        if self.current(vmid).await? != ContainerState::Missing {
            return Err(ContainerError::Conflict(format!("container {vmid} already exists")));
        }
        let endpoint = self.create_inner(spec).await?;
        info!(vmid, agent = %endpoint.agent_url, "Proxmox VE container created");
        Ok(Container { vmid, endpoint })
    }

    async fn start(&self, vmid: u32) -> Result<(), ContainerError> {
        match self.current(vmid).await? {
            ContainerState::Missing => Err(ContainerError::NotFound(vmid)),
            ContainerState::Running => Ok(()),
            ContainerState::Stopped => self.start_and_address(vmid, None).await.map(drop),
        }
    }

    async fn stop(&self, vmid: u32) -> Result<(), ContainerError> {
        match self.current(vmid).await? {
            ContainerState::Missing => return Err(ContainerError::NotFound(vmid)),
            ContainerState::Stopped => return Ok(()),
            ContainerState::Running => {}
        }
        let secs = self.config.shutdown_timeout.as_secs().max(1);
        // The shutdown task itself gives up after `timeout`; allow a little more to see it end.
        let wait = self.config.shutdown_timeout + Duration::from_secs(30).min(self.config.task_timeout);
        match self.power(vmid, "shutdown", &[("timeout", secs.to_string())], wait).await {
            Ok(()) => Ok(()),
            Err(ContainerError::NotFound(v)) => Err(ContainerError::NotFound(v)),
            Err(e) => {
                warn!(vmid, error = %e, "clean shutdown failed; stopping hard");
                match self.power(vmid, "stop", &[], self.config.task_timeout).await {
                    // It may have stopped by itself in the meantime.
                    Err(e) if self.current(vmid).await? == ContainerState::Running => Err(e),
                    _ => Ok(()),
                }
            }
        }
    }

    async fn destroy(&self, vmid: u32) -> Result<(), ContainerError> {
        match self.current(vmid).await? {
            ContainerState::Missing => {
                self.endpoints.lock().unwrap().remove(&vmid);
                return Ok(());
            }
            ContainerState::Running => match self.stop(vmid).await {
                Ok(()) | Err(ContainerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            },
            ContainerState::Stopped => {}
        }
        let mut url = self.lxc(vmid, &[]);
        url.query_pairs_mut().append_pair("purge", "1").append_pair("destroy-unreferenced-disks", "1");
        let what = format!("destroying {vmid}");
        match self.call(Method::DELETE, url, &[]).await {
            Ok(upid) => self.wait_task(&upid, &what, self.config.task_timeout).await?,
            Err(e) if e.is_missing() => {}
            Err(e) => return Err(e.into_error(&what)),
        }
        self.endpoints.lock().unwrap().remove(&vmid);
        info!(vmid, "Proxmox VE container destroyed");
        Ok(())
    }

    async fn status(&self, vmid: u32) -> Result<ContainerState, ContainerError> {
        self.current(vmid).await
    }

    async fn agent_endpoint(&self, vmid: u32) -> Result<AgentEndpoint, ContainerError> {
        match self.current(vmid).await? {
            ContainerState::Missing => Err(ContainerError::NotFound(vmid)),
            ContainerState::Running => self.await_endpoint(vmid, None).await,
            ContainerState::Stopped => self.endpoints.lock().unwrap().get(&vmid).cloned().ok_or_else(|| {
                ContainerError::Conflict(format!(
                    "container {vmid} is stopped: its address is known only while it runs"
                ))
            }),
        }
    }
}

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
