//! `/files`: the file manager of the container's files root (the game server dir or the dev
//! workspace), and resumable uploads over the tus 1.0.0 protocol (core, creation, termination) so
//! stock tus clients (tus-js-client, Uppy) can send files larger than a proxy's body cap in pieces.
//!
//! The routes only translate HTTP: confinement, atomicity and upload bookkeeping live in
//! `zlh_core::files`. Bodies stream in and out with constant memory; axum's default body limit is
//! off here and each route enforces its own. Authentication is the caller's job (the integrating
//! router puts it in front). Logs carry relative paths and sizes, never contents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use zlh_core::files::{Entry, EntryKind, FileError, Jail, UploadInfo, UploadManager};

pub use zlh_core::files::UploadLimits;

use crate::http::{ApiError, ApiResult};

/// The protocol version this server speaks, sent on every tus response.
const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,termination";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// Chunk size when streaming a file out.
const READ_CHUNK: usize = 64 * 1024;
/// Atomic-write temps untouched this long are leftovers of a dead request.
const TEMP_GRACE: Duration = Duration::from_secs(3600);

/// The directory the file routes work in, known once the container is provisioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesRoot {
    pub path: PathBuf,
    /// `(uid, gid)` new files and directories get (the dev user when the agent runs as root).
    pub owner: Option<(u32, u32)>,
    /// Bytes the tree may hold, open uploads included (the container's disk); `None`: the
    /// configured quota, if any.
    pub quota_bytes: Option<u64>,
}

/// Tells the routes the current files root; `None` until provisioning has decided it.
pub type RootSource = Arc<dyn Fn() -> Option<FilesRoot> + Send + Sync>;

/// Everything the file routes need; cheap to clone.
#[derive(Clone)]
pub struct FilesState {
    inner: Arc<Inner>,
}

struct Inner {
    source: RootSource,
    uploads: UploadManager,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Temp files older than this are leftovers of an earlier run.
    started: SystemTime,
}

impl FilesState {
    /// `upload_state_dir` keeps upload bookkeeping (outside the files root).
    pub fn new(source: RootSource, upload_state_dir: PathBuf, limits: UploadLimits) -> anyhow::Result<Self> {
        let uploads = UploadManager::new(&upload_state_dir, limits)?;
        Ok(Self { inner: Arc::new(Inner { source, uploads, metrics: None, started: SystemTime::now() }) })
    }

    /// Counts uploaded bytes in the agent's `zlh_agent_upload_bytes` counter.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = Some(metrics);
        }
        self
    }

    fn limits(&self) -> &UploadLimits {
        self.inner.uploads.limits()
    }

    /// Opens the current root; 409 before provisioning (or before provisioning made the root).
    fn jail(&self) -> ApiResult<Jail> {
        let root = (self.inner.source)().ok_or_else(|| ApiError::conflict("container is not provisioned yet"))?;
        let jail = Jail::open(&root.path, root.owner).map_err(|e| match e {
            FileError::NotFound { .. } => ApiError::conflict("files root does not exist yet"),
            e => {
                tracing::error!(error = %e, "files root cannot be opened");
                ApiError::internal("files root cannot be opened")
            }
        })?;
        Ok(jail.with_quota(root.quota_bytes))
    }

    /// Bytes the files root may still take under its quota (`None`: no quota), for what the agent
    /// writes there besides the file routes (mod installs).
    pub async fn quota_free(&self) -> ApiResult<Option<u64>> {
        let jail = self.jail()?;
        self.inner.uploads.quota_free(&jail, 0).await.map_err(api_error)
    }

    /// Counts `added` bytes written into the files root in place of `removed` ones.
    pub fn note_written(&self, added: u64, removed: u64) {
        if let Ok(jail) = self.jail() {
            self.inner.uploads.note_written(&jail, added, removed);
        }
    }

    /// Removes expired uploads, and temp files left by an earlier run or untouched for an hour
    /// (requests that died without cleaning up).
    pub async fn maintain(&self) {
        let now = SystemTime::now();
        if let Err(e) = self.inner.uploads.cleanup_expired(now).await {
            tracing::warn!(error = %e, "upload cleanup failed");
        }
        let Some(root) = (self.inner.source)() else { return };
        let Ok(jail) = Jail::open(&root.path, root.owner) else { return };
        // A second of slack: file times come from a coarse clock that lags the precise one.
        let older_than = (self.inner.started - Duration::from_secs(1)).max(now - TEMP_GRACE);
        match self.inner.uploads.sweep(&jail, older_than).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed stray temp files"),
            Err(e) => tracing::warn!(error = %e, "temp file sweep failed"),
        }
    }

    /// Runs [`FilesState::maintain`] now and then every `every`.
    pub fn spawn_maintenance(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                state.maintain().await;
            }
        })
    }
}

