//! On-disk layout of an install root and the install manifest format.
//!
//! ```text
//! <root>/.staging/<tmp>/            extraction in progress (removed at start)
//! <root>/<id>/<version>/            a complete install, with its manifest:
//! <root>/<id>/<version>/.zlh-manifest.json
//! <root>/<id>/current -> <version>  the active version (a relative symlink)
//! <root>/<id>/previous -> <version> the version active before the last switch (for rollback)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{ArtifactKey, Digest, RuntimeId, Version};

/// File name of the manifest inside each version directory; archives may not contain it.
pub const MANIFEST_NAME: &str = ".zlh-manifest.json";
pub const STAGING_DIR: &str = ".staging";
pub const CURRENT_LINK: &str = "current";
pub const PREVIOUS_LINK: &str = "previous";

/// What one archive entry became on disk. Paths are relative to the install dir, `/`-separated,
/// normalized (no `.`, `..` or empty components).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ManifestEntry {
    File { path: String, size: u64, sha256: Digest, mode: u32 },
    Dir { path: String, mode: u32 },
    Symlink { path: String, target: String },
}

impl ManifestEntry {
    pub fn path(&self) -> &str {
        match self {
            ManifestEntry::File { path, .. }
            | ManifestEntry::Dir { path, .. }
            | ManifestEntry::Symlink { path, .. } => path,
        }
    }
}

/// Written last into a staged install; its presence marks a version directory as complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: RuntimeId,
    pub version: Version,
    pub artifact_key: ArtifactKey,
    pub artifact_sha256: Digest,
    pub installed_at: DateTime<Utc>,
    #[serde(default)]
    pub bin: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub entries: Vec<ManifestEntry>,
}

/// Paths inside one install root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn staging(&self) -> PathBuf {
        self.root.join(STAGING_DIR)
    }
    pub fn id_dir(&self, id: &RuntimeId) -> PathBuf {
        self.root.join(id.as_str())
    }
    pub fn version_dir(&self, id: &RuntimeId, version: &Version) -> PathBuf {
        self.id_dir(id).join(version.as_str())
    }
    pub fn manifest(&self, id: &RuntimeId, version: &Version) -> PathBuf {
        self.version_dir(id, version).join(MANIFEST_NAME)
    }
    pub fn current_link(&self, id: &RuntimeId) -> PathBuf {
        self.id_dir(id).join(CURRENT_LINK)
    }
    pub fn previous_link(&self, id: &RuntimeId) -> PathBuf {
        self.id_dir(id).join(PREVIOUS_LINK)
    }
}
