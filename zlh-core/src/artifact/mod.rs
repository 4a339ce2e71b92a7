//! Artifact stores: where runtimes, addons, game servers, mods and the signed catalog live.
//!
//! The [`ArtifactStore`] trait is kept small for backend authors (head, ranged get, atomic put,
//! list, delete); conveniences built on it live in [`ArtifactStoreExt`]. Backends are picked from
//! a URL by [`from_url`]: `file:///srv/artifacts`, `http(s)://host/base` (read-only),
//! `s3://bucket?endpoint=…&region=…`, `r2://<account-id>/<bucket>`, `memory://`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::types::{ArtifactKey, InvalidValue};

mod ext;
mod http;
mod local;
mod memory;
mod s3;

pub use ext::ArtifactStoreExt;
pub use http::{HttpStore, HttpStoreBuilder};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use s3::{S3Store, S3StoreBuilder};

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

    /// The first byte asked for.
    pub fn start(self) -> u64 {
        match self {
            ByteRange::All => 0,
            ByteRange::From(start) | ByteRange::Bounded { start, .. } => start,
        }
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
    #[error("{store} unreachable for {key} after {attempts} attempts: {message}")]
    Unavailable { store: String, key: String, attempts: u32, message: String },
    /// The store accepted the request but did not answer within the retry budget (a hung
    /// server): retries included, so callers do not retry it again.
    #[error("{store} did not answer for {key} within {budget:?} (a hung or overloaded store)")]
    TimedOut { store: String, key: String, budget: Duration },
    #[error("bucket {bucket:?} does not exist ({store}); create it or fix the store URL")]
    NoSuchBucket { store: String, bucket: String },
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

    /// `range` cannot be served from an object of `size` bytes.
    pub fn invalid_range(key: &ArtifactKey, range: ByteRange, size: u64) -> Self {
        ArtifactError::InvalidRange { key: key.to_string(), start: range.start(), size }
    }
}

/// Time a network store allows to open a connection, unless its builder says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence a network store allows while reading an answer (there is no overall limit on
/// a body, so large artifacts stream for as long as they take).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a network store spends on one request until its answer starts, retries included.
/// Below half a minute so that a command making two requests to a hung store (the catalog, then
/// an artifact) still fails within one.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(25);

/// Runs one store request, retries included, within `budget`: a store that accepts connections
/// and then never answers fails in bounded time, with an error naming the key.
pub(crate) async fn within_budget<T>(
    store: &str,
    key: &str,
    budget: Duration,
    request: impl std::future::Future<Output = Result<T, ArtifactError>>,
) -> Result<T, ArtifactError> {
    tokio::time::timeout(budget, request)
        .await
        .unwrap_or_else(|_| Err(ArtifactError::TimedOut { store: store.to_owned(), key: key.to_owned(), budget }))
}

/// How often and how patiently a transient failure is retried: `attempts` tries in all, waiting
/// `base_delay`, then twice that, and so on between them. Waits use `tokio::time::sleep`, so tests
/// run them instantly with paused time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 3, base_delay: Duration::from_millis(200) }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
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

