//! Resumable (tus 1.0.0) uploads through the API's relay, on SQLite and PostgreSQL: a PATCH whose
//! connection drops mid-body keeps what reached the agent, a HEAD through the API tells the
//! client where it stopped, a PATCH from a stale offset is told the real one (even when the agent
//! refuses it before reading the body and resets the connection), and the rest PATCHed from
//! there completes the file byte for byte. A client that goes silent without closing is cut after
//! the relay's body stall bound, so the upload resumes from the bytes it sent; a slow upload that
//! keeps moving is never cut, however long it takes.

#[macro_use]
mod api_support;

use std::time::{Duration, Instant};

use api_support::{TestApi, DEADLINE};
use base64::Engine;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use zlh_apid::config::ApiConfig;

/// Large enough that a refused chunk is still being sent when the agent answers.
const TOTAL: usize = 6 << 20;
const FIRST: usize = 2 << 20;
/// How often a stale chunk is sent (whether the agent's answer survives its reset is a race).
const STALE_ATTEMPTS: usize = 20;
const TARGET: &str = "world/über backup a..b.zip";

fn content() -> Vec<u8> {
    (0..TOTAL).map(|i| (i * 31 % 251) as u8).collect()
}

async fn offset_of(
    api: &TestApi,
    location: &str,
    token: &str,
) -> (StatusCode, Option<u64>, reqwest::header::HeaderMap) {
    let resp = api.request(Method::HEAD, location, Some(token)).header("tus-resumable", "1.0.0").send().await.unwrap();
    let offset = resp.headers().get("upload-offset").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (resp.status(), offset, resp.headers().clone())
}

/// How the first PATCH is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// HTTP/1.1 with a Content-Length: the connection closes mid-body.
    H1,
    /// HTTP/1.1, chunked: the connection closes after a chunk.
    H1Chunked,
    /// HTTP/1.1 that waited for `100 Continue` before sending.
    H1Expect,
    /// HTTP/2: the connection closes mid-body.
    H2,
    /// HTTP/2: only the stream is cancelled, the connection stays.
    H2Reset,
}

