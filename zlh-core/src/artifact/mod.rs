//! Artifact stores: where runtimes, addons, game servers, mods and the signed catalog live.
//!
//! The [`ArtifactStore`] trait is kept small for backend authors (head, ranged get, atomic put,
//! list, delete); conveniences built on it live in [`ArtifactStoreExt`]. Backends are picked from
//! a URL by [`from_url`]: `file:///srv/artifacts`, `http(s)://host/base` (read-only),
//! `s3://bucket?endpoint=…&region=…`, `r2://<account-id>/<bucket>`, `memory://`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::types::{ArtifactKey, InvalidValue};

mod ext;
mod memory;

pub use ext::ArtifactStoreExt;
pub use memory::MemoryStore;

/// A stream of object bytes, in order.
pub type ByteStream = BoxStream<'static, Result<Bytes, ArtifactError>>;

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: ArtifactKey,
    pub size: u64,
    pub last_modified: Option<DateTime<Utc>>,
    /// Opaque version tag where the backend has one (S3 ETag, file mtime+size).
    pub etag: Option<String>,
}

/// Which bytes of an object to read. `From(n)` resumes an interrupted download at byte `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    All,
    From(u64),
    /// `start..end`, end exclusive.
    Bounded {
        start: u64,
        end: u64,
    },
}

impl ByteRange {
    /// The concrete `start..end` of this range within an object of `size` bytes, or `None`
    /// when it is not satisfiable (start beyond the end, or an empty or inverted range).
    pub fn resolve(self, size: u64) -> Option<std::ops::Range<u64>> {
        let (start, end) = match self {
            ByteRange::All => return Some(0..size),
            ByteRange::From(start) => (start, size),
            ByteRange::Bounded { start, end } => (start, end.min(size)),
        };
        (start < end || (start == size && end == size && matches!(self, ByteRange::From(_)))).then_some(start..end)
    }
}

/// An object being read: its metadata, the byte range actually served, and the bytes.
pub struct GetResult {
    pub meta: ObjectMeta,
    pub range: std::ops::Range<u64>,
    pub stream: ByteStream,
}

impl fmt::Debug for GetResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResult").field("meta", &self.meta).field("range", &self.range).finish_non_exhaustive()
    }
}

/// Errors from any store. `store` names the backend and location (never credentials).
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    InvalidKey(#[from] InvalidValue),
    #[error("invalid artifact store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("artifact {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("access to {key} denied by {store} (check credentials and permissions)")]
    Forbidden { store: String, key: String },
    #[error("range {start}.. of {key} is not satisfiable (size {size})")]
    InvalidRange { key: String, start: u64, size: u64 },
    #[error("{store} is read-only: {op} is not supported")]
    ReadOnly { store: String, op: &'static str },
    #[error("{store} does not support {op}")]
    Unsupported { store: String, op: &'static str },
    #[error("{store} unreachable after {attempts} attempts: {message}")]
    Unavailable { store: String, attempts: u32, message: String },
    #[error("I/O error in {store} for {key}: {source}")]
    Io {
        store: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{store}: {message}")]
    Backend { store: String, message: String },
}

impl ArtifactError {
    /// True for errors worth retrying (timeouts, 5xx, dropped connections).
    pub fn is_transient(&self) -> bool {
        matches!(self, ArtifactError::Unavailable { .. })
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, ArtifactError::NotFound { .. })
    }
}

/// A store of artifacts addressed by [`ArtifactKey`].
///
/// Contract every backend keeps (checked by one shared test suite):
/// - `put` is atomic: readers see the old object or the complete new one, never a part.
/// - `get` with [`ByteRange::From`] resumes a download; the served range is reported.
/// - `list` returns objects whose key lies under `prefix` (all objects for `""`), sorted by key.
/// - `delete` of a missing key is `NotFound`.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Human-readable location for errors and logs, without credentials.
    fn describe(&self) -> String;
    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError>;
    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError>;
    async fn put(&self, key: &ArtifactKey, body: ByteStream) -> Result<ObjectMeta, ArtifactError>;
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError>;
    async fn delete(&self, key: &ArtifactKey) -> Result<(), ArtifactError>;
}

/// Shared handle to a store.
pub type DynStore = Arc<dyn ArtifactStore>;
