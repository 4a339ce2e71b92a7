//! Attacks on browser IDE access, each refused, over real sockets against the whole API with the
//! IDE mounted: forged, expired, replayed and misdirected tokens; a session cookie of one IDE on
//! another; a user who lost the server; `Host`, `X-Forwarded-Host` and `Forwarded` spoofing;
//! `..` and encoded traversal; and attempts to steer the proxy elsewhere (absolute-form request
//! targets, `CONNECT`, odd ports).
//!
//! Two users each own one running dev server with its own stand-in code-server that records
//! every request it gets: alice has vmid 6001, bob has vmid 6002. The attacker is alice (or an
//! outsider) going for bob's IDE. Each test checks the answer and that no stand-in saw a request
//! it should not have; steering attempts also name a "victim" listener that must accept nothing.
//! Requests a well-behaved client cannot send are written as raw HTTP/1.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message as WsMsg, WebSocketUpgrade};
use axum::extract::Request;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing::{self, TestDb};
use zlh_apid::ide::IdeState;
use zlh_apid::servers::repo::{self, state, Kind};
use zlh_apid::state::AppState;
use zlh_core::ide::{IdeConfig, IdeRouter, IdeSession, LocalIdeRouter};
use zlh_core::token::TokenKey;
use zlh_core::Vmid;

