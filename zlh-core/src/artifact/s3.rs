//! `s3://bucket?endpoint=…` and `r2://<account-id>/<bucket>`: S3-compatible object storage.
//!
//! Requests, SigV4 signing and retries are the `object_store` crate's; this file maps our small
//! trait onto it. Choices that matter:
//! - `put` of a small body is one `PUT`; a larger one is a multipart upload whose parts all have
//!   the same size but the last (Cloudflare R2 requires that). On error the upload is aborted, so
//!   nothing becomes visible; a `put` future dropped mid-way aborts it too, in the background.
//! - No S3 checksum headers are sent (R2 does not honour them all): integrity is checked end to
//!   end against the catalog's sha256.
//! - Credentials never appear in `describe()`, errors or logs.
//! - An `http://` endpoint is used as written (local MinIO and the like): naming it is consent.
//! - Every request ends within the retry budget ([`S3StoreBuilder::retry_budget`]) until its
//!   answer starts; a body then only has the read timeout between two reads.
//! - A missing bucket is [`ArtifactError::NoSuchBucket`], not a missing object of it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::aws::AmazonS3Builder;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use url::Url;

use super::{
    error_chain, within_budget, ArtifactError, ArtifactStore, ByteRange, ByteStream, GetResult, ObjectMeta, RetryPolicy,
};
use crate::types::ArtifactKey;

/// The smallest multipart part S3 accepts (all parts but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// A credential that prints as `***`.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Configures an [`S3Store`]; start from [`S3StoreBuilder::new`] or [`S3StoreBuilder::from_url`].
#[derive(Debug, Clone)]
pub struct S3StoreBuilder {
    /// How the store is named in errors: `s3://bucket/prefix` or `r2://account/bucket/prefix`.
    name: String,
    bucket: String,
    prefix: Option<String>,
    endpoint: Option<String>,
    region: String,
    access_key_id: Option<Secret>,
    secret_access_key: Option<Secret>,
    session_token: Option<Secret>,
    part_size: usize,
    max_concurrent_parts: usize,
    retry: RetryPolicy,
    connect_timeout: Duration,
    read_timeout: Duration,
    retry_budget: Duration,
}

impl S3StoreBuilder {
    /// A store for `bucket` on AWS S3 (change the endpoint for other providers). Credentials
    /// default to `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`.
    pub fn new(bucket: impl Into<String>) -> Self {
        let bucket = bucket.into();
        let env = |name| std::env::var(name).ok().filter(|v| !v.is_empty()).map(Secret);
        Self {
            name: format!("s3://{bucket}"),
            bucket,
            prefix: None,
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: env("AWS_SESSION_TOKEN"),
            part_size: 8 * 1024 * 1024,
            max_concurrent_parts: 4,
            retry: RetryPolicy::default(),
            connect_timeout: super::DEFAULT_CONNECT_TIMEOUT,
            read_timeout: super::DEFAULT_READ_TIMEOUT,
            retry_budget: super::DEFAULT_RETRY_BUDGET,
        }
    }

