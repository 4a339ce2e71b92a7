//! `http(s)://host/base`: the platform's original artifact server, plain static files (nginx).
//!
//! Read-only: such servers have no upload, delete or listing API, so `put`/`delete` are
//! [`ArtifactError::ReadOnly`] and `list` is [`ArtifactError::Unsupported`]. Reads use `HEAD` and
//! `GET` with a `Range` header. Servers may ignore `Range` and answer `200` with the whole file;
//! the unwanted head of the body is then skipped here. 5xx answers, connection failures and
//! timeouts are retried with exponential backoff before giving up with
//! [`ArtifactError::Unavailable`]; all of it within a retry budget, so a server that accepts
//! connections and never answers ends in [`ArtifactError::TimedOut`].

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{future, StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::{
    error_chain, within_budget, ArtifactError, ArtifactStore, ByteRange, ByteStream, GetResult, ObjectMeta, RetryPolicy,
};
use crate::types::ArtifactKey;

/// Configures an [`HttpStore`].
#[derive(Debug, Clone)]
pub struct HttpStoreBuilder {
    base: Url,
    connect_timeout: Duration,
    read_timeout: Duration,
    retry: RetryPolicy,
    retry_budget: Duration,
}

impl HttpStoreBuilder {
    /// Time allowed to open a connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed between two reads of a response (default 20 s).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Retries of 5xx answers, connection failures and timeouts (default 3 attempts, 200 ms base).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Longest one request may take until its answer starts, retries included (default 25 s).
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    pub fn build(self) -> Result<HttpStore, ArtifactError> {
        let client = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout)
            .user_agent(concat!("zlh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ArtifactError::Backend { store: redact(self.base.as_str()), message: e.to_string() })?;
        Ok(HttpStore {
            describe: redact(self.base.as_str()),
            base: self.base,
            client,
            retry: self.retry,
            retry_budget: self.retry_budget,
        })
    }
}

/// A read-only store over a static file server.
#[derive(Debug, Clone)]
pub struct HttpStore {
    base: Url,
    /// `base` without credentials, for errors and logs.
    describe: String,
    client: reqwest::Client,
    retry: RetryPolicy,
    retry_budget: Duration,
}

impl HttpStore {
    /// A builder for the store at `url` (`http(s)://host/base`).
    pub fn builder(url: &str) -> Result<HttpStoreBuilder, ArtifactError> {
        let invalid = |reason: &str| ArtifactError::InvalidUrl { url: redact(url), reason: reason.to_owned() };
        let mut base = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none_or(str::is_empty) {
            return Err(invalid("expected http(s)://host/base"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("a query or fragment has no meaning here"));
        }
        // Keys are appended as path segments: make the base end in a directory.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(HttpStoreBuilder {
            base,
            connect_timeout: super::DEFAULT_CONNECT_TIMEOUT,
            read_timeout: super::DEFAULT_READ_TIMEOUT,
            retry: RetryPolicy::default(),
            retry_budget: super::DEFAULT_RETRY_BUDGET,
        })
    }

    fn url(&self, key: &ArtifactKey) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http URLs have a path").pop_if_empty().extend(key.as_str().split('/'));
        url
    }

    /// Sends a request, retrying transient failures; any answer that is not transient is returned
    /// as is (error statuses included) for the caller to interpret.
    async fn send(&self, method: Method, key: &ArtifactKey, range: ByteRange) -> Result<Response, ArtifactError> {
        within_budget(&self.describe, key.as_str(), self.retry_budget, self.send_with_retries(method, key, range)).await
    }

    async fn send_with_retries(
        &self,
        method: Method,
        key: &ArtifactKey,
        range: ByteRange,
    ) -> Result<Response, ArtifactError> {
        let url = self.url(key);
        let mut last = String::new();
        for attempt in 1..=self.retry.attempts.max(1) {
            if attempt > 1 {
                tokio::time::sleep(self.retry.delay(attempt - 1)).await;
            }
            let mut request = self.client.request(method.clone(), url.clone());
            if let Some(value) = range_header(range) {
                request = request.header(RANGE, value);
            }
            last = match request.send().await {
                Ok(resp) if !is_transient_status(resp.status()) => return Ok(resp),
                Ok(resp) => format!("HTTP {}", resp.status()),
                // Without the URL: it may carry credentials.
                Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => error_chain(&e.without_url()),
                Err(e) => return Err(self.backend(error_chain(&e.without_url()))),
            };
            if attempt < self.retry.attempts {
                tracing::warn!(store = %self.describe, %key, attempt, error = %last, "artifact request failed, will retry");
            }
        }
        Err(ArtifactError::Unavailable {
            store: self.describe.clone(),
            key: key.to_string(),
            attempts: self.retry.attempts.max(1),
            message: last,
        })
    }

    fn backend(&self, message: String) -> ArtifactError {
        ArtifactError::Backend { store: self.describe.clone(), message }
    }

    /// The one place HTTP statuses become errors.
    fn status_error(
        &self,
        key: &ArtifactKey,
        status: StatusCode,
        range: ByteRange,
        headers: &HeaderMap,
    ) -> ArtifactError {
        let (store, key_s) = (self.describe.clone(), key.to_string());
        match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => ArtifactError::NotFound { store, key: key_s },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ArtifactError::Forbidden { store, key: key_s },
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let size = content_range(headers).map(|r| r.total).unwrap_or(0);
                ArtifactError::invalid_range(key, range, size)
            }
            s if is_transient_status(s) => {
                ArtifactError::Unavailable { store, key: key_s, attempts: 1, message: format!("HTTP {s}") }
            }
            s => ArtifactError::Backend { store, message: format!("unexpected HTTP {s} for {key}") },
        }
    }

    /// Size and version of the object from the headers of an answer.
    fn meta(&self, key: &ArtifactKey, headers: &HeaderMap, size: u64) -> ObjectMeta {
        let header = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
        ObjectMeta {
            key: key.clone(),
            size,
            last_modified: header(LAST_MODIFIED)
                .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
                .map(|t| t.with_timezone(&chrono::Utc)),
            etag: header(ETAG).map(str::to_owned),
        }
    }

    fn body(&self, key: &ArtifactKey, resp: Response) -> ByteStream {
        let (store, key) = (self.describe.clone(), key.to_string());
        // A body cut short is worth resuming: report it as transient.
        resp.bytes_stream()
            .map_err(move |e| ArtifactError::Unavailable {
                store: store.clone(),
                key: key.clone(),
                attempts: 1,
                message: error_chain(&e),
            })
            .boxed()
    }
}