/// The file routes with their state applied, to merge at the root of the agent's router.
pub fn router(state: FilesState) -> Router {
    let tus = Router::new()
        .route("/files/uploads", post(tus_create).options(tus_options))
        .route("/files/uploads/{id}", axum::routing::head(tus_head).patch(tus_patch).delete(tus_delete))
        .layer(axum::middleware::map_response(with_tus_resumable));
    Router::new()
        .route("/files/list", get(list))
        .route("/files/read", get(read))
        .route("/files/write", put(write))
        .route("/files/mkdir", post(mkdir))
        .route("/files/rename", post(rename))
        .route("/files", axum::routing::delete(remove))
        .merge(tus)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The HTTP status a file error deserves: 4xx for the request, 5xx for the agent.
fn api_error(e: FileError) -> ApiError {
    let status = match &e {
        FileError::InvalidPath { .. } => StatusCode::BAD_REQUEST,
        FileError::NotFound { .. } | FileError::UnknownUpload { .. } => StatusCode::NOT_FOUND,
        FileError::AlreadyExists { .. }
        | FileError::NotADirectory { .. }
        | FileError::IsADirectory { .. }
        | FileError::NotEmpty { .. }
        | FileError::OffsetConflict { .. } => StatusCode::CONFLICT,
        FileError::Escape { .. } => StatusCode::FORBIDDEN,
        FileError::TooLarge { .. } | FileError::QuotaExceeded { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        FileError::UploadBusy { .. } => StatusCode::LOCKED,
        FileError::Interrupted { .. } => StatusCode::BAD_REQUEST,
        FileError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        FileError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FileError> + Send + 'static) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(api_error),
        Err(e) => Err(ApiError::internal(format!("file operation failed: {e}"))),
    }
}

#[derive(Debug, Deserialize)]
struct PathQuery {
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
struct RemoveQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Debug, Deserialize)]
struct MkdirBody {
    path: String,
}

#[derive(Debug, Deserialize)]
struct RenameBody {
    from: String,
    to: String,
    #[serde(default)]
    overwrite: bool,
}

#[derive(Debug, Serialize)]
struct EntryJson {
    name: String,
    #[serde(rename = "type")]
    kind: EntryKind,
    size: u64,
    modified: Option<String>,
}

impl From<Entry> for EntryJson {
    fn from(e: Entry) -> Self {
        let modified = e
            .modified
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        Self { name: e.name, kind: e.kind, size: e.size, modified }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad_request(e.body_text()))
}

fn json<T>(j: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    j.map(|Json(j)| j).map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn list(State(state): State<FilesState>, q: Result<Query<PathQuery>, QueryRejection>) -> ApiResult<Response> {
    let path = query(q)?.path;
    let jail = state.jail()?;
    let p = path.clone();
    let entries = blocking(move || jail.list(&p)).await?;
    tracing::debug!(path = %path, entries = entries.len(), "listed");
    let entries: Vec<EntryJson> = entries.into_iter().map(EntryJson::from).collect();
    Ok(Json(serde_json::json!({ "path": path, "entries": entries })).into_response())
}

async fn read(
    State(state): State<FilesState>,
    headers: HeaderMap,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let path = query(q)?.path;
    let jail = state.jail()?;
    let p = path.clone();
    let (file, len) = blocking(move || jail.open_read(&p)).await?;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None | Some(RangeSpec::Ignored) => (StatusCode::OK, 0, len),
        Some(RangeSpec::Bytes(start, end)) => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        Some(RangeSpec::Unsatisfiable) => {
            let mut resp = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable").into_response();
            resp.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{len}")));
            return Ok(resp);
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| api_error(FileError::from_io(&path, e)))?;
    }
    tracing::info!(path = %path, size = len, start, end, "file read");
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(end - start), READ_CHUNK));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, header_value(&format!("bytes {start}-{}/{len}", end - 1)));
    }
    Ok(resp)
}

/// One `Range: bytes=…` request, resolved against the file length.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Inclusive first and last byte.
    Bytes(u64, u64),
    /// Past the end: 416.
    Unsatisfiable,
    /// Malformed, another unit or several ranges: the whole file is sent (RFC 9110 allows it).
    Ignored,
}

fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeSpec::Ignored };
    let Some((first, last)) = spec.split_once('-') else { return RangeSpec::Ignored };
    if spec.contains(',') {
        return RangeSpec::Ignored;
    }
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        // `bytes=-n`: the last n bytes.
        (true, false) => match parse(last) {
            Some(0) => return RangeSpec::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            None => return RangeSpec::Ignored,
        },
        (false, true) => match parse(first) {
            Some(a) => (a, len.saturating_sub(1)),
            None => return RangeSpec::Ignored,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a <= b => (a, b.min(len.saturating_sub(1))),
            _ => return RangeSpec::Ignored,
        },
        (true, true) => return RangeSpec::Ignored,
    };
    if start >= len {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Bytes(start, end)
    }
}