    /// Parses `s3://bucket[/prefix][?endpoint=…&region=…&prefix=…]` or
    /// `r2://<account-id>/<bucket>[/prefix][?prefix=…]`. `allow_http=true|false` is still accepted
    /// from older URLs and has no effect: the endpoint's scheme decides.
    pub fn from_url(url: &str) -> Result<Self, ArtifactError> {
        let invalid = |reason: &str| ArtifactError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        let parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Refuse rather than echo: credentials come from the environment or the builder.
            return Err(ArtifactError::InvalidUrl {
                url: "<redacted>".into(),
                reason: "credentials do not belong in the URL; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY".into(),
            });
        }
        let host = parsed.host_str().unwrap_or_default();
        let mut segments: Vec<&str> = parsed.path().split('/').filter(|s| !s.is_empty()).collect();
        let mut builder = match parsed.scheme() {
            "s3" => {
                if host.is_empty() {
                    return Err(invalid("missing bucket: expected s3://bucket"));
                }
                Self::new(host)
            }
            "r2" => {
                if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(invalid("expected r2://<account-id>/<bucket>"));
                }
                if segments.is_empty() {
                    return Err(invalid("missing bucket: expected r2://<account-id>/<bucket>"));
                }
                let bucket = segments.remove(0);
                let mut b =
                    Self::new(bucket).endpoint(format!("https://{host}.r2.cloudflarestorage.com")).region("auto");
                b.name = format!("r2://{host}/{bucket}");
                b
            }
            _ => return Err(invalid("expected s3:// or r2://")),
        };
        if !segments.is_empty() {
            builder = builder.prefix(segments.join("/"));
        }
        for (name, value) in parsed.query_pairs() {
            match &*name {
                "endpoint" => builder = builder.endpoint(value.into_owned()),
                "region" => builder = builder.region(value.into_owned()),
                "allow_http" => {
                    value.parse::<bool>().map_err(|_| invalid("allow_http must be true or false"))?;
                }
                "prefix" => builder = builder.prefix(value.into_owned()),
                other => {
                    return Err(invalid(&format!("unknown parameter {other:?} (endpoint, region, allow_http, prefix)")))
                }
            }
        }
        Ok(builder)
    }

    /// Key prefix inside the bucket (`team/artifacts`): keys are stored as `<prefix>/<key>`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into().trim_matches('/').to_owned();
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// The service URL, for S3-compatible servers (`http://127.0.0.1:9000`; plain HTTP is used
    /// when the URL says so).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// Credentials to use instead of the environment's.
    pub fn credentials(mut self, access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        self.access_key_id = Some(Secret(access_key_id.into()));
        self.secret_access_key = Some(Secret(secret_access_key.into()));
        self.session_token = None;
        self
    }

    pub fn session_token(mut self, token: impl Into<String>) -> Self {
        self.session_token = Some(Secret(token.into()));
        self
    }

    /// Size of every multipart part but the last (default 8 MiB, at least 5 MiB). Bodies up to
    /// this size are sent with a single `PUT`.
    pub fn part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Parts uploaded at once (default 4).
    pub fn max_concurrent_parts(mut self, n: usize) -> Self {
        self.max_concurrent_parts = n.max(1);
        self
    }

    /// Retries of 5xx answers and timeouts (default 3 attempts, 200 ms base, doubling).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest silence while reading an answer (default 30 s). There is no overall limit, so
    /// large objects can stream for as long as they take.
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Longest one request may take until its answer starts, retries included (default 25 s):
    /// a store that accepts connections and never answers fails with
    /// [`ArtifactError::TimedOut`] naming the key.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    pub fn build(self) -> Result<S3Store, ArtifactError> {
        let name = match &self.prefix {
            Some(p) => format!("{}/{p}", self.name),
            None => self.name.clone(),
        };
        let fail = |message: String| ArtifactError::Backend { store: name.clone(), message };
        if self.part_size < MIN_PART_SIZE {
            return Err(fail(format!("part size {} is below the S3 minimum of {MIN_PART_SIZE}", self.part_size)));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.retry.base_delay,
                max_backoff: self.retry.delay(self.retry.attempts.max(1)),
                base: 2.0,
            },
            max_retries: self.retry.attempts.saturating_sub(1) as usize,
            retry_timeout: self.retry_budget,
        };
        // Client options carry `allow_http` too: set it there, or it is overwritten.
        let http = self.endpoint.as_deref().is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"));
        let client = ClientOptions::new()
            .with_allow_http(http)
            .with_connect_timeout(self.connect_timeout)
            .with_read_timeout(self.read_timeout)
            .with_timeout_disabled();
        let mut s3 = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(endpoint) = &self.endpoint {
            s3 = s3.with_endpoint(endpoint);
        }
        if let Some(Secret(id)) = &self.access_key_id {
            s3 = s3.with_access_key_id(id);
        }
        if let Some(Secret(secret)) = &self.secret_access_key {
            s3 = s3.with_secret_access_key(secret);
        }
        if let Some(Secret(token)) = &self.session_token {
            s3 = s3.with_token(token);
        }
        if let Some(p) = &self.prefix {
            Path::parse(p).map_err(|e| fail(format!("invalid prefix: {e}")))?;
        }
        // object_store errors name the setting, never its value.
        let s3 = s3.build().map_err(|e| fail(e.to_string()))?;
        Ok(S3Store {
            inner: Arc::new(s3),
            bucket: self.bucket,
            retry_budget: self.retry_budget,
            prefix: self.prefix.map(|p| format!("{p}/")).unwrap_or_default(),
            name,
            part_size: self.part_size,
            max_concurrent_parts: self.max_concurrent_parts,
            attempts: self.retry.attempts.max(1),
        })
    }
}

