//! The IDE in a real browser: headless Chromium (driven over the DevTools protocol) against the
//! API with the IDE mounted and a stand-in code-server that, like code-server, refuses WebSocket
//! upgrades whose `Origin` is not the host it was asked for.
//!
//! - Hosted: the URL of an IDE token sets the session cookie on `dev-<vmid>.localhost:<port>` (no
//!   DNS set-up), lands on a URL without the token, and the page's HTTP call and WebSocket round
//!   trip work through the host proxy. A page on another origin cannot open that WebSocket; a
//!   fresh browser with no cookie gets 401 and none of the IDE; when the server stops, the open
//!   WebSocket is closed.
//! - Legacy path: `GET /api/dev/{id}/ide?token=…&mode=path` on the API host leads to
//!   `/__ide/<vmid>/`, where the same page (relative URLs only) works the same way.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMsg, WebSocketUpgrade};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing::{self, TestDb};
use zlh_apid::servers::repo::{self, state, Kind};
use zlh_apid::state::AppState;

const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(30);
/// What the API answers a dev host or legacy path without a session.
const NO_SESSION: &str = zlh_apid::ide::NO_SESSION;

/// The page the stand-in code-server serves: an HTTP call, then a WebSocket round trip, and the
/// outcome written into the page for the test to read. Relative URLs only, like code-server's,
/// so it works at `/` on a dev host and under `/__ide/<vmid>/` on the API host.
const PAGE: &str = r#"<!doctype html><html><body><div id="out">loading</div><script>
const out = document.getElementById('out');
fetch('data').then(r => r.json()).then(d => {
  const u = new URL('ws', location.href);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(u);
  ws.onopen = () => ws.send('ping');
  ws.onmessage = e => { if (e.data === 'pong') out.textContent = 'http:' + d.ok + ' ws:pong'; };
  ws.onclose = () => { out.textContent += ' closed'; };
}).catch(e => { out.textContent = 'failed: ' + e; });
</script></body></html>"#;

/// What the stand-in code-server saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    ws_accepted: AtomicUsize,
    ws_refused: AtomicUsize,
    /// `Origin` of every accepted WebSocket.
    origins: Mutex<Vec<String>>,
}

/// code-server's WebSocket origin check (`authenticateOrigin` in its `src/node/http.ts`): without
/// an `Origin` (not a browser) the upgrade is let through; otherwise the origin's `host[:port]`
/// must equal the request's host, which is `Forwarded: host=…` if present, else the first
/// `X-Forwarded-Host`, else `Host`, all compared in lowercase.
fn origin_matches_host(headers: &HeaderMap) -> bool {
    let first = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let Some(origin) = first("origin") else { return true };
    let Ok(origin) = url::Url::parse(&origin) else { return false };
    let Some(name) = origin.host_str() else { return false };
    let origin = match origin.port() {
        Some(p) => format!("{name}:{p}"),
        None => name.to_owned(),
    }
    .to_ascii_lowercase();
    let forwarded = first("forwarded").and_then(|f| {
        f.split([';', ',']).find_map(|part| {
            let (k, v) = part.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("host") && !v.is_empty()).then(|| v.trim().to_owned())
        })
    });
    let x_forwarded = first("x-forwarded-host").and_then(|x| x.split(',').next().map(str::to_owned));
    let host = forwarded.or(x_forwarded).or_else(|| first("host"));
    host.is_some_and(|h| h.trim().to_ascii_lowercase() == origin)
}

