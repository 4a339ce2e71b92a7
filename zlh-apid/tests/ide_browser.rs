//! The hosted IDE in a real browser: headless Chromium (driven over the DevTools protocol) opens
//! the URL of an IDE token, gets the session cookie on `dev-<vmid>.localhost:<port>` with no DNS
//! set-up, lands on a URL without the token, loads a page and talks HTTP and WebSocket to the
//! stand-in code-server through the API's host proxy; when the server stops, the open WebSocket
//! is closed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMsg, WebSocketUpgrade};
use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing;
use zlh_apid::servers::repo::{self, state, Kind};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The page the stand-in code-server serves: an HTTP call, then a WebSocket round trip, and the
/// outcome written into the page for the test to read.
const PAGE: &str = r#"<!doctype html><html><body><div id="out">loading</div><script>
const out = document.getElementById('out');
fetch('/data').then(r => r.json()).then(d => {
  const ws = new WebSocket('ws://' + location.host + '/ws');
  ws.onopen = () => ws.send('ping');
  ws.onmessage = e => { if (e.data === 'pong') out.textContent = 'http:' + d.ok + ' ws:pong'; };
  ws.onclose = () => { out.textContent += ' closed'; };
}).catch(e => { out.textContent = 'failed: ' + e; });
</script></body></html>"#;

async fn code_server() -> SocketAddr {
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/data", get(|| async { Json(json!({"ok": "yes"})) }))
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
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
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
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

/// A DevTools protocol session: calls by id, events skipped.
struct Cdp {
    ws: Ws,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({"id": self.next, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await.expect("DevTools answer");
            let Some(Ok(Message::Text(t))) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == self.next {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it yields a string containing `needle`.
    async fn wait_text(&mut self, expression: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expression).await;
            let s = v.as_str().unwrap_or_default().to_string();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < deadline, "{expression} never showed {needle:?}; last {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_the_hosted_ide_and_loses_it_when_the_server_stops() {
    let t = testing::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ApiConfig { ide_recheck_every: Duration::from_millis(200), ..ApiConfig::default() };
    let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
    let ide = zlh_apid::ide::IdeState::new(&config, &[9u8; 32], addr.port()).unwrap();
    let router = zlh_apid::ide::mount(zlh_apid::http::app(app.clone()), app.clone(), Arc::clone(&ide));
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
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
    let code = code_server().await;
    let s = repo::insert(&app.db, me["id"].as_str().unwrap(), Kind::Dev, "browser", "basic", &json!({})).await.unwrap();
    repo::set_vmid(&app.db, &s.id, 6001).await.unwrap();
    repo::set_endpoint(&app.db, &s.id, "http://127.0.0.1:9/", Some(&code.to_string())).await.unwrap();
    repo::set_state(&app.db, &s.id, state::RUNNING, None).await.unwrap();

    let token: Value = http
        .post(api(&format!("/api/dev/{}/ide-token", s.id)))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = token["url"].as_str().unwrap_or_else(|| panic!("{token}")).to_string();
    assert!(url.starts_with(&format!("http://dev-6001.localhost:{}/", addr.port())), "{url}");

    let browser = Browser::launch();
    let (ws, _) = tokio_tungstenite::connect_async(browser.devtools.as_str()).await.unwrap();
    let mut cdp = Cdp { ws, next: 0, session: None };
    let target = cdp.call("Target.createTarget", json!({"url": url})).await;
    let attached = cdp.call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());

    // Through the proxy: the page, its HTTP call and its WebSocket.
    let text = cdp
        .wait_text("document.getElementById('out') ? document.getElementById('out').textContent : ''", "ws:pong")
        .await;
    assert_eq!(text, "http:yes ws:pong");
    // The token is gone from the address bar; the session cookie is not readable by scripts.
    let href = cdp.eval("location.href").await;
    assert_eq!(href, json!(format!("http://dev-6001.localhost:{}/?folder=/home/dev/workspace", addr.port())));
    let cookies = cdp.eval("document.cookie").await;
    assert!(!cookies.as_str().unwrap_or_default().contains("zlh"), "HttpOnly: {cookies}");

    // The server stops: the open WebSocket is closed by the API.
    repo::set_state(&app.db, &s.id, "stopped", None).await.unwrap();
    cdp.wait_text("document.getElementById('out').textContent", "closed").await;
    drop(browser);
}
