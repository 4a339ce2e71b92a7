//! OCI containers run by runc: the local container host for hosting strangers.
//!
//! - [`host`] — [`OciHost`], the [`crate::container::ContainerHost`] over runc;
//! - [`bundle`] — the runtime config (namespaces, ids, mounts, capabilities, seccomp, limits);
//! - [`network`] — each container's own address through the CNI plugins, fenced off;
//! - [`runc`] — the runtime's command line;
//! - [`init`] — the container's first process, which keeps the agent running.

pub mod bundle;
pub mod host;
pub mod init;
pub mod network;
pub mod runc;

pub use host::{OciHost, OciHostConfig, OciRecord};
