//! The IDE reverse proxy over real HTTP and WebSocket: a browser stand-in (reqwest,
//! tokio-tungstenite) → an axum server forwarding through `ide::proxy::Proxy` → a stand-in
//! code-server that reports what it saw.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message as WsMsg, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::{FutureExt as _, SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use zlh_core::ide::proxy::{Forward, Proxy, ProxyConfig};
use zlh_core::ide::routes::RouteTable;
use zlh_core::Vmid;

const VMID: Vmid = Vmid(6001);
const WAIT: Duration = Duration::from_secs(10);

fn headers_json(h: &HeaderMap) -> Value {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        map.entry(k.as_str().to_owned()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    json!(map)
}

/// A stand-in code-server.
async fn upstream() -> SocketAddr {
    async fn seen(headers: HeaderMap, req: Request) -> Json<Value> {
        Json(json!({ "headers": headers_json(&headers), "path": req.uri().to_string() }))
    }
    async fn echo(req: Request) -> Response {
        Body::from_stream(req.into_body().into_data_stream()).into_response()
    }
    async fn count(body: Body) -> String {
        let mut n = 0usize;
        let mut s = body.into_data_stream();
        while let Some(Ok(c)) = s.next().await {
            n += c.len();
        }
        n.to_string()
    }
    async fn ws(ws: WebSocketUpgrade, headers: HeaderMap) -> Response {
        let seen = headers_json(&headers).to_string();
        ws.on_upgrade(move |mut socket| async move {
            if socket.send(WsMsg::Text(seen.into())).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = socket.recv().await {
                if matches!(msg, WsMsg::Text(_) | WsMsg::Binary(_)) && socket.send(msg).await.is_err() {
                    return;
                }
            }
        })
    }
    let app = Router::new()
        .route("/seen", any(seen))
        .route("/echo", post(echo))
        .route("/count", post(count))
        .route("/slow", get(std::future::pending::<String>))
        .route(
            "/cookies",
            get(|| async {
                let mut h = HeaderMap::new();
                h.append("set-cookie", "zlh_ide=forged; Domain=localhost; Path=/".parse().unwrap());
                h.append("set-cookie", "code-server-session=fine; Path=/".parse().unwrap());
                (h, "ok")
            }),
        )
        .route("/ws", get(ws));
    serve(app).await
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

#[derive(Clone)]
struct Front {
    proxy: Proxy,
    routes: Arc<RouteTable>,
}

/// What zlh-apid does after authorising: resolve the target from the table, forward.
async fn front_handler(State(f): State<Front>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    let Some(target) = f.routes.resolve(VMID) else {
        return (axum::http::StatusCode::NOT_FOUND, "no route").into_response();
    };
    // HTTP/2 names the host in the URI (`:authority`), HTTP/1.1 in `Host`.
    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).or(req.uri().authority().map(|a| a.as_str()));
    let host = host.unwrap_or_default().to_owned();
    let fwd = Forward { target, host, client_ip: Some(peer.ip()), proto: "https".into(), path_and_query: None };
    let routes = f.routes.clone();
    f.proxy.forward(req, fwd, move || routes.closed(VMID, target)).await.map(Body::new)
}

struct Setup {
    front: SocketAddr,
    routes: Arc<RouteTable>,
    http: reqwest::Client,
}

async fn setup(config: ProxyConfig) -> Setup {
    let target = upstream().await;
    let routes = Arc::new(RouteTable::default());
    routes.register(VMID, target);
    let config = ProxyConfig { session_cookies: vec!["zlh_ide".into()], ..config };
    let front = Front { proxy: Proxy::new(config), routes: routes.clone() };
    let addr = serve(Router::new().fallback(front_handler).with_state(front)).await;
    Setup { front: addr, routes, http: reqwest::Client::new() }
}

impl Setup {
    fn host(&self) -> String {
        format!("dev-6001.localhost:{}", self.front.port())
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.front)
    }
}

#[tokio::test]
async fn host_and_origin_reach_code_server_and_zlh_credentials_do_not() {
    let s = setup(ProxyConfig::default()).await;
    let origin = format!("http://{}", s.host());
    let r = s
        .http
        .get(s.url("/seen?folder=/home/dev/workspace"))
        .header("host", s.host())
        .header("origin", &origin)
        .header("cookie", "zlh_ide=session-secret; code-server-session=cs; vscode-tkn=t")
        .header("authorization", "Bearer zlh-bearer-secret")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "gopher")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["path"], "/seen?folder=/home/dev/workspace");
    assert_eq!(h["host"], json!([s.host()]));
    assert_eq!(h["origin"], json!([origin]));
    assert_eq!(h["cookie"], json!(["code-server-session=cs; vscode-tkn=t"]));
    assert!(h.get("authorization").is_none(), "{h}");
    assert_eq!(h["x-forwarded-for"], json!(["127.0.0.1"]), "the browser's own chain is replaced");
    assert_eq!(h["x-forwarded-host"], json!([s.host()]));
    assert_eq!(h["x-forwarded-proto"], json!(["https"]));
    assert!(!seen.to_string().contains("secret"), "{seen}");
}