async fn wait_patched(api: &TestApi, vmid: u32) {
    let started = Instant::now();
    while api.agent.patched(vmid) < FIRST as u64 {
        assert!(started.elapsed() < DEADLINE, "[{}] the agent got {} bytes", api.backend, api.agent.patched(vmid));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(api.agent.patched(vmid), FIRST as u64, "[{}] only the first part was sent", api.backend);
}

async fn h1(api: TestApi) {
    a_dropped_patch_resumes_where_it_stopped(api, Cut::H1).await
}
async fn h1_chunked(api: TestApi) {
    a_dropped_patch_resumes_where_it_stopped(api, Cut::H1Chunked).await
}
async fn h1_expect(api: TestApi) {
    a_dropped_patch_resumes_where_it_stopped(api, Cut::H1Expect).await
}
async fn h2_reset(api: TestApi) {
    a_dropped_patch_resumes_where_it_stopped(api, Cut::H2Reset).await
}
async fn h2(api: TestApi) {
    a_dropped_patch_resumes_where_it_stopped(api, Cut::H2).await
}

/// A running server of a new user, and the location of a new upload of `length` bytes on it.
async fn new_upload(api: &TestApi, length: usize) -> (api_support::User, u32, String) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let id = api.create_game(&a).await;
    let vmid = api.wait_running(&a, &id).await["vmid"].as_u64().unwrap() as u32;
    let metadata = format!("path {}", base64::engine::general_purpose::STANDARD.encode(TARGET));
    let resp = api
        .request(Method::POST, &format!("/api/servers/{id}/files/uploads"), Some(&a.token))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", length)
        .header("upload-metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "[{backend}] {:?}", resp.text().await);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&format!("/api/servers/{id}/files/uploads/")), "[{backend}] {location}");
    (a, vmid, location)
}

/// The head of an HTTP/1.1 PATCH of `location` from offset 0, with a Content-Length of `TOTAL`.
fn patch_head(api: &TestApi, location: &str, token: &str, framing: &str) -> String {
    format!(
        "PATCH {location} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n{framing}\r\n",
        api.addr
    )
}

async fn a_dropped_patch_resumes_where_it_stopped(api: TestApi, how: Cut) {
    let backend = api.backend;
    let (a, vmid, location) = new_upload(&api, TOTAL).await;
    let data = content();

    // Part of the body, then the connection goes away (a closed laptop lid).
    match how {
        Cut::H1 | Cut::H1Chunked | Cut::H1Expect => {
            let mut sock = tokio::net::TcpStream::connect(api.addr).await.unwrap();
            let framing = match how {
                Cut::H1Chunked => "Transfer-Encoding: chunked\r\n".to_string(),
                Cut::H1Expect => format!("Content-Length: {TOTAL}\r\nExpect: 100-continue\r\n"),
                _ => format!("Content-Length: {TOTAL}\r\n"),
            };
            let head = patch_head(&api, &location, &a.token, &framing);
            sock.write_all(head.as_bytes()).await.unwrap();
            if how == Cut::H1Chunked {
                sock.write_all(format!("{FIRST:x}\r\n").as_bytes()).await.unwrap();
                sock.write_all(&data[..FIRST]).await.unwrap();
                sock.write_all(b"\r\n").await.unwrap();
            } else {
                sock.write_all(&data[..FIRST]).await.unwrap();
            }
            wait_patched(&api, vmid).await;
            drop(sock);
        }
        Cut::H2 | Cut::H2Reset => {
            use http_body_util::StreamBody;
            use hyper_util::rt::{TokioExecutor, TokioIo};
            let tcp = tokio::net::TcpStream::connect(api.addr).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
            let conn = tokio::spawn(conn);
            let (tx, rx) =
                futures::channel::mpsc::unbounded::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>();
            tx.unbounded_send(Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(&data[..FIRST])))).unwrap();
            let req = hyper::Request::builder()
                .method("PATCH")
                .uri(format!("http://{}{location}", api.addr))
                .header("authorization", format!("Bearer {}", a.token))
                .header("tus-resumable", "1.0.0")
                .header("content-type", "application/offset+octet-stream")
                .header("upload-offset", "0")
                .header("content-length", TOTAL)
                .body(StreamBody::new(rx))
                .unwrap();
            let pending = tokio::spawn(async move { send.send_request(req).await.map(|r| r.status()) });
            wait_patched(&api, vmid).await;
            pending.abort();
            if how == Cut::H2 {
                conn.abort();
            }
            // The connection stays open; only the stream is cancelled.
            std::mem::forget(tx);
        }
    }

    let (status, offset, headers) = offset_of(&api, &location, &a.token).await;
    assert_eq!(status, StatusCode::OK, "[{backend}]");
    assert_eq!(offset, Some(FIRST as u64), "[{backend}] HEAD through the API shows the bytes received");
    assert_eq!(headers.get("tus-resumable").map(|v| v.as_bytes()), Some(&b"1.0.0"[..]), "[{backend}]");
    assert_eq!(headers.get("upload-length").map(|v| v.as_bytes()), Some(TOTAL.to_string().as_bytes()));
    assert_eq!(headers.get("cache-control").map(|v| v.as_bytes()), Some(&b"no-store"[..]), "[{backend}]");
    assert_eq!(api.agent.file(vmid, TARGET), None, "[{backend}] an unfinished upload is not the file");

    // A client resuming from a stale offset is told the real one, every time: the agent refuses
    // before reading the body and closes while the relay is still sending it.
    for attempt in 0..STALE_ATTEMPTS {
        let stale = api
            .request(Method::PATCH, &location, Some(&a.token))
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", 0)
            .body(data.clone())
            .send()
            .await
            .unwrap();
        let status = stale.status();
        let real = stale.headers().get("upload-offset").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status, StatusCode::CONFLICT, "[{backend} {how:?}] stale PATCH {attempt}: {:?}", stale.text().await);
        assert_eq!(real, Some(FIRST.to_string()), "[{backend} {how:?}] stale PATCH {attempt}");
    }

    let rest = api
        .request(Method::PATCH, &location, Some(&a.token))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", FIRST)
        .body(data[FIRST..].to_vec())
        .send()
        .await
        .unwrap();
    let (status, offset) = (rest.status(), rest.headers().get("upload-offset").cloned());
    assert_eq!(status, StatusCode::NO_CONTENT, "[{backend}] {:?}", rest.text().await);
    assert_eq!(offset.unwrap(), TOTAL.to_string().as_str(), "[{backend}]");
    let file = api.agent.file(vmid, TARGET).expect("the finished file");
    assert_eq!(Sha256::digest(&file), Sha256::digest(&data), "[{backend}] the file is complete and intact");
}

