//! Where containers come from: the seam between the control plane and whatever runs a container.
//!
//! A [`ContainerHost`] creates, starts, stops and destroys containers by vmid and says where each
//! one's agent listens. Backends:
//! - [`local::LocalHost`] (the embedded default): each container is a `zlh-agentd serve` process
//!   on this machine with its own root directory and its own loopback ports.
//! - [`proxmox::ProxmoxHost`]: LXC containers cloned from a template over the Proxmox VE REST API.
//! - [`mock::MockHost`]: in memory, for the simulator and tests.
//!
//! Every backend is idempotent where a retry would otherwise fail: starting a running container,
//! stopping a stopped one and destroying a missing one all succeed.

use std::fmt;
use std::net::SocketAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod local;
pub mod mock;
pub mod oci;
pub mod proxmox;

pub use local::{LocalHost, LocalHostConfig};
pub use mock::{MockHost, MockStep};
pub use proxmox::{ProxmoxConfig, ProxmoxHost, Templates};

/// The shortest agent token the agent accepts (its own rule, repeated so a bad spec fails at
/// create instead of at the agent's first start).
pub const MIN_AGENT_TOKEN_LEN: usize = 32;

/// What a container is for; picks the template (Proxmox) and whether code-server is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    Game,
    Dev,
}

impl ContainerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Game => "game",
            ContainerKind::Dev => "dev",
        }
    }
}

/// What to create. `Debug` never shows `agent_token`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub vmid: u32,
    pub kind: ContainerKind,
    /// A DNS label: lowercase letters, digits and `-`, at most 63 bytes.
    pub hostname: String,
    pub memory_mb: u32,
    pub disk_gb: u32,
    pub cores: u32,
    /// The bearer token the container's agent will require (at least [`MIN_AGENT_TOKEN_LEN`]
    /// printable ASCII characters).
    pub agent_token: String,
    /// Ports the game server listens on (informational for backends that need no mapping).
    pub ports: Vec<u16>,
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("vmid", &self.vmid)
            .field("kind", &self.kind)
            .field("hostname", &self.hostname)
            .field("memory_mb", &self.memory_mb)
            .field("disk_gb", &self.disk_gb)
            .field("cores", &self.cores)
            .field("agent_token", &"<redacted>")
            .field("ports", &self.ports)
            .finish()
    }
}

impl ContainerSpec {
    /// Checks what every backend relies on; the error names the field.
    pub fn validate(&self) -> Result<(), ContainerError> {
        let bad = |m: String| Err(ContainerError::InvalidSpec(m));
        if self.vmid == 0 {
            return bad("vmid must be positive".into());
        }
        let h = &self.hostname;
        let label_ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !h.starts_with('-')
            && !h.ends_with('-');
        if !label_ok {
            return bad(format!("hostname {h:?} is not a DNS label (a-z, 0-9, '-', at most 63 bytes)"));
        }
        if self.memory_mb == 0 || self.cores == 0 || self.disk_gb == 0 {
            return bad("memory_mb, cores and disk_gb must be positive".into());
        }
        if self.agent_token.len() < MIN_AGENT_TOKEN_LEN {
            return bad(format!("agent_token is shorter than {MIN_AGENT_TOKEN_LEN} characters"));
        }
        if !self.agent_token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("agent_token must be printable ASCII without spaces".into());
        }
        Ok(())
    }
}

/// Where a container's agent (and its code-server, for dev containers) can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEndpoint {
    /// Base URL of the agent's HTTP API (`http://10.0.0.5:18888/`); routes are joined under its path.
    pub agent_url: url::Url,
    /// code-server's address, for the IDE route table (dev containers only).
    pub code_server: Option<SocketAddr>,
}

/// A created container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub vmid: u32,
    pub endpoint: AgentEndpoint,
}

/// Whether a container runs, as the backend sees it (not whether its agent answers: that is the
/// status poller's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Running,
    Stopped,
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} does not exist")]
    NotFound(u32),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    /// The backend refused our credentials (Proxmox 401/403).
    #[error("container backend refused the credentials: {0}")]
    Auth(String),
    #[error("container backend error: {message}")]
    Backend { message: String },
    #[error("container I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl ContainerError {
    pub fn backend(message: impl Into<String>) -> Self {
        ContainerError::Backend { message: message.into() }
    }
}

/// The container backend seam. Handed around as `Arc<dyn ContainerHost>`.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ContainerHost: Send + Sync {
    /// Creates the container and returns where its agent will listen. A vmid already in use is a
    /// [`ContainerError::Conflict`]. The local and mock hosts leave it stopped; Proxmox leaves it
    /// running (its address comes from DHCP). Call `start` next either way: it is idempotent.
    async fn create(&self, spec: &ContainerSpec) -> Result<Container, ContainerError>;
    /// Starts the container; starting a running one is Ok.
    async fn start(&self, vmid: u32) -> Result<(), ContainerError>;
    /// Stops everything in the container; stopping a stopped one is Ok.
    async fn stop(&self, vmid: u32) -> Result<(), ContainerError>;
    /// Stops and removes the container and its disk; a missing container is Ok.
    async fn destroy(&self, vmid: u32) -> Result<(), ContainerError>;
    async fn status(&self, vmid: u32) -> Result<ContainerState, ContainerError>;
    /// Where the agent listens. For backends that assign addresses at start (Proxmox DHCP), only
    /// known once the container has run.
    async fn agent_endpoint(&self, vmid: u32) -> Result<AgentEndpoint, ContainerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(vmid: u32) -> ContainerSpec {
        ContainerSpec {
            vmid,
            kind: ContainerKind::Dev,
            hostname: format!("dev-{vmid}"),
            memory_mb: 1024,
            disk_gb: 8,
            cores: 2,
            agent_token: "secret-token-0123456789abcdef-0123456789".into(),
            ports: vec![],
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let shown = format!("{:?}", spec(6001));
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("dev-6001"), "{shown}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert!(spec(6001).validate().is_ok());
        type Change = fn(&mut ContainerSpec);
        let cases: [(Change, &str); 5] = [
            (|s| s.hostname = "Dev_1".into(), "hostname"),
            (|s| s.hostname = "-x".into(), "hostname"),
            (|s| s.agent_token = "short".into(), "agent_token"),
            (|s| s.agent_token = format!("{} x", "a".repeat(40)), "agent_token"),
            (|s| s.memory_mb = 0, "memory_mb"),
        ];
        for (change, field) in cases {
            let mut s = spec(6001);
            change(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