#[tokio::test]
async fn client_addresses_are_the_peer_unless_the_peer_is_a_trusted_proxy() {
    async fn seen(s: &Setup) -> Value {
        let r = s
            .http
            .get(s.url("/seen"))
            .header("host", s.host())
            .header("x-forwarded-for", "10.0.0.1, 127.0.0.1")
            .header("x-real-ip", "10.0.0.1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["headers"].clone()
    }
    let untrusted = seen(&setup(ProxyConfig::default()).await).await;
    assert_eq!(untrusted["x-forwarded-for"], json!(["127.0.0.1"]), "{untrusted}");
    assert_eq!(untrusted["x-real-ip"], json!(["127.0.0.1"]), "{untrusted}");

    let trusted_proxies = zlh_core::ide::forwarding::TrustedProxies::parse(&["127.0.0.1/32"]).unwrap();
    let trusted = seen(&setup(ProxyConfig { trusted_proxies, ..Default::default() }).await).await;
    assert_eq!(trusted["x-forwarded-for"], json!(["10.0.0.1, 127.0.0.1, 127.0.0.1"]), "{trusted}");
    assert_eq!(trusted["x-real-ip"], json!(["10.0.0.1"]), "{trusted}");
}

#[tokio::test]
async fn code_server_cannot_set_the_zlh_session_cookie() {
    let s = setup(ProxyConfig::default()).await;
    let r = s.http.get(s.url("/cookies")).header("host", s.host()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(cookies, ["code-server-session=fine; Path=/"]);
}

/// The sender only sends more once the echo of what it sent came back (give or take a window far
/// below the body's size): a proxy that collected either body before passing it on would stall.
#[tokio::test]
async fn a_large_body_streams_through_both_ways() {
    const TOTAL: usize = 64 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    const WINDOW: u64 = 4 * 1024 * 1024;
    let s = setup(ProxyConfig::default()).await;
    let (echoed_tx, mut echoed_rx) = tokio::sync::watch::channel(0u64);
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut hash = Sha256::new();
        for i in 0..TOTAL / CHUNK {
            echoed_rx.wait_for(|echoed| sent - echoed <= WINDOW).await.unwrap();
            let chunk = Bytes::from(vec![(i % 251) as u8; CHUNK]);
            hash.update(&chunk);
            chunk_tx.send(Ok(chunk)).await.unwrap();
            sent += CHUNK as u64;
        }
        hash.finalize()
    });
    let body = futures::stream::unfold(chunk_rx, |mut rx| async { rx.recv().await.map(|c| (c, rx)) });
    let run = async {
        let mut r = s
            .http
            .post(s.url("/echo"))
            .header("host", s.host())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (mut total, mut hash) = (0u64, Sha256::new());
        while let Some(chunk) = r.chunk().await.unwrap() {
            total += chunk.len() as u64;
            hash.update(&chunk);
            echoed_tx.send_replace(total);
        }
        (total, hash.finalize())
    };
    let (total, echoed_hash) = tokio::time::timeout(Duration::from_secs(120), run).await.expect("no stall");
    assert_eq!(total, TOTAL as u64);
    assert_eq!(echoed_hash, sender.await.unwrap());
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let s = setup(ProxyConfig { body_limit: 1024 * 1024, ..Default::default() }).await;
    let declared = s.http.post(s.url("/count")).header("host", s.host()).body(vec![0u8; 1024 * 1024 + 1]).send();
    assert_eq!(declared.await.unwrap().status(), 413);
    let exact = s.http.post(s.url("/count")).header("host", s.host()).body(vec![0u8; 1024 * 1024]).send();
    let exact = exact.await.unwrap();
    assert_eq!(exact.status(), 200);
    assert_eq!(exact.text().await.unwrap(), (1024 * 1024).to_string());
    // Chunked: no length up front; cut off once over the limit.
    let chunks = futures::stream::iter((0..32).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 64 * 1024]))));
    let streamed = s.http.post(s.url("/count")).header("host", s.host()).body(reqwest::Body::wrap_stream(chunks));
    assert_eq!(streamed.send().await.unwrap().status(), 413);
}

