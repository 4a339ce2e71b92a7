//! The signed catalog: which runtimes, addons and games exist, where their artifacts are and what
//! their bytes hash to. Format: `catalog.json` beside `catalog.json.minisig` in the artifact store.
//!
//! - [`Catalog`]: the parsed document; [`Catalog::parse`] validates it fully (see `validate.rs`).
//! - `signed.rs`: minisign verification against a trusted key, expiry, and the on-disk record of
//!   the last accepted catalog that enforces anti-rollback.
//! - `source.rs`: the catalog in force for a daemon: fetched and accepted, or the one accepted before.
//! - `resolve.rs`: picking a version by prefix and channel (`21` → newest stable `21.x`).
//! - `edit.rs`: the publishing side: building and promoting entries, always keeping it valid.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{ArtifactKey, Digest, RuntimeId, Version};

mod edit;
mod resolve;
mod signed;
mod source;
mod validate;

pub use resolve::{CatalogItem, ItemKind};
pub use signed::{verify_catalog, CatalogKeeper, TrustedKey, MAX_SIGNATURE_BYTES};
pub use source::{resolve, CatalogSource, Loaded};
pub use validate::MAX_CATALOG_BYTES;

/// The only catalog schema this build understands.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub schema: u32,
    /// Monotonic publication number; a catalog with a lower serial than the last accepted is refused.
    pub serial: u64,
    pub expires: DateTime<Utc>,
    #[serde(default)]
    pub runtimes: Vec<Package>,
    #[serde(default)]
    pub addons: Vec<Package>,
    #[serde(default)]
    pub games: Vec<Game>,
}

/// A runtime (java, node, python, dotnet, go) or an addon (code-server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub id: RuntimeId,
    pub versions: Vec<PackageVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageVersion {
    pub version: Version,
    #[serde(default)]
    pub channel: Channel,
    pub artifact: ArtifactRef,
    /// Directories inside the install to put on PATH (`bin`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bin: Vec<String>,
    /// Environment for processes using this runtime; `{install}` expands to the install dir.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Game {
    pub id: RuntimeId,
    pub variants: Vec<GameVariant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameVariant {
    pub id: RuntimeId,
    pub versions: Vec<GameVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameVersion {
    pub version: Version,
    #[serde(default)]
    pub channel: Channel,
    pub artifact: ArtifactRef,
    /// The runtime this server needs; `version` may be a prefix (`21`).
    pub runtime: RuntimeRequirement,
    /// How to start it; without it, a Minecraft-style `java -jar {install}/server.jar nogui`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<GameLaunch>,
}

/// How to start and stop a game server. In `command`, `{install}` is the server artifact's install
/// dir, `{server}` the server's data dir (its working dir), `{memory_mb}` the container's memory,
/// `{heap_mb}` three quarters of it (for a JVM's `-Xmx`), `{port}` the first game port, `{world}`
/// the world name. The program is looked up on the PATH, which holds the runtime's bin dirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameLaunch {
    pub command: Vec<String>,
    /// A console line that stops the server gracefully (`stop`); without it, SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_command: Option<String>,
    /// Output that marks the server ready (`Done (`); without it, ready once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_pattern: Option<String>,
    /// Where mods or plugins go, relative to the server dir (`mods`, `plugins`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mods_dir: Option<String>,
    /// A regex for the lines players can write (this game's chat), besides Minecraft's chat and
    /// command lines; such lines never decide a crash's classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_pattern: Option<String>,
}

impl GameLaunch {
    /// The Minecraft (Java edition) launch that a game entry without `launch` gets.
    pub fn minecraft_default() -> Self {
        Self {
            command: ["java", "-Xms{heap_mb}M", "-Xmx{heap_mb}M", "-jar", "{install}/server.jar", "nogui"]
                .map(String::from)
                .to_vec(),
            stop_command: Some("stop".into()),
            ready_pattern: Some("Done (".into()),
            mods_dir: Some("mods".into()),
            chat_pattern: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeRequirement {
    pub id: RuntimeId,
    pub version: String,
}

/// Where an artifact is and what it must hash to; sizes bound what extraction may write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    pub key: ArtifactKey,
    pub sha256: Digest,
    /// Size of the artifact itself in bytes.
    pub size: u64,
    pub format: ArchiveFormat,
    /// Total bytes of regular files once unpacked (for `file`, equal to `size`).
    pub unpacked_size: u64,
    /// Number of archive entries (for `file`, 1).
    pub entries: u64,
}

/// How an artifact is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArchiveFormat {
    #[serde(rename = "tar.zst")]
    TarZst,
    #[serde(rename = "tar.gz")]
    TarGz,
    /// A single file installed as-is under its key's file name (a server jar, a mod).
    #[serde(rename = "file")]
    File,
}

impl ArchiveFormat {
    /// Guesses the format from a file name.
    pub fn from_file_name(name: &str) -> Self {
        if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
            ArchiveFormat::TarZst
        } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            ArchiveFormat::TarGz
        } else {
            ArchiveFormat::File
        }
    }
}

/// Release channel. Ordered by stability: asking for `beta` accepts `beta` and `stable`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Dev,
    Beta,
    #[default]
    Stable,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Dev => "dev",
            Channel::Beta => "beta",
            Channel::Stable => "stable",
        })
    }
}

impl FromStr for Channel {
    type Err = CatalogError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dev" => Ok(Channel::Dev),
            "beta" => Ok(Channel::Beta),
            "stable" => Ok(Channel::Stable),
            _ => Err(CatalogError::Invalid(format!("unknown channel {s:?} (expected dev, beta or stable)"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is not valid JSON of schema {SCHEMA}: {0}")]
    Parse(String),
    #[error("catalog is invalid: {0}")]
    Invalid(String),
    #[error("catalog signature refused: {0}")]
    BadSignature(String),
    #[error("trusted key is not a minisign public key: {0}")]
    BadTrustedKey(String),
    #[error("catalog expired at {expires}")]
    Expired { expires: DateTime<Utc> },
    #[error("catalog serial {offered} is older than the accepted serial {accepted} (rollback refused)")]
    Rollback { offered: u64, accepted: u64 },
    #[error("catalog serial {serial} was already accepted with different content")]
    SerialReused { serial: u64 },
    #[error("no catalog has been accepted yet")]
    NoneAccepted,
    #[error("unknown {kind} {id:?}; available: {available}")]
    UnknownId { kind: ItemKind, id: String, available: String },
    #[error("no {channel} version of {id} matches {request:?}; available: {available}")]
    NoMatchingVersion { id: String, request: String, channel: Channel, available: String },
    /// The version asked for exists, but only on a less stable channel than the one resolved.
    #[error(
        "no {wanted} version of {id} matches; {id} {version} exists on channel {found}; promote it with \
         `zlh-agentd publish promote {}{id} {version} {wanted}`; available: {available}",
        kind.promote_flag()
    )]
    OnOtherChannel { kind: ItemKind, id: String, version: String, found: Channel, wanted: Channel, available: String },
    #[error("catalog store: {0}")]
    Store(#[from] crate::artifact::ArtifactError),
    #[error("catalog state {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
