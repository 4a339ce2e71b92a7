//! Browser IDE access through the whole API over real HTTP and WebSocket, on SQLite and
//! PostgreSQL: IDE tokens, the cookie bootstrap on `dev-<vmid>.localhost:<port>`, the host-based
//! and legacy path proxies to a stand-in code-server, and access ending while sockets are open.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMsg, WebSocketUpgrade};
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing::{self, TestDb};
use zlh_apid::db::Db;
use zlh_apid::ide::IdeState;
use zlh_apid::servers::repo::{self, state, Kind};
use zlh_apid::state::AppState;

const WAIT: Duration = Duration::from_secs(10);
type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A stand-in code-server: answers every path with what it saw, `/ws` is an echo that first
/// reports the upgrade request's headers. Counts the requests that reach it.
async fn code_server() -> (SocketAddr, Arc<AtomicUsize>) {
    fn seen(h: &HeaderMap) -> Value {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in h {
            map.entry(k.as_str().to_owned()).or_default().push(v.to_str().unwrap_or("<bytes>").to_owned());
        }
        json!(map)
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade, headers: HeaderMap| async move {
                let report = seen(&headers).to_string();
                ws.on_upgrade(move |mut socket| async move {
                    if socket.send(WsMsg::Text(report.into())).await.is_err() {
                        return;
                    }
                    while let Some(Ok(msg)) = socket.recv().await {
                        if matches!(msg, WsMsg::Text(_)) && socket.send(msg).await.is_err() {
                            return;
                        }
                    }
                })
            }),
        )
        .fallback(|req: Request| async move {
            Json(json!({ "path": req.uri().to_string(), "headers": seen(req.headers()) }))
        })
        .layer(axum::middleware::from_fn(move |req: Request, next: axum::middleware::Next| {
            h.fetch_add(1, Ordering::SeqCst);
            async move { next.run(req).await }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

struct Env {
    backend: &'static str,
    addr: SocketAddr,
    app: Arc<AppState>,
    ide: Arc<IdeState>,
    /// Resolves `dev-<n>.localhost` to the API; follows no redirects.
    http: reqwest::Client,
    code: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// The database, unless another replica's `Env` holds it.
    _db: Option<TestDb>,
}

/// The API as `serve` runs it, with the IDE mounted in front, on 127.0.0.1:0.
async fn start(backend: &'static str, t: TestDb, tweak: impl Fn(&mut ApiConfig)) -> Env {
    let db = t.db.clone();
    start_on(backend, db, Some(t), tweak).await
}

/// [`start`] on `db`, which `t` keeps alive unless another replica's `Env` does.
async fn start_on(backend: &'static str, db: Db, t: Option<TestDb>, tweak: impl Fn(&mut ApiConfig)) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ApiConfig { ide_recheck_every: Duration::from_millis(100), ..ApiConfig::default() };
    tweak(&mut config);
    let app = zlh_apid::state::for_tests(db, config.clone());
    let ide = IdeState::new(&config, &[9u8; 32], addr.port()).unwrap();
    let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app.clone(), ide.clone());
    tokio::spawn(zlh_apid::http::server::serve(listener, front, std::future::pending()));
    let mut http = reqwest::Client::builder().redirect(Policy::none());
    for vmid in 6001..6010 {
        http = http.resolve(&format!("dev-{vmid}.localhost"), addr);
    }
    let (code, hits) = code_server().await;
    Env { backend, addr, app, ide, http: http.build().unwrap(), code, hits, _db: t }
}

impl Env {
    /// A second API replica on the same database and secret, as behind one load balancer.
    async fn replica(&self) -> Env {
        start_on(self.backend, self.app.db.clone(), None, |_| {}).await
    }
}

async fn each_backend(tweak: impl Fn(&mut ApiConfig)) -> Vec<Env> {
    let mut envs = Vec::new();
    for (name, t) in testing::both().await {
        envs.push(start(name, t, &tweak).await);
    }
    envs
}

impl Env {
    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn dev_host(&self, vmid: u32) -> String {
        format!("dev-{vmid}.localhost:{}", self.addr.port())
    }

    fn dev(&self, vmid: u32, path: &str) -> String {
        format!("http://{}{path}", self.dev_host(vmid))
    }

    /// A new user: (bearer token, user id).
    async fn user(&self, name: &str) -> (String, String) {
        let body =
            json!({ "email": format!("{name}@example.com"), "username": name, "password": "correct horse battery" });
        let r = self.http.post(self.api("/api/auth/register")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", self.backend);
        let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
        let me: Value =
            self.http.get(self.api("/api/auth/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        (token, me["id"].as_str().unwrap().to_owned())
    }

    /// A running dev server of `user_id` at `vmid` whose code-server is the stand-in.
    async fn dev_server(&self, user_id: &str, vmid: u32) -> String {
        let db = &self.app.db;
        let s = repo::insert(db, user_id, Kind::Dev, "ide test", "basic", &json!({})).await.unwrap();
        repo::set_vmid(db, &s.id, vmid).await.unwrap();
        repo::set_endpoint(db, &s.id, "http://127.0.0.1:9/", Some(&self.code.to_string())).await.unwrap();
        repo::set_state(db, &s.id, state::RUNNING, None).await.unwrap();
        s.id
    }

    async fn ide_token(&self, bearer: &str, id: &str) -> reqwest::Response {
        self.http.post(self.api(&format!("/api/dev/{id}/ide-token"))).bearer_auth(bearer).send().await.unwrap()
    }

    /// Token → bootstrap on the dev host → the session cookie (`name=value`).
    async fn open_ide(&self, bearer: &str, id: &str) -> String {
        let t: Value = self.ide_token(bearer, id).await.json().await.unwrap();
        let r = self.http.get(t["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(r.status(), 303, "{}", self.backend);
        let set = r.headers()["set-cookie"].to_str().unwrap();
        set.split(';').next().unwrap().to_owned()
    }

    async fn get_dev(&self, vmid: u32, path: &str, cookie: &str) -> reqwest::Response {
        self.http.get(self.dev(vmid, path)).header("cookie", cookie).send().await.unwrap()
    }

    /// A WebSocket to `/ws` on `host` (sent as `Host`), with `cookie` and `origin`.
    async fn ws(&self, host: &str, path: &str, cookie: &str, origin: &str) -> Result<Ws, u16> {
        let mut req = format!("ws://{}{path}", self.addr).into_client_request().unwrap();
        req.headers_mut().insert("host", host.parse().unwrap());
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        req.headers_mut().insert("origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }

    async fn hosted_ws(&self, vmid: u32, cookie: &str) -> Ws {
        let origin = format!("http://{}", self.dev_host(vmid));
        let mut ws = self.ws(&self.dev_host(vmid), "/ws", cookie, &origin).await.expect("upgrade accepted");
        next_text(&mut ws).await;
        ws
    }
}

/// The next message, as text; a WebSocket over HTTP/1.1 or HTTP/2 alike.
async fn next_text<S>(ws: &mut S) -> String
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    match tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time") {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn echoes(ws: &mut Ws) {
    ws.send(Message::Text("ping".into())).await.unwrap();
    assert_eq!(next_text(ws).await, "ping");
}

/// The socket ends (close frame, error or EOF) within the bounded wait.
async fn closes<S>(ws: &mut S)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    });
    ended.await.expect("the WebSocket closes");
}

fn cookie_attrs(set_cookie: &str) -> Vec<String> {
    set_cookie.split(';').skip(1).map(|a| a.trim().to_ascii_lowercase()).collect()
}

#[tokio::test]
async fn tokens_go_only_to_the_owner_of_a_running_dev_server() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let (bob, _) = env.user("bob").await;
        let id = env.dev_server(&alice_id, 6001).await;

        let r = env.ide_token(&alice, &id).await;
        assert_eq!(r.status(), 200, "{}", env.backend);
        let t: Value = r.json().await.unwrap();
        let token = t["token"].as_str().unwrap();
        let url = t["url"].as_str().unwrap();
        assert_eq!(url, format!("http://dev-6001.localhost:{}/api/dev/{id}/ide?token={token}", env.addr.port()));
        assert_eq!(t["ideUrl"], format!("http://dev-6001.localhost:{}/?folder=/home/dev/workspace", env.addr.port()));
        let expires = chrono::DateTime::parse_from_rfc3339(t["expiresAt"].as_str().unwrap()).unwrap();
        let left = expires.timestamp() - chrono::Utc::now().timestamp();
        assert!((50..=61).contains(&left), "about a minute: {left}s");

        assert_eq!(env.ide_token(&bob, &id).await.status(), 404, "another user's server is not revealed");
        let anonymous = env.http.post(env.api(&format!("/api/dev/{id}/ide-token"))).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);

        repo::set_state(&env.app.db, &id, state::PROVISIONING, None).await.unwrap();
        let r = env.ide_token(&alice, &id).await;
        assert_eq!(r.status(), 409);
        assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("not running"));

        let game = repo::insert(&env.app.db, &alice_id, Kind::Game, "g", "basic", &json!({})).await.unwrap();
        repo::set_vmid(&env.app.db, &game.id, 5001).await.unwrap();
        repo::set_state(&env.app.db, &game.id, state::RUNNING, None).await.unwrap();
        assert_eq!(env.ide_token(&alice, &game.id).await.status(), 409);
    }
}

#[tokio::test]
async fn the_bootstrap_sets_a_host_only_cookie_and_drops_the_token_from_the_url() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
        let url = t["url"].as_str().unwrap();

        let r = env.http.get(url).send().await.unwrap();
        assert_eq!(r.status(), 303, "{}", env.backend);
        assert_eq!(r.headers()["location"], "/?folder=/home/dev/workspace");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(set.starts_with("zlh_ide="), "{set}");
        let attrs = cookie_attrs(&set);
        for want in ["httponly", "samesite=lax", "path=/", "max-age=43200"] {
            assert!(attrs.contains(&want.to_owned()), "{want} in {set}");
        }
        assert!(!attrs.iter().any(|a| a.starts_with("domain")), "host-only: {set}");
        assert!(!attrs.contains(&"secure".to_owned()), "plain-HTTP local mode: {set}");
        let cookie = set.split(';').next().unwrap().to_owned();

        // The IDE itself, through the proxy: Host and Origin as sent, zlh's credentials gone.
        let origin = format!("http://{}", env.dev_host(6001));
        let r = env
            .http
            .post(env.dev(6001, "/?folder=/home/dev/workspace"))
            .header("cookie", format!("{cookie}; code-server-session=cs"))
            .header("origin", &origin)
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen: Value = r.json().await.unwrap();
        assert_eq!(seen["path"], "/?folder=/home/dev/workspace");
        assert_eq!(seen["headers"]["host"], json!([env.dev_host(6001)]));
        assert_eq!(seen["headers"]["origin"], json!([origin]));
        assert_eq!(seen["headers"]["cookie"], json!(["code-server-session=cs"]));
        assert_eq!(seen["headers"]["x-forwarded-proto"], json!(["http"]));
        assert_eq!(seen["headers"]["x-forwarded-for"], json!(["127.0.0.1"]));
        assert!(seen["headers"].get("authorization").is_none());
        assert!(!seen.to_string().contains(&alice) && !seen.to_string().contains(cookie.split('=').nth(1).unwrap()));

        // The link is spent: without the cookie it no longer opens anything; with it, a reload
        // still lands in the IDE.
        assert_eq!(env.http.get(url).send().await.unwrap().status(), 401);
        let reload = env.http.get(url).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(reload.status(), 303);
        assert!(reload.headers().get("set-cookie").is_none());
        assert_eq!(env.get_dev(6001, "/", "zlh_ide=forged").await.status(), 401);
        assert_eq!(env.http.get(env.dev(6001, "/")).send().await.unwrap().status(), 401);
    }
}