const WAIT: Duration = Duration::from_secs(10);
const MASTER: [u8; 32] = [9; 32];
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A stand-in code-server that records each request as `METHOD target host=…` and answers with
/// it (plus the headers it saw); `/ws` is a WebSocket echo.
#[derive(Clone)]
struct CodeServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl CodeServer {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = Router::new()
            .route(
                "/ws",
                get(|ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(|mut socket| async move {
                        while let Some(Ok(msg)) = socket.recv().await {
                            if matches!(msg, WsMsg::Text(_)) && socket.send(msg).await.is_err() {
                                return;
                            }
                        }
                    })
                }),
            )
            .fallback(|req: Request| async move {
                let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (k, v) in req.headers() {
                    headers.entry(k.as_str().to_owned()).or_default().push(v.to_str().unwrap_or("<bytes>").to_owned());
                }
                Json(json!({ "method": req.method().as_str(), "path": req.uri().to_string(), "headers": headers }))
            })
            .layer(axum::middleware::from_fn(move |req: Request, next: axum::middleware::Next| {
                let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                log.lock().unwrap().push(format!("{} {} host={host}", req.method(), req.uri()));
                async move { next.run(req).await }
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A listener an attack tries to steer the proxy to. Counts the connections it accepts (before
/// dropping them, so a proxy that got here has been counted by the time it answers).
struct Victim {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Victim {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Self { addr, accepted }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn untouched(&self) {
        assert_eq!(self.accepted.load(Ordering::SeqCst), 0, "a connection reached the victim {}", self.addr);
    }
}

struct Env {
    addr: SocketAddr,
    app: Arc<AppState>,
    ide: Arc<IdeState>,
    http: reqwest::Client,
    /// alice's server: vmid 6001.
    a: CodeServer,
    /// bob's server: vmid 6002.
    b: CodeServer,
    alice: String,
    alice_id: String,
    bob: String,
    bob_id: String,
    a_id: String,
    b_id: String,
    _db: TestDb,
}

async fn start(t: TestDb) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ApiConfig { ide_recheck_every: Duration::from_millis(100), ..ApiConfig::default() };
    let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
    let ide = IdeState::new(&config, &MASTER, addr.port()).unwrap();
    let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app.clone(), ide.clone());
    tokio::spawn(zlh_apid::http::server::serve(listener, front, std::future::pending()));
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .resolve("dev-6001.localhost", addr)
        .resolve("dev-6002.localhost", addr)
        .build()
        .unwrap();
    let (a, b) = (CodeServer::start().await, CodeServer::start().await);
    let mut env = Env {
        addr,
        app,
        ide,
        http,
        a,
        b,
        alice: String::new(),
        alice_id: String::new(),
        bob: String::new(),
        bob_id: String::new(),
        a_id: String::new(),
        b_id: String::new(),
        _db: t,
    };
    (env.alice, env.alice_id) = env.user("alice").await;
    (env.bob, env.bob_id) = env.user("bob").await;
    env.a_id = env.dev_server(&env.alice_id.clone(), 6001, env.a.addr).await;
    env.b_id = env.dev_server(&env.bob_id.clone(), 6002, env.b.addr).await;
    env
}

async fn sqlite() -> Env {
    start(testing::sqlite().await).await
}

impl Env {
    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn api_host(&self) -> String {
        self.addr.to_string()
    }

    fn dev_host(&self, vmid: u32) -> String {
        format!("dev-{vmid}.localhost:{}", self.addr.port())
    }

    fn dev(&self, vmid: u32, path: &str) -> String {
        format!("http://{}{path}", self.dev_host(vmid))
    }

    async fn user(&self, name: &str) -> (String, String) {
        let body =
            json!({ "email": format!("{name}@example.com"), "username": name, "password": "correct horse battery" });
        let r = self.http.post(self.api("/api/auth/register")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
        let me: Value =
            self.http.get(self.api("/api/auth/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        (token, me["id"].as_str().unwrap().to_owned())
    }

    async fn dev_server(&self, user_id: &str, vmid: u32, code: SocketAddr) -> String {
        let db = &self.app.db;
        let s = repo::insert(db, user_id, Kind::Dev, "attack test", "basic", &json!({})).await.unwrap();
        repo::set_vmid(db, &s.id, vmid).await.unwrap();
        repo::set_endpoint(db, &s.id, "http://127.0.0.1:9/", Some(&code.to_string())).await.unwrap();
        repo::set_state(db, &s.id, state::RUNNING, None).await.unwrap();
        s.id
    }

    /// A fresh IDE token from the API (`POST /api/dev/{id}/ide-token`).
    async fn token(&self, bearer: &str, id: &str) -> String {
        let r = self.http.post(self.api(&format!("/api/dev/{id}/ide-token"))).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

    /// `GET /api/dev/{id}/ide?token=…` on `vmid`'s dev host.
    async fn bootstrap(&self, vmid: u32, id: &str, token: &str) -> reqwest::Response {
        self.http.get(self.dev(vmid, &format!("/api/dev/{id}/ide?token={token}"))).send().await.unwrap()
    }

    /// alice's hosted session cookie for 6001, the genuine way (`zlh_ide=…`).
    async fn alice_cookie(&self) -> String {
        let token = self.token(&self.alice, &self.a_id).await;
        let r = self.bootstrap(6001, &self.a_id, &token).await;
        assert_eq!(r.status(), 303);
        r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
    }

    /// `session`, minted straight from the router, recorded as opened from alice's sign-in as the
    /// bootstrap records it: an IDE session lives only as long as the API session it came from.
    async fn opened_by_alice_sign_in(&self, session: IdeSession) -> IdeSession {
        let api = zlh_apid::auth::session::verify(&self.app, &self.alice, chrono::Utc::now()).await.unwrap();
        zlh_apid::ide::ledger::record_origin(&self.app.db, &session.id, &api.id, session.expires_at).await.unwrap();
        session
    }

    /// alice's legacy path-proxy cookie for `/__ide/6001`.
    async fn alice_path_cookie(&self) -> String {
        let token = self.token(&self.alice, &self.a_id).await;
        let r = self
            .http
            .get(self.api(&format!("/api/dev/{}/ide?token={token}&mode=path", self.a_id)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
    }

    async fn get_dev(&self, vmid: u32, path: &str, cookie: &str) -> reqwest::Response {
        self.http.get(self.dev(vmid, path)).header("cookie", cookie).send().await.unwrap()
    }

    /// A WebSocket upgrade to `path` with `Host: host`; the status of a refusal.
    async fn ws_status(&self, host: &str, path: &str, cookie: &str) -> u16 {
        let mut req = format!("ws://{}{path}", self.addr).into_client_request().unwrap();
        req.headers_mut().insert("host", host.parse().unwrap());
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        req.headers_mut().insert("origin", format!("http://{host}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    }

    /// Neither stand-in code-server has seen anything since `before` (their hit counts).
    fn nothing_reached(&self, before: (usize, usize), what: &str) {
        assert_eq!(self.a.hits(), before.0, "{what}: alice's code-server saw {:?}", self.a.seen());
        assert_eq!(self.b.hits(), before.1, "{what}: bob's code-server saw {:?}", self.b.seen());
    }

    fn hits(&self) -> (usize, usize) {
        (self.a.hits(), self.b.hits())
    }

    /// The HTTP/1.1 request `line` (`GET / HTTP/1.1`) with `headers` and `Connection: close`,
    /// written as is.
    async fn raw(&self, line: &str, headers: &[(&str, &str)]) -> Raw {
        let mut req = format!("{line}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        raw(self.addr, &req).await
    }
}

/// A raw answer: status and the whole text.
#[derive(Debug)]
struct Raw {
    status: u16,
    text: String,
}

/// Writes `request` and reads the answer: its head, then the body by `Content-Length` or chunked
/// end, or until the server closes.
async fn raw(addr: SocketAddr, request: &str) -> Raw {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            let Some(end) = text.find("\r\n\r\n") else { continue };
            let head = text[..end].to_ascii_lowercase();
            let body = &buf[end + 4..];
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) || (head.contains("chunked") && body.ends_with(b"0\r\n\r\n")) {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no complete answer to {request:?}; got {:?}", String::from_utf8_lossy(&buf)));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?} for {request:?}"));
    Raw { status, text }
}

fn refused(status: u16) -> bool {
    (400..500).contains(&status)
}

// ---------------------------------------------------------------------------------------------
// Tokens and cookies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_signed_with_another_key_is_refused() {
    let env = sqlite().await;
    // The same API, another master secret: another deployment's (or an attacker's) IDE key.
    let key = TokenKey::new(&zlh_apid::state::derive(&[8u8; 32], "zlh ide key v1")).unwrap();
    let forger = LocalIdeRouter::new(IdeConfig::default(), key).unwrap();
    let before = env.hits();

    let forged = forger.issue_token(&env.alice_id, Vmid(6001)).unwrap();
    let r = env.bootstrap(6001, &env.a_id, &forged.token).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let path_mode = env.api(&format!("/api/dev/{}/ide?token={}&mode=path", env.a_id, forged.token));
    let r = env.http.get(path_mode).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    let session = forger.issue_session(&env.alice_id, Vmid(6001)).unwrap();
    let cookie = format!("zlh_ide={}", session.value);
    assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 401);
    assert_eq!(env.ws_status(&env.dev_host(6001), "/ws", &cookie).await, 401);
    let r = env.http.get(env.api("/__ide/6001/")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 401);
    env.nothing_reached(before, "forged credentials");

    // The genuine key does open it: what was refused was the signature. But only as a session
    // opened from a sign-in: one the key signed and no sign-in opened is refused as well.
    let unopened = env.ide.router.issue_session(&env.alice_id, Vmid(6001)).unwrap();
    assert_eq!(env.get_dev(6001, "/", &format!("zlh_ide={}", unopened.value)).await.status(), 401);
    let real = env.opened_by_alice_sign_in(env.ide.router.issue_session(&env.alice_id, Vmid(6001)).unwrap()).await;
    assert_eq!(env.get_dev(6001, "/", &format!("zlh_ide={}", real.value)).await.status(), 200);
}

#[tokio::test]
async fn an_unsigned_or_tampered_token_is_refused() {
    let env = sqlite().await;
    let genuine = env.token(&env.alice, &env.a_id).await;
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    let none = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let before = env.hits();

    // alg none, with and without a signature.
    for forged in [format!("{none}.{}.", parts[1]), format!("{none}.{}", parts[1])] {
        let r = env.bootstrap(6001, &env.a_id, &forged).await;
        assert_eq!(r.status(), 401, "{forged}");
        assert!(r.headers().get("set-cookie").is_none());
    }
    // alice's genuine token re-pointed at bob's vmid, and made to last a day: the old signature.
    claims["vmid"] = json!(6002);
    claims["exp"] = json!(chrono::Utc::now().timestamp() + 86_400);
    let tampered = format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2]);
    let r = env.bootstrap(6002, &env.b_id, &tampered).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    env.nothing_reached(before, "unsigned and tampered tokens");

    // Untouched, the same token still opens alice's IDE once.
    assert_eq!(env.bootstrap(6001, &env.a_id, &genuine).await.status(), 303);
}

#[tokio::test]
async fn an_expired_token_or_session_is_refused() {
    let env = sqlite().await;
    let past = chrono::Utc::now() - chrono::Duration::minutes(10);
    let before = env.hits();

    let stale = env.ide.router.issue_token_at(&env.alice_id, Vmid(6001), past).unwrap();
    let r = env.bootstrap(6001, &env.a_id, &stale.token).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    // A session that ended an hour ago (12 h lifetime, issued 13 h ago).
    let long_ago = chrono::Utc::now() - chrono::Duration::hours(13);
    let old = env.ide.router.issue_session_at(&env.alice_id, Vmid(6001), long_ago).unwrap();
    let old = env.opened_by_alice_sign_in(old).await;
    let cookie = format!("zlh_ide={}", old.value);
    assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 401);
    assert_eq!(env.ws_status(&env.dev_host(6001), "/ws", &cookie).await, 401);
    env.nothing_reached(before, "expired credentials");

    // Issued now by the same router, both work: the clock is what refused them.
    let fresh = env.opened_by_alice_sign_in(env.ide.router.issue_session(&env.alice_id, Vmid(6001)).unwrap()).await;
    assert_eq!(env.get_dev(6001, "/", &format!("zlh_ide={}", fresh.value)).await.status(), 200);
}

#[tokio::test]
async fn a_token_for_another_vmid_is_refused_at_bootstrap() {
    let env = sqlite().await;
    // alice's own second server at 6003, so the only thing wrong is the vmid.
    let c = CodeServer::start().await;
    let c_id = env.dev_server(&env.alice_id, 6003, c.addr).await;
    let http = reqwest::Client::builder().redirect(Policy::none()).resolve("dev-6003.localhost", env.addr).build();
    let http = http.unwrap();
    let before = env.hits();

    let for_6001 = env.token(&env.alice, &env.a_id).await;
    // On the other server's host, naming the other server.
    let r = http.get(env.dev(6003, &format!("/api/dev/{c_id}/ide?token={for_6001}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // On bob's host, naming bob's server.
    let r = env.bootstrap(6002, &env.b_id, &for_6001).await;
    assert_eq!(r.status(), 401);
    // Through the legacy path bootstrap on the API host, naming the other server.
    let r = env.http.get(env.api(&format!("/api/dev/{c_id}/ide?token={for_6001}&mode=path"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    env.nothing_reached(before, "tokens for another vmid");
    assert_eq!(c.hits(), 0);

    // Still unspent, it opens its own IDE.
    assert_eq!(env.bootstrap(6001, &env.a_id, &for_6001).await.status(), 303);
}

#[tokio::test]
async fn a_token_opens_an_ide_once() {
    let env = sqlite().await;
    let token = env.token(&env.alice, &env.a_id).await;
    assert_eq!(env.bootstrap(6001, &env.a_id, &token).await.status(), 303);
    let again = env.bootstrap(6001, &env.a_id, &token).await;
    assert_eq!(again.status(), 401, "a token copied from a history or a log is spent");
    assert!(again.headers().get("set-cookie").is_none());
    let path = env.http.get(env.api(&format!("/api/dev/{}/ide?token={token}&mode=path", env.a_id))).send().await;
    assert_eq!(path.unwrap().status(), 401, "spent for the path proxy as well");
}

#[tokio::test]
async fn tokens_and_session_cookies_are_not_interchangeable() {
    let env = sqlite().await;
    let before = env.hits();
    let token = env.token(&env.alice, &env.a_id).await;
    assert_eq!(env.get_dev(6001, "/", &format!("zlh_ide={token}")).await.status(), 401);
    let session = env.ide.router.issue_session(&env.alice_id, Vmid(6001)).unwrap();
    let r = env.bootstrap(6001, &env.a_id, &session.value).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // The API's own bearer session is no IDE cookie either.
    assert_eq!(env.get_dev(6001, "/", &format!("zlh_ide={}", env.alice)).await.status(), 401);
    let bearer = env.http.get(env.dev(6001, "/")).bearer_auth(&env.alice).send().await.unwrap();
    assert_eq!(bearer.status(), 401);
    env.nothing_reached(before, "swapped credentials");
}

#[tokio::test]
async fn a_session_cookie_of_one_vmid_is_refused_on_another_host() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "alice's cookie opens alice's IDE");
    let before = env.hits();

    assert_eq!(env.get_dev(6002, "/", &cookie).await.status(), 401);
    let post = env.http.post(env.dev(6002, "/x")).header("cookie", &cookie);
    assert_eq!(post.header("origin", format!("http://{}", env.dev_host(6002))).send().await.unwrap().status(), 401);
    assert_eq!(env.ws_status(&env.dev_host(6002), "/ws", &cookie).await, 401);
    // The hosted cookie on the legacy path of bob's vmid, and alice's path cookie there too.
    let r = env.http.get(env.api("/__ide/6002/")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let path_cookie = env.alice_path_cookie().await;
    let r = env.http.get(env.api("/__ide/6002/")).header("cookie", &path_cookie).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(env.ws_status(&env.api_host(), "/__ide/6002/ws", &path_cookie).await, 401);
    // Both cookies at once (one per name and one duplicated): still only alice's vmid.
    let both = format!("{cookie}; {path_cookie}; zlh_ide=garbage");
    assert_eq!(env.get_dev(6002, "/", &both).await.status(), 401);
    env.nothing_reached(before, "alice's cookies on bob's IDE");
}

#[tokio::test]
async fn a_user_who_lost_the_server_is_refused_once_the_access_memo_lapses() {
    for (backend, t) in testing::both().await {
        let env = start(t).await;
        let cookie = env.alice_cookie().await;
        let path_cookie = env.alice_path_cookie().await;
        let pending = env.token(&env.alice, &env.a_id).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "{backend}");

        // Behind the API's back (an operator in the database, another replica): nothing in this
        // process hears of it, so the memoised answer may stand for `ide_access_cache_ms`, and
        // not a moment longer than scheduling takes.
        sqlx::query("UPDATE servers SET user_id = $1 WHERE id = $2")
            .bind(&env.bob_id)
            .bind(&env.a_id)
            .execute(env.app.db.pool())
            .await
            .unwrap();
        let changed = std::time::Instant::now();
        let bound = env.app.config.ide_access_cache + Duration::from_secs(1);
        loop {
            let status = env.get_dev(6001, "/", &cookie).await.status();
            if status == 404 {
                break;
            }
            assert_eq!(status, 200, "{backend}");
            assert!(
                changed.elapsed() < bound,
                "{backend}: still let in {:?} after losing the server",
                changed.elapsed()
            );
            // A poll interval, not a timing assumption: the bound above is what is asserted.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let before = env.hits();
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 404, "{backend}");
        assert_eq!(env.ws_status(&env.dev_host(6001), "/ws", &cookie).await, 404, "{backend}");
        let r = env.http.get(env.api("/__ide/6001/")).header("cookie", &path_cookie).send().await.unwrap();
        assert_eq!(r.status(), 404, "{backend}");
        // A token issued before the loss opens nothing either.
        let r = env.bootstrap(6001, &env.a_id, &pending).await;
        assert_eq!(r.status(), 404, "{backend}");
        assert!(r.headers().get("set-cookie").is_none());
        // Nor does the API hand out new ones.
        let r = env.http.post(env.api(&format!("/api/dev/{}/ide-token", env.a_id))).bearer_auth(&env.alice).send();
        assert_eq!(r.await.unwrap().status(), 404, "{backend}");
        env.nothing_reached(before, backend);
    }
}

// ---------------------------------------------------------------------------------------------
// Host spoofing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn x_forwarded_host_does_not_make_the_api_host_a_dev_host() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let before = env.hits();
    for header in ["x-forwarded-host", "x-forwarded-server", "x-host", "x-original-host"] {
        let r = env
            .http
            .get(env.api("/?folder=/home/dev/workspace"))
            .header(header, env.dev_host(6001))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{header}: the API's own not-found");
    }
    env.nothing_reached(before, "X-Forwarded-Host on the API host");
}

#[tokio::test]
async fn forwarded_host_does_not_make_the_api_host_a_dev_host() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let before = env.hits();
    for forwarded in [
        format!("host={}", env.dev_host(6001)),
        format!("host=\"{}\";proto=http", env.dev_host(6001)),
        format!("for=1.2.3.4, host={}", env.dev_host(6001)),
    ] {
        let r = env
            .http
            .get(env.api("/?folder=/home/dev/workspace"))
            .header("forwarded", forwarded.as_str())
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{forwarded}");
    }
    env.nothing_reached(before, "Forwarded on the API host");
}

#[tokio::test]
async fn forwarding_headers_do_not_steer_between_dev_hosts() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let before = env.hits();
    // On bob's host with alice's cookie, claiming to be alice's host: refused.
    for (name, value) in
        [("x-forwarded-host", env.dev_host(6001)), ("forwarded", format!("host={}", env.dev_host(6001)))]
    {
        let r = env.http.get(env.dev(6002, "/")).header(name, &value).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.status(), 401, "{name}: {value}");
    }
    env.nothing_reached(before, "forwarding headers naming alice's host on bob's");

    // On alice's host, naming bob's: alice's own code-server answers, told the real host, and
    // the made-up headers stay behind (code-server trusts `Forwarded` for its origin check).
    let r = env
        .http
        .get(env.dev(6001, "/probe"))
        .header("x-forwarded-host", env.dev_host(6002))
        .header("forwarded", format!("host={}", env.dev_host(6002)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/probe");
    assert_eq!(seen["headers"]["x-forwarded-host"], json!([env.dev_host(6001)]));
    assert!(seen["headers"].get("forwarded").is_none(), "{seen}");
    assert_eq!(env.b.hits(), before.1, "bob's code-server saw {:?}", env.b.seen());
}

#[tokio::test]
async fn duplicate_or_conflicting_host_headers_are_refused() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let (dev1, dev2, api) = (env.dev_host(6001), env.dev_host(6002), env.api_host());
    let before = env.hits();
    for hosts in [
        [dev1.as_str(), dev2.as_str()],
        [dev2.as_str(), dev1.as_str()],
        [api.as_str(), dev1.as_str()],
        [dev1.as_str(), api.as_str()],
    ] {
        let r = env.raw("GET / HTTP/1.1", &[("Host", hosts[0]), ("Host", hosts[1]), ("Cookie", &cookie)]).await;
        assert_eq!(r.status, 400, "Host {hosts:?}: {}", r.text);
    }
    // Several names in one header, or separated by whitespace.
    for host in [format!("{dev1},{dev2}"), format!("{dev1}, {dev2}"), format!("{dev1} {dev2}")] {
        let r = env.raw("GET / HTTP/1.1", &[("Host", &host), ("Cookie", &cookie)]).await;
        assert!(refused(r.status), "Host {host:?}: {}", r.text);
    }
    env.nothing_reached(before, "conflicting Host headers");
}

/// RFC 9112 §3.2: a request with more than one `Host` line gets 400, even when they agree.
#[tokio::test]
async fn a_repeated_identical_host_header_is_refused() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let dev1 = env.dev_host(6001);
    let before = env.hits();
    let r = env.raw("GET / HTTP/1.1", &[("Host", &dev1), ("Host", &dev1), ("Cookie", &cookie)]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    env.nothing_reached(before, "two identical Host lines");
}

#[tokio::test]
async fn spoofed_host_spellings_never_reach_an_ide() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let port = env.addr.port();
    let before = env.hits();
    for host in [
        format!("dev-6001.localhost.:{port}"),
        format!("dev-06001.localhost:{port}"),
        format!("dev-6001.localhost.evil.example:{port}"),
        format!("evil.example.dev-6001.localhost:{port}"),
        format!("dev-6001.localhost:{port}.evil.example"),
        format!("dev-6001.localhost%3a{port}"),
        format!("dev%2d6001.localhost:{port}"),
        format!("alice@dev-6001.localhost:{port}"),
        format!("dev-6001.localhost:{port}@evil.example"),
        format!("[::1]:{port}"),
        format!("dev-6001.localhost:{port}/x"),
        format!("dev-6001.localhost\\@evil.example:{port}"),
    ] {
        let r = env.raw("GET /?folder=/home/dev/workspace HTTP/1.1", &[("Host", &host), ("Cookie", &cookie)]).await;
        assert!(refused(r.status), "Host {host:?}: {}", r.text);
    }
    env.nothing_reached(before, "spoofed Host spellings");
}

// ---------------------------------------------------------------------------------------------
// Steering the target
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn absolute_form_request_targets_never_steer_the_proxy() {
    let env = sqlite().await;
    let victim = Victim::start().await;
    let cookie = env.alice_cookie().await;
    let (dev1, dev2) = (env.dev_host(6001), env.dev_host(6002));
    let v = format!("127.0.0.1:{}", victim.port());
    let before = env.hits();
    for (target, host) in [
        (format!("http://{v}/"), dev1.clone()),
        (format!("http://{dev1}/"), v.clone()),
        (format!("http://{dev2}/"), dev1.clone()),
        (format!("http://{dev1}/"), dev2.clone()),
        ("http://evil.example/".to_owned(), "evil.example".to_owned()),
        (format!("http://{v}/"), v.clone()),
        (format!("http://{dev1}@{v}/"), dev1.clone()),
        (format!("http://{v}#@{dev1}/"), dev1.clone()),
        (format!("https://{v}/"), dev1.clone()),
    ] {
        let r = env.raw(&format!("GET {target} HTTP/1.1"), &[("Host", &host), ("Cookie", &cookie)]).await;
        assert!(refused(r.status), "GET {target} with Host {host}: {}", r.text);
    }
    // Without any Host line, the target's authority is the host: bob's IDE, with alice's cookie.
    let r = env.raw(&format!("GET http://{dev2}/ HTTP/1.1"), &[("Cookie", &cookie)]).await;
    assert_eq!(r.status, 401, "{}", r.text);
    env.nothing_reached(before, "absolute-form targets");
    victim.untouched();

    // Naming the victim on the legacy path proxy: the route table's target answers, not the
    // victim.
    let path_cookie = env.alice_path_cookie().await;
    let api = env.api_host();
    let line = format!("GET http://{v}/__ide/6001/probe HTTP/1.1");
    let r = env.raw(&line, &[("Host", &api), ("Cookie", &path_cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("\"path\":\"/probe\""), "{}", r.text);
    assert_eq!(env.a.seen().last().unwrap(), &format!("GET /probe host={api}"));
    victim.untouched();
}

#[tokio::test]
async fn connect_requests_are_refused() {
    let env = sqlite().await;
    let victim = Victim::start().await;
    let cookie = env.alice_cookie().await;
    let path_cookie = env.alice_path_cookie().await;
    let (dev1, api) = (env.dev_host(6001), env.api_host());
    let v = format!("127.0.0.1:{}", victim.port());
    let before = env.hits();
    for (target, host, cookie) in [
        (v.clone(), v.clone(), &cookie),
        (v.clone(), dev1.clone(), &cookie),
        (v.clone(), api.clone(), &path_cookie),
        ("127.0.0.1:22".to_owned(), "127.0.0.1:22".to_owned(), &cookie),
        (dev1.clone(), v.clone(), &cookie),
    ] {
        let r = env.raw(&format!("CONNECT {target} HTTP/1.1"), &[("Host", &host), ("Cookie", cookie)]).await;
        assert!(refused(r.status), "CONNECT {target} with Host {host}: {}", r.text);
    }
    env.nothing_reached(before, "CONNECT to other hosts");
    victim.untouched();
}

/// A `CONNECT` naming the dev host itself, with a valid cookie, is not a request for code-server:
/// a proxy that forwards it asks code-server to open a tunnel.
#[tokio::test]
async fn connect_to_the_dev_host_itself_is_refused() {
    let env = sqlite().await;
    let cookie = env.alice_cookie().await;
    let path_cookie = env.alice_path_cookie().await;
    let (dev1, api) = (env.dev_host(6001), env.api_host());
    let before = env.hits();
    let hosted = env.raw(&format!("CONNECT {dev1} HTTP/1.1"), &[("Host", &dev1), ("Cookie", &cookie)]).await;
    let path = env.raw("CONNECT /__ide/6001/ HTTP/1.1", &[("Host", &api), ("Cookie", &path_cookie)]).await;
    let seen = env.a.seen();
    assert!(refused(hosted.status), "CONNECT {dev1}: {}; code-server saw {seen:?}", hosted.text);
    assert!(refused(path.status), "CONNECT /__ide/6001/: {}; code-server saw {seen:?}", path.text);
    env.nothing_reached(before, "CONNECT to the dev host");
}

#[tokio::test]
async fn odd_ports_in_the_host_never_pick_the_target() {
    let env = sqlite().await;
    let victim = Victim::start().await;
    let cookie = env.alice_cookie().await;
    let before = env.hits();
    // Not a port at all: not a dev host, so the API's own not-found, whatever the cookie.
    for port in ["0", "99999", "65536", "-1", "+80", "080", "", "22:22", "0x16"] {
        let host = format!("dev-6001.localhost:{port}");
        let r = env.raw("GET /?folder=/home/dev/workspace HTTP/1.1", &[("Host", &host), ("Cookie", &cookie)]).await;
        assert!(refused(r.status), "Host {host:?}: {}", r.text);
    }
    // A real port that is not the API's, without a cookie: refused.
    for port in [victim.port().to_string(), "22".to_owned(), "65535".to_owned()] {
        let host = format!("dev-6001.localhost:{port}");
        let r = env.raw("GET / HTTP/1.1", &[("Host", &host)]).await;
        assert_eq!(r.status, 401, "Host {host:?}: {}", r.text);
    }
    env.nothing_reached(before, "odd ports");
    // With alice's cookie the port still picks nothing: the route table's code-server answers,
    // and the victim listening on that port is never contacted.
    let host = format!("dev-6001.localhost:{}", victim.port());
    let r = env.raw("GET /probe HTTP/1.1", &[("Host", &host), ("Cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(env.a.seen().last().unwrap(), &format!("GET /probe host={host}"));
    assert_eq!(env.b.hits(), before.1);
    victim.untouched();
}

// ---------------------------------------------------------------------------------------------
// Traversal
// ---------------------------------------------------------------------------------------------

const TRAVERSALS: &[&str] = &[
    "/../",
    "/%2e%2e/",
    "/%2E%2E/",
    "/..%2f",
    "/..%2F..%2Fapi%2Fservers",
    "/.%2e/api/servers",
    "/..;/",
    "/..\\",
    "//evil.example/",
    "/../api/servers",
];

#[tokio::test]
async fn traversal_on_a_dev_host_without_a_session_is_refused() {
    let env = sqlite().await;
    let before = env.hits();
    for path in TRAVERSALS {
        for vmid in [6001, 6002] {
            let r = env.raw(&format!("GET {path} HTTP/1.1"), &[("Host", &env.dev_host(vmid))]).await;
            assert!(refused(r.status), "{path}: {}", r.text);
        }
    }
    env.nothing_reached(before, "traversal without a session");
}

/// With a session, a traversal on a dev host stays inside that host's code-server: it reaches
/// neither the API nor another IDE nor a host named in the path.
#[tokio::test]
async fn traversal_on_a_dev_host_never_leaves_its_code_server() {
    let env = sqlite().await;
    let victim = Victim::start().await;
    let cookie = env.alice_cookie().await;
    let before = env.hits();
    let to_victim = format!("//127.0.0.1:{}/", victim.port());
    let bearer = format!("Bearer {}", env.alice);
    for path in TRAVERSALS.iter().copied().chain([to_victim.as_str(), "/../../__ide/6002/"]) {
        let a_before = env.a.hits();
        let headers = [("Host", env.dev_host(6001)), ("Cookie", cookie.clone()), ("Authorization", bearer.clone())];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = env.raw(&format!("GET {path} HTTP/1.1"), &headers).await;
        // Either refused outright (not a request target HTTP allows), or alice's code-server
        // got exactly that path on her host.
        if r.status == 200 {
            assert_eq!(env.a.seen().last().unwrap(), &format!("GET {path} host={}", env.dev_host(6001)));
            assert_eq!(env.a.hits(), a_before + 1);
        } else {
            assert!(refused(r.status), "{path}: {}", r.text);
            assert_eq!(env.a.hits(), a_before, "{path}");
        }
        assert!(!r.text.contains("\"servers\""), "never the API's answer: {}", r.text);
    }
    let reached = env.a.seen();
    for path in ["/../api/servers", to_victim.as_str()] {
        let line = format!("GET {path} host={}", env.dev_host(6001));
        assert!(reached.contains(&line), "{line} in {reached:?}");
    }
    assert_eq!(env.b.hits(), before.1, "bob's code-server saw {:?}", env.b.seen());
    victim.untouched();
}

#[tokio::test]
async fn traversal_on_the_legacy_path_never_reaches_another_ide() {
    let env = sqlite().await;
    let victim = Victim::start().await;
    let cookie = env.alice_path_cookie().await;
    let hosted = env.alice_cookie().await;
    let api = env.api_host();
    let before = env.hits();
    // Paths aimed at bob's vmid: refused (no session for it, not a vmid, or not a route).
    for path in [
        "/__ide/6002/",
        "/__ide/6002/../6001/",
        "/__ide/6002/%2e%2e/6001/",
        "/__ide/..%2f6002/",
        "/__ide/%2e%2e/6002/",
        "/__ide/..%2F__ide%2F6002/",
        "/__ide/6001%2f..%2f6002/",
        "/__ide/6001%2F..%2F6002/",
        "/__ide/6002%00/",
        "/__ide/6002%20/",
        "/__ide/+6002/",
        "/__ide/06002/",
        "/__ide/6002.0/",
        "/__ide/0x177a/",
        "/api/../__ide/6002/",
        "/%2e%2e/__ide/6002/",
        "/__ide/./6002/",
        "/__ide//6002/",
        "//__ide/6002/",
    ] {
        for c in [&cookie, &hosted] {
            let r = env.raw(&format!("GET {path} HTTP/1.1"), &[("Host", &api), ("Cookie", c)]).await;
            assert!(refused(r.status), "{path}: {}", r.text);
        }
    }
    // A percent-encoded vmid is sent to its one spelling, where the session is checked.
    let r = env.raw("GET /__ide/%36%30%30%32/x HTTP/1.1", &[("Host", &api), ("Cookie", &cookie)]).await;
    assert_eq!(r.status, 308, "{}", r.text);
    assert!(r.text.contains("location: /__ide/6002/\r\n"), "{}", r.text);
    env.nothing_reached(before, "traversal on the legacy path");

    // Inside alice's own prefix, `..` and friends go to alice's code-server as sent: never bob's,
    // never the victim's.
    let to_victim = format!("/__ide/6001//127.0.0.1:{}/", victim.port());
    for path in ["/__ide/6001/../6002/", "/__ide/6001/..%2f..%2f__ide%2f6002/", "/__ide/6001/%2e%2e/", &to_victim] {
        let r = env.raw(&format!("GET {path} HTTP/1.1"), &[("Host", &api), ("Cookie", &cookie)]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        let forwarded = path.strip_prefix("/__ide/6001").unwrap();
        assert_eq!(env.a.seen().last().unwrap(), &format!("GET {forwarded} host={api}"));
    }
    assert_eq!(env.b.hits(), before.1, "bob's code-server saw {:?}", env.b.seen());
    victim.untouched();
}
