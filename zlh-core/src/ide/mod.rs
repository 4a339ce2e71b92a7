//! Who may reach which browser IDE: declared here, implemented by the IDE access work
//! (`token.rs`, `host.rs`, `proxy.rs`).

use std::net::SocketAddr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::Vmid;

/// A signed, expiring IDE token bound to one user and one vmid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeToken {
    pub token: String,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// What a verified token or session grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeGrant {
    pub user_id: String,
    pub vmid: Vmid,
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
}

#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait IdeRouter: Send + Sync {
    fn issue_token(&self, user_id: &str, vmid: Vmid) -> Result<IdeToken, IdeError>;
    fn verify_token(&self, token: &str, vmid: Vmid) -> Result<IdeGrant, IdeError>;
    /// Strictly parses a Host header into the vmid it names.
    fn parse_host(&self, host: &str) -> Result<Vmid, IdeError>;
    fn hosted_url(&self, vmid: Vmid) -> String;
    async fn register(&self, vmid: Vmid, target: SocketAddr);
    async fn unregister(&self, vmid: Vmid);
    async fn resolve(&self, vmid: Vmid) -> Result<SocketAddr, IdeError>;
}