#[tokio::test]
async fn over_https_the_cookie_is_secure_and_host_prefixed() {
    let env = start("sqlite", testing::sqlite().await, |c| c.ide_insecure_cookies = Some(false)).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
    let r = env.http.get(t["url"].as_str().unwrap()).send().await.unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-zlh_ide="), "{set}");
    assert!(cookie_attrs(&set).contains(&"secure".to_owned()), "{set}");
    let cookie = set.split(';').next().unwrap();
    let seen: Value = env.get_dev(6001, "/", &format!("{cookie}; other=1")).await.json().await.unwrap();
    assert_eq!(seen["headers"]["cookie"], json!(["other=1"]));
    // The plain name is not accepted in secure mode (a sibling host could have set it).
    let plain = cookie.replacen("__Host-zlh_ide", "zlh_ide", 1);
    assert_eq!(env.get_dev(6001, "/", &plain).await.status(), 401);
}

#[tokio::test]
async fn a_token_or_cookie_for_one_ide_opens_no_other() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let one = env.dev_server(&alice_id, 6001).await;
        let two = env.dev_server(&alice_id, 6002).await;
        let t: Value = env.ide_token(&alice, &one).await.json().await.unwrap();
        let token = t["token"].as_str().unwrap();
        let r = env.http.get(env.dev(6002, &format!("/api/dev/{two}/ide?token={token}"))).send().await.unwrap();
        assert_eq!(r.status(), 401, "{}", env.backend);
        assert!(r.headers().get("set-cookie").is_none());
        // On its own host but naming the other server: no cookie either.
        let r = env.http.get(env.dev(6001, &format!("/api/dev/{two}/ide?token={token}"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert!(r.headers().get("set-cookie").is_none());

        let cookie_one = env.open_ide(&alice, &one).await;
        assert_eq!(env.get_dev(6001, "/", &cookie_one).await.status(), 200);
        let before = env.hits.load(Ordering::SeqCst);
        assert_eq!(env.get_dev(6002, "/", &cookie_one).await.status(), 401);
        let origin = format!("http://{}", env.dev_host(6002));
        assert_eq!(env.ws(&env.dev_host(6002), "/ws", &cookie_one, &origin).await.err(), Some(401));
        assert_eq!(env.hits.load(Ordering::SeqCst), before, "nothing reached code-server");
    }
}

#[tokio::test]
async fn the_api_host_sends_the_bootstrap_on_to_the_dev_host() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
        let token = t["token"].as_str().unwrap();
        let r = env.http.get(env.api(&format!("/api/dev/{id}/ide?token={token}"))).send().await.unwrap();
        assert_eq!(r.status(), 303, "{}", env.backend);
        assert!(r.headers().get("set-cookie").is_none(), "the API host sets no IDE cookie");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        assert_eq!(location, t["url"].as_str().unwrap());
        assert_eq!(env.http.get(&location).send().await.unwrap().status(), 303);
        let none = env.http.get(env.api(&format!("/api/dev/{id}/ide"))).send().await.unwrap();
        assert_eq!(none.status(), 400);
        // The same token again: the hosted bootstrap spent it, so the API host refuses it too.
        let again = env.http.get(env.api(&format!("/api/dev/{id}/ide?token={token}"))).send().await.unwrap();
        assert_eq!(again.status(), 401, "{}", env.backend);
    }
}

