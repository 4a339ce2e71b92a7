//! The files, mods and runtimes relays, attacked over real HTTP/1.1 (raw bytes: no client
//! normalises the path) and HTTP/2 (h2c with prebuilt URIs), on SQLite and PostgreSQL: no
//! spelling of a dot segment, separator or control character reaches the agent's `/config`,
//! `/status`, `/metrics`, power or code-server routes with the API's token; the tenant gets the
//! API's JSON error and the agent sees nothing. Legit names (nested dirs, spaces, unicode,
//! `a..b`) still arrive as they were meant.

#[macro_use]
mod api_support;

use api_support::{TestApi, User};
use axum::body::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// User A's running game server and dev container.
struct Fixture {
    a: User,
    game: String,
    game_vmid: u32,
    dev: String,
    dev_vmid: u32,
}

async fn setup(api: &TestApi) -> Fixture {
    let a = api.register("alice").await;
    let game = api.create_game(&a).await;
    let dev = api.create_dev(&a, "node").await;
    let game_vmid = api.wait_running(&a, &game).await["vmid"].as_u64().unwrap() as u32;
    let dev_vmid = api.wait_running(&a, &dev).await["vmid"].as_u64().unwrap() as u32;
    Fixture { a, game, game_vmid, dev, dev_vmid }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

/// One connection style to the API; HTTP/2 keeps its connection, HTTP/1.1 opens one a request.
struct Wire {
    api_addr: std::net::SocketAddr,
    proto: Proto,
    h2: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
}

impl Wire {
    async fn new(api: &TestApi, proto: Proto) -> Self {
        let mut wire = Self { api_addr: api.addr, proto, h2: None };
        if proto == Proto::H2 {
            let tcp = tokio::net::TcpStream::connect(api.addr).await.unwrap();
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(conn);
            wire.h2 = Some(send);
        }
        wire
    }

    /// Sends `method path` exactly as written, with the user's token; status and JSON body.
    async fn send(&mut self, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        let (status, text) = match self.proto {
            Proto::H1 => self.raw_h1(method, path, token, body).await,
            Proto::H2 => {
                let uri: hyper::Uri = format!("http://{}{path}", self.api_addr).parse().expect("a URI");
                assert_eq!(uri.path_and_query().unwrap().as_str(), path, "the URI is sent as written");
                let req = hyper::Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                let send = self.h2.as_mut().unwrap();
                let resp = tokio::time::timeout(api_support::DEADLINE, send.send_request(req))
                    .await
                    .expect("the API answers in time")
                    .expect("an HTTP/2 answer");
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }
        };
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn raw_h1(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.api_addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api_addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(api_support::DEADLINE, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {text}"));
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }
}

/// The agent routes no relayed path may reach.
const AGENT_ONLY: &[&str] =
    &["config", "status", "metrics", "start", "stop", "restart", "kill", "dev/codeserver/stop", "console/stream"];

/// Every spelling of "leave `family` and go to `target`" this test knows.
fn escapes(family: &str, target: &str) -> Vec<String> {
    let back = target.replace('/', "\\");
    let enc = |sep: &str| target.replace('/', sep);
    vec![
        format!("{family}/..\\{back}"),
        format!("{family}/..\\{target}"),
        format!("{family}/x/..\\..\\{back}"),
        format!("{family}/.\\..\\{back}"),
        format!("{family}\\..\\{back}"),
        format!("{family}/../{target}"),
        format!("{family}/./../{target}"),
        format!("{family}/%2e%2e/{target}"),
        format!("{family}/%2E%2E/{target}"),
        format!("{family}/%2E./{target}"),
        format!("{family}/.%2e/{target}"),
        format!("{family}/%2e/../{target}"),
        format!("{family}/..%2f{}", enc("%2f")),
        format!("{family}/..%2F{}", enc("%2F")),
        format!("{family}/..%5c{}", enc("%5c")),
        format!("{family}/%2e%2e%5C{}", enc("%5C")),
        format!("{family}/%c0%ae%c0%ae/{target}"),
        format!("{family}/%e0%80%ae%e0%80%ae/{target}"),
        format!("{family}/..%c0%af{}", enc("%c0%af")),
        format!("{family}/%252e%252e/{target}"),
        format!("{family}/%252e%252e%252f{}", enc("%252f")),
        format!("{family}/%25%32%65%25%32%65/{target}"),
        format!("{family}//../{target}"),
        format!("{family}/..%00/{target}"),
        format!("{family}/%00/../{target}"),
        format!("{family}/..%0d%0a/{target}"),
        format!("{family}/%3F/../{target}"),
        format!("{family}/x%23/../../{target}"),
        format!("{family}/x%3F/..%2f..%2f{}", enc("%2f")),
    ]
}

/// No request since `before` came from the relay (the API's own status poll may have run: it is
/// the only thing allowed, and never carries the relay's `X-Forwarded-Prefix`).
fn assert_nothing_relayed(api: &TestApi, before: usize, what: impl std::fmt::Debug) {
    let reached: Vec<_> = api.agent.seen().into_iter().skip(before).collect();
    for seen in &reached {
        let own_poll = seen.method == "GET" && seen.path == "/status" && seen.header("x-forwarded-prefix").is_none();
        assert!(own_poll, "[{} {what:?}] a refused path reached the agent: {seen:?}", api.backend);
    }
}

async fn no_spelling_reaches_an_agent_only_route(api: &TestApi, proto: Proto) {
    let f = setup(api).await;
    let backend = api.backend;
    let configs_before = api.agent.configs();
    let seen_before = api.agent.seen().len();
    let mut wire = Wire::new(api, proto).await;
    let payload = json!({ "vmid": f.game_vmid, "memory_mb": 65536 }).to_string();
    let mut tried = 0;
    for family in ["files", "mods", "runtimes"] {
        for target in AGENT_ONLY {
            let id = if target.starts_with("dev/") { &f.dev } else { &f.game };
            for tail in escapes(family, target) {
                for method in ["GET", "POST"] {
                    let path = format!("/api/servers/{id}/{tail}");
                    let (status, body) = wire.send(method, &path, &f.a.token, &payload).await;
                    assert!(
                        status == 400 || status == 404,
                        "[{backend} {proto:?}] {method} {path} was not refused: {status} {body}"
                    );
                    if status == 400 {
                        assert!(
                            body["error"].is_string(),
                            "[{backend} {proto:?}] {path}: the API's error body: {body}"
                        );
                    }
                    tried += 1;
                }
            }
        }
    }
    assert!(tried > 1000, "{tried}");
    assert_nothing_relayed(api, seen_before, proto);
    assert!(api.agent.actions(f.game_vmid).is_empty(), "[{backend} {proto:?}] a power action ran");
    assert!(api.agent.actions(f.dev_vmid).is_empty(), "[{backend} {proto:?}] code-server was switched");
    assert_eq!(api.agent.configs(), configs_before, "[{backend} {proto:?}] a payload was rewritten");
}

async fn legit_names_arrive_as_meant(api: &TestApi, proto: Proto) {
    let f = setup(api).await;
    let backend = api.backend;
    let mut wire = Wire::new(api, proto).await;
    let base = format!("/api/servers/{}", f.game);
    let last = |api: &TestApi| api.agent.seen_by(f.game_vmid).last().cloned().expect("a relayed request");

    // Names travel in the query: passed on as they came, and never a route.
    let query = "path=worlds%2Fmy%20world%2F%C3%BCber%20%E2%9C%93%2Fa..b";
    let (status, body) = wire.send("GET", &format!("{base}/files/list?{query}"), &f.a.token, "").await;
    assert_eq!(status, 200, "[{backend} {proto:?}] {body}");
    assert_eq!(last(api).path, format!("/files/list?{query}"), "[{backend} {proto:?}]");
    let (status, body) = wire.send("GET", &format!("{base}/files/list?x=/../../config"), &f.a.token, "").await;
    assert_eq!(status, 200, "[{backend} {proto:?}] {body}");
    assert_eq!(last(api).path, "/files/list?x=/../../config", "[{backend} {proto:?}] the query stayed a query");

    // Names in path segments: decoded once by the API, encoded again, decoded once by the agent.
    let cases = [
        ("DELETE", "mods/my%20mod%20%C3%BC%20a..b.jar", "my mod ü a..b.jar", Value::Null),
        ("POST", "mods/a..b/enable", "a..b", json!("enable")),
        ("POST", "mods/..a/disable", "..a", json!("disable")),
        ("POST", "mods/x%3Fy%23z/disable", "x?y#z", json!("disable")),
        ("POST", "mods/100%25.jar/enable", "100%.jar", json!("enable")),
    ];
    for (method, tail, name, action) in cases {
        let (status, body) = wire.send(method, &format!("{base}/{tail}"), &f.a.token, "").await;
        assert_eq!(status, 200, "[{backend} {proto:?}] {method} {tail}: {body}");
        assert_eq!(body["name"], json!(name), "[{backend} {proto:?}] {tail}");
        assert_eq!(body["action"], action, "[{backend} {proto:?}] {tail}");
        assert_eq!(body["vmid"], json!(f.game_vmid.to_string()));
    }
    let (status, body) = wire.send("GET", &format!("{base}/runtimes"), &f.a.token, "").await;
    assert_eq!((status, body["vmid"].clone()), (200, json!(f.game_vmid)), "[{backend} {proto:?}] {body}");
    assert!(api.agent.actions(f.game_vmid).is_empty());
}

/// HTTP/1.1 only: bytes a client library would never send.
async fn raw_fragments_and_backslashes_stay_out(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let wire = Wire::new(&api, Proto::H1).await;
    let before = api.agent.seen_by(f.game_vmid).len();
    let (status, _) =
        wire.raw_h1("GET", &format!("/api/servers/{}/files/list#/../../config", f.game), &f.a.token, "").await;
    let seen = api.agent.seen_by(f.game_vmid);
    // A fragment is not part of the route: either refused, or the list it names, never /config.
    for s in &seen[before..] {
        assert!(s.path.starts_with("/files/list"), "[{backend}] {status}: {s:?}");
    }
    let (status, body) =
        wire.raw_h1("POST", &format!("/api/servers/{}/mods/..\\..\\stop", f.game), &f.a.token, "").await;
    assert_eq!(status, 400, "[{backend}] {body}");
    assert!(api.agent.actions(f.game_vmid).is_empty());
}

/// The console's mode is one the agent knows, or the socket is refused before the agent sees it.
async fn console_mode_is_checked(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let before = api.agent.seen().len();
    let auth = format!("Bearer {}", f.a.token);
    for query in ["?mode=../../config", "?mode=shell%26token%3Dx", "?mode=shell%23", "?mode="] {
        let refused = api.console_with_headers(&f.dev, query, &[("authorization", &auth)]).await;
        let (status, body) = refused.err().unwrap_or_else(|| panic!("[{backend}] {query} opened a console"));
        assert_eq!(status, 400, "[{backend}] {query}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    assert_nothing_relayed(&api, before, "console");
    let (mut ws, _) =
        api.console_with_headers(&f.dev, "?mode=shell&other=x", &[("authorization", &auth)]).await.unwrap();
    // An echo proves the agent's socket is open.
    ws.send(Message::text("hi")).await.unwrap();
    let echo = tokio::time::timeout(api_support::DEADLINE, ws.next()).await.expect("an echo in time");
    assert!(matches!(echo, Some(Ok(Message::Text(ref t))) if t.as_str() == format!("{}: hi", f.dev_vmid)), "{echo:?}");
    let opened: Vec<_> =
        api.agent.seen_by(f.dev_vmid).into_iter().filter(|s| s.path.starts_with("/console/")).map(|s| s.path).collect();
    assert_eq!(opened, ["/console/stream?mode=shell"], "[{backend}] only the mode reaches the agent");
    let _ = ws.close(None).await;
}

async fn h1_escapes(api: TestApi) {
    no_spelling_reaches_an_agent_only_route(&api, Proto::H1).await
}

async fn h2_escapes(api: TestApi) {
    no_spelling_reaches_an_agent_only_route(&api, Proto::H2).await
}

async fn h1_legit_names(api: TestApi) {
    legit_names_arrive_as_meant(&api, Proto::H1).await
}

async fn h2_legit_names(api: TestApi) {
    legit_names_arrive_as_meant(&api, Proto::H2).await
}

on_both_backends!(tokio::test(flavor = "multi_thread", worker_threads = 2);
    h1_escapes,
    h2_escapes,
    h1_legit_names,
    h2_legit_names,
    raw_fragments_and_backslashes_stay_out,
    console_mode_is_checked,
);
