//! The read-only HTTP artifact store against real local HTTP servers: a static file server
//! (ranges, HEAD, 404), and handlers that refuse, fail, ignore ranges or break off mid-body.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use tower_http::services::ServeDir;
use zlh_core::artifact::{ArtifactError, ArtifactStore, ArtifactStoreExt, ByteRange, HttpStore, RetryPolicy};
use zlh_core::ArtifactKey;

fn key(s: &str) -> ArtifactKey {
    ArtifactKey::parse(s).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Requests seen by the handlers, and the file they serve.
#[derive(Clone)]
struct Shared {
    hits: Arc<AtomicU32>,
    data: Bytes,
}

struct Server {
    base: String,
    hits: Arc<AtomicU32>,
    data: Bytes,
    _files: tempfile::TempDir,
}

/// `/files/…` serves a directory (with ranges); the other routes misbehave on purpose.
async fn server() -> Server {
    let files = tempfile::tempdir().unwrap();
    let data = Bytes::from(pattern(500_000));
    std::fs::create_dir_all(files.path().join("runtimes/java")).unwrap();
    std::fs::write(files.path().join("runtimes/java/java.tar.zst"), &data).unwrap();
    let shared = Shared { hits: Arc::new(AtomicU32::new(0)), data: data.clone() };
    let app = Router::new()
        .nest_service("/files", ServeDir::new(files.path()))
        .route("/secret/{*rest}", get(|| async { StatusCode::FORBIDDEN }))
        .route("/down/{*rest}", get(always_503).head(always_503))
        .route("/flaky/{*rest}", get(flaky))
        .route("/norange/{*rest}", get(ignores_range))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, hits: shared.hits, data, _files: files }
}

async fn always_503(State(s): State<Shared>) -> StatusCode {
    s.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::SERVICE_UNAVAILABLE
}

/// 503 twice, then the file.
async fn flaky(State(s): State<Shared>) -> Response {
    if s.hits.fetch_add(1, Ordering::SeqCst) < 2 {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    s.data.clone().into_response()
}

/// Always the whole file with 200, whatever `Range` says.
async fn ignores_range(State(s): State<Shared>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.data.clone().into_response()
}

/// A bare HTTP/1.1 server (so the cut is exact): the first answer promises the whole file and
/// closes the connection after 100 000 bytes; later answers honour `Range: bytes=N-`.
async fn breaks_off_once(data: Bytes) -> (String, Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/breaks", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicU32::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut");
                request.extend_from_slice(&buf[..n]);
            }
            let request = String::from_utf8_lossy(&request).to_lowercase();
            let len = data.len();
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                sock.write_all(head.as_bytes()).await.unwrap();
                sock.write_all(&data[..100_000]).await.unwrap();
            } else {
                let start: usize = request
                    .split("range: bytes=")
                    .nth(1)
                    .and_then(|r| r.split('-').next())
                    .and_then(|n| n.parse().ok())
                    .expect("a resume asks for a range");
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{len}\r\nconnection: close\r\n\r\n",
                    len - start,
                    len - 1
                );
                sock.write_all(head.as_bytes()).await.unwrap();
                sock.write_all(&data[start..]).await.unwrap();
            }
            sock.shutdown().await.unwrap();
        }
    });
    (base, hits)
}

fn store(base: &str) -> HttpStore {
    HttpStore::builder(base).unwrap().build().unwrap()
}

async fn read(store: &HttpStore, k: &str, range: ByteRange) -> (std::ops::Range<u64>, Vec<u8>) {
    let got = store.get_range(&key(k), range).await.unwrap_or_else(|e| panic!("{k} {range:?}: {e}"));
    let served = got.range.clone();
    let mut out = Vec::new();
    let mut s = got.stream;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    (served, out)
}

const JAVA: &str = "runtimes/java/java.tar.zst";

#[tokio::test]
async fn http_store_reads_whole_files_and_metadata() {
    let srv = server().await;
    let store = store(&format!("{}/files", srv.base));
    let meta = store.head(&key(JAVA)).await.unwrap();
    assert_eq!(meta.size, srv.data.len() as u64);
    assert!(meta.last_modified.is_some(), "Last-Modified parsed");
    let (range, bytes) = read(&store, JAVA, ByteRange::All).await;
    assert_eq!(range, 0..srv.data.len() as u64);
    assert!(bytes == srv.data, "body differs");
}