async fn write(
    State(state): State<FilesState>,
    headers: HeaderMap,
    q: Result<Query<PathQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<Response> {
    let path = query(q)?.path;
    let jail = state.jail()?;
    let max = state.limits().write_body_max.min(state.limits().max_file_bytes);
    if content_length(&headers).is_some_and(|n| n > max) {
        return Err(api_error(FileError::TooLarge { path, limit: max }));
    }
    let quota_free = if state.inner.uploads.quota_of(&jail).is_some() {
        let (j, p) = (jail.clone(), path.clone());
        let replaced = blocking(move || match j.stat(&p) {
            Ok(e) if e.kind == EntryKind::File => Ok(e.size),
            _ => Ok(0),
        })
        .await?;
        state.inner.uploads.quota_free(&jail, replaced).await.map_err(api_error)?.map(|free| (free, replaced))
    } else {
        None
    };
    let size = jail
        .write_stream(&path, body.into_data_stream(), max, quota_free.map(|(free, _)| free))
        .await
        .map_err(api_error)?;
    if let Some((_, replaced)) = quota_free {
        state.inner.uploads.note_written(&jail, size, replaced);
    }
    tracing::info!(path = %path, size, "file written");
    Ok(Json(serde_json::json!({ "path": path, "size": size })).into_response())
}

async fn mkdir(State(state): State<FilesState>, body: Result<Json<MkdirBody>, JsonRejection>) -> ApiResult<Response> {
    let MkdirBody { path } = json(body)?;
    let jail = state.jail()?;
    let p = path.clone();
    blocking(move || jail.mkdir(&p)).await?;
    tracing::info!(path = %path, "directory created");
    Ok(Json(serde_json::json!({ "path": path })).into_response())
}

async fn rename(State(state): State<FilesState>, body: Result<Json<RenameBody>, JsonRejection>) -> ApiResult<Response> {
    let RenameBody { from, to, overwrite } = json(body)?;
    let jail = state.jail()?;
    let (f, t) = (from.clone(), to.clone());
    blocking(move || jail.rename(&f, &t, overwrite)).await?;
    tracing::info!(from = %from, to = %to, overwrite, "renamed");
    Ok(Json(serde_json::json!({ "from": from, "to": to })).into_response())
}

async fn remove(
    State(state): State<FilesState>,
    q: Result<Query<RemoveQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let RemoveQuery { path, recursive } = query(q)?;
    let jail = state.jail()?;
    let (j, p) = (jail.clone(), path.clone());
    blocking(move || j.remove(&p, recursive)).await?;
    // What was freed is not known without a walk: the next quota check measures.
    state.inner.uploads.forget_usage(&jail);
    tracing::info!(path = %path, recursive, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- tus 1.0.0 ----

/// Every tus response says which protocol version it speaks, errors included.
async fn with_tus_resumable(mut resp: Response) -> Response {
    resp.headers_mut().insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    resp
}

/// A tus refusal: the JSON error plus the headers the protocol asks for with it.
#[derive(Debug)]
struct TusError {
    error: ApiError,
    /// The real offset, with a 409.
    offset: Option<u64>,
    /// `Tus-Version`, with a 412.
    version: bool,
}

impl From<ApiError> for TusError {
    fn from(error: ApiError) -> Self {
        Self { error, offset: None, version: false }
    }
}

impl From<FileError> for TusError {
    fn from(e: FileError) -> Self {
        let offset = match &e {
            FileError::OffsetConflict { current, .. } => Some(*current),
            _ => None,
        };
        Self { error: api_error(e), offset, version: false }
    }
}

impl IntoResponse for TusError {
    fn into_response(self) -> Response {
        let mut resp = self.error.into_response();
        if let Some(offset) = self.offset {
            resp.headers_mut().insert("upload-offset", HeaderValue::from(offset));
        }
        if self.version {
            resp.headers_mut().insert("tus-version", HeaderValue::from_static(TUS_VERSION));
        }
        resp
    }
}

type TusResult = Result<Response, TusError>;

/// Requests other than OPTIONS must speak our version: 412 otherwise.
fn check_tus_version(headers: &HeaderMap) -> Result<(), TusError> {
    if headers.get("tus-resumable").and_then(|v| v.to_str().ok()) == Some(TUS_VERSION) {
        return Ok(());
    }
    let error = ApiError::new(StatusCode::PRECONDITION_FAILED, format!("Tus-Resumable: {TUS_VERSION} is required"));
    Err(TusError { error, offset: None, version: true })
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header values built here are visible ASCII")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn u64_header(headers: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    let value = headers.get(name).ok_or_else(|| ApiError::bad_request(format!("{name} header is required")))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::bad_request(format!("{name} must be a non-negative integer")))
}

async fn tus_options(State(state): State<FilesState>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    h.insert("tus-max-size", HeaderValue::from(state.limits().max_file_bytes));
    resp
}

/// `Upload-Metadata`: comma-separated `key base64(value)` pairs (the value may be absent).
fn parse_metadata(raw: &str) -> Result<Vec<(String, String)>, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64_unpadded = base64::engine::general_purpose::STANDARD_NO_PAD;
    let mut pairs = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once(' ') {
            Some((k, v)) => {
                let v = v.trim();
                let bytes =
                    b64.decode(v).or_else(|_| b64_unpadded.decode(v)).map_err(|_| format!("{k}: not base64"))?;
                (k, String::from_utf8(bytes).map_err(|_| format!("{k}: not UTF-8"))?)
            }
            None => (pair, String::new()),
        };
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

/// The target of an upload: `path`, or `dir` joined with `relativePath`, `filename` or `name`
/// (what Uppy sends), and whether it may replace a file.
fn upload_target(meta: &[(String, String)]) -> Result<(String, bool), String> {
    let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let overwrite = matches!(get("overwrite"), Some("" | "true" | "1" | "yes"));
    if let Some(path) = get("path").filter(|p| !p.is_empty()) {
        return Ok((path.to_owned(), overwrite));
    }
    let name = ["relativePath", "filename", "name"]
        .into_iter()
        .find_map(|k| get(k).filter(|v| !v.is_empty() && *v != "null"))
        .ok_or("Upload-Metadata needs a path (or a filename)")?;
    let path = match get("dir").map(|d| d.trim_end_matches('/')).filter(|d| !d.is_empty()) {
        Some(dir) => format!("{dir}/{name}"),
        None => name.to_owned(),
    };
    Ok((path, overwrite))
}

async fn tus_create(State(state): State<FilesState>, headers: HeaderMap) -> TusResult {
    check_tus_version(&headers)?;
    if headers.contains_key("upload-defer-length") && !headers.contains_key("upload-length") {
        return Err(ApiError::bad_request("Upload-Defer-Length is not supported; send Upload-Length").into());
    }
    let length = u64_header(&headers, "upload-length")?;
    let raw = headers.get("upload-metadata").map(|v| v.to_str().unwrap_or("\u{0}")).unwrap_or("");
    let meta = parse_metadata(raw).map_err(|e| ApiError::bad_request(format!("Upload-Metadata: {e}")))?;
    let (path, overwrite) = upload_target(&meta).map_err(ApiError::bad_request)?;
    let jail = state.jail()?;
    let info = state.inner.uploads.create(&jail, &path, length, overwrite).await?;
    tracing::info!(id = %info.id, path = %info.path, length, overwrite, "tus upload created");
    let prefix = headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        .map(|p| p.trim_end_matches('/'))
        .filter(|p| p.starts_with('/'))
        .unwrap_or("");
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&format!("{prefix}/files/uploads/{}", info.id)));
    h.insert("upload-offset", HeaderValue::from(info.offset));
    Ok(resp)
}

fn offset_headers(resp: &mut Response, info: &UploadInfo) {
    let h = resp.headers_mut();
    h.insert("upload-offset", HeaderValue::from(info.offset));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn tus_head(State(state): State<FilesState>, Path(id): Path<String>, headers: HeaderMap) -> TusResult {
    check_tus_version(&headers)?;
    let jail = state.jail()?;
    let info = state.inner.uploads.status(&jail, &id).await?;
    let mut resp = StatusCode::OK.into_response();
    offset_headers(&mut resp, &info);
    resp.headers_mut().insert("upload-length", HeaderValue::from(info.length));
    Ok(resp)
}

async fn tus_patch(
    State(state): State<FilesState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> TusResult {
    check_tus_version(&headers)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be {OFFSET_OCTET_STREAM}"),
        )
        .into());
    }
    let offset = u64_header(&headers, "upload-offset")?;
    let jail = state.jail()?;
    let declared = content_length(&headers);
    // On its own task: if the client goes away and the connection with it, the bytes that arrived
    // are still saved before the task ends, whether or not this handler is still being polled.
    let metrics = state.inner.metrics.clone();
    let stream = body
        .into_data_stream()
        .inspect_ok(move |b| {
            if let Some(m) = &metrics {
                m.add_upload_bytes(b.len() as u64);
            }
        })
        .map_err(|e| e.to_string());
    let task = tokio::spawn({
        let (state, id) = (state.clone(), id.clone());
        async move { state.inner.uploads.append(&jail, &id, offset, declared, stream).await }
    });
    let info = match task.await {
        Ok(result) => result?,
        Err(e) => return Err(ApiError::internal(format!("upload task failed: {e}")).into()),
    };
    tracing::debug!(id = %id, offset = info.offset, length = info.length, "tus upload appended");
    let mut resp = StatusCode::NO_CONTENT.into_response();
    offset_headers(&mut resp, &info);
    Ok(resp)
}

