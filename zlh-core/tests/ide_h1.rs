//! The IDE proxy's lean HTTP/1.1 path (`ide::h1`) over real TCP: a browser stand-in (hyper's
//! client, or raw bytes for what a client library would never send) → `h1::serve` → a scripted
//! code-server that answers with exactly the bytes a test gives it, odd framings included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zlh_core::ide::h1::{self, Admission, Gate, Head, Served};
use zlh_core::ide::proxy::{plain, Proxy, ProxyConfig};
use zlh_core::net::ConnectionLimits;

const WAIT: Duration = Duration::from_secs(10);

/// Forwards to `target`; hands `api.example` to the full server; answers `/refuse` itself.
struct TestGate {
    target: SocketAddr,
    answered: Mutex<Vec<u16>>,
}

impl Gate for TestGate {
    async fn admit(&self, head: &Head<'_>) -> Admission {
        if head.host == "api.example" {
            Admission::Handover
        } else if head.path() == "/refuse" {
            Admission::Answer(plain(http::StatusCode::UNAUTHORIZED, "Open this IDE from the zlh portal."))
        } else {
            Admission::Forward(self.target)
        }
    }

    fn answered(&self, status: u16, _took: Duration) {
        self.answered.lock().unwrap().push(status);
    }
}

/// What the scripted code-server saw: each request's raw bytes, and its connections.
struct Upstream {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Vec<u8>>,
    connections: Arc<AtomicUsize>,
}

/// A code-server that answers the n-th request it gets (on any connection) with `answers[n]`
/// (the last one repeating), closing the connection after the n-th answer when `close_after(n)`.
async fn scripted(answers: Vec<&'static [u8]>, close_after: fn(usize) -> bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, requests) = mpsc::unbounded_channel();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let served = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let (tx, answers, served) = (tx.clone(), answers.clone(), served.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(request) = read_request(&mut s, &mut buf).await else { return };
                    let n = served.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(request);
                    let answer = answers[n.min(answers.len() - 1)];
                    if !answer.is_empty() && s.write_all(answer).await.is_err() {
                        return;
                    }
                    if answer.is_empty() || close_after(n) {
                        // An empty answer: say nothing, keep the connection open.
                        if answer.is_empty() {
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                }
            });
        }
    });
    Upstream { addr, requests, connections }
}

/// One request (head and `Content-Length` body) off `s`; `None` at its end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if buf.len() >= end + 4 + body {
                return Some(buf.drain(..end + 4 + body).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The lean path on a port of its own; connections it hands over arrive on the receiver.
async fn lean(
    target: SocketAddr,
    config: ProxyConfig,
) -> (SocketAddr, Arc<TestGate>, mpsc::UnboundedReceiver<h1::Rewind>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(TestGate { target, answered: Mutex::new(Vec::new()) });
    let proxy = Proxy::new(config);
    let (tx, handed) = mpsc::unbounded_channel();
    let g = gate.clone();
    tokio::spawn(async move {
        loop {
            let (s, peer) = listener.accept().await.unwrap();
            let (gate, proxy, tx) = (g.clone(), proxy.clone(), tx.clone());
            tokio::spawn(async move {
                if let Served::Handover(rest) =
                    h1::serve(s, peer, &*gate, &proxy, "https", &ConnectionLimits::default(), std::future::pending())
                        .await
                {
                    let _ = tx.send(rest);
                }
            });
        }
    });
    (addr, gate, handed)
}

fn config() -> ProxyConfig {
    ProxyConfig { session_cookies: vec!["zlh_ide".into()], ..Default::default() }
}

async fn browser(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends `req` and returns the status, headers and whole body (hyper checks the framing).
async fn fetch(b: &mut SendRequest<Full<Bytes>>, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, Bytes) {
    b.ready().await.unwrap();
    let resp = tokio::time::timeout(WAIT, b.send_request(req)).await.expect("an answer").unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect()).await.expect("the body").unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path).header("host", "dev-6001.localhost:4000").body(Full::new(Bytes::new())).unwrap()
}