/// Status, headers (but the date) and body of an answer.
async fn answer(r: reqwest::Response) -> (u16, Vec<(String, String)>, String) {
    let status = r.status().as_u16();
    let mut headers: Vec<(String, String)> = r
        .headers()
        .iter()
        .filter(|(k, _)| *k != "date")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<bytes>").to_owned()))
        .collect();
    headers.sort();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test]
async fn without_a_valid_token_the_api_host_bootstrap_says_nothing_about_the_server() {
    for env in each_backend(|_| {}).await {
        let backend = env.backend;
        let (alice, alice_id) = env.user("alice").await;
        let (_, bob_id) = env.user("bob").await;
        let mine = env.dev_server(&alice_id, 6001).await;
        let bobs = env.dev_server(&bob_id, 6002).await;
        // A server with no container yet (no vmid), and one that is not a server at all.
        let unplaced = repo::insert(&env.app.db, &alice_id, Kind::Dev, "new", "basic", &json!({})).await.unwrap().id;
        let missing = "0123456789abcdef".to_owned();
        // Tokens that are not valid for the server named: junk, alice's for 6001 (valid only there).
        let t: Value = env.ide_token(&alice, &mine).await.json().await.unwrap();
        let alices = t["token"].as_str().unwrap().to_owned();
        for token in ["x".to_owned(), alices.clone()] {
            for mode in ["", "&mode=path"] {
                let mut seen = Vec::new();
                for id in [&bobs, &unplaced, &missing] {
                    let url = env.api(&format!("/api/dev/{id}/ide?token={token}{mode}"));
                    seen.push(answer(env.http.get(url).send().await.unwrap()).await);
                }
                if token == "x" {
                    let url = env.api(&format!("/api/dev/{mine}/ide?token=x{mode}"));
                    seen.push(answer(env.http.get(url).send().await.unwrap()).await);
                }
                assert_eq!(seen[0].0, 401, "{backend}: {seen:?}");
                assert!(!seen[0].2.contains("600"), "{backend}: no vmid in {seen:?}");
                for other in &seen[1..] {
                    assert_eq!(other, &seen[0], "{backend}: mode {mode:?}");
                }
            }
        }
        // alice's token is still unspent and still opens her own IDE.
        let r = env.http.get(env.api(&format!("/api/dev/{mine}/ide?token={alices}"))).send().await.unwrap();
        assert_eq!(r.status(), 303, "{backend}");
        assert!(r.headers()["location"].to_str().unwrap().contains("dev-6001."));
    }
}