async fn ws_connect(
    s: &Setup,
    origin: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("ws://{}/ws", s.front).into_client_request().unwrap();
    req.headers_mut().insert("host", s.host().parse().unwrap());
    req.headers_mut().insert("origin", origin.parse().unwrap());
    req.headers_mut().insert("cookie", "zlh_ide=session-secret; code-server-session=cs".parse().unwrap());
    req.headers_mut().insert("authorization", "Bearer zlh-bearer-secret".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The next message, as text; a WebSocket over HTTP/1.1 or HTTP/2 alike.
async fn next_text<S>(ws: &mut S) -> String
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    match tokio::time::timeout(WAIT, ws.next()).await.expect("message in time") {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
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
    ended.await.expect("the socket closes once the route is gone");
}

#[tokio::test]
async fn websockets_are_proxied_with_host_and_origin_and_without_zlh_credentials() {
    let s = setup(ProxyConfig::default()).await;
    let origin = format!("http://{}", s.host());
    let mut ws = ws_connect(&s, &origin).await;
    let seen: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(seen["host"], json!([s.host()]));
    assert_eq!(seen["origin"], json!([origin]));
    assert_eq!(seen["cookie"], json!(["code-server-session=cs"]));
    assert!(seen.get("authorization").is_none());
    assert_eq!(seen["sec-websocket-version"], json!(["13"]));
    for i in 0..100 {
        ws.send(Message::Text(format!("hello {i}").into())).await.unwrap();
        assert_eq!(next_text(&mut ws).await, format!("hello {i}"));
    }
    let big = vec![7u8; 1024 * 1024];
    ws.send(Message::Binary(big.clone().into())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => assert_eq!(b, big),
        other => panic!("expected the binary echo, got {other:?}"),
    }
}

/// A WebSocket over HTTP/2 (RFC 8441), as a client that honours the front's
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL` opens it: an extended `CONNECT` on an h2c connection.
#[tokio::test]
async fn a_websocket_over_http2_reaches_code_server_as_an_http1_upgrade() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let s = setup(ProxyConfig::default()).await;
    let tcp = tokio::net::TcpStream::connect(s.front).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let origin = format!("http://{}", s.host());
    let connect = |protocol: Option<&'static str>| {
        let mut req = hyper::Request::builder()
            .method("CONNECT")
            .uri(format!("http://{}/ws", s.host()))
            .header("sec-websocket-version", "13")
            .header("origin", &origin)
            .header("cookie", "zlh_ide=session-secret; code-server-session=cs");
        if let Some(p) = protocol {
            req = req.extension(hyper::ext::Protocol::from_static(p));
        }
        req.body(http_body_util::Empty::<Bytes>::new()).unwrap()
    };

    // A plain CONNECT (a tunnel to wherever) stays refused.
    h2.ready().await.unwrap();
    let refused = h2.send_request(connect(None)).await.unwrap();
    assert_eq!(refused.status(), 405, "a bare CONNECT is no WebSocket");

    h2.ready().await.unwrap();
    let resp = h2.send_request(connect(Some("websocket"))).await.unwrap();
    assert_eq!(resp.status(), 200, "RFC 8441: the WebSocket is open");
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    let seen: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    // Code-server saw an ordinary HTTP/1.1 upgrade, for this host and origin, without zlh's cookie.
    assert_eq!(seen["host"], json!([s.host()]));
    assert_eq!(seen["origin"], json!([origin]));
    assert_eq!(seen["cookie"], json!(["code-server-session=cs"]));
    assert_eq!(seen["upgrade"], json!(["websocket"]));
    assert_eq!(seen["sec-websocket-version"], json!(["13"]));
    assert_eq!(seen["sec-websocket-key"].as_array().map(Vec::len), Some(1));
    for i in 0..20 {
        ws.send(Message::Text(format!("over h2 {i}").into())).await.unwrap();
        assert_eq!(next_text(&mut ws).await, format!("over h2 {i}"));
    }

    // Removing the route closes it, as over HTTP/1.1.
    assert!(s.routes.unregister(VMID));
    closes(&mut ws).await;
}

#[tokio::test]
async fn removing_the_route_closes_open_websockets() {
    let s = setup(ProxyConfig::default()).await;
    let mut ws = ws_connect(&s, &format!("http://{}", s.host())).await;
    let mut other = ws_connect(&s, &format!("http://{}", s.host())).await;
    next_text(&mut ws).await;
    next_text(&mut other).await;
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still here");

    assert!(s.routes.unregister(VMID));
    for socket in [&mut ws, &mut other] {
        closes(socket).await;
    }
    let r = s.http.get(s.url("/seen")).header("host", s.host()).send().await.unwrap();
    assert_eq!(r.status(), 404, "no route, no proxying");
}

#[tokio::test]
async fn an_unreachable_code_server_is_a_502_that_reveals_nothing() {
    let s = setup(ProxyConfig { connect_timeout: Duration::from_secs(2), ..Default::default() }).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    s.routes.register(VMID, closed);
    let r = s.http.get(s.url("/seen")).header("host", s.host()).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let body = r.text().await.unwrap();
    assert!(!body.contains("127.0.0.1") && !body.contains(&closed.port().to_string()), "{body}");
}

#[tokio::test]
async fn a_slow_code_server_is_a_504_after_the_response_timeout() {
    let s = setup(ProxyConfig { response_timeout: Duration::from_millis(300), ..Default::default() }).await;
    let started = std::time::Instant::now();
    let r = s.http.get(s.url("/slow")).header("host", s.host()).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < WAIT, "bounded by the configured timeout");
    // A fast answer is not affected by the short timeout.
    let ok = s.http.get(s.url("/seen")).header("host", s.host()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Keep-alive connections to code-server
// ---------------------------------------------------------------------------------------------

/// A stand-in code-server counting the connections it accepts. Without `keep_alive` it answers
/// with `Connection: close`, as a server shedding idle connections does.
async fn counting_upstream(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    let app = Router::new()
        .route("/", any(|| async { "ok" }))
        .route("/empty", get(|| async { axum::http::StatusCode::NO_CONTENT }))
        .route(
            "/big",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let chunks = futures::stream::repeat(chunk).take(1024).map(Ok::<_, std::io::Error>);
                Body::from_stream(chunks)
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A front forwarding everything to `target`; the proxy is returned to look into its pool.
async fn pooled_front(target: SocketAddr) -> (SocketAddr, Proxy) {
    let proxy = Proxy::new(ProxyConfig::default());
    let p = proxy.clone();
    let front = serve(Router::new().fallback(move |req: Request| {
        let p = p.clone();
        async move {
            let fwd = Forward {
                target,
                host: "dev-6001.localhost".into(),
                client_ip: None,
                proto: "http".into(),
                path_and_query: None,
            };
            p.forward(req, fwd, || futures::future::pending().boxed()).await.map(Body::new)
        }
    }))
    .await;
    (front, proxy)
}

#[tokio::test]
async fn requests_in_a_row_share_one_kept_alive_connection() {
    let (target, accepted) = counting_upstream(true).await;
    let (front, proxy) = pooled_front(target).await;
    let http = reqwest::Client::new();
    for i in 0..20 {
        let path = match i % 4 {
            0 => "/empty",
            _ => "/",
        };
        let r =
            if i % 5 == 4 { http.head(format!("http://{front}/")) } else { http.get(format!("http://{front}{path}")) };
        let r = r.send().await.unwrap();
        assert!(r.status().is_success(), "{i}: {}", r.status());
        let body = r.text().await.unwrap();
        assert!(body.is_empty() || body == "ok", "{body}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused, including after empty bodies");
    assert_eq!(proxy.idle_connections(target), 1);
}

#[tokio::test]
async fn a_code_server_closing_its_connections_gets_a_fresh_one_each_time() {
    let (target, accepted) = counting_upstream(false).await;
    let (front, _proxy) = pooled_front(target).await;
    let http = reqwest::Client::new();
    for _ in 0..10 {
        let r = http.get(format!("http://{front}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn a_response_abandoned_midway_does_not_hand_its_connection_on() {
    let (target, accepted) = counting_upstream(true).await;
    let (front, _proxy) = pooled_front(target).await;
    let http = reqwest::Client::new();
    let mut big = http.get(format!("http://{front}/big")).send().await.unwrap();
    assert_eq!(big.status(), 200);
    assert!(!big.chunk().await.unwrap().unwrap().is_empty());
    drop(big);
    // Were the half-read connection reused, this answer would be the rest of the 64 MiB.
    let r = http.get(format!("http://{front}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A stand-in code-server that answers one request per connection with keep-alive, then closes
/// the connection as Node does when its keep-alive time runs out; `closed` hears of each close.
async fn closing_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                drop(stream);
                let _ = closed_tx.send(());
            });
        }
    });
    (addr, accepted, closed)
}

#[tokio::test]
async fn a_kept_alive_connection_closed_while_idle_is_replaced_not_answered_with_502() {
    let (target, accepted, mut closed) = closing_upstream().await;
    let (front, proxy) = pooled_front(target).await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let r = http.get(format!("http://{front}/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        // The close has happened (and reached the proxy's socket) before the next request.
        tokio::time::timeout(WAIT, closed.recv()).await.unwrap().unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a fresh connection for each request");
    assert!(proxy.idle_connections(target) <= 1);
}