async fn tus_delete(State(state): State<FilesState>, Path(id): Path<String>, headers: HeaderMap) -> TusResult {
    check_tus_version(&headers)?;
    let jail = state.jail()?;
    state.inner.uploads.cancel(&jail, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    //! The routes over real HTTP on a 127.0.0.1 listener, against real directories.

    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;
    use futures::stream;
    use reqwest::{Client, Method};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Server {
        base: String,
        addr: std::net::SocketAddr,
        root: PathBuf,
        outside: PathBuf,
        provisioned: Arc<AtomicBool>,
        state: FilesState,
        http: Client,
        _tmp: tempfile::TempDir,
    }

    async fn serve(limits: UploadLimits) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("server");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("world")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), "top secret").unwrap();
        fs::write(root.join("server.properties"), "motd=hello\n").unwrap();
        let provisioned = Arc::new(AtomicBool::new(true));
        let source: RootSource = {
            let (root, provisioned) = (root.clone(), provisioned.clone());
            Arc::new(move || {
                provisioned.load(Ordering::SeqCst).then(|| FilesRoot {
                    path: root.clone(),
                    owner: None,
                    quota_bytes: None,
                })
            })
        };
        let state = FilesState::new(source, tmp.path().join("state"), limits).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = Client::builder().no_proxy().build().unwrap();
        Server { base: format!("http://{addr}"), addr, root, outside, provisioned, state, http, _tmp: tmp }
    }

    impl Server {
        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }

        async fn get_json(&self, path: &str) -> (StatusCode, Value) {
            let resp = self.http.get(self.url(path)).send().await.unwrap();
            let status = resp.status();
            (status, resp.json().await.unwrap())
        }

        async fn send_json(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
            let resp = self.http.request(method, self.url(path)).json(&body).send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
        }

        async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
            let resp = self.http.put(self.url(&format!("/files/write?path={path}"))).body(body).send().await.unwrap();
            let status = resp.status();
            (status, resp.json().await.unwrap())
        }

        fn assert_outside_untouched(&self) {
            let names: Vec<_> = fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, vec!["secret"]);
            assert_eq!(fs::read_to_string(self.outside.join("secret")).unwrap(), "top secret");
        }

        /// Every name in a directory, hidden ones included.
        fn all_names(&self, dir: &str) -> Vec<String> {
            let mut names: Vec<_> = fs::read_dir(self.root.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }

        /// A tus client's steps, as documented in the report: create, then PATCH pieces.
        async fn tus_create(&self, metadata: &[(&str, &str)], length: u64) -> reqwest::Response {
            let b64 = base64::engine::general_purpose::STANDARD;
            let meta: Vec<String> = metadata.iter().map(|(k, v)| format!("{k} {}", b64.encode(v))).collect();
            self.http
                .post(self.url("/files/uploads"))
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Length", length)
                .header("Upload-Metadata", meta.join(","))
                .send()
                .await
                .unwrap()
        }

        /// Creates an upload and returns its absolute URL.
        async fn tus_start(&self, path: &str, length: u64) -> String {
            let resp = self.tus_create(&[("path", path)], length).await;
            assert_eq!(resp.status(), StatusCode::CREATED, "{:?}", resp.text().await);
            let location = resp.headers()["location"].to_str().unwrap().to_owned();
            reqwest::Url::parse(&self.base).unwrap().join(&location).unwrap().to_string()
        }

        async fn tus_patch(&self, url: &str, offset: u64, body: impl Into<reqwest::Body>) -> reqwest::Response {
            self.http
                .patch(url)
                .header("Tus-Resumable", "1.0.0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", offset)
                .body(body)
                .send()
                .await
                .unwrap()
        }

        async fn tus_offset(&self, url: &str) -> (StatusCode, Option<u64>) {
            let resp = self.http.head(url).header("Tus-Resumable", "1.0.0").send().await.unwrap();
            let offset = resp.headers().get("upload-offset").map(|v| v.to_str().unwrap().parse().unwrap());
            (resp.status(), offset)
        }
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn sha(data: &[u8]) -> Vec<u8> {
        Sha256::digest(data).to_vec()
    }

    #[tokio::test]
    async fn list_read_write_mkdir_rename_delete() {
        let s = serve(UploadLimits::default()).await;
        let (status, body) = s.put("world/level.dat", "level data").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({ "path": "world/level.dat", "size": 10 }));

        let (status, body) = s.get_json("/files/list").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["path"], "");
        let entries = body["entries"].as_array().unwrap();
        let names: Vec<_> =
            entries.iter().map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap())).collect();
        assert_eq!(names, vec![("world", "dir"), ("server.properties", "file")]);
        assert_eq!(entries[1]["size"], 11);
        let modified = entries[1]["modified"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(modified).is_ok(), "{modified}");

        let resp = s.http.get(s.url("/files/read?path=world/level.dat")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(resp.headers()["content-length"], "10");
        assert_eq!(resp.text().await.unwrap(), "level data");

        s.send_json(Method::POST, "/files/mkdir", serde_json::json!({ "path": "plugins/conf" })).await;
        assert!(s.root.join("plugins/conf").is_dir());
        let (status, body) = s
            .send_json(
                Method::POST,
                "/files/rename",
                serde_json::json!({ "from": "world/level.dat", "to": "plugins/l" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(fs::read_to_string(s.root.join("plugins/l")).unwrap(), "level data");
        let (status, body) = s
            .send_json(
                Method::POST,
                "/files/rename",
                serde_json::json!({ "from": "server.properties", "to": "plugins/l" }),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"], "\"plugins/l\" already exists");
        let rename = serde_json::json!({ "from": "server.properties", "to": "plugins/l", "overwrite": true });
        assert_eq!(s.send_json(Method::POST, "/files/rename", rename).await.0, StatusCode::OK);
        assert_eq!(fs::read_to_string(s.root.join("plugins/l")).unwrap(), "motd=hello\n");

        let (status, body) = s.send_json(Method::DELETE, "/files?path=plugins", Value::Null).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, _) = s.send_json(Method::DELETE, "/files?path=plugins&recursive=true", Value::Null).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(!s.root.join("plugins").exists());

        let (status, body) = s.get_json("/files/list?path=plugins").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "\"plugins\" does not exist");
        let (status, body) = s.send_json(Method::POST, "/files/mkdir", serde_json::json!({ "nope": 1 })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("path"), "{body}");
    }

    #[tokio::test]
    async fn read_honours_one_range() {
        let s = serve(UploadLimits::default()).await;
        fs::write(s.root.join("log.txt"), "0123456789").unwrap();
        let get = |range: &'static str| s.http.get(s.url("/files/read?path=log.txt")).header("Range", range).send();
        let resp = get("bytes=2-5").await.unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(resp.headers()["content-range"], "bytes 2-5/10");
        assert_eq!(resp.text().await.unwrap(), "2345");
        assert_eq!(get("bytes=-3").await.unwrap().text().await.unwrap(), "789");
        assert_eq!(get("bytes=8-").await.unwrap().text().await.unwrap(), "89");
        assert_eq!(get("bytes=8-100").await.unwrap().text().await.unwrap(), "89");
        let resp = get("bytes=10-").await.unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()["content-range"], "bytes */10");
        let resp = get("bytes=0-1,4-5").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.text().await.unwrap(), "0123456789");
    }

    #[test]
    fn range_parsing() {
        assert_eq!(parse_range("bytes=0-0", 5), RangeSpec::Bytes(0, 0));
        assert_eq!(parse_range("bytes=-10", 5), RangeSpec::Bytes(0, 4));
        assert_eq!(parse_range("bytes=-0", 5), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=-1", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=3-2", 5), RangeSpec::Ignored);
        assert_eq!(parse_range("items=0-1", 5), RangeSpec::Ignored);
        assert_eq!(parse_range("bytes=x-1", 5), RangeSpec::Ignored);
    }

    #[tokio::test]
    async fn escapes_are_refused_and_change_nothing() {
        let s = serve(UploadLimits::default()).await;
        symlink("/etc", s.root.join("etc")).unwrap();
        symlink("../outside", s.root.join("up")).unwrap();
        let forbidden = [
            "/files/list?path=..",
            "/files/list?path=up",
            "/files/list?path=etc",
            "/files/list?path=world/../../outside",
            "/files/read?path=etc/passwd",
            "/files/read?path=up/secret",
            "/files/read?path=../outside/secret",
        ];
        for path in forbidden {
            let (status, body) = s.get_json(path).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
            assert!(body["error"].as_str().unwrap().contains("outside the files root"), "{body}");
            assert!(!body["error"].as_str().unwrap().contains(s.root.to_str().unwrap()));
        }
        for path in ["up/new", "../outside/new", "etc/zlh-escape-test", "up/secret"] {
            assert_eq!(s.put(path, "pwned").await.0, StatusCode::FORBIDDEN, "{path}");
        }
        let (status, _) = s.put("%2Fetc%2Fzlh-escape-test", "pwned").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(s.put("world%00x", "pwned").await.0, StatusCode::BAD_REQUEST);
        for (method, path, body) in [
            (Method::POST, "/files/mkdir", serde_json::json!({ "path": "up/dir" })),
            (Method::POST, "/files/rename", serde_json::json!({ "from": "server.properties", "to": "up/stolen" })),
            (Method::POST, "/files/rename", serde_json::json!({ "from": "up/secret", "to": "stolen" })),
            (Method::DELETE, "/files?path=up/secret", Value::Null),
            (Method::DELETE, "/files?path=../outside&recursive=true", Value::Null),
        ] {
            assert_eq!(s.send_json(method, path, body).await.0, StatusCode::FORBIDDEN, "{path}");
        }
        let resp = s.tus_create(&[("path", "up/upload.bin")], 5).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
        s.assert_outside_untouched();
        assert!(!Path::new("/etc/zlh-escape-test").exists());
        assert!(s.root.join("server.properties").exists());
    }

    #[tokio::test]
    async fn before_provisioning_every_route_answers_409() {
        let s = serve(UploadLimits::default()).await;
        s.provisioned.store(false, Ordering::SeqCst);
        let (status, body) = s.get_json("/files/list").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body, serde_json::json!({ "error": "container is not provisioned yet" }));
        assert_eq!(s.put("x", "y").await.0, StatusCode::CONFLICT);
        assert_eq!(s.tus_create(&[("path", "x")], 1).await.status(), StatusCode::CONFLICT);
        s.provisioned.store(true, Ordering::SeqCst);
        assert_eq!(s.get_json("/files/list").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn write_streams_past_axums_default_limit_and_enforces_its_own() {
        let limits = UploadLimits { write_body_max: 3 << 20, ..UploadLimits::default() };
        let s = serve(limits).await;
        let big = content(3 << 20);
        let (status, body) = s.put("world/region.mca", big.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(sha(&fs::read(s.root.join("world/region.mca")).unwrap()), sha(&big));

        let (status, body) = s.put("world/region.mca", content((3 << 20) + 1)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        // Without a Content-Length the limit is enforced while streaming.
        let chunked = stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 1 << 20]))));
        let (status, _) = s.put("world/region.mca", reqwest::Body::wrap_stream(chunked)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(sha(&fs::read(s.root.join("world/region.mca")).unwrap()), sha(&big), "old content intact");
        assert_eq!(s.all_names("world"), vec!["region.mca"], "no temp left");
    }

    #[tokio::test]
    async fn quota_covers_writes_and_uploads() {
        let s = serve(UploadLimits { quota_bytes: Some(1 << 20), ..UploadLimits::default() }).await;
        let used = fs::metadata(s.root.join("server.properties")).unwrap().len() as usize;
        assert_eq!(s.put("a.bin", content(600_000)).await.0, StatusCode::OK);
        let (status, body) = s.put("b.bin", content(600_000)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body["error"].as_str().unwrap().contains("quota"), "{body}");
        assert!(!s.root.join("b.bin").exists());
        // Replacing a file may use the bytes it frees.
        let fits = (1 << 20) - used;
        assert_eq!(s.put("a.bin", content(fits)).await.0, StatusCode::OK);
        assert_eq!(s.tus_create(&[("path", "c.bin")], 1).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn tus_upload_in_pieces() {
        let s = serve(UploadLimits { max_file_bytes: 1 << 30, ..UploadLimits::default() }).await;
        let resp = s.http.request(Method::OPTIONS, s.url("/files/uploads")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
        assert_eq!(resp.headers()["tus-version"], "1.0.0");
        assert_eq!(resp.headers()["tus-extension"], "creation,termination");
        assert_eq!(resp.headers()["tus-max-size"], (1u64 << 30).to_string().as_str());

        let data = content(1_000_000);
        let resp = s.tus_create(&[("filename", "mod.jar"), ("dir", "world/mods")], data.len() as u64).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()["upload-offset"], "0");
        assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
        let location = resp.headers()["location"].to_str().unwrap();
        assert!(location.starts_with("/files/uploads/"), "{location}");
        let url = s.url(location);

        let mut offset = 0u64;
        for piece in data.chunks(300_000) {
            assert!(!s.root.join("world/mods").exists(), "nothing visible before the end");
            let resp = s.tus_patch(&url, offset, piece.to_vec()).await;
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            offset += piece.len() as u64;
            assert_eq!(resp.headers()["upload-offset"], offset.to_string().as_str());
            assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
            let head = s.http.head(&url).header("Tus-Resumable", "1.0.0").send().await.unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            assert_eq!(head.headers()["upload-offset"], offset.to_string().as_str());
            assert_eq!(head.headers()["upload-length"], "1000000");
            assert_eq!(head.headers()["cache-control"], "no-store");
        }
        assert_eq!(sha(&fs::read(s.root.join("world/mods/mod.jar")).unwrap()), sha(&data));
        assert_eq!(s.all_names(""), vec!["server.properties", "world"], "the partial file became the target");
    }

    #[tokio::test]
    async fn tus_refusals() {
        let s = serve(UploadLimits { max_file_bytes: 1000, ..UploadLimits::default() }).await;
        let url = s.tus_start("a.bin", 100).await;
        // Version, content type, offset, unknown id, length.
        let resp = s.http.head(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(resp.headers()["tus-version"], "1.0.0");
        let resp = s.http.patch(&url).header("Tus-Resumable", "1.0.0").header("Upload-Offset", 0).body("x");
        let resp = resp.header("Content-Type", "application/octet-stream").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
        assert_eq!(s.tus_patch(&url, 0, "0123456789").await.status(), StatusCode::NO_CONTENT);
        let resp = s.tus_patch(&url, 5, "56789").await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()["upload-offset"], "10");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "upload is at offset 10, not 5");
        assert_eq!(s.tus_patch(&url, 10, vec![0u8; 91]).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(s.tus_offset(&url).await, (StatusCode::OK, Some(10)));
        let unknown = s.url(&format!("/files/uploads/{}", "0".repeat(32)));
        assert_eq!(s.tus_offset(&unknown).await.0, StatusCode::NOT_FOUND);
        assert_eq!(s.tus_patch(&s.url("/files/uploads/..%2F..%2Fx"), 0, "x").await.status(), StatusCode::NOT_FOUND);
        // Creation: length, metadata, size limit, existing target.
        let resp = s.http.post(s.url("/files/uploads")).header("Tus-Resumable", "1.0.0").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(s.tus_create(&[("other", "x")], 5).await.status(), StatusCode::BAD_REQUEST);
        assert_eq!(s.tus_create(&[("path", "big")], 1001).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(s.tus_create(&[("path", "server.properties")], 5).await.status(), StatusCode::CONFLICT);
        let replace = s.tus_create(&[("path", "server.properties"), ("overwrite", "true")], 5).await;
        assert_eq!(replace.status(), StatusCode::CREATED);
        // Termination leaves nothing.
        let resp = s.http.delete(&url).header("Tus-Resumable", "1.0.0").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(s.tus_offset(&url).await.0, StatusCode::NOT_FOUND);
        let replace_url = s.url(replace.headers()["location"].to_str().unwrap());
        s.http.delete(&replace_url).header("Tus-Resumable", "1.0.0").send().await.unwrap();
        assert_eq!(s.all_names(""), vec!["server.properties", "world"]);
    }

    /// A client whose connection drops mid-PATCH: raw TCP, so exactly what reached the agent is known.
    #[tokio::test]
    async fn tus_dropped_connection_keeps_bytes_and_resumes() {
        let s = serve(UploadLimits::default()).await;
        let data = content(500_000);
        let url = s.tus_start("world/backup.zip", data.len() as u64).await;
        let path = reqwest::Url::parse(&url).unwrap().path().to_owned();

        let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: agent\r\nTus-Resumable: 1.0.0\r\n\
             Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            data.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        // The agent asks for the body once the upload is held for this request.
        let mut seen = Vec::new();
        while !seen.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(sock.read(&mut byte).await.unwrap(), 1);
            seen.push(byte[0]);
        }
        assert!(seen.starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&seen));
        sock.write_all(&data[..200_000]).await.unwrap();
        drop(sock);

        assert_eq!(s.tus_offset(&url).await, (StatusCode::OK, Some(200_000)));
        assert!(!s.root.join("world/backup.zip").exists());
        let (_, listing) = s.get_json("/files/list").await;
        assert_eq!(listing["entries"].as_array().unwrap().len(), 2, "{listing}");
        assert_eq!(s.all_names("world"), Vec::<String>::new());

        let resp = s.tus_patch(&url, 200_000, data[200_000..].to_vec()).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(sha(&fs::read(s.root.join("world/backup.zip")).unwrap()), sha(&data));
        assert_eq!(s.all_names(""), vec!["server.properties", "world"]);
    }

    /// The same through reqwest: a body stream that fails midway, as a browser tab closing would.
    #[tokio::test]
    async fn tus_failed_body_stream_resumes_from_head() {
        let s = serve(UploadLimits::default()).await;
        let data = content(400_000);
        let url = s.tus_start("blob.bin", data.len() as u64).await;
        let sent = Bytes::copy_from_slice(&data[..150_000]);
        let broken = stream::iter(vec![Ok(sent), Err(std::io::Error::other("tab closed"))]);
        assert!(s
            .http
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", 0)
            .body(reqwest::Body::wrap_stream(broken))
            .send()
            .await
            .is_err());
        let (status, offset) = s.tus_offset(&url).await;
        assert_eq!(status, StatusCode::OK);
        let offset = offset.unwrap();
        assert!(offset <= 150_000, "{offset}");
        assert!(!s.root.join("blob.bin").exists());
        let resp = s.tus_patch(&url, offset, data[offset as usize..].to_vec()).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(sha(&fs::read(s.root.join("blob.bin")).unwrap()), sha(&data));
    }

    #[tokio::test]
    async fn maintenance_removes_leftovers_of_an_earlier_run() {
        let s = serve(UploadLimits::default()).await;
        let before_start = SystemTime::now() - Duration::from_secs(60);
        for leftover in ["world/.zlh-tmp-0a0b", ".zlh-upload-0123456789abcdef0123456789abcdef"] {
            let file = fs::File::create(s.root.join(leftover)).unwrap();
            file.set_modified(before_start).unwrap();
        }
        fs::write(s.root.join("world/.zlh-tmp-inflight"), "a write going on now").unwrap();
        let live = s.tus_start("live.bin", 10).await;
        s.state.maintain().await;
        assert_eq!(s.all_names("world"), vec![".zlh-tmp-inflight"]);
        let hidden: Vec<_> = s.all_names("").into_iter().filter(|n| n.starts_with(".zlh-upload-")).collect();
        assert_eq!(hidden.len(), 1);
        assert!(live.ends_with(&hidden[0][".zlh-upload-".len()..]), "the live upload stays");
    }

    /// Peak resident memory of this process, from the kernel.
    fn peak_rss() -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// 256 MiB in two 128 MiB PATCHes, generated as it is sent: the agent's memory stays flat.
    #[tokio::test]
    async fn tus_large_upload_in_constant_memory() {
        const BLOCK: usize = 1 << 20;
        const BLOCKS: usize = 256;
        let s = serve(UploadLimits::default()).await;
        let url = s.tus_start("world/huge.bin", (BLOCK * BLOCKS) as u64).await;
        let base = Bytes::from(content(BLOCK));
        // Block i is the base block stamped with i, so a misplaced block would show.
        let block = move |i: usize| {
            let mut b = base.to_vec();
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Bytes::from(b)
        };
        let before = peak_rss();
        for half in 0..2 {
            let blocks = (half * BLOCKS / 2..(half + 1) * BLOCKS / 2).map({
                let block = block.clone();
                move |i| Ok::<_, std::io::Error>(block(i))
            });
            let resp =
                s.tus_patch(&url, (half * BLOCK * BLOCKS / 2) as u64, reqwest::Body::wrap_stream(stream::iter(blocks)));
            assert_eq!(resp.await.status(), StatusCode::NO_CONTENT);
        }
        let grown = peak_rss().saturating_sub(before);
        assert!(grown < 64 << 20, "peak memory grew by {} MiB", grown >> 20);
        let mut file = fs::File::open(s.root.join("world/huge.bin")).unwrap();
        assert_eq!(file.metadata().unwrap().len(), (BLOCK * BLOCKS) as u64);
        let mut buf = vec![0u8; BLOCK];
        for i in 0..BLOCKS {
            std::io::Read::read_exact(&mut file, &mut buf).unwrap();
            assert!(buf == block(i), "block {i} differs");
        }
    }
}