/// The error and its causes on one line (client libraries' own messages hide the interesting part).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Opens the store a URL names:
///
/// | URL | store |
/// | --- | --- |
/// | `file:///srv/artifacts` or `/srv/artifacts` | [`LocalStore`] |
/// | `http(s)://host/base` | [`HttpStore`] (read-only) |
/// | `s3://bucket?endpoint=…&region=…&prefix=…` | [`S3Store`] (an `http://` endpoint is fine) |
/// | `r2://<account-id>/<bucket>` | [`S3Store`] on Cloudflare R2 |
/// | `memory://` | [`MemoryStore`] (empty) |
///
/// S3 and R2 credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
/// `AWS_SESSION_TOKEN`); use [`S3StoreBuilder`] to pass them explicitly.
pub fn from_url(url: &str) -> Result<DynStore, ArtifactError> {
    let invalid = |reason: &str| ArtifactError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
    if url.starts_with('/') {
        return Ok(Arc::new(LocalStore::new(url)?));
    }
    let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            // The URL parser would quietly turn `file:rel` into `/rel`: insist on the written form.
            if !(url.starts_with("file:///") || url.starts_with("file://localhost/")) {
                return Err(invalid("file URLs name a local absolute path (file:///srv/artifacts)"));
            }
            let path = parsed.to_file_path().map_err(|_| invalid("not an absolute local path"))?;
            Ok(Arc::new(LocalStore::new(path)?))
        }
        "http" | "https" => Ok(Arc::new(HttpStore::builder(url)?.build()?)),
        "s3" | "r2" => Ok(Arc::new(S3StoreBuilder::from_url(url)?.build()?)),
        "memory" => Ok(Arc::new(MemoryStore::new())),
        other => Err(invalid(&format!("unknown scheme {other:?} (expected file, http, https, s3, r2 or memory)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(url: &str) -> String {
        match from_url(url) {
            Err(ArtifactError::InvalidUrl { reason, .. }) => reason,
            Err(other) => panic!("{url}: expected InvalidUrl, got {other:?}"),
            Ok(store) => panic!("{url}: accepted as {}", store.describe()),
        }
    }

    #[test]
    fn file_urls_and_absolute_paths_open_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let sub = root.join("artifacts");
        let by_url = from_url(&format!("file://{}", sub.display())).unwrap();
        assert_eq!(by_url.describe(), format!("file://{}", sub.display()));
        assert!(sub.is_dir(), "the root is created");
        assert_eq!(from_url(sub.to_str().unwrap()).unwrap().describe(), by_url.describe());
        assert_eq!(from_url(&format!("file://localhost{}", sub.display())).unwrap().describe(), by_url.describe());
    }

    #[test]
    fn relative_and_remote_file_urls_are_refused() {
        invalid("file://relative/dir");
        invalid("file:relative/dir");
        invalid("relative/dir");
        invalid("");
    }

    #[test]
    fn http_urls_open_a_read_only_store() {
        assert_eq!(
            from_url("https://artifacts.example.com/base").unwrap().describe(),
            "https://artifacts.example.com/base/"
        );
        assert_eq!(from_url("http://127.0.0.1:8080").unwrap().describe(), "http://127.0.0.1:8080/");
        invalid("http://");
        invalid("https://example.com/base?x=1");
    }

    #[test]
    fn s3_and_r2_urls_open_s3_stores() {
        let s3 = from_url("s3://zlh-artifacts?endpoint=http://127.0.0.1:9000&region=us-east-1").unwrap();
        assert_eq!(s3.describe(), "s3://zlh-artifacts");
        assert_eq!(from_url("s3://bucket?prefix=team/a").unwrap().describe(), "s3://bucket/team/a");
        assert_eq!(from_url("s3://bucket/team/a").unwrap().describe(), "s3://bucket/team/a");
        assert_eq!(from_url("r2://0123abcd/artifacts").unwrap().describe(), "r2://0123abcd/artifacts");
        assert!(invalid("s3://").contains("bucket"));
        assert!(invalid("s3:///only/path").contains("bucket"));
        assert!(invalid("r2://0123abcd").contains("bucket"));
        assert!(invalid("s3://bucket?regoin=x").contains("regoin"));
        invalid("s3://bucket?allow_http=maybe");
    }

    #[test]
    fn credentials_in_s3_urls_are_refused_without_echoing_them() {
        let err = from_url("s3://AKIA:topsecret@bucket").err().unwrap();
        assert!(matches!(err, ArtifactError::InvalidUrl { .. }));
        assert!(!format!("{err} {err:?}").contains("topsecret"));
    }

    #[test]
    fn memory_and_unknown_schemes() {
        assert_eq!(from_url("memory://").unwrap().describe(), "memory://");
        assert!(invalid("ftp://host/x").contains("unknown scheme"));
        invalid("not a url");
    }

    #[test]
    fn retry_delays_double() {
        let p = RetryPolicy { attempts: 4, base_delay: Duration::from_millis(200) };
        assert_eq!([p.delay(1), p.delay(2), p.delay(3)], [200, 400, 800].map(Duration::from_millis));
    }
}