async fn next_request(u: &mut Upstream) -> String {
    let raw = tokio::time::timeout(WAIT, u.requests.recv()).await.expect("a request").unwrap();
    String::from_utf8(raw).unwrap()
}

const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhello";

#[tokio::test]
async fn requests_in_a_row_share_one_code_server_connection_with_zlh_credentials_left_behind() {
    let mut up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, gate, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    for _ in 0..3 {
        let req = http::Request::get("/static/app.js?v=1")
            .header("host", "dev-6001.localhost:4000")
            .header("cookie", "zlh_ide=secret; vscode-tkn=keep")
            .header("authorization", "Bearer zlh")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-host", "evil.example")
            .header("origin", "https://dev-6001.localhost:4000")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, body) = fetch(&mut b, req).await;
        assert_eq!((status, &body[..]), (200, &b"hello"[..]));
        assert!(headers.get("keep-alive").is_none(), "hop-by-hop headers stay behind");
        assert_eq!(headers.get("content-type").unwrap(), "text/plain");
        let seen = next_request(&mut up).await.to_ascii_lowercase();
        assert!(seen.starts_with("get /static/app.js?v=1 http/1.1\r\n"), "{seen}");
        assert!(seen.contains("\r\nhost: dev-6001.localhost:4000\r\n"), "{seen}");
        assert!(seen.contains("\r\ncookie: vscode-tkn=keep\r\n"), "{seen}");
        assert!(seen.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"), "the browser's own chain is replaced: {seen}");
        assert!(seen.contains("\r\nx-forwarded-host: dev-6001.localhost:4000\r\n"), "{seen}");
        assert!(seen.contains("\r\nx-forwarded-proto: https\r\n"), "{seen}");
        assert!(seen.contains("\r\norigin: https://dev-6001.localhost:4000\r\n"), "{seen}");
        assert!(!seen.contains("secret") && !seen.contains("authorization") && !seen.contains("evil"), "{seen}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    assert_eq!(*gate.answered.lock().unwrap(), [200, 200, 200]);
}

#[tokio::test]
async fn chunked_and_close_delimited_answers_arrive_whole_and_zlh_cookies_cannot_be_set() {
    let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: zlh_ide=forged\r\nSet-Cookie: cs=ok\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let mut up = scripted(vec![chunked], |_| false).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    for _ in 0..2 {
        let (status, headers, body) = fetch(&mut b, get("/")).await;
        assert_eq!((status, &body[..]), (200, &b"hello, world"[..]));
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["cs=ok"]);
        next_request(&mut up).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "a chunked answer leaves the connection usable");

    let until_close: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it until the end";
    let mut up = scripted(vec![until_close], |_| true).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    for _ in 0..2 {
        let (status, _, body) = fetch(&mut b, get("/")).await;
        assert_eq!((status, &body[..]), (200, &b"all of it until the end"[..]));
        next_request(&mut up).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 2, "a close-delimited answer ends its connection");
}

#[tokio::test]
async fn answers_without_a_body_keep_the_connection_in_step() {
    let answers: Vec<&[u8]> = vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ];
    let mut up = scripted(answers, |_| false).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    let head = http::Request::head("/").header("host", "dev-6001.localhost").body(Full::new(Bytes::new())).unwrap();
    let (status, headers, body) = fetch(&mut b, head).await;
    assert_eq!((status, headers.get("content-length").unwrap().to_str().unwrap(), body.len()), (200, "1234", 0));
    assert_eq!(fetch(&mut b, get("/")).await.0, 204);
    let (status, headers, _) = fetch(&mut b, get("/")).await;
    assert_eq!((status, headers.get("etag").unwrap().to_str().unwrap()), (304, "\"x\""));
    let (status, _, body) = fetch(&mut b, get("/")).await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]), "an interim 103 is passed over");
    for _ in 0..4 {
        next_request(&mut up).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_with_unclear_framing_is_a_502_and_its_connection_is_not_reused() {
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    ] {
        let mut up = scripted(vec![bad, OK_HELLO], |_| false).await;
        let (addr, gate, _) = lean(up.addr, config()).await;
        let mut b = browser(addr).await;
        let (status, _, body) = fetch(&mut b, get("/")).await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(bad));
        assert_eq!(&body[..], b"The IDE is not reachable.", "nothing of code-server's answer leaks");
        // The browser's connection goes on, on a new code-server connection.
        let (status, _, body) = fetch(&mut b, get("/")).await;
        assert_eq!((status, &body[..]), (200, &b"hello"[..]));
        next_request(&mut up).await;
        next_request(&mut up).await;
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
        assert_eq!(*gate.answered.lock().unwrap(), [502, 200]);
    }
}

