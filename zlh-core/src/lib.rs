//! zlh-core: the library behind the zlh hosting platform.
//!
//! One module per concept. Each seam is a trait handed around as `Arc<dyn Trait>`:
//! [`artifact::ArtifactStore`], [`runtime::RuntimeInstaller`], [`supervisor::Supervisor`],
//! [`ide::IdeRouter`] and [`tunnel::Tunnel`]. The daemons (`zlh-agentd`, `zlh-apid`) and the
//! simulator (`zlh-sim`) only compose these.

pub mod agent_client;
pub mod artifact;
pub mod atomic;
pub mod catalog;
pub mod container;
pub mod files;
pub mod ide;
pub mod logging;
pub mod net;
pub mod payload;
pub mod runtime;
pub mod supervisor;
pub mod tls;
pub mod token;
pub mod tunnel;
pub mod types;

pub use types::{ArtifactKey, Digest, RuntimeId, Version, Vmid};