#[tokio::test]
async fn dev_hosts_never_reach_the_api_and_other_hosts_never_reach_the_proxy() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let cookie = env.open_ide(&alice, &id).await;

        // An API path on the dev host is code-server's, and needs the IDE cookie, not a bearer.
        let r = env.http.get(env.dev(6001, "/api/servers")).bearer_auth(&alice).send().await.unwrap();
        assert_eq!(r.status(), 401, "{}", env.backend);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        let seen: Value = env.get_dev(6001, "/api/servers", &cookie).await.json().await.unwrap();
        assert_eq!(seen["path"], "/api/servers");
        // Also where the API would answer 405 or 404.
        let put = env.http.put(env.dev(6001, "/api/health")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(put.json::<Value>().await.unwrap()["path"], "/api/health");
        let deep = env.get_dev(6001, "/no/such/api/route", &cookie).await;
        assert_eq!(deep.json::<Value>().await.unwrap()["path"], "/no/such/api/route");

        let before = env.hits.load(Ordering::SeqCst);
        for host in [
            "evil.com".to_owned(),
            format!("dev-6001.localhost.evil.com:{}", env.addr.port()),
            "dev-6001.localhost.".to_owned(),
            format!("dev-06001.localhost:{}", env.addr.port()),
            format!("dev-6001.dev-6001.localhost:{}", env.addr.port()),
            format!("x@dev-6001.localhost:{}", env.addr.port()),
        ] {
            let r =
                env.http.get(env.api("/?folder=/home/dev/workspace")).header("host", &host).header("cookie", &cookie);
            let r = r.send().await.unwrap();
            assert_ne!(r.status(), 200, "{host}");
            let health = env.http.get(env.api("/api/health")).header("host", &host).send().await.unwrap();
            assert_eq!(health.json::<Value>().await.unwrap()["ok"], true, "{host} is the API's");
        }
        assert_eq!(env.hits.load(Ordering::SeqCst), before, "nothing reached code-server");
    }
}

