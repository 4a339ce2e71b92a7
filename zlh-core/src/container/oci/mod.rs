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

/// Why OCI containers cannot run on this machine (`None`: they can): they need root, an OCI
/// runtime, the CNI plugins and mkfs.ext4.
pub fn unavailable() -> Option<&'static str> {
    let found = |names: &[&str]| names.iter().any(|n| host::which(std::path::Path::new(n)).is_some());
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root");
    }
    if !found(&["runc", "crun"]) {
        return Some("no OCI runtime (runc) installed");
    }
    if !std::path::Path::new("/usr/lib/cni/ptp").is_file() {
        return Some("the CNI plugins are not installed (containernetworking-plugins)");
    }
    if !found(&["mkfs.ext4"]) {
        return Some("mkfs.ext4 is not installed (e2fsprogs)");
    }
    None
}
