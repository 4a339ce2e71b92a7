//! Installing language runtimes, addons and game servers from the catalog.
//!
//! An install is a transaction committed by `rename`: the artifact streams from the store through
//! sha256 and the decompressor into safe extraction under `<root>/.staging/`; only once the digest
//! matches is the manifest written and the directory renamed to `<root>/<id>/<version>`, and then
//! `<root>/<id>/current` is swapped by renaming a new symlink over it. A kill at any point leaves
//! the old state or the new one; leftovers in `.staging` are removed at the next start.

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::catalog::CatalogItem;
use crate::types::{Digest, RuntimeId, Version};

pub mod extract;
pub mod installer;
pub mod layout;

pub use installer::{Installer, InstallerOptions};

/// One installed version as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRuntime {
    pub id: RuntimeId,
    pub version: Version,
    pub path: PathBuf,
    /// True when `<root>/<id>/current` points at this version.
    pub current: bool,
    pub artifact_sha256: Digest,
    pub installed_at: DateTime<Utc>,
    pub bin: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
}

/// The step an install is in, for `/status` and progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallStep {
    /// Streaming: download, hash, decompress and extract in one pass.
    Downloading,
    /// Stream done; comparing the digest.
    Verifying,
    /// Writing the manifest and renaming into place.
    Committing,
    /// Swapping `current`.
    Activating,
    Done,
    Failed,
}

/// A progress event; every install broadcasts these to [`RuntimeInstaller::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallProgress {
    pub id: RuntimeId,
    pub version: Version,
    pub step: InstallStep,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Result of re-hashing an install against its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub id: RuntimeId,
    pub version: Version,
    pub files_checked: u64,
    /// Paths (relative to the install) whose content, type or link target differ, or are missing.
    pub mismatched: Vec<String>,
    /// Paths present on disk that the manifest does not list.
    pub unexpected: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.mismatched.is_empty() && self.unexpected.is_empty()
    }
}

/// What `upgrade` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    pub previous: Option<Version>,
    pub current: InstalledRuntime,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{id} {version} is not installed; installed: {installed}")]
    NotInstalled { id: String, version: String, installed: String },
    #[error("{id} {version} is the current version; removing it must be forced")]
    IsCurrent { id: String, version: String },
    #[error("nothing to roll back to for {id}: {reason}")]
    NoRollback { id: String, reason: String },
    #[error("artifact {key} digest mismatch: catalog says {expected}, got {actual}")]
    DigestMismatch { key: String, expected: Digest, actual: Digest },
    #[error("artifact {key} size mismatch: catalog says {expected} bytes, got {actual}")]
    SizeMismatch { key: String, expected: u64, actual: u64 },
    #[error("unsafe or malformed archive {key}: {source}")]
    Archive {
        key: String,
        #[source]
        source: extract::ExtractError,
    },
    #[error(transparent)]
    Store(#[from] crate::artifact::ArtifactError),
    #[error("install manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A concurrent caller's install of the same version failed; this is its error, shared.
    #[error("{0}")]
    Shared(std::sync::Arc<InstallError>),
}

impl InstallError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> InstallError {
        let path = path.into();
        move |source| InstallError::Io { path, source }
    }
}

/// Installs and manages versions of catalog items under one root directory.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait RuntimeInstaller: Send + Sync {
    /// Installs `item` (sharing the work with any concurrent install of the same id+version) and
    /// makes it current when `activate`. Installing an already installed version is a no-op.
    async fn install(&self, item: &CatalogItem, activate: bool) -> Result<InstalledRuntime, InstallError>;
    /// Installs `item` and makes it current, keeping the version that was current for rollback.
    async fn upgrade(&self, item: &CatalogItem) -> Result<Upgrade, InstallError>;
    /// Makes `to` (or, without it, the version current before the last switch) current again.
    async fn rollback(&self, id: &RuntimeId, to: Option<Version>) -> Result<InstalledRuntime, InstallError>;
    /// Removes one version; refuses the current one unless `force`.
    async fn remove(&self, id: &RuntimeId, version: &Version, force: bool) -> Result<(), InstallError>;
    /// Re-hashes one installed version against its manifest.
    async fn verify(&self, id: &RuntimeId, version: &Version) -> Result<VerifyReport, InstallError>;
    /// Every installed version, sorted by id then version.
    async fn list(&self) -> Result<Vec<InstalledRuntime>, InstallError>;
    /// Progress of every install from now on.
    fn subscribe(&self) -> broadcast::Receiver<InstallProgress>;
}