#[tokio::test]
async fn a_chunked_answer_that_breaks_off_is_a_502_or_a_failed_body() {
    let broken: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX";
    let big: &'static [u8] = Box::leak(
        [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n"[..], &[b'x'; 0x10000], b"\r\n5\r\nhelloXX"]
            .concat()
            .into_boxed_slice(),
    );
    // Broken before anything reached the browser: a 502 it can show.
    let up = scripted(vec![broken], |_| true).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let (status, _, body) = fetch(&mut browser(addr).await, get("/")).await;
    assert_eq!((status, &body[..]), (502, &b"The IDE is not reachable."[..]));
    // Broken after the head and 64 KiB went out: the browser sees the body fail, not end.
    let up = scripted(vec![big], |_| true).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    b.ready().await.unwrap();
    let resp = b.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err(), "a broken body must not look complete");
}

#[tokio::test]
async fn a_kept_connection_that_code_server_closed_is_replaced_for_a_get() {
    // Closes after every answer without saying so, as a code-server restarting would.
    let mut up = scripted(vec![OK_HELLO], |_| true).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    for _ in 0..3 {
        let (status, _, body) = fetch(&mut b, get("/")).await;
        assert_eq!((status, &body[..]), (200, &b"hello"[..]));
        next_request(&mut up).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn small_bodies_and_pipelined_requests_are_forwarded_in_order() {
    let mut up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /a HTTP/1.1\r\nHost: dev-6001.localhost\r\nContent-Length: 7\r\n\r\npayload\
          GET /b HTTP/1.1\r\nHost: dev-6001.localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{answer}");
    assert!(answer.ends_with("connection: close\r\n\r\nhello"), "{answer}");
    let first = next_request(&mut up).await;
    assert!(
        first.starts_with("POST /a HTTP/1.1\r\n") && first.ends_with("content-length: 7\r\n\r\npayload"),
        "{first}"
    );
    assert!(next_request(&mut up).await.starts_with("GET /b HTTP/1.1\r\n"));
}

#[tokio::test]
async fn the_gates_own_answers_are_sent_and_the_connection_goes_on() {
    let up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, gate, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    let (status, headers, body) = fetch(&mut b, get("/refuse")).await;
    assert_eq!((status, &body[..]), (401, &b"Open this IDE from the zlh portal."[..]));
    assert_eq!(headers.get("cache-control").unwrap(), "no-store");
    assert_eq!(fetch(&mut b, get("/")).await.0, 200);
    assert_eq!(*gate.answered.lock().unwrap(), [401, 200]);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "the refused request reached nobody");
}

#[tokio::test]
async fn unreachable_and_silent_code_servers_are_502_and_504() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (addr, _, _) = lean(closed, config()).await;
    assert_eq!(fetch(&mut browser(addr).await, get("/")).await.0, 502);

    let silent = scripted(vec![b""], |_| false).await;
    let config = ProxyConfig { response_timeout: Duration::from_millis(300), ..config() };
    let (addr, _, _) = lean(silent.addr, config).await;
    let (status, _, body) = fetch(&mut browser(addr).await, get("/")).await;
    assert_eq!((status, &body[..]), (504, &b"The IDE did not answer in time."[..]));
}