/// A store in an S3 bucket (AWS, Cloudflare R2, MinIO…).
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<AmazonS3>,
    bucket: String,
    /// Bound of every request until its answer starts.
    retry_budget: Duration,
    /// Prepended to every key: empty, or the builder's prefix and a `/`.
    prefix: String,
    name: String,
    part_size: usize,
    max_concurrent_parts: usize,
    /// Tries per request, for error reports (object_store does the retrying).
    attempts: u32,
}

/// Shows the location only: the client inside holds the credentials.
impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("name", &self.name).field("part_size", &self.part_size).finish_non_exhaustive()
    }
}

impl S3Store {
    pub fn builder(bucket: impl Into<String>) -> S3StoreBuilder {
        S3StoreBuilder::new(bucket)
    }

    fn path(&self, key: &ArtifactKey) -> Path {
        // Keys (and the prefix, checked by the builder) are valid object_store paths as they are:
        // no empty, `.` or `..` segments, no control characters.
        Path::parse(format!("{}{key}", self.prefix)).expect("artifact keys are valid object paths")
    }

    /// The one place object_store errors become ours. Some of its errors (listing, multipart)
    /// only carry the HTTP status in their message, so that is read too.
    fn error(&self, key: &str, e: object_store::Error) -> ArtifactError {
        let (store, key) = (self.name.clone(), key.to_owned());
        let message = error_chain(&e);
        // S3 names a missing bucket in the body of its answer (HEAD answers have none: see
        // [`Self::not_found`]).
        if message.contains("<Code>NoSuchBucket</Code>") {
            return ArtifactError::NoSuchBucket { store, bucket: self.bucket.clone() };
        }
        match e {
            object_store::Error::NotFound { .. } => return ArtifactError::NotFound { store, key },
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                return ArtifactError::Forbidden { store, key }
            }
            _ => {}
        }
        let attempts = self.attempts;
        match status_in(&message) {
            Some(401 | 403) => ArtifactError::Forbidden { store, key },
            Some(404) => ArtifactError::NotFound { store, key },
            // What is left after object_store's own retries: 5xx, timeouts, dropped connections.
            Some(500..=599) => ArtifactError::Unavailable { store, key, attempts, message },
            None if is_connection_failure(&message) => ArtifactError::Unavailable { store, key, attempts, message },
            _ => ArtifactError::Backend { store, message },
        }
    }

    /// One request, retries included, within the retry budget.
    async fn bounded<T>(
        &self,
        key: &str,
        request: impl std::future::Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, ArtifactError> {
        within_budget(&self.name, key, self.retry_budget, async { request.await.map_err(|e| self.error(key, e)) }).await
    }

    /// `e`, unless it says `key` is not found while in truth the bucket is missing: HEAD answers
    /// have no body to say so, and some servers answer a GET in a missing bucket with NoSuchKey.
    /// A one-key listing always names a missing bucket; it is only asked on a miss.
    async fn not_found(&self, key: &ArtifactKey, e: ArtifactError) -> ArtifactError {
        if !e.is_not_found() {
            return e;
        }
        let path = self.path(key);
        let opts = PaginatedListOptions { max_keys: Some(1), ..Default::default() };
        match self.bounded(key.as_str(), self.inner.list_paginated(Some(path.as_ref()), opts)).await {
            Err(bucket @ ArtifactError::NoSuchBucket { .. }) => bucket,
            _ => e,
        }
    }

    fn meta(key: ArtifactKey, m: &object_store::ObjectMeta) -> ObjectMeta {
        ObjectMeta { key, size: m.size, last_modified: Some(m.last_modified), etag: m.e_tag.clone() }
    }

    /// Sends `first` and the rest of `body` as a multipart upload of equal parts. Aborted on
    /// error, and also when the caller drops the put half-way ([`AbortOnDrop`]).
    async fn put_multipart(&self, path: &Path, first: Vec<Bytes>, mut body: ByteStream) -> Result<(), ArtifactError> {
        let key = path.as_ref();
        let upload = self.bounded(key, self.inner.put_multipart(path)).await?;
        let mut guard = AbortOnDrop {
            writer: Some(WriteMultipart::new_with_chunk_size(upload, self.part_size)),
            store: self.name.clone(),
            key: key.to_owned(),
        };
        let writer = guard.writer.as_mut().expect("set above");
        let fed: Result<(), ArtifactError> = async {
            for chunk in first {
                writer.put(chunk);
            }
            while let Some(chunk) = body.next().await {
                writer.wait_for_capacity(self.max_concurrent_parts).await.map_err(|e| self.error(key, e))?;
                writer.put(chunk?);
            }
            Ok(())
        }
        .await;
        let writer = guard.writer.take().expect("set above");
        match fed {
            Ok(()) => writer.finish().await.map(drop).map_err(|e| self.error(key, e)),
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(store = %self.name, key, error = %abort, "could not abort multipart upload");
                }
                Err(e)
            }
        }
    }
}