#[tokio::test]
async fn cross_origin_writes_and_websockets_are_refused() {
    let env = start("sqlite", testing::sqlite().await, |_| {}).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&alice, &id).await;
    let before = env.hits.load(Ordering::SeqCst);
    let foreign = format!("http://{}", env.dev_host(6002));
    assert_eq!(env.ws(&env.dev_host(6001), "/ws", &cookie, &foreign).await.err(), Some(403));
    let post = env.http.post(env.dev(6001, "/x")).header("cookie", &cookie).header("origin", &foreign);
    assert_eq!(post.send().await.unwrap().status(), 403);
    let null = env.http.post(env.dev(6001, "/x")).header("cookie", &cookie).header("origin", "null");
    assert_eq!(null.send().await.unwrap().status(), 403);
    assert_eq!(env.hits.load(Ordering::SeqCst), before);
    let mut ws = env.hosted_ws(6001, &cookie).await;
    echoes(&mut ws).await;
}

#[tokio::test]
async fn websockets_are_proxied_and_close_when_the_server_stops() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let cookie = env.open_ide(&alice, &id).await;
        let origin = format!("http://{}", env.dev_host(6001));
        let mut ws = env.ws(&env.dev_host(6001), "/ws", &cookie, &origin).await.expect("upgrade");
        let seen: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(seen["host"], json!([env.dev_host(6001)]), "{}", env.backend);
        assert_eq!(seen["origin"], json!([origin]));
        assert!(seen.get("cookie").is_none(), "only zlh's cookie was sent, and it stays behind");
        echoes(&mut ws).await;

        repo::set_state(&env.app.db, &id, "stopped", None).await.unwrap();
        closes(&mut ws).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 409);
        assert_eq!(env.ide.router.routes().resolve(zlh_core::Vmid(6001)), None, "route removed");

        repo::set_state(&env.app.db, &id, state::RUNNING, None).await.unwrap();
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "the session outlives a restart");
        let mut ws = env.hosted_ws(6001, &cookie).await;
        repo::mark_deleted(&env.app.db, &id).await.unwrap();
        closes(&mut ws).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 404);
    }
}