/// Sends `bytes` and returns what the full server would be handed, read until `bytes.len()`.
async fn handed_over(bytes: &[u8]) -> Vec<u8> {
    let up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, _, mut handed) = lean(up.addr, config()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut rest = tokio::time::timeout(WAIT, handed.recv()).await.expect("handed over").unwrap();
    let mut got = vec![0u8; bytes.len()];
    tokio::time::timeout(WAIT, rest.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(up.connections.load(Ordering::SeqCst), 0, "nothing reached code-server");
    got
}

#[tokio::test]
async fn what_the_lean_path_does_not_take_is_handed_over_byte_for_byte() {
    let big_body = format!("POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nContent-Length: {}\r\n\r\n", h1::MAX_BODY + 1);
    let big_head = format!("GET / HTTP/1.1\r\nHost: dev-1.localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(h1::MAX_HEAD));
    let cases: Vec<&[u8]> = vec![
        b"GET / HTTP/1.1\r\nHost: api.example\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: dev-1.localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: dev-1.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        b"GET http://dev-1.localhost/ HTTP/1.1\r\nHost: dev-1.localhost\r\n\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: dev-1.localhost\r\n\r\n",
        b"GET /a\"b HTTP/1.1\r\nHost: dev-1.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: dev-1.localhost\r\nHost: dev-2.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: dev-1.localhost\r\nConnection: x-private\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : dev-1.localhost\r\n\r\n",
        big_body.as_bytes(),
        big_head.as_bytes(),
    ];
    for bytes in cases {
        assert_eq!(handed_over(bytes).await, bytes, "{}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)]));
    }
}

#[tokio::test]
async fn a_request_after_lean_ones_is_handed_over_from_its_first_byte() {
    let mut up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, _, mut handed) = lean(up.addr, config()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let second = b"GET /ws HTTP/1.1\r\nHost: dev-1.localhost\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    s.write_all(b"GET / HTTP/1.1\r\nHost: dev-1.localhost\r\n\r\n").await.unwrap();
    s.write_all(second).await.unwrap();
    let mut rest = tokio::time::timeout(WAIT, handed.recv()).await.expect("handed over").unwrap();
    let mut got = vec![0u8; second.len()];
    rest.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], &second[..]);
    assert!(next_request(&mut up).await.starts_with("GET / HTTP/1.1"));
    let mut answer = vec![0u8; 4096];
    let n = s.read(&mut answer).await.unwrap();
    assert!(answer[..n].ends_with(b"hello"), "the first request was answered before the hand-over");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever a client sends, the lean path neither panics nor loses a byte: it answers, closes,
    /// or hands over exactly what was sent.
    #[test]
    fn hostile_bytes_are_answered_closed_or_handed_over_intact(
        prefix in prop::sample::select(vec![
            "GET / HTTP/1.1\r\nHost: dev-1.localhost\r\n",
            "POST / HTTP/1.1\r\nHost: dev-1.localhost\r\nContent-Length: 4\r\n",
            "GET / HTTP/1.1\r\n",
            "",
        ]),
        tail in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = prefix.as_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let up = scripted(vec![OK_HELLO], |_| false).await;
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, peer) = listener.accept().await.unwrap();
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let gate = TestGate { target: up.addr, answered: Mutex::new(Vec::new()) };
            let proxy = Proxy::new(config());
            let served = tokio::time::timeout(WAIT, h1::serve(server, peer, &gate, &proxy, "http", &ConnectionLimits::default(), std::future::pending()))
                .await
                .expect("the lean path finishes");
            if let Served::Handover(mut rest) = served {
                let mut got = Vec::new();
                rest.read_to_end(&mut got).await.unwrap();
                assert!(bytes.ends_with(&got) && !got.is_empty(), "handed over bytes must be the unanswered tail");
            }
        });
    }
}