on_both_backends!(tokio::test(flavor = "multi_thread", worker_threads = 2);
    h1, h1_chunked, h1_expect, h2, h2_reset,
);

/// The relay's bounds in these tests: small, so a stall is seen quickly.
const STALL: Duration = Duration::from_millis(300);

fn stall_config() -> ApiConfig {
    ApiConfig { relay_body_idle_timeout: STALL, relay_answer_timeout: STALL, ..api_support::config() }
}

/// A client sends part of a PATCH body and goes silent, its connection left open (a dropped
/// network): the relay cuts the agent's request after the stall bound, the agent keeps what
/// arrived and lets the upload go, and a HEAD on a new connection reports exactly those bytes.
async fn a_silent_client_is_cut_and_the_upload_resumes_from_what_it_sent(api: TestApi) {
    let backend = api.backend;
    let (a, vmid, location) = new_upload(&api, TOTAL).await;
    let data = content();

    let mut silent = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    let head = patch_head(&api, &location, &a.token, &format!("Content-Length: {TOTAL}\r\n"));
    silent.write_all(head.as_bytes()).await.unwrap();
    silent.write_all(&data[..FIRST]).await.unwrap();
    wait_patched(&api, vmid).await;

    let asked = Instant::now();
    let (status, offset, _) = offset_of(&api, &location, &a.token).await;
    assert_eq!(status, StatusCode::OK, "[{backend}]");
    assert_eq!(offset, Some(FIRST as u64), "[{backend}] HEAD reports the bytes the silent client sent");
    assert!(asked.elapsed() < DEADLINE, "[{backend}] HEAD took {:?}", asked.elapsed());

    let rest = api
        .request(Method::PATCH, &location, Some(&a.token))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", FIRST)
        .body(data[FIRST..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), StatusCode::NO_CONTENT, "[{backend}] {:?}", rest.text().await);
    let file = api.agent.file(vmid, TARGET).expect("the finished file");
    assert_eq!(Sha256::digest(&file), Sha256::digest(&data), "[{backend}] the file is complete and intact");
    // Open until here: the cut came from the stall bound, not from a close.
    drop(silent);
}

/// Chunks of a slow upload, each well within the stall bound.
const SLOW_CHUNKS: usize = 16;
const SLOW_CHUNK: usize = 64 << 10;
const SLOW_PACE: Duration = Duration::from_millis(100);

/// An upload sent slowly but steadily, taking several times the relay's bounds overall, is not cut.
async fn a_slow_steady_upload_is_not_cut(api: TestApi) {
    let backend = api.backend;
    let total = SLOW_CHUNKS * SLOW_CHUNK;
    let (a, vmid, location) = new_upload(&api, total).await;
    let data: Vec<u8> = content()[..total].to_vec();
    let chunks: Vec<bytes::Bytes> = data.chunks(SLOW_CHUNK).map(bytes::Bytes::copy_from_slice).collect();
    let paced = futures::stream::iter(chunks).then(|chunk| async move {
        // Pacing the sender is what is under test, not synchronisation.
        tokio::time::sleep(SLOW_PACE).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let started = Instant::now();
    let resp = api
        .request(Method::PATCH, &location, Some(&a.token))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", 0)
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "[{backend}] {:?}", resp.text().await);
    assert!(took > STALL * 3, "[{backend}] the upload took {took:?}, longer than the bounds");
    let file = api.agent.file(vmid, TARGET).expect("the finished file");
    assert_eq!(Sha256::digest(&file), Sha256::digest(&data), "[{backend}] the file is complete and intact");
}

macro_rules! with_stall_bound {
    ($($name:ident),* $(,)?) => {
        mod stall_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = zlh_apid::db::testing::sqlite().await;
                    super::$name(super::TestApi::start("sqlite", db, super::stall_config()).await).await
                }
            )*
        }
        mod stall_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = zlh_apid::db::testing::postgres().await;
                    super::$name(super::TestApi::start("postgres", db, super::stall_config()).await).await
                }
            )*
        }
    };
}

with_stall_bound!(a_silent_client_is_cut_and_the_upload_resumes_from_what_it_sent, a_slow_steady_upload_is_not_cut);