#[tokio::test]
async fn http_store_reads_ranges() {
    let srv = server().await;
    let store = store(&format!("{}/files/", srv.base));
    let len = srv.data.len() as u64;
    assert_eq!(read(&store, JAVA, ByteRange::From(123_456)).await, (123_456..len, srv.data[123_456..].to_vec()));
    assert_eq!(read(&store, JAVA, ByteRange::Bounded { start: 7, end: 19 }).await, (7..19, srv.data[7..19].to_vec()));
    assert_eq!(read(&store, JAVA, ByteRange::From(len)).await, (len..len, vec![]), "resume at the very end");
    let err = store.get_range(&key(JAVA), ByteRange::From(len + 10)).await.unwrap_err();
    assert!(
        matches!(err, ArtifactError::InvalidRange { start, size, .. } if start == len + 10 && size == len),
        "{err:?}"
    );
}

#[tokio::test]
async fn http_store_skips_bytes_when_the_server_ignores_range() {
    let srv = server().await;
    let store = store(&format!("{}/norange", srv.base));
    let (range, bytes) = read(&store, "any/file", ByteRange::Bounded { start: 70_000, end: 70_100 }).await;
    assert_eq!(range, 70_000..70_100);
    assert_eq!(bytes, srv.data[70_000..70_100]);
    let (_, bytes) = read(&store, "any/file", ByteRange::From(499_990)).await;
    assert_eq!(bytes, srv.data[499_990..]);
}

#[tokio::test(start_paused = true)]
async fn http_resumable_get_resumes_with_a_range_request() {
    let data = Bytes::from(pattern(500_000));
    let (base, hits) = breaks_off_once(data.clone()).await;
    let store = store(&base);
    let k = key("any/file");
    let mut s = store.get_resumable(&k);
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    assert!(out == data, "resumed body differs ({} bytes)", out.len());
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one break, one resume");
}

#[tokio::test]
async fn http_store_maps_404_and_403() {
    let srv = server().await;
    let files = store(&format!("{}/files", srv.base));
    assert!(files.head(&key("no/such.tar")).await.unwrap_err().is_not_found());
    assert!(files.get_range(&key("no/such.tar"), ByteRange::All).await.unwrap_err().is_not_found());
    let secret = store(&format!("{}/secret", srv.base));
    let err = secret.get_range(&key("a/b"), ByteRange::All).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Forbidden { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn http_store_retries_5xx_with_backoff() {
    let srv = server().await;
    let store = store(&format!("{}/flaky", srv.base));
    let started = tokio::time::Instant::now();
    let (_, bytes) = read(&store, "a/b", ByteRange::All).await;
    assert!(bytes == srv.data);
    assert_eq!(srv.hits.load(Ordering::SeqCst), 3, "two 503s, then the file");
    assert!(started.elapsed() >= Duration::from_millis(600), "waited 200 ms + 400 ms: {:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn http_store_gives_up_on_a_server_that_stays_down() {
    let srv = server().await;
    let store = HttpStore::builder(&format!("{}/down", srv.base))
        .unwrap()
        .retry(RetryPolicy { attempts: 4, base_delay: Duration::from_millis(100) })
        .build()
        .unwrap();
    match store.get_range(&key("a/b"), ByteRange::All).await {
        Err(ArtifactError::Unavailable { attempts, message, .. }) => {
            assert_eq!(attempts, 4);
            assert!(message.contains("503"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(srv.hits.load(Ordering::SeqCst), 4);
    assert!(store.head(&key("a/b")).await.unwrap_err().is_transient());
}

#[tokio::test]
async fn http_store_is_read_only() {
    let store = store("http://127.0.0.1:9/base");
    let err = store.put_bytes(&key("a/b"), Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::ReadOnly { op: "put", .. }), "{err:?}");
    let err = store.delete(&key("a/b")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::ReadOnly { op: "delete", .. }), "{err:?}");
    let err = store.list("").await.unwrap_err();
    assert!(matches!(err, ArtifactError::Unsupported { op: "list", .. }), "{err:?}");
}

#[tokio::test]
async fn http_store_hides_url_credentials() {
    let store = store("https://user:hunter2@artifacts.example.com/base");
    assert!(!store.describe().contains("hunter2"), "{}", store.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_http_store_fails_within_the_retry_budget_naming_the_key() {
    // Accepts connections and never answers, like a server stopped with SIGSTOP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/artifacts", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let budget = Duration::from_secs(2);
    let store = HttpStore::builder(&base).unwrap().retry_budget(budget).build().unwrap();
    let started = std::time::Instant::now();
    let err = store.get_range(&key("runtimes/java/21.0.5/java.tar.zst"), ByteRange::All).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, ArtifactError::TimedOut { .. }), "{err:?}");
    assert!(err.to_string().contains("runtimes/java/21.0.5/java.tar.zst"), "{err}");
    assert!(elapsed < budget + Duration::from_secs(3), "took {elapsed:?}");
    server.abort();
}