#[tokio::test]
async fn stopping_closes_a_connection_between_requests_not_during_one() {
    let mut up = scripted(vec![b"", OK_HELLO], |_| false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let target = up.addr;
    let served = tokio::spawn(async move {
        let (s, peer) = listener.accept().await.unwrap();
        let gate = TestGate { target, answered: Mutex::new(Vec::new()) };
        let proxy = Proxy::new(ProxyConfig { response_timeout: Duration::from_millis(500), ..config() });
        let stop = async move {
            let _ = stop_rx.await;
        };
        matches!(h1::serve(s, peer, &gate, &proxy, "http", &ConnectionLimits::default(), stop).await, Served::Closed)
    });
    let mut b = browser(addr).await;
    b.ready().await.unwrap();
    // The first request waits on a code-server that never answers; stopping meanwhile does not
    // cut it off: it ends with its own answer (here the 504).
    let pending = tokio::spawn(b.send_request(get("/")));
    next_request(&mut up).await;
    stop_tx.send(()).unwrap();
    let resp = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), 504);
    assert!(tokio::time::timeout(WAIT, served).await.unwrap().unwrap(), "then the connection closes");
}

#[tokio::test]
async fn client_addresses_are_the_peer_unless_the_peer_is_a_trusted_proxy() {
    let spoofing = || {
        http::Request::get("/")
            .header("host", "dev-6001.localhost:4000")
            .header("x-forwarded-for", "10.0.0.1, 127.0.0.1")
            .header("x-real-ip", "10.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let forwarding = |seen: &str| {
        let lines: Vec<String> = seen
            .split("\r\n")
            .filter(|l| l.starts_with("x-forwarded-for:") || l.starts_with("x-real-ip:"))
            .map(str::to_owned)
            .collect();
        lines
    };
    // Nobody trusted (the default): both say the peer, once, whatever the browser sent.
    let mut up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, _, _) = lean(up.addr, config()).await;
    let mut b = browser(addr).await;
    assert_eq!(fetch(&mut b, spoofing()).await.0, 200);
    let seen = next_request(&mut up).await.to_ascii_lowercase();
    assert_eq!(forwarding(&seen), ["x-forwarded-for: 127.0.0.1", "x-real-ip: 127.0.0.1"], "{seen}");

    // The peer is a configured proxy: its chain is kept and the peer appended, its X-Real-IP kept.
    let trusted = ProxyConfig {
        trusted_proxies: zlh_core::ide::forwarding::TrustedProxies::parse(&["127.0.0.1/32"]).unwrap(),
        ..config()
    };
    let mut up = scripted(vec![OK_HELLO], |_| false).await;
    let (addr, _, _) = lean(up.addr, trusted).await;
    let mut b = browser(addr).await;
    assert_eq!(fetch(&mut b, spoofing()).await.0, 200);
    let seen = next_request(&mut up).await.to_ascii_lowercase();
    assert_eq!(forwarding(&seen), ["x-forwarded-for: 10.0.0.1, 127.0.0.1, 127.0.0.1", "x-real-ip: 10.0.0.1"], "{seen}");
}

#[tokio::test]
async fn a_connection_owes_its_first_head_within_the_head_timeout_and_may_idle_longer_after_an_answer() {
    let limits = ConnectionLimits {
        head_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let up = scripted(vec![OK_HELLO], |_| false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (target, served_limits) = (up.addr, limits.clone());
    tokio::spawn(async move {
        loop {
            let (s, peer) = listener.accept().await.unwrap();
            let limits = served_limits.clone();
            tokio::spawn(async move {
                let gate = TestGate { target, answered: Mutex::new(Vec::new()) };
                let proxy = Proxy::new(config());
                h1::serve(s, peer, &gate, &proxy, "http", &limits, std::future::pending()).await
            });
        }
    });

    // Silent, or part of a head: closed at the head timeout, not the idle one.
    for sent in [&b""[..], b"GET / HTTP/1.1\r\nHost: dev-6001.localhost\r\n"] {
        let started = std::time::Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect("closed").unwrap();
        let took = started.elapsed();
        assert!(took >= limits.head_timeout && took < limits.idle_timeout, "{sent:?}: closed after {took:?}");
    }

    // Answered, then idle: kept for the idle timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: dev-6001.localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"hello") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert_ne!(n, 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let answered = std::time::Instant::now();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.expect("closed").unwrap();
    let idle = answered.elapsed();
    assert!(idle >= limits.idle_timeout, "an answered connection was closed after {idle:?} idle");
}