/// Aborts a multipart upload whose put was dropped before it finished (the caller gave up or
/// timed out): its parts would otherwise stay in the bucket, unseen and billed, until a
/// lifecycle rule removed them. The abort runs on the runtime the put ran on.
struct AbortOnDrop {
    writer: Option<WriteMultipart>,
    store: String,
    key: String,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else { return };
        let (store, key) = (std::mem::take(&mut self.store), std::mem::take(&mut self.key));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    match writer.abort().await {
                        Ok(()) => tracing::info!(%store, %key, "abandoned multipart upload aborted"),
                        Err(e) => {
                            tracing::warn!(%store, %key, error = %e, "could not abort an abandoned multipart upload")
                        }
                    }
                });
            }
            Err(_) => tracing::warn!(%store, %key, "multipart upload abandoned outside a runtime; not aborted"),
        }
    }
}

/// The HTTP status in an object_store error message ("… status code: 403 Forbidden …").
fn status_in(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

fn is_connection_failure(message: &str) -> bool {
    ["timed out", "error sending request", "connection", "Connect"].iter().any(|m| message.contains(m))
}

#[async_trait]
impl ArtifactStore for S3Store {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError> {
        match self.bounded(key.as_str(), self.inner.head(&self.path(key))).await {
            Ok(m) => Ok(Self::meta(key.clone(), &m)),
            Err(e) => Err(self.not_found(key, e).await),
        }
    }

    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError> {
        let wanted = match range {
            ByteRange::All => None,
            ByteRange::From(start) => Some(GetRange::Offset(start)),
            ByteRange::Bounded { start, end } => Some(GetRange::Bounded(start..end)),
        };
        let path = self.path(key);
        let got = within_budget(&self.name, key.as_str(), self.retry_budget, async {
            Ok(self.inner.get_opts(&path, GetOptions::new().with_range(wanted)).await)
        })
        .await?;
        let got = match got {
            Ok(got) => got,
            Err(
                e @ (object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => return Err(self.not_found(key, self.error(key.as_str(), e)).await),
            Err(e) if range != ByteRange::All => {
                // S3 refuses ranges it cannot serve (416) and `bytes=N-` at the very end, which
                // this API allows as an empty read: find out which it was from the size.
                let meta = self.head(key).await?;
                return match range.resolve(meta.size) {
                    None => Err(ArtifactError::invalid_range(key, range, meta.size)),
                    Some(served) if served.is_empty() => {
                        Ok(GetResult { meta, range: served, stream: stream::empty().boxed() })
                    }
                    Some(_) => Err(self.error(key.as_str(), e)),
                };
            }
            Err(e) => return Err(self.error(key.as_str(), e)),
        };
        let meta = Self::meta(key.clone(), &got.meta);
        let served = got.range.clone();
        let (store, key_s) = (self.name.clone(), key.to_string());
        let stream = got
            .into_stream()
            .map_err(move |e| {
                // A body that breaks off mid-way is worth resuming.
                ArtifactError::Unavailable {
                    store: store.clone(),
                    key: key_s.clone(),
                    attempts: 1,
                    message: e.to_string(),
                }
            })
            .boxed();
        Ok(GetResult { meta, range: served, stream })
    }

    async fn put(&self, key: &ArtifactKey, mut body: ByteStream) -> Result<ObjectMeta, ArtifactError> {
        let path = self.path(key);
        // Buffer up to one part: a body that fits goes in a single PUT.
        let mut first = Vec::new();
        let mut buffered = 0usize;
        while buffered <= self.part_size {
            match body.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    buffered += chunk.len();
                    first.push(chunk);
                }
                None => break,
            }
        }
        if buffered <= self.part_size {
            let payload: PutPayload = first.into_iter().collect();
            self.bounded(key.as_str(), self.inner.put(&path, payload)).await?;
        } else {
            self.put_multipart(&path, first, body).await?;
        }
        self.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError> {
        // S3 prefixes are plain strings: ask for `<prefix>` and keep the whole-segment matches
        // (`java` lists `java` and `java/…`, not `javascript/…`).
        let raw = format!("{}{}", self.prefix, prefix.trim_end_matches('/'));
        let mut found = Vec::new();
        let mut page_token = None;
        loop {
            let opts = PaginatedListOptions { page_token, ..Default::default() };
            let page = self
                .bounded(prefix, self.inner.list_paginated((!raw.is_empty()).then_some(raw.as_str()), opts))
                .await?;
            for m in &page.result.objects {
                let Some(key) = m.location.as_ref().strip_prefix(&self.prefix) else { continue };
                if let Ok(key) = ArtifactKey::parse(key) {
                    if key.starts_with(prefix) {
                        found.push(Self::meta(key, m));
                    }
                }
            }
            page_token = page.page_token;
            if page_token.is_none() {
                break;
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn delete(&self, key: &ArtifactKey) -> Result<(), ArtifactError> {
        // S3 deletes are idempotent; the trait promises NotFound for a missing key.
        self.head(key).await?;
        self.bounded(key.as_str(), self.inner.delete(&self.path(key))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2_urls_point_at_the_account_endpoint_with_region_auto() {
        let b = S3StoreBuilder::from_url("r2://0123abcd/artifacts/team?prefix=x").unwrap();
        assert_eq!(b.endpoint.as_deref(), Some("https://0123abcd.r2.cloudflarestorage.com"));
        assert_eq!(b.region, "auto");
        assert_eq!(b.bucket, "artifacts");
        assert_eq!(b.prefix.as_deref(), Some("x"), "the query's prefix wins over the path's");
    }

    #[test]
    fn s3_url_parameters_are_read() {
        let b = S3StoreBuilder::from_url("s3://b?endpoint=http://127.0.0.1:9000&region=eu-west-1").unwrap();
        assert_eq!((b.endpoint.as_deref(), b.region.as_str()), (Some("http://127.0.0.1:9000"), "eu-west-1"));
        // Older URLs carrying the flag still open.
        assert!(S3StoreBuilder::from_url("s3://b?endpoint=http://127.0.0.1:9000&allow_http=true")
            .unwrap()
            .build()
            .is_ok());
    }

    #[test]
    fn part_size_below_the_s3_minimum_is_refused() {
        assert!(S3StoreBuilder::new("b").part_size(MIN_PART_SIZE - 1).build().is_err());
        assert!(S3StoreBuilder::new("b").part_size(MIN_PART_SIZE).build().is_ok());
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let b = S3StoreBuilder::new("b").credentials("AKIAID", "very-secret").session_token("tok-secret");
        let shown = format!("{b:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("tok-secret") && !shown.contains("AKIAID"),
            "{shown}"
        );
    }

    #[test]
    fn a_no_such_bucket_answer_to_any_request_names_the_bucket() {
        // As AWS answers a PUT into a missing bucket (the test server creates buckets instead).
        let store = S3StoreBuilder::new("gone").build().unwrap();
        let body = "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\
                    <Error><Code>NoSuchBucket</Code><BucketName>gone</BucketName></Error>";
        let e = object_store::Error::Generic { store: "S3", source: body.into() };
        match store.error("a/b", e) {
            ArtifactError::NoSuchBucket { bucket, store } => {
                assert_eq!((bucket.as_str(), store.as_str()), ("gone", "s3://gone"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statuses_are_read_from_messages() {
        assert_eq!(status_in("Server returned non-2xx status code: 403 Forbidden: <xml>"), Some(403));
        assert_eq!(status_in("no status here"), None);
    }
}