type H2Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A WebSocket to `http://{authority}{path}` over HTTP/2 (RFC 8441 extended CONNECT on an h2c
/// connection), as a client that honours the server's `SETTINGS_ENABLE_CONNECT_PROTOCOL` opens
/// it. `Err` is the refusal's status.
async fn h2_ws(env: &Env, authority: &str, path: &str, cookie: &str, origin: &str) -> Result<H2Ws, u16> {
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("CONNECT")
        .uri(format!("http://{authority}{path}"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .header("cookie", cookie)
        .header("origin", origin)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(req).await.unwrap();
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
    Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(io, role, None).await)
}

#[tokio::test]
async fn a_websocket_over_http2_opens_the_hosted_ide_as_over_http1() {
    let env = start("sqlite", testing::sqlite().await, |_| {}).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&alice, &id).await;
    let origin = format!("http://{}", env.dev_host(6001));
    let before = env.hits.load(Ordering::SeqCst);
    let host = env.dev_host(6001);
    assert_eq!(h2_ws(&env, &host, "/ws", "zlh_ide=forged", &origin).await.err(), Some(401), "no session");
    let foreign = format!("http://{}", env.dev_host(6002));
    assert_eq!(h2_ws(&env, &host, "/ws", &cookie, &foreign).await.err(), Some(403), "cross-origin");
    assert_eq!(env.hits.load(Ordering::SeqCst), before, "refusals never reach code-server");

    let mut ws = h2_ws(&env, &host, "/ws", &cookie, &origin).await.expect("the WebSocket opens");
    let seen: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(seen["host"], json!([env.dev_host(6001)]));
    assert_eq!(seen["origin"], json!([origin]));
    assert!(seen.get("cookie").is_none(), "zlh's cookie stays behind");
    ws.send(Message::Text("ping over h2".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "ping over h2");

    // Stopping the server closes it, as it does an HTTP/1.1 WebSocket.
    repo::set_state(&env.app.db, &id, "stopped", None).await.unwrap();
    closes(&mut ws).await;
}

#[tokio::test]
async fn websockets_close_when_the_user_loses_the_server_or_signs_out_of_the_ide() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let (_, bob_id) = env.user("bob").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let cookie = env.open_ide(&alice, &id).await;
        let mut ws = env.hosted_ws(6001, &cookie).await;
        echoes(&mut ws).await;

        sqlx::query("UPDATE servers SET user_id = $1 WHERE id = $2")
            .bind(&bob_id)
            .bind(&id)
            .execute(env.app.db.pool())
            .await
            .unwrap();
        closes(&mut ws).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 404, "{}", env.backend);

        sqlx::query("UPDATE servers SET user_id = $1 WHERE id = $2")
            .bind(&alice_id)
            .bind(&id)
            .execute(env.app.db.pool())
            .await
            .unwrap();
        let mut ws = env.hosted_ws(6001, &cookie).await;
        let second = env.open_ide(&alice, &id).await;
        let mut other_session = env.hosted_ws(6001, &second).await;
        let origin = format!("http://{}", env.dev_host(6001));
        let logout = env.http.post(env.dev(6001, "/__zlh/logout")).header("cookie", &cookie).header("origin", &origin);
        let r = logout.send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
        closes(&mut ws).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 401, "the session is revoked");
        echoes(&mut other_session).await;
        assert_eq!(env.get_dev(6001, "/", &second).await.status(), 200, "other sessions stay");
    }
}

#[tokio::test]
async fn removing_the_route_closes_websockets_at_once() {
    // A long re-check: only the route table's notification can close the socket in time.
    let env = start("sqlite", testing::sqlite().await, |c| c.ide_recheck_every = Duration::from_secs(3600)).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&alice, &id).await;
    let mut ws = env.hosted_ws(6001, &cookie).await;
    env.ide.server_stopped(6001).await;
    closes(&mut ws).await;
    assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "the next request finds the route again");
}