#[async_trait]
impl ArtifactStore for HttpStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError> {
        let resp = self.send(Method::HEAD, key, ByteRange::All).await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(key, resp.status(), ByteRange::All, resp.headers()));
        }
        let size = content_length(resp.headers())
            .ok_or_else(|| self.backend(format!("HEAD {key}: the server sent no Content-Length")))?;
        Ok(self.meta(key, resp.headers(), size))
    }

    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError> {
        let resp = self.send(Method::GET, key, range).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let served = content_range(resp.headers())
                    .ok_or_else(|| self.backend(format!("GET {key}: 206 without a valid Content-Range")))?;
                let wanted = range.resolve(served.total);
                if wanted.as_ref() != Some(&(served.start..served.end)) {
                    return Err(self.backend(format!(
                        "GET {key}: asked for {range:?}, the server sent {}..{} of {}",
                        served.start, served.end, served.total
                    )));
                }
                let meta = self.meta(key, resp.headers(), served.total);
                Ok(GetResult { meta, range: served.start..served.end, stream: self.body(key, resp) })
            }
            StatusCode::OK => {
                // The whole file: fine for `All`, otherwise the server ignored `Range`.
                let size = content_length(resp.headers())
                    .ok_or_else(|| self.backend(format!("GET {key}: the server sent no Content-Length")))?;
                let served = range.resolve(size).ok_or_else(|| ArtifactError::invalid_range(key, range, size))?;
                let meta = self.meta(key, resp.headers(), size);
                let stream = slice_stream(self.body(key, resp), served.start, served.end - served.start);
                Ok(GetResult { meta, range: served, stream })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // Servers refuse `bytes=N-` at the very end, which this API allows as an empty read.
                if let Some(size) = content_range(resp.headers()).map(|r| r.total) {
                    if let Some(served) = range.resolve(size).filter(|r| r.is_empty()) {
                        let meta = self.meta(key, resp.headers(), size);
                        return Ok(GetResult { meta, range: served, stream: futures::stream::empty().boxed() });
                    }
                }
                Err(self.status_error(key, resp.status(), range, resp.headers()))
            }
            status => Err(self.status_error(key, status, range, resp.headers())),
        }
    }

    async fn put(&self, _key: &ArtifactKey, _body: ByteStream) -> Result<ObjectMeta, ArtifactError> {
        Err(ArtifactError::ReadOnly { store: self.describe.clone(), op: "put" })
    }

    async fn list(&self, _prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError> {
        Err(ArtifactError::Unsupported { store: self.describe.clone(), op: "list" })
    }

    async fn delete(&self, _key: &ArtifactKey) -> Result<(), ArtifactError> {
        Err(ArtifactError::ReadOnly { store: self.describe.clone(), op: "delete" })
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

fn range_header(range: ByteRange) -> Option<String> {
    match range {
        ByteRange::All => None,
        ByteRange::From(start) => Some(format!("bytes={start}-")),
        // HTTP ranges are inclusive; an empty or inverted range is sent as is for the server to refuse.
        ByteRange::Bounded { start, end } => Some(format!("bytes={start}-{}", end.saturating_sub(1))),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A parsed `Content-Range: bytes a-b/total` (`end` exclusive); `bytes */total` gives an empty range.
struct ContentRange {
    start: u64,
    end: u64,
    total: u64,
}

fn content_range(headers: &HeaderMap) -> Option<ContentRange> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?.strip_prefix("bytes ")?;
    let (span, total) = value.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if span.trim() == "*" {
        return Some(ContentRange { start: total, end: total, total });
    }
    let (a, b) = span.split_once('-')?;
    let (start, last): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (start <= last && last < total).then_some(ContentRange { start, end: last + 1, total })
}

/// `len` bytes of `stream` after skipping `skip`.
fn slice_stream(stream: ByteStream, skip: u64, len: u64) -> ByteStream {
    stream
        .scan((skip, len), |(skip, left), chunk| {
            if *skip == 0 && *left == 0 {
                return future::ready(None); // done: do not download the rest
            }
            let out = chunk.map(|mut bytes: Bytes| {
                let drop_n = (*skip).min(bytes.len() as u64) as usize;
                *skip -= drop_n as u64;
                let _ = bytes.split_to(drop_n);
                bytes.truncate((*left).min(bytes.len() as u64) as usize);
                *left -= bytes.len() as u64;
                bytes
            });
            future::ready(Some(out))
        })
        .try_filter(|b| future::ready(!b.is_empty()))
        .boxed()
}

/// `url` without user info, for errors.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}