async fn code_server() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (ws_seen, count) = (seen.clone(), seen.clone());
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/data", get(|| async { Json(json!({"ok": "yes"})) }))
        .route(
            "/ws",
            get(move |ws: WebSocketUpgrade, headers: HeaderMap| async move {
                if !origin_matches_host(&headers) {
                    ws_seen.ws_refused.fetch_add(1, Ordering::SeqCst);
                    return (StatusCode::FORBIDDEN, "origin does not match host").into_response();
                }
                ws_seen.ws_accepted.fetch_add(1, Ordering::SeqCst);
                let origin = headers.get("origin").and_then(|o| o.to_str().ok()).unwrap_or_default().to_owned();
                ws_seen.origins.lock().unwrap().push(origin);
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if let WsMsg::Text(t) = msg {
                            let reply = if t.as_str() == "ping" { "pong" } else { "?" };
                            if socket.send(WsMsg::Text(reply.into())).await.is_err() {
                                return;
                            }
                        }
                    }
                })
                .into_response()
            }),
        )
        .layer(axum::middleware::from_fn(move |req: Request, next: axum::middleware::Next| {
            count.requests.fetch_add(1, Ordering::SeqCst);
            async move { next.run(req).await }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// The API with the IDE mounted on 127.0.0.1:0, a user and her running dev server at vmid 6001
/// whose code-server is the stand-in.
struct Setup {
    addr: SocketAddr,
    app: Arc<AppState>,
    bearer: String,
    server: String,
    code: Arc<Seen>,
    _db: TestDb,
}

async fn setup() -> Setup {
    let t = testing::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ApiConfig { ide_recheck_every: Duration::from_millis(200), ..ApiConfig::default() };
    let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
    let ide = zlh_apid::ide::IdeState::new(&config, &[9u8; 32], addr.port()).unwrap();
    let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app.clone(), ide);
    tokio::spawn(zlh_apid::http::server::serve(listener, front, std::future::pending()));
    let http = reqwest::Client::new();
    let api = |p: &str| format!("http://{addr}{p}");
    let r: Value = http
        .post(api("/api/auth/register"))
        .json(&json!({"email": "ada@example.com", "username": "ada", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = r["token"].as_str().unwrap().to_string();
    let me: Value = http.get(api("/api/auth/me")).bearer_auth(&bearer).send().await.unwrap().json().await.unwrap();
    let (code_addr, code) = code_server().await;
    let s = repo::insert(&t.db, me["id"].as_str().unwrap(), Kind::Dev, "browser", "basic", &json!({})).await.unwrap();
    repo::set_vmid(&t.db, &s.id, 6001).await.unwrap();
    repo::set_endpoint(&t.db, &s.id, "http://127.0.0.1:9/", Some(&code_addr.to_string())).await.unwrap();
    repo::set_state(&t.db, &s.id, state::RUNNING, None).await.unwrap();
    Setup { addr, app, bearer, server: s.id, code, _db: t }
}

impl Setup {
    /// A fresh IDE token: `{token, url, …}`.
    async fn ide_token(&self) -> Value {
        let url = format!("http://{}/api/dev/{}/ide-token", self.addr, self.server);
        let r = reqwest::Client::new().post(url).bearer_auth(&self.bearer).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    fn requests(&self) -> usize {
        self.code.requests.load(Ordering::SeqCst)
    }

    fn ws_upgrades(&self) -> (usize, usize) {
        (self.code.ws_accepted.load(Ordering::SeqCst), self.code.ws_refused.load(Ordering::SeqCst))
    }
}

/// Headless Chromium with its DevTools endpoint; killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: String,
}

impl Browser {
    fn launch() -> Self {
        assert!(std::path::Path::new(CHROMIUM).exists(), "Chromium is needed (Debian package chromium)");
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let devtools = rx.recv_timeout(Duration::from_secs(60)).expect("Chromium's DevTools endpoint");
        Browser { child, _profile: profile, devtools }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol connection: calls by id; events kept until asked for.
struct Cdp {
    ws: Ws,
    next: u64,
    events: Vec<Value>,
}

/// One page, attached in flat mode: its session id.
struct Tab(String);

impl Cdp {
    async fn connect(browser: &Browser) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(browser.devtools.as_str()).await.unwrap();
        Cdp { ws, next: 0, events: Vec::new() }
    }

    async fn read(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a DevTools message in time");
            match m {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(_)) => {}
                other => panic!("DevTools connection ended: {other:?}"),
            }
        }
    }

    async fn call(&mut self, tab: Option<&Tab>, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({"id": self.next, "method": method, "params": params});
        if let Some(Tab(s)) = tab {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let v = self.read().await;
            if v["id"] == self.next {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The first event (kept or yet to come) of `tab` for which `pred` holds.
    async fn event(&mut self, tab: &Tab, method: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let matches = |v: &Value| v["sessionId"] == tab.0 && v["method"] == method && pred(&v["params"]);
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i)["params"].clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no {method} event");
            let v = self.read().await;
            if matches(&v) {
                return v["params"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// A new blank page, in `context` (a fresh browser context: no cookies) or the default one,
    /// with network events on.
    async fn open_tab(&mut self, context: Option<&str>) -> Tab {
        let mut params = json!({"url": "about:blank"});
        if let Some(c) = context {
            params["browserContextId"] = json!(c);
        }
        let target = self.call(None, "Target.createTarget", params).await;
        let attached =
            self.call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
        let tab = Tab(attached["sessionId"].as_str().unwrap().to_owned());
        self.call(Some(&tab), "Network.enable", json!({})).await;
        tab
    }

    /// A fresh browser context: its own cookie jar, like a new private window.
    async fn fresh_context(&mut self) -> String {
        let r = self.call(None, "Target.createBrowserContext", json!({})).await;
        r["browserContextId"].as_str().unwrap().to_owned()
    }

    /// Navigates `tab` to `url` and returns the HTTP status of the document it lands on (after
    /// redirects) and that document's URL.
    async fn navigate(&mut self, tab: &Tab, url: &str) -> (u16, String) {
        let r = self.call(Some(tab), "Page.navigate", json!({"url": url})).await;
        assert!(r["errorText"].is_null(), "navigating to {url}: {r}");
        let loader = r["loaderId"].clone();
        let doc =
            self.event(tab, "Network.responseReceived", |p| p["type"] == "Document" && p["loaderId"] == loader).await;
        let status = doc["response"]["status"].as_u64().unwrap() as u16;
        (status, doc["response"]["url"].as_str().unwrap().to_owned())
    }

    async fn eval(&mut self, tab: &Tab, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let r = self.call(Some(tab), "Runtime.evaluate", params).await;
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it yields a string containing `needle`. The page writes its
    /// progress into the DOM and announces nothing, so this polls.
    async fn wait_text(&mut self, tab: &Tab, expression: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.eval(tab, expression).await;
            let s = v.as_str().unwrap_or_default().to_string();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < deadline, "{expression} never showed {needle:?}; last {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const OUT: &str = "document.getElementById('out') ? document.getElementById('out').textContent : ''";

/// Opens `url` in a fresh browser context (no cookies at all) and checks the answer is the 401
/// page, with nothing from code-server in it and nothing sent to code-server.
async fn refused_without_a_session(cdp: &mut Cdp, s: &Setup, url: &str, message: &str) {
    let before = s.requests();
    let context = cdp.fresh_context().await;
    let tab = cdp.open_tab(Some(&context)).await;
    let (status, _) = cdp.navigate(&tab, url).await;
    assert_eq!(status, 401, "{url} without a session");
    let body = cdp.wait_text(&tab, "document.body ? document.body.innerText : ''", message).await;
    assert_eq!(body.trim(), message);
    assert_eq!(cdp.eval(&tab, "document.getElementById('out') === null").await, json!(true));
    assert_eq!(s.requests(), before, "nothing reached code-server for {url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_the_hosted_ide_and_loses_it_when_the_server_stops() {
    let s = setup().await;
    let port = s.addr.port();
    let token = s.ide_token().await;
    let url = token["url"].as_str().unwrap_or_else(|| panic!("{token}")).to_string();
    assert!(url.starts_with(&format!("http://dev-6001.localhost:{port}/")), "{url}");

    let browser = Browser::launch();
    let mut cdp = Cdp::connect(&browser).await;
    let tab = cdp.open_tab(None).await;

    // Through the proxy: the page, its HTTP call and its WebSocket, which the stand-in only
    // accepts because Origin and the host it is told agree.
    let (status, landed) = cdp.navigate(&tab, &url).await;
    assert_eq!(status, 200);
    let hosted = format!("http://dev-6001.localhost:{port}/?folder=/home/dev/workspace");
    assert_eq!(landed, hosted, "the token is gone from the address");
    assert_eq!(cdp.wait_text(&tab, OUT, "ws:pong").await, "http:yes ws:pong");
    assert_eq!(cdp.eval(&tab, "location.href").await, json!(hosted));
    let cookies = cdp.eval(&tab, "document.cookie").await;
    assert!(!cookies.as_str().unwrap_or_default().contains("zlh"), "HttpOnly: {cookies}");
    assert_eq!(s.ws_upgrades(), (1, 0));
    assert_eq!(*s.code.origins.lock().unwrap(), [format!("http://dev-6001.localhost:{port}")]);

    // A page on another origin, in the same browser (which holds the IDE cookie), cannot open
    // the IDE's WebSocket: nothing reaches code-server.
    let other = cdp.open_tab(None).await;
    let (status, _) = cdp.navigate(&other, &format!("http://127.0.0.1:{port}/api/health")).await;
    assert_eq!(status, 200);
    let attempt = format!(
        "new Promise(done => {{ const ws = new WebSocket('ws://dev-6001.localhost:{port}/ws'); \
         ws.onopen = () => done('open'); ws.onclose = e => done('closed:' + e.code); }})"
    );
    assert_eq!(cdp.eval(&other, &attempt).await, json!("closed:1006"));
    assert_eq!(s.ws_upgrades(), (1, 0), "the cross-origin upgrade never reached code-server");

    // A fresh browser with no cookie gets the 401 page, at the IDE and at the spent link.
    refused_without_a_session(&mut cdp, &s, &hosted, NO_SESSION).await;
    let spent = "This IDE link has expired or was already used. Open the IDE again.";
    refused_without_a_session(&mut cdp, &s, &url, spent).await;

    // The server stops: the open WebSocket is closed by the API.
    repo::set_state(&s.app.db, &s.server, "stopped", None).await.unwrap();
    cdp.wait_text(&tab, OUT, "closed").await;
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_the_legacy_path_ide_on_the_api_host() {
    let s = setup().await;
    let port = s.addr.port();
    let token = s.ide_token().await;
    let t = token["token"].as_str().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/dev/{}/ide?token={t}&mode=path", s.server);

    let browser = Browser::launch();
    let mut cdp = Cdp::connect(&browser).await;
    let tab = cdp.open_tab(None).await;
    let (status, landed) = cdp.navigate(&tab, &url).await;
    assert_eq!(status, 200);
    let ide = format!("http://127.0.0.1:{port}/__ide/6001/?folder=/home/dev/workspace");
    assert_eq!(landed, ide);
    assert_eq!(cdp.wait_text(&tab, OUT, "ws:pong").await, "http:yes ws:pong");
    assert_eq!(cdp.eval(&tab, "location.href").await, json!(ide));
    let cookies = cdp.eval(&tab, "document.cookie").await;
    assert!(!cookies.as_str().unwrap_or_default().contains("zlh"), "HttpOnly: {cookies}");
    assert_eq!(s.ws_upgrades(), (1, 0));
    assert_eq!(*s.code.origins.lock().unwrap(), [format!("http://127.0.0.1:{port}")]);

    refused_without_a_session(&mut cdp, &s, &ide, NO_SESSION).await;

    repo::set_state(&s.app.db, &s.server, state::SUSPENDED, None).await.unwrap();
    cdp.wait_text(&tab, OUT, "closed").await;
    drop(browser);
}

/// The stand-in's origin check is real: the browser tests above pass only because the proxy
/// hands code-server a host that matches the page's origin.
#[tokio::test]
async fn the_stand_in_refuses_websockets_whose_origin_is_not_its_host() {
    let (addr, seen) = code_server().await;
    let dev = "dev-6001.localhost:4000";
    let upgrade = |headers: Vec<(&'static str, String)>| async move {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(k, v.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    };
    let host = |h: &str| ("host", h.to_owned());
    let origin = |o: &str| ("origin", o.to_owned());
    assert_eq!(upgrade(vec![host(dev), origin(&format!("http://{dev}"))]).await, 101);
    assert_eq!(upgrade(vec![host(dev), origin("HTTP://DEV-6001.LOCALHOST:4000")]).await, 101);
    assert_eq!(upgrade(vec![host(dev)]).await, 101, "no Origin: not a browser");
    assert_eq!(upgrade(vec![host(dev), origin("http://dev-6002.localhost:4000")]).await, 403);
    assert_eq!(upgrade(vec![host(dev), origin("http://dev-6001.localhost:4001")]).await, 403);
    assert_eq!(upgrade(vec![host(dev), origin("http://dev-6001.localhost")]).await, 403);
    assert_eq!(upgrade(vec![host(dev), origin("null")]).await, 403);
    // The host code-server compares with is the forwarded one when a proxy says so.
    let xfh = |h: &str| ("x-forwarded-host", h.to_owned());
    assert_eq!(upgrade(vec![host("127.0.0.1:9"), xfh(dev), origin(&format!("http://{dev}"))]).await, 101);
    assert_eq!(upgrade(vec![host(dev), xfh("evil.example"), origin(&format!("http://{dev}"))]).await, 403);
    let fwd = ("forwarded", "for=1.2.3.4;host=evil.example".to_owned());
    assert_eq!(upgrade(vec![host(dev), fwd, origin(&format!("http://{dev}"))]).await, 403);
    assert_eq!(seen.ws_accepted.load(Ordering::SeqCst), 4);
    assert_eq!(seen.ws_refused.load(Ordering::SeqCst), 6);
}