#[tokio::test]
async fn the_legacy_path_proxy_serves_the_owner() {
    for env in each_backend(|_| {}).await {
        let (alice, alice_id) = env.user("alice").await;
        let (bob, _) = env.user("bob").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
        let token = t["token"].as_str().unwrap();
        let r = env.http.get(env.api(&format!("/api/dev/{id}/ide?token={token}&mode=path"))).send().await.unwrap();
        assert_eq!(r.status(), 303, "{}", env.backend);
        assert_eq!(r.headers()["location"], "/__ide/6001/?folder=/home/dev/workspace");
        let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(cookie_attrs(&set).contains(&"path=/__ide/6001".to_owned()), "{set}");
        let cookie = set.split(';').next().unwrap().to_owned();

        let api_host = env.addr.to_string();
        let r = env
            .http
            .get(env.api("/__ide/6001/static/app.js?v=1"))
            .header("cookie", format!("{cookie}; cs=1"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen: Value = r.json().await.unwrap();
        assert_eq!(seen["path"], "/static/app.js?v=1");
        assert_eq!(seen["headers"]["host"], json!([api_host]));
        assert_eq!(seen["headers"]["cookie"], json!(["cs=1"]));
        assert!(seen["headers"].get("authorization").is_none());
        let root = env.http.get(env.api("/__ide/6001/")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(root.json::<Value>().await.unwrap()["path"], "/");
        let bare = env.http.get(env.api("/__ide/6001?folder=x")).send().await.unwrap();
        assert_eq!(bare.status(), 308);
        assert_eq!(bare.headers()["location"], "/__ide/6001/?folder=x");

        let mut ws =
            env.ws(&api_host, "/__ide/6001/ws", &cookie, &format!("http://{api_host}")).await.expect("upgrade");
        let seen: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(seen["host"], json!([api_host]));
        echoes(&mut ws).await;
        // Over HTTP/2 the host comes as the URI's authority; code-server gets it as `Host`.
        let mut h2 = h2_ws(&env, &api_host, "/__ide/6001/ws", &cookie, &format!("http://{api_host}"))
            .await
            .expect("the WebSocket opens over HTTP/2");
        let seen: Value = serde_json::from_str(&next_text(&mut h2).await).unwrap();
        assert_eq!(seen["host"], json!([api_host]), "{}", env.backend);
        h2.send(Message::Text("ping".into())).await.unwrap();
        assert_eq!(next_text(&mut h2).await, "ping");

        let before = env.hits.load(Ordering::SeqCst);
        assert_eq!(env.http.get(env.api("/__ide/6001/")).send().await.unwrap().status(), 401);
        let bearer_only = env.http.get(env.api("/__ide/6001/")).bearer_auth(&bob).send().await.unwrap();
        assert_eq!(bearer_only.status(), 401);
        let other_vmid = env.http.get(env.api("/__ide/6002/")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(other_vmid.status(), 401);
        assert_eq!(
            env.http.get(env.api("/__ide/06001/")).header("cookie", &cookie).send().await.unwrap().status(),
            404
        );
        assert_eq!(env.hits.load(Ordering::SeqCst), before);

        repo::set_state(&env.app.db, &id, state::SUSPENDED, None).await.unwrap();
        closes(&mut ws).await;
        closes(&mut h2).await;
        assert_eq!(env.http.get(env.api("/__ide/6001/")).header("cookie", &cookie).send().await.unwrap().status(), 409);
    }
}

#[tokio::test]
async fn admins_may_open_any_hosted_ide() {
    let env = start("sqlite", testing::sqlite().await, |_| {}).await;
    let (_, alice_id) = env.user("alice").await;
    let (root, _) = env.user("root").await;
    zlh_apid::auth::admins::grant(&env.app.db, "root@example.com").await.unwrap();
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&root, &id).await;
    assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200);
}

#[tokio::test]
async fn the_path_proxy_can_be_turned_off() {
    let env = start("sqlite", testing::sqlite().await, |c| c.ide_path_proxy = false).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
    let token = t["token"].as_str().unwrap();
    let r = env.http.get(env.api(&format!("/api/dev/{id}/ide?token={token}&mode=path"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(env.http.get(env.api("/__ide/6001/")).send().await.unwrap().status(), 404);
    // The hosted IDE still opens with the same (unspent) token.
    let r = env.http.get(t["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn a_request_naming_two_different_hosts_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start("sqlite", testing::sqlite().await, |_| {}).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&alice, &id).await;
    let dev = env.dev_host(6001);
    let before = env.hits.load(Ordering::SeqCst);
    for (target, host) in
        [(format!("http://{dev}/"), "evil.com".to_owned()), ("http://evil.com/".to_owned(), dev.clone())]
    {
        let mut tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
        let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{target} with Host {host}: {answer}");
    }
    assert_eq!(env.hits.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn dev_host_traffic_is_counted_apart_from_the_api_routes() {
    let env =
        start("sqlite", testing::sqlite().await, |c| c.metrics_token = Some("scrape-token-0123456789".into())).await;
    let (alice, alice_id) = env.user("alice").await;
    let id = env.dev_server(&alice_id, 6001).await;
    let cookie = env.open_ide(&alice, &id).await;
    for _ in 0..3 {
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200);
    }
    assert_eq!(env.get_dev(6001, "/", "zlh_ide=forged").await.status(), 401);
    let scrape = env.http.get(env.api("/metrics")).bearer_auth("scrape-token-0123456789").send().await.unwrap();
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.unwrap();
    let count = |status: u16| {
        text.lines()
            .find(|l| l.starts_with(&format!("zlh_api_ide_requests_total{{status=\"{status}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    // The bootstrap's 303 is a dev-host request too.
    assert_eq!(count(200), Some(3), "{text}");
    assert_eq!(count(401), Some(1), "{text}");
    assert_eq!(count(303), Some(1), "{text}");
    assert!(text.contains("zlh_api_ide_request_duration_seconds_count 5"), "{text}");
    assert!(!text.contains("dev-6001"), "hosts and ids stay out of labels");
}

#[tokio::test]
async fn a_token_opens_one_session_and_a_logout_ends_it_on_every_replica() {
    for env in each_backend(|_| {}).await {
        let backend = env.backend;
        let other = env.replica().await;
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;

        // The link is used on the other replica; here it is spent.
        let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
        let here = t["url"].as_str().unwrap().to_owned();
        let there = here.replace(&format!(":{}/", env.addr.port()), &format!(":{}/", other.addr.port()));
        let r = other.http.get(&there).send().await.unwrap();
        assert_eq!(r.status(), 303, "{backend}");
        let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
        let r = env.http.get(&here).send().await.unwrap();
        assert_eq!(r.status(), 401, "{backend}: a token opens one session, whichever replica sees it");
        assert!(r.headers().get("set-cookie").is_none());

        // The session works on both; logged out on one, it ends on the other within its memo time,
        // and so does a WebSocket open there.
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "{backend}");
        assert_eq!(other.get_dev(6001, "/", &cookie).await.status(), 200, "{backend}");
        let mut ws = env.hosted_ws(6001, &cookie).await;
        echoes(&mut ws).await;
        let origin = format!("http://{}", other.dev_host(6001));
        let r = other.http.post(other.dev(6001, "/__zlh/logout")).header("cookie", &cookie).header("origin", &origin);
        assert_eq!(r.send().await.unwrap().status(), 204, "{backend}");
        assert_eq!(other.get_dev(6001, "/", &cookie).await.status(), 401, "{backend}: at once where it was ended");
        let ended = std::time::Instant::now();
        let bound = env.app.config.ide_access_cache + Duration::from_secs(1);
        loop {
            let status = env.get_dev(6001, "/", &cookie).await.status();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200, "{backend}");
            assert!(ended.elapsed() < bound, "{backend}: still let in {:?} after logout", ended.elapsed());
            // A poll interval, not a timing assumption: the bound above is what is asserted.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 401, "{backend}");
        closes(&mut ws).await;
    }
}

impl Env {
    /// Another sign-in of `name` (registered by [`Env::user`]): its bearer token.
    async fn login(&self, name: &str) -> String {
        let body = json!({ "identifier": name, "password": "correct horse battery" });
        let r = self.http.post(self.api("/api/auth/login")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", self.backend);
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

    async fn logout(&self, bearer: &str) {
        let r = self.http.post(self.api("/api/auth/logout")).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", self.backend);
    }
}

#[tokio::test]
async fn signing_out_of_the_api_ends_the_ide_sessions_opened_with_that_sign_in() {
    // A long re-check and access memo: only the sign-out itself can end the session in time here.
    let tweak = |c: &mut ApiConfig| {
        c.ide_recheck_every = Duration::from_secs(3600);
        c.ide_access_cache = Duration::from_secs(3600);
    };
    for env in each_backend(tweak).await {
        let backend = env.backend;
        let (alice, alice_id) = env.user("alice").await;
        let laptop = env.login("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let cookie = env.open_ide(&alice, &id).await;
        let path_cookie = {
            let t: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
            let url = env.api(&format!("/api/dev/{id}/ide?token={}&mode=path", t["token"].as_str().unwrap()));
            let r = env.http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 303, "{backend}");
            r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
        };
        let on_laptop = env.open_ide(&laptop, &id).await;
        // A link fetched before signing out and opened after.
        let unspent: Value = env.ide_token(&alice, &id).await.json().await.unwrap();
        let mut ws = env.hosted_ws(6001, &cookie).await;
        echoes(&mut ws).await;
        let mut laptop_ws = env.hosted_ws(6001, &on_laptop).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "{backend}");
        let api_host = env.addr.to_string();
        let path_get = || env.http.get(env.api("/__ide/6001/")).header("cookie", &path_cookie).send();
        assert_eq!(path_get().await.unwrap().status(), 200, "{backend}");

        env.logout(&alice).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 401, "{backend}: the hosted IDE is signed out");
        assert_eq!(
            env.ws(&env.dev_host(6001), "/ws", &cookie, &format!("http://{}", env.dev_host(6001))).await.err(),
            Some(401)
        );
        closes(&mut ws).await;
        assert_eq!(path_get().await.unwrap().status(), 401, "{backend}: so is the legacy path IDE");
        assert_eq!(
            env.ws(&api_host, "/__ide/6001/ws", &path_cookie, &format!("http://{api_host}")).await.err(),
            Some(401)
        );
        let r = env.http.get(unspent["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(r.status(), 401, "{backend}: a link from the signed-out session opens nothing");
        assert!(r.headers().get("set-cookie").is_none());

        // The other sign-in's IDE is untouched.
        echoes(&mut laptop_ws).await;
        assert_eq!(env.get_dev(6001, "/", &on_laptop).await.status(), 200, "{backend}");
    }
}

#[tokio::test]
async fn signing_out_on_one_replica_ends_the_ide_on_another() {
    for env in each_backend(|_| {}).await {
        let backend = env.backend;
        let other = env.replica().await;
        let (alice, alice_id) = env.user("alice").await;
        let id = env.dev_server(&alice_id, 6001).await;
        let cookie = env.open_ide(&alice, &id).await;
        let mut ws = env.hosted_ws(6001, &cookie).await;
        echoes(&mut ws).await;
        assert_eq!(env.get_dev(6001, "/", &cookie).await.status(), 200, "{backend}");

        other.logout(&alice).await;
        let ended = std::time::Instant::now();
        let bound = env.app.config.ide_access_cache + Duration::from_secs(1);
        loop {
            let status = env.get_dev(6001, "/", &cookie).await.status();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200, "{backend}");
            assert!(ended.elapsed() < bound, "{backend}: still let in {:?} after signing out", ended.elapsed());
            // A poll interval, not a timing assumption: the bound above is what is asserted.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        closes(&mut ws).await;
    }
}
