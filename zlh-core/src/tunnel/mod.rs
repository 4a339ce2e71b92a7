//! SSH and network access to dev containers: declared here, implemented by the tunnel work
//! (`local.rs`, `cloudflare.rs`, `headscale.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::Vmid;

/// What a user needs to reach a container over SSH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshAccess {
    pub host: String,
    /// The `~/.ssh/config` snippet to show in the portal.
    pub ssh_config: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A pre-auth key for joining a tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKey {
    pub key: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel backend unavailable: {0}")]
    Unavailable(String),
    #[error("tunnel backend refused: {0}")]
    Refused(String),
    #[error("{0} is not supported by this tunnel")]
    Unsupported(&'static str),
}

#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Tunnel: Send + Sync {
    async fn ssh_access(&self, user_id: &str, vmid: Vmid) -> Result<SshAccess, TunnelError>;
    async fn auth_key(&self, user_id: &str, vmid: Vmid) -> Result<AuthKey, TunnelError>;
    async fn revoke(&self, vmid: Vmid) -> Result<(), TunnelError>;
}
